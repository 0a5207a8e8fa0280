"""Rollouts: on-policy student paths with teacher calls, teacher demonstrations, and teacher
scoring of finished paths. Produces `Trajectory` records (DESIGN.md §8)."""

from __future__ import annotations

import random
from typing import Callable

import torch

from .budgets import BudgetTable
from .decoding import DecodeOutput, generate
from .examples import Example
from .models import LM, Student
from .trajectory import Trajectory


@torch.no_grad()
def score_batch(teacher: LM, p_ids: torch.Tensor, p_mask: torch.Tensor, paths: list[list[int]], *,
                top_k: int = 0) -> list:
    """Teacher log p(x_t | s_t) of every token of each path of one batch (one teacher-forced
    forward; prompts already left-padded). With ``top_k`` each entry is ``(logp, topk_ids,
    topk_logp)``, the last two [T][k]."""
    T = max(len(p) for p in paths)
    ids = torch.full((len(paths), T), teacher.pad_id, dtype=torch.long, device=teacher.device)
    for i, p in enumerate(paths):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    logp = torch.log_softmax(teacher.forward(p_ids, p_mask, ids)[..., : teacher.vocab_size].float(), -1)
    tok_logp = logp.gather(-1, ids[..., None]).squeeze(-1)  # [B, T]
    if not top_k:
        return [tok_logp[i, : len(p)].tolist() for i, p in enumerate(paths)]
    top_lp, top_ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)  # [B, T, k]
    return [(tok_logp[i, : len(p)].tolist(), top_ids[i, : len(p)].tolist(), top_lp[i, : len(p)].tolist())
            for i, p in enumerate(paths)]


def score_paths(teacher: LM, prompts: list[str], paths: list[list[int]], *, batch_size: int = 64) -> list[list[float]]:
    """Teacher log p(x_t | s_t) of every token of each finished path (one teacher-forced
    forward per batch)."""
    out: list[list[float]] = []
    for s in range(0, len(paths), batch_size):
        p_ids, p_mask = teacher.encode_prompts(prompts[s : s + batch_size])
        out.extend(score_batch(teacher, p_ids, p_mask, paths[s : s + batch_size]))
    return out


def prompt_ids(lm: LM, prompts: list[str]) -> list[list[int]]:
    ids, mask = lm.encode_prompts(prompts)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def sample_tasks(examples: list[Example], table: BudgetTable, n: int, rng: random.Random,
                 instruction: str) -> tuple[list[str], list[int], list[Example]]:
    """``n`` prompts: random sources, each with a random budget (and the examples drawn)."""
    picks = [rng.choice(examples) for _ in range(n)]
    budget_ids = [rng.randrange(len(table)) for _ in range(n)]
    prompts = [table.prompt(table[b].phrase, instruction, ex.source) for ex, b in zip(picks, budget_ids)]
    return prompts, budget_ids, picks


