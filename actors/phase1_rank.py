"""One Phase-1 rank under Ray Train (`TorchTrainer`, jobs/train_bc.py): `kdtw.phase1.run_phase1`
on this rank (torch.distributed is already set up by Ray Train), rank 0's result reported as a
Ray Train checkpoint (``student/``, ``learner.pt`` and the per-step metrics)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import ray.train
import torch

from actors.common import on_device
from kdtw.phase1 import run_phase1, save_phase1

METRICS_FILE = "phase1_metrics.jsonl"


def train_loop(config: dict) -> None:
    cfg = on_device(config["cfg"], "learner", "student", "teacher")
    torch.set_num_threads(cfg.ray.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rows: list[dict] = []
    t0 = time.perf_counter()

    def on_metrics(step: int, m: dict) -> None:
        rows.append({"step": step, "seconds": time.perf_counter() - t0, **m})

    loop = run_phase1(cfg, rank=rank, world=world, log=print if rank == 0 else (lambda _: None), on_metrics=on_metrics)
    last = {k: v for k, v in (rows[-1] if rows else {}).items() if isinstance(v, (int, float))}
    if rank != 0:
        ray.train.report(last)
        return
    tmp = tempfile.mkdtemp(prefix="kdtw-phase1-")
    try:
        save_phase1(loop, tmp, world=world)
        with open(os.path.join(tmp, METRICS_FILE), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        ray.train.report(last, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
