"""The single-process training loop: Phase 1 (behaviour cloning with the KL oracle), then
Phase 2 (PCL with a Lagrangian per budget), validation at every budget, checkpoint selection,
export of the selected student, and a JSON report. Synchronous: collect → score → learn → λ.

This is both the debugger and the reference the Ray loop is compared with (same objects, same
math): `run_local(cfg)` or `kdtw train --local --config conf/default.yaml`. Validation,
selection, the log lines, export, report and plot are kdtw/reporting.py's, shared with the Ray job.
"""

from __future__ import annotations

import os
import random
import time
from typing import Callable

import torch

from .budgets import BudgetTable
from .buffer import ReplayBuffer
from .config import Config, check_writable_dir
from .factory import budget_table, load_pair, load_splits
from .learner import Learner, StepStats
from .metrics import primary_metric
from .models import LM, Student
from .reporting import (LoopState, StatusPacer, finish_run, format_step, format_validation, record_validation,
                        trace_entry, validate, validation_examples)
from .rollout import DemoQueue, collect, demo_generator, prompt_ids, sample_tasks, teacher_demos
from .settle import settle_budgets
from .trajectory import Trajectory

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- batches


def reference_paths(student: Student, prompts: list[str], budget_ids: list[int], targets: list[str]) -> list[Trajectory]:
    """Reference targets as Phase-1 paths (train.bc_targets=reference)."""
    lm = student.lm
    src = prompt_ids(lm, prompts)
    out = []
    for i, t in enumerate(targets):
        toks = list(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) + [lm.eos_id]
        out.append(Trajectory(source_ids=src[i], budget_id=budget_ids[i], tokens=toks,
                              actions_tau=[False] * len(toks), behaviour_logp=[0.0] * len(toks),
                              teacher_logp=[0.0] * len(toks), origin="teacher_demo"))
    return out