def student_rollouts(
    student: Student,
    teacher: LM,
    prompts: list[str],
    budget_ids: list[int],
    *,
    max_new_tokens: int,
    use_tau: bool = True,
    temperature: float = 1.0,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    version: int = 0,
    worker_id: int = 0,
    budgets: list[float] | None = None,
    decoded_rule: str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[list[Trajectory], DecodeOutput]:
    """Sampled on-policy paths (teacher tokens sampled at <τ>), scored by the teacher on its
    decode state (``generate(score_teacher=True)``: each output position computed once).
    ``budgets``: each prompt's target (a zero budget decodes with <τ> masked).
    ``decoded_rule``: decode instead as validation does (argmax tokens, the teacher's argmax at
    calls, calls by this rule); the paths are marked ``decoded`` (λ probes, train.decoded_per_budget)."""
    decoded = decoded_rule is not None
    out = generate(
        student, teacher, prompts, mode="budgeted" if use_tau else "student",
        max_new_tokens=max_new_tokens, do_sample=not decoded, temperature=1.0 if decoded else temperature,
        teacher_do_sample=not decoded, batch_size=batch_size, generator=generator, budgets=budgets,
        score_teacher=True, call_rule=decoded_rule or "argmax", on_batch=on_batch,
    )
    t_logp = out.teacher_logp
    src = prompt_ids(student.lm, prompts)
    trajs = [
        Trajectory(
            source_ids=src[i], budget_id=budget_ids[i], tokens=out.tokens[i],
            actions_tau=out.call_mask[i], behaviour_logp=out.behaviour_logp[i],
            teacher_logp=t_logp[i], origin="student", policy_version=version,
            worker_id=worker_id, greedy_tau=out.greedy_tau[i], tau_prob=out.tau_prob[i] if use_tau else [],
            decoded=decoded,
        )
        for i in range(len(prompts))
    ]
    return trajs, out


def teacher_demos(
    teacher: LM,
    prompts: list[str],
    budget_ids: list[int],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    version: int = 0,
    worker_id: int = 0,
    keep_logits: bool = False,
) -> list[Trajectory] | tuple[list[Trajectory], list[torch.Tensor]]:
    """Teacher-sampled paths x ~ p(· | Y): actions are their tokens, c_t = 0 (DESIGN.md §3); their
    log p is the one computed while they were decoded (no second teacher pass). ``keep_logits``:
    also return the teacher's logits [L_i, V] over each path, the distributions its tokens were
    drawn from (`kdtw.learner.Learner.bc_step` reads them instead of a second teacher pass)."""
    out = generate(None, teacher, prompts, mode="teacher", max_new_tokens=max_new_tokens,
                   teacher_do_sample=True, batch_size=batch_size, generator=generator, score_teacher=True,
                   keep_teacher_logits=keep_logits)
    t_logp = out.teacher_logp
    src = prompt_ids(teacher, prompts)
    trajs = [
        Trajectory(
            source_ids=src[i], budget_id=budget_ids[i], tokens=out.tokens[i],
            actions_tau=[False] * len(out.tokens[i]), behaviour_logp=t_logp[i],
            teacher_logp=t_logp[i], origin="teacher_demo", policy_version=version, worker_id=worker_id,
        )
        for i in range(len(prompts))
    ]
    return (trajs, out.teacher_logits) if keep_logits else trajs


DemoFn = Callable[[list[str], list[int], torch.Generator], Callable[[], list[Trajectory]]]


def demo_generator(seed: int) -> torch.Generator:
    """The random stream of a collector's teacher demonstrations (its own, so that they can be
    decoded elsewhere while the student's rollouts run; seeded apart from the rollout stream)."""
    return torch.Generator().manual_seed(seed + 7_777_777)


def demo_batch_size(cfg, steps: int) -> int:
    """The decode batch of a collector's demonstrations of ``steps`` rollout batches, wherever they
    are decoded (through a local teacher or on a replica): ``steps``·decoding.batch_size."""
    return cfg.decoding.batch_size * steps


def start_demos(cfg, teacher: LM, prompts: list[str], budget_ids: list[int], demo_gen: torch.Generator, *,
                steps: int = 1, version: int = 0, worker_id: int = 0,
                elsewhere: DemoFn | None = None) -> Callable[[], list[Trajectory]]:
    """A collector's teacher demonstrations of ``steps`` rollout batches, as a function that
    returns them: started on the teacher's side by ``elsewhere(prompts, budget_ids, demo_gen)``
    (decoded there while the caller goes on), or, without it, decoded through ``teacher`` when the
    function is called, in batches of `demo_batch_size`. `collect` and a resumed `DemoQueue`
    (`DemoQueue.restore`) both decode through here, so the same route gives the same paths."""
    if elsewhere is not None:
        return elsewhere(prompts, budget_ids, demo_gen)
    return lambda: teacher_demos(teacher, prompts, budget_ids, max_new_tokens=cfg.decoding.max_new_tokens,
                                 batch_size=demo_batch_size(cfg, steps), generator=demo_gen, version=version,
                                 worker_id=worker_id)


class DemoQueue:
    """A collector's teacher demonstrations decoded ``steps`` rollout batches at a time
    (``train.phase2_demo_steps``) and handed out one batch per `collect`: the teacher is frozen,
    so demonstrations decoded a few steps early are the same paths' distribution, and the
    teacher decodes them at a better rate in one larger batch (8 demonstrations a step on the
    default profile are few enough that its per-forward overhead dominates). With ``steps`` 1 a
    collect decodes its own, as before the queue.

    `state` is what a checkpoint keeps to resume exactly: the prompts of the batches decoded
    ahead, the demonstration stream's state before they were decoded and how many were handed
    out; `restore` decodes them again from that state (the same paths) and drops those."""

    def __init__(self, steps: int = 1) -> None:
        self.steps = steps
        self.ahead: list[list[Trajectory]] = []
        self.drawn: dict | None = None  # prompts, budget ids and demo_gen state of the ahead batches

    def start(self, prompts: list[str], budget_ids: list[int], demo_gen: torch.Generator) -> None:
        self.drawn = {"prompts": list(prompts), "budget_ids": list(budget_ids), "gen": demo_gen.get_state()}

    def fill(self, demos: list[Trajectory]) -> None:
        n = len(demos) // self.steps
        self.ahead = [demos[i * n:(i + 1) * n] for i in range(self.steps)]

    def take(self, version: int) -> list[Trajectory]:
        """The next batch, labelled with the version it is handed out at (the buffer's staleness
        counts learner versions; a demonstration's behaviour policy is the frozen teacher)."""
        demos = self.ahead.pop(0)
        for t in demos:
            t.policy_version = version
        return demos

    def state(self) -> dict | None:
        if not self.ahead:  # batches ahead were always drawn (`start`) before they were decoded
            return None
        return {**self.drawn, "steps": self.steps, "taken": self.steps - len(self.ahead)}

    def restore(self, state: dict | None, decode: Callable[[list[str], list[int], torch.Generator], list[Trajectory]],
                demo_gen: torch.Generator) -> None:
        """Set what `state` returned: the ahead batches decoded again by ``decode(prompts,
        budget_ids, gen)`` from the saved stream state, the ``taken`` ones dropped; ``demo_gen``
        ends where that decode leaves it (where it stood when the state was saved)."""
        self.ahead, self.drawn = [], None
        if state is None:
            return
        if state["steps"] != self.steps:
            raise ValueError(f"the checkpoint's demonstrations were decoded {state['steps']} steps at a time, "
                             f"not train.phase2_demo_steps={self.steps}: resume with "
                             f"train.phase2_demo_steps={state['steps']}")
        demo_gen.set_state(state["gen"])
        self.start(state["prompts"], state["budget_ids"], demo_gen)
        self.fill(decode(state["prompts"], state["budget_ids"], demo_gen))
        for _ in range(state["taken"]):
            self.ahead.pop(0)


def collect(cfg, student: Student, teacher: LM, train_set: list[Example], table: BudgetTable, *,
            rng: random.Random, gen: torch.Generator, demo_gen: torch.Generator, version: int, worker_id: int = 0,
            demos_elsewhere: DemoFn | None = None,
            demo_queue: DemoQueue | None = None) -> tuple[list[Trajectory], list[Trajectory]]:
    """One rollout batch, the collector of both transports (`kdtw.local.LocalLoop` with a local
    teacher, a Ray rollout worker with a `kdtw.teacher_service.RemoteTeacher`):
    ``train.batch_size`` paths, ``round(batch_size·demo_ratio)`` of them teacher demonstrations,
    plus ``train.decoded_per_budget`` λ probes per nonzero budget among the student paths
    (``decoded``; not trained on). Tasks are drawn from ``rng`` (on-policy ones, then
    demonstration ones, then probes), student actions and
    teacher tokens at calls from ``gen``, demonstrations from ``demo_gen``: the same seeds give the
    same batch on either transport. ``demos_elsewhere(prompts, budget_ids, demo_gen)`` starts the
    demonstrations on the teacher's side (or in a thread of a Ray worker, through the pool) and
    returns a function that waits for them: they are decoded there while the student's rollouts
    run here. Without it they are decoded through
    ``teacher`` after the rollouts. ``demo_queue`` (a `DemoQueue`, kept by the caller across
    calls) decodes them ``train.phase2_demo_steps`` batches at a time: the tasks of all of them
    are drawn from ``rng`` at the call that decodes them; without it each call decodes its own."""
    c, tc = cfg, cfg.train
    n_demo = round(tc.batch_size * tc.demo_ratio)
    n_on = tc.batch_size - n_demo
    queue = demo_queue if demo_queue is not None else DemoQueue()
    prompts, bids, _ = sample_tasks(train_set, table, n_on, rng, c.task.instruction)
    # the demonstrations of queue.steps batches, drawn here when none are left from earlier ones
    refill = bool(n_demo) and not queue.ahead
    pending = None
    if refill:
        d_prompts, d_bids, _ = sample_tasks(train_set, table, n_demo * queue.steps, rng, c.task.instruction)
        queue.start(d_prompts, d_bids, demo_gen)
        pending = start_demos(c, teacher, d_prompts, d_bids, demo_gen, steps=queue.steps, version=version,
                              worker_id=worker_id, elsewhere=demos_elsewhere)
    # λ probes (train.decoded_per_budget): training prompts for every nonzero budget, decoded
    # after the rollouts as validation decodes them; the buffer drops them, the λ estimate reads them
    probe_bids = [k for k in range(len(table)) if table.targets[k] > 0] * tc.decoded_per_budget
    probe_prompts = [table.prompt(table[k].phrase, c.task.instruction, rng.choice(train_set).source)
                     for k in probe_bids]
    trajs = []
    for ps, bs, rule in ((prompts, bids, None), (probe_prompts, probe_bids, c.decoding.call_rule)):
        if ps:
            trajs += student_rollouts(
                student, teacher, ps, bs, max_new_tokens=c.decoding.max_new_tokens, use_tau=tc.use_tau,
                temperature=tc.rollout_temperature, batch_size=c.decoding.batch_size, generator=gen,
                version=version, worker_id=worker_id, budgets=[table.targets[b] for b in bs],
                decoded_rule=rule)[0]
    if pending is not None:  # decoded meanwhile on the teacher's side, or through `teacher` now
        queue.fill(pending())
    return trajs, (queue.take(version) if n_demo else [])
