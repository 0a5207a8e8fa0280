"""Phase 1 (behaviour cloning with the KL oracle, DESIGN.md §4) on R data-parallel ranks.

Each rank runs `LocalLoop`'s own Phase-1 batches and learner; with R > 1 the learner averages
gradients over the ranks (`torch.distributed`, set up by Ray Train's TorchTrainer in
jobs/train_bc.py) and each rank draws its own tasks (seed + rank) for a share of the global
batch. With R = 1 this is exactly `LocalLoop.run`'s Phase 1. The result is a Phase-1 folder
(``student/`` + ``learner.pt``: optimiser state, step) that Phase 2 starts from. The same folder,
written atomically with every rank's random state and SHA-256 checksums, is Phase 1's checkpoint:
its marker says how many steps it holds, and ``resume`` continues from it with the steps a Phase 1
never stopped would take. No Ray here.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from typing import Callable

import torch
import torch.distributed as dist

from .atomic import make_tmp_dir, recover_dir, remove_dir, replace_dir
from .checkpoint import (
    CHECKPOINTS,
    LATEST,
    META,
    CheckpointError,
    digests,
    load_state,
    save_state,
    verify_digests,
)
from .config import Config
from .factory import load_teacher
from .learner import Learner
from .local import LocalLoop
from .models import Student
from .reporting import StatusPacer

PHASE1_META = "kdtw_phase1.json"
RNG_FILE = "rng.pt"  # every rank's random state, so a resumed Phase 1 takes the steps an unstopped one would


class AllReduceLearner(Learner):
    """A `Learner` whose optimiser step uses the gradient averaged over all ranks. Ranks start
    from rank 0's weights; after the first step the <τ> offset (calibrated by each rank on its
    own batch) is averaged, so every rank holds the same weights from then on."""

    def __init__(self, student: Student, *, targets: list[float], train_cfg) -> None:
        super().__init__(student, targets=targets, train_cfg=train_cfg)
        with torch.no_grad():
            for p in student.parameters():
                dist.broadcast(p.data, 0)

    def _apply(self, loss: torch.Tensor, phase: str) -> None:
        finite = torch.tensor([1.0 if bool(torch.isfinite(loss)) else 0.0])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0.0:
            raise FloatingPointError(
                f"{phase} loss is not finite on some rank at learner step {self.step}: no update was applied; "
                f"lower train.lr (now {self.cfg.lr}) or train.lambda_max, or turn on train.reward_scaling"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        world = dist.get_world_size()
        for p in self.student.parameters():
            if p.grad is None:  # every rank must join every all_reduce
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if self.step == 0:
            with torch.no_grad():
                dist.all_reduce(self.student.tau_offset.data)
                self.student.tau_offset.data /= world
        self.step += 1


def rank_config(cfg: Config, world: int) -> Config:
    """The config one rank runs: its share of the global batch."""
    c = copy.deepcopy(cfg)
    c.train.batch_size = max(1, math.ceil(cfg.train.batch_size / world))
    return c


def rng_state(loop: LocalLoop) -> dict:
    """The random state this rank's Phase 1 draws from: tasks (``loop.rng``), teacher samples
    (``loop.gen``), both as they were before the batches decoded ahead
    (``train.phase1_demo_steps``) with the number of those already trained on, and torch's
    global generator (dropout). Tensors and plain data only."""
    py, gen, taken = loop.phase1_draw_state()
    return {"python": py, "gen": gen, "torch": torch.get_rng_state(), "phase1_taken": taken}


def set_rng_state(loop: LocalLoop, state: dict) -> None:
    version, internal, gauss = state["python"]
    loop.resume_phase1_draws((version, tuple(internal), gauss), state["gen"], int(state.get("phase1_taken", 0)))
    torch.set_rng_state(state["torch"])


def run_phase1(cfg: Config, *, rank: int = 0, world: int = 1, log: Callable[[str], None] = print,
               on_metrics: Callable[[int, dict], None] | None = None, resume: str | None = None,
               checkpoint_every: int = 0, should_stop: Callable[[], bool] | None = None,
               on_checkpoint: Callable[[LocalLoop, list[dict]], None] | None = None) -> LocalLoop:
    """``train.phase1_steps`` BC steps on this rank; returns the loop (student, learner), whose
    ``learner.step`` is the number of steps done. ``resume``: a Phase-1 folder (`save_phase1`)
    to continue from (weights, optimiser, step and every rank's random state: the same steps as a
    run that was never stopped). Every ``checkpoint_every`` steps, and when ``should_stop()``
    (asked on rank 0 after each step, its answer shared by all ranks) says to stop, rank 0 gets
    ``on_checkpoint(loop, rngs)`` with every rank's random state; a stop then ends the loop."""
    c = rank_config(cfg, world)
    saved = None
    if resume is not None:
        s = c.student
        student = Student.load(os.path.join(resume, "student"), dtype=s.dtype, device=s.device)
        loop = LocalLoop(c, student=student, teacher=load_teacher(c), log=log)
        saved = load_state(os.path.join(resume, "learner.pt"))
    else:
        loop = LocalLoop(c, log=log)
    if rank:
        loop.rng = random.Random(cfg.seed + 7919 * rank)
        loop.gen = torch.Generator().manual_seed(cfg.seed + 7919 * rank)
    if world > 1:
        loop.learner = AllReduceLearner(loop.student, targets=loop.table.targets, train_cfg=c.train)
    if saved is not None:
        loop.learner.load_state_dict(saved)
        rngs = load_state(os.path.join(resume, RNG_FILE)) if os.path.exists(os.path.join(resume, RNG_FILE)) else []
        if len(rngs) == world:
            set_rng_state(loop, rngs[rank])
        elif rank == 0:
            log(f"[phase 1] {resume} was written by {len(rngs) or 'an unknown number of'} rank(s), this run has "
                f"{world}: the ranks go on from fresh random states (not the steps an unstopped run would take)")
        if rank == 0:
            log(f"[phase 1] resumed at step {loop.learner.step}/{c.train.phase1_steps} from {resume}")
    tc = c.train
    stop, pace = False, StatusPacer(tc.log_every, tc.phase1_steps)
    while loop.learner.step < tc.phase1_steps and not stop:
        m = loop.learner.bc_step(loop.teacher, *loop.phase1_batch())
        step = loop.learner.step
        if on_metrics is not None:
            on_metrics(step, m)
        if rank == 0 and pace.due(step):
            log(f"[phase 1] step {step}/{tc.phase1_steps} bc loss {m['bc/loss']:.3f} "
                f"call-nll {m['bc/call_nll']:.3f} kl {m['bc/kl']:.3f}")
        stop = _agree(bool(should_stop and rank == 0 and should_stop()), world)
        due = checkpoint_every > 0 and step % checkpoint_every == 0 and step < tc.phase1_steps
        if (stop or due) and on_checkpoint is not None:
            rngs = _gather(rng_state(loop), world)
            if rank == 0:
                on_checkpoint(loop, rngs)
    return loop