class LocalLoop:
    """Synchronous reference loop. ``collect`` and ``learn`` are separate so the Ray loop can be
    compared with it step by step (the same rollout, scoring and learner objects)."""

    def __init__(self, cfg: Config, *, teacher: LM | None = None, student: Student | None = None, log: Log = print):
        self.cfg = cfg
        self.log = log
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.demo_gen = demo_generator(cfg.seed)
        self.demo_queue = DemoQueue(cfg.train.phase2_demo_steps)
        if teacher is None or student is None:
            teacher, student = load_pair(cfg)
        self.teacher, self.student = teacher, student
        self.table: BudgetTable = budget_table(cfg)
        splits = load_splits(cfg)
        self.train_set = splits["train"]
        self.val_set = validation_examples(cfg, splits)
        self.learner = Learner(student, targets=self.table.targets, train_cfg=cfg.train)
        tc = cfg.train
        self.buffer = ReplayBuffer(capacity_tokens=tc.buffer_tokens, demo_ratio=tc.demo_ratio,
                                   max_staleness=tc.max_staleness, batch_size=tc.batch_size, seed=cfg.seed)
        self.state = LoopState()
        self.in_phase2 = False
        # Phase-1 batches decoded ahead (train.phase1_demo_steps) and the task and teacher draw
        # states before they were drawn
        self._phase1_ahead: list[tuple[list[Trajectory], list[torch.Tensor]]] = []
        self._phase1_start: tuple | None = None

    # -- phases

    def phase1_batch(self) -> tuple[list[Trajectory], list[torch.Tensor] | None]:
        """One Phase-1 batch: the paths, and the teacher's logits over them where decoding them
        computed those (teacher demonstrations; ``None`` for reference paths): ``bc_step``'s
        arguments after the teacher. Teacher demonstrations are decoded
        ``train.phase1_demo_steps`` batches at a time and handed out one by one."""
        c = self.cfg
        B, k = c.train.batch_size, c.train.phase1_demo_steps
        if c.train.bc_targets == "reference":
            prompts, bids, picks = sample_tasks(self.train_set, self.table, B, self.rng, c.task.instruction)
            return reference_paths(self.student, prompts, bids, [ex.target for ex in picks]), None
        if not self._phase1_ahead:
            self._phase1_start = (self.rng.getstate(), self.gen.get_state())
            prompts, bids, _ = sample_tasks(self.train_set, self.table, k * B, self.rng, c.task.instruction)
            trajs, logits = teacher_demos(self.teacher, prompts, bids, max_new_tokens=c.decoding.max_new_tokens,
                                          batch_size=c.decoding.batch_size * k, generator=self.gen,
                                          keep_logits=True)
            self._phase1_ahead = [(trajs[i * B:(i + 1) * B], logits[i * B:(i + 1) * B]) for i in range(k)]
        return self._phase1_ahead.pop(0)

    def phase1_draw_state(self) -> tuple[tuple, torch.Tensor, int]:
        """Where Phase 1's draws stand, to resume them exactly: the task and teacher random
        states before the batches decoded ahead were drawn, and how many of those were handed
        out (`resume_phase1_draws`); with none ahead, the current states and 0."""
        if self._phase1_ahead:
            py, gen = self._phase1_start
            return py, gen, self.cfg.train.phase1_demo_steps - len(self._phase1_ahead)
        return self.rng.getstate(), self.gen.get_state(), 0

    def resume_phase1_draws(self, py: tuple, gen: torch.Tensor, taken: int) -> None:
        """Set what `phase1_draw_state` returned: the random states, then the ``taken`` batches
        already trained on decoded again (the same paths, drawn from the same states) and
        dropped."""
        self.rng.setstate(py)
        self.gen.set_state(gen)
        self._phase1_ahead = []
        for _ in range(taken):
            self.phase1_batch()

    def collect(self) -> tuple[list[Trajectory], list[Trajectory]]:
        """On-policy student paths and teacher demonstrations for one learner step
        (`kdtw.rollout.collect`, the collector a Ray rollout worker runs too)."""
        return collect(self.cfg, self.student, self.teacher, self.train_set, self.table, rng=self.rng, gen=self.gen,
                       demo_gen=self.demo_gen, version=self.learner.version, demo_queue=self.demo_queue)

    def learn(self, trajs: list[Trajectory], demos: list[Trajectory]) -> StepStats:
        self.buffer.add(trajs + demos)
        batch = self.buffer.sample(self.cfg.train.batch_size, current_version=self.learner.version,
                                   take_newest=self.cfg.train.max_staleness == 0)
        return self.learner.learn(batch, trajs)

    # -- the run

    def run(self, *, should_stop: Callable[[], str | None] | None = None) -> dict:
        """Phase 1, Phase 2, selection, export, report. ``should_stop`` is asked after each
        Phase-2 step (``self.in_phase2`` is set meanwhile); a name (e.g. ``"SIGINT"``) ends Phase 2
        there: the selection among the validations so far is exported and the report says where
        it stopped (``report["stopped"]``). The local loop keeps no training checkpoint to resume."""
        c, tc, log = self.cfg, self.cfg.train, self.log
        check_writable_dir(c.run_dir, "run_dir")  # `kdtw train --local` checks before loading models
        os.makedirs(c.run_dir, exist_ok=True)
        c.save(os.path.join(c.run_dir, "config.yaml"))
        key = primary_metric(c.task.metric)
        t_start = time.perf_counter()

        log(f"[kdtw] teacher {self.teacher.num_parameters() / 1e6:.2f}M, student "
            f"{self.student.lm.num_parameters() / 1e6:.2f}M parameters; {len(self.table)} budgets; "
            f"{len(self.val_set)} validation examples")
        initial = validate(c, self.student, self.teacher, self.val_set, progress=log)
        log("[kdtw] before training (greedy, validation):\n" + format_validation(initial, key))

        t1, pace = time.perf_counter(), StatusPacer(tc.log_every, tc.phase1_steps)
        for step in range(tc.phase1_steps):
            m = self.learner.bc_step(self.teacher, *self.phase1_batch())
            if pace.due(step + 1):
                el = time.perf_counter() - t1
                log(f"[phase 1] step {step + 1}/{tc.phase1_steps} bc loss {m['bc/loss']:.3f} "
                    f"call-nll {m['bc/call_nll']:.3f} kl {m['bc/kl']:.3f} "
                    f"({el:.0f}s, eta {el / (step + 1) * (tc.phase1_steps - step - 1):.0f}s)")
        phase1_seconds = time.perf_counter() - t1
        if tc.phase1_steps:
            v = validate(c, self.student, self.teacher, self.val_set, progress=log)
            self._record(v, "[phase 1] done", step=0, phase=1)

        t2 = time.perf_counter()
        self.learner.start_phase2()
        self.in_phase2, stopped, settled, failed = True, None, None, None
        pace = StatusPacer(tc.log_every, tc.phase2_steps)
        for step in range(tc.phase2_steps):
            try:
                trajs, demos = self.collect()
                st = self.learn(trajs, demos)
            except FloatingPointError as e:  # a loss, the weights or the student's logits gone non-finite
                failed, stopped = e, {"error": str(e), "phase": 2, "step": step}
                log(f"[kdtw] Phase 2 failed at step {step + 1} of {tc.phase2_steps}; exporting the selection "
                    "among the validations so far")
                break
            self.state.losses.append(st.loss)
            self.state.lam_trace.append(trace_entry(step + 1, st))
            if pace.due(step + 1):
                el = time.perf_counter() - t2
                log(f"[phase 2] step {step + 1}/{tc.phase2_steps} " + format_step(st)
                    + f" ({el:.0f}s, eta {el / (step + 1) * (tc.phase2_steps - step - 1):.0f}s)")
            if step + 1 == tc.phase2_steps and tc.settle_probes:
                settled = settle_budgets(c, self.student, self.teacher, self.train_set, self.table, log=log)
                shift = torch.tensor(settled["shift"])
                self.learner.lam += shift  # λ_k and the integral follow the offsets they carry
                self.learner.integral += shift
            if (step + 1) % tc.validate_every == 0 or step + 1 == tc.phase2_steps:
                v = validate(c, self.student, self.teacher, self.val_set, progress=log)
                self._record(v, f"[validate] phase-2 step {step + 1}", step=step + 1, phase=2)
            signame = should_stop() if should_stop is not None else None
            if signame and step + 1 < tc.phase2_steps:
                stopped = {"signal": signame, "phase": 2, "step": step + 1}
                log(f"[kdtw] {signame}: Phase 2 stopped after step {step + 1} of {tc.phase2_steps}; "
                    "exporting the selection among the validations so far")
                break
        self.in_phase2 = False
        phase2_seconds = time.perf_counter() - t2

        report = finish_run(c, self.state, self.table, initial, teacher=self.teacher, val_set=self.val_set, log=log,
                            seconds={"phase1": phase1_seconds, "phase2": phase2_seconds,
                                     "total": time.perf_counter() - t_start},
                            extra={"stopped": stopped, "settled": settled})
        if failed is not None:
            raise failed  # after the export: the command still fails, with the cause
        return report

    def _record(self, v: dict, title: str, *, step: int, phase: int) -> None:
        record_validation(self.cfg, self.state, v, title, step=step, phase=phase, lam=self.learner.lam.tolist(),
                          student=self.student, log=self.log)


def run_local(cfg: Config, *, log: Log = print) -> dict:
    return LocalLoop(cfg, log=log).run()
