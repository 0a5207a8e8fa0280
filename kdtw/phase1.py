"""Phase 1 (behaviour cloning with the KL oracle, DESIGN.md §4) on R data-parallel ranks.

Each rank runs `LocalLoop`'s own Phase-1 batches and learner; with R > 1 the learner averages
gradients over the ranks (`torch.distributed`, set up by Ray Train's TorchTrainer in
jobs/train_bc.py) and each rank draws its own tasks (seed + rank) for a share of the global
batch. With R = 1 this is exactly `LocalLoop.run`'s Phase 1. The result is a Phase-1 folder
(``student/`` + ``learner.pt``: optimiser state, step) that Phase 2 starts from. No Ray here.
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

from .atomic import recover_dir
from .checkpoint import load_state, save_state
from .config import Config
from .learner import Learner
from .local import LocalLoop
from .models import Student

PHASE1_META = "kdtw_phase1.json"


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


def run_phase1(cfg: Config, *, rank: int = 0, world: int = 1, log: Callable[[str], None] = print,
               on_metrics: Callable[[int, dict], None] | None = None) -> LocalLoop:
    """``train.phase1_steps`` BC steps on this rank; returns the loop (student, learner)."""
    c = rank_config(cfg, world)
    loop = LocalLoop(c, log=log)
    if rank:
        loop.rng = random.Random(cfg.seed + 7919 * rank)
        loop.gen = torch.Generator().manual_seed(cfg.seed + 7919 * rank)
    if world > 1:
        loop.learner = AllReduceLearner(loop.student, targets=loop.table.targets, train_cfg=c.train)
    tc = c.train
    for step in range(tc.phase1_steps):
        m = loop.learner.bc_step(loop.teacher, loop.phase1_batch())
        if on_metrics is not None:
            on_metrics(step + 1, m)
        if rank == 0 and ((step + 1) % tc.log_every == 0 or step + 1 == tc.phase1_steps):
            log(f"[phase 1] step {step + 1}/{tc.phase1_steps} bc loss {m['bc/loss']:.3f} "
                f"call-nll {m['bc/call_nll']:.3f} kl {m['bc/kl']:.3f}")
    return loop


def save_phase1(loop: LocalLoop, folder: str, *, world: int = 1) -> None:
    """Write ``student/``, ``learner.pt`` and the marker file into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    loop.student.save(os.path.join(folder, "student"))
    save_state(loop.learner.state_dict(), os.path.join(folder, "learner.pt"))  # read back without pickle code
    with open(os.path.join(folder, PHASE1_META), "w") as f:
        json.dump({"steps": loop.learner.step, "ranks": world, "config": loop.cfg.name}, f)


def check_phase1(folder: str) -> str:
    """``folder`` if it holds a Phase-1 result, else a one-line error (`CheckpointError` for a
    ``learner.pt`` that is not tensors and plain data)."""
    recover_dir(folder)  # a Phase-1 result whose replacement was killed: the old copy back
    need = [PHASE1_META, "learner.pt", os.path.join("student", "kdtw_student.json")]
    missing = [n for n in need if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(
            f"{folder!r} is not a Phase-1 folder (missing {', '.join(missing)}): give the phase1/ "
            "folder jobs/train_bc.py or jobs/train_pcl.py wrote"
        )
    load_state(os.path.join(folder, "learner.pt"))  # a crafted or damaged file: refused here, before Ray starts
    return folder