def _agree(flag: bool, world: int) -> bool:
    """Rank 0's decision, on every rank."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gather(state: dict, world: int) -> list[dict]:
    if world == 1:
        return [state]
    out: list = [None] * world
    dist.all_gather_object(out, state)  # in memory between ranks; written to disk as tensors and plain data
    return out


def save_phase1(loop: LocalLoop, folder: str, *, world: int = 1, rngs: list[dict] | None = None,
                extra: dict | None = None, files: dict[str, str] | None = None) -> None:
    """Write ``student/``, ``learner.pt``, the ranks' random states, ``files`` (name -> text) and
    the marker file (steps done, of how many, ``extra``: the MLflow run, the validation before
    training) into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for name, text in (files or {}).items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    loop.student.save(os.path.join(folder, "student"))
    save_state(loop.learner.state_dict(), os.path.join(folder, "learner.pt"))  # read back without pickle code
    save_state(rngs if rngs is not None else [rng_state(loop)], os.path.join(folder, RNG_FILE))
    meta = {"steps": loop.learner.step, "of": loop.cfg.train.phase1_steps, "ranks": world,
            "config": loop.cfg.name, **(extra or {})}
    # integrity (not origin): a truncated or edited file is refused instead of resumed from
    meta["files"] = digests(folder, skip=PHASE1_META)
    with open(os.path.join(folder, PHASE1_META), "w") as f:
        json.dump(meta, f)


def write_phase1(loop: LocalLoop, folder: str, **kw) -> None:
    """`save_phase1` into a temporary sibling, then swapped in (kdtw/atomic.py): a kill at any
    point leaves the previous Phase-1 folder or the new one, whole."""
    recover_dir(folder)
    tmp = make_tmp_dir(folder)
    try:
        save_phase1(loop, tmp, **kw)
        replace_dir(tmp, folder)
    except BaseException:
        remove_dir(tmp)
        raise


def read_phase1(folder: str) -> dict:
    """The marker of a Phase-1 folder (`check_phase1` first)."""
    with open(os.path.join(folder, PHASE1_META)) as f:
        meta = json.load(f)
    meta.setdefault("of", meta.get("steps"))  # folders written before Phase-1 checkpoints were complete
    return meta


def is_complete(meta: dict) -> bool:
    return int(meta["steps"]) >= int(meta["of"])


def check_phase1(folder: str, *, complete: bool = True) -> str:
    """``folder`` if it holds a Phase-1 result (with ``complete=False``: or an unfinished Phase
    1's checkpoint), else a one-line error (`CheckpointError` for a ``learner.pt`` that is not
    tensors and plain data)."""
    recover_dir(folder)  # a Phase-1 result whose replacement was killed: the old copy back
    need = [PHASE1_META, "learner.pt", os.path.join("student", "kdtw_student.json")]
    missing = [n for n in need if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(
            f"{folder!r} is not a Phase-1 folder (missing {', '.join(missing)}): give the phase1/ "
            "folder jobs/train_bc.py or jobs/train_pcl.py wrote"
        )
    load_state(os.path.join(folder, "learner.pt"))  # a crafted or damaged file: refused here, before Ray starts
    if os.path.exists(os.path.join(folder, RNG_FILE)):
        load_state(os.path.join(folder, RNG_FILE))
    try:
        meta = read_phase1(folder)
        steps, of = int(meta["steps"]), int(meta["of"])
        files = dict(meta.get("files") or {})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{os.path.join(folder, PHASE1_META)} is corrupt ({type(e).__name__}: {e})") from None
    verify_digests(folder, files, what=f"Phase-1 folder {folder}")
    if complete and steps < of:
        run_dir = os.path.dirname(os.path.abspath(folder))
        raise ValueError(f"{folder!r} holds an unfinished Phase 1 (step {steps} of {of}): continue it with "
                         f"--resume {run_dir}, or give a finished Phase-1 folder")
    return folder


def phase1_to_resume(path: str) -> str | None:
    """``<path>/phase1`` when ``path`` is a run folder stopped in Phase 1 or before Phase 2's
    first checkpoint (no ``checkpoints/`` to resume from, a Phase-1 folder there), checked with
    `check_phase1`; None otherwise (``--resume`` then looks for a Phase-2 checkpoint)."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, META)):
        return None
    root = os.path.join(path, CHECKPOINTS)
    if os.path.isdir(root) and any(n == LATEST or n.startswith("step_") for n in os.listdir(root)):
        return None
    folder = os.path.join(path, "phase1")
    recover_dir(folder)
    if not os.path.exists(os.path.join(folder, PHASE1_META)):
        return None
    if not os.path.exists(os.path.join(path, "config.yaml")):
        raise CheckpointError(f"{path!r} has a Phase-1 checkpoint but no config.yaml: it is not a run folder "
                              "of jobs/train_pcl.py")
    return check_phase1(folder, complete=False)
