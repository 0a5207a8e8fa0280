"""Phase 1 on Ray Train. `train_loop` is one rank (`TorchTrainer`): `kdtw.phase1.run_phase1` on
this rank (torch.distributed is already set up by Ray Train), rank 0's result reported as a Ray
Train checkpoint (``student/``, ``learner.pt`` and the per-step metrics). `run_bc` is the driver
side (jobs/train_bc.py, and jobs/train_pcl.py before Phase 2): it runs the trainer and writes
``<run_dir>/phase1/`` atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time

import ray.train
import torch

from actors.common import on_device
from kdtw.phase1 import run_phase1, save_phase1

METRICS_FILE = "phase1_metrics.jsonl"
STATUS_EVERY_S = 30.0  # a status line at least this often, between the log_every lines


def train_loop(config: dict) -> None:
    cfg = on_device(config["cfg"], "learner", "student", "teacher")
    torch.set_num_threads(cfg.ray.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rows: list[dict] = []
    t0 = time.perf_counter()
    # rank 0 sends its lines to the driver, which prints them: a print here would reach the
    # terminal through Ray's log forwarding, with a prefix, among Ray's own lines (and twice)
    lines = config.get("lines") if rank == 0 else None
    logged_at = [time.perf_counter()]

    def log(line: str) -> None:
        if lines is not None:
            lines.put(line)
            logged_at[0] = time.perf_counter()

    def on_metrics(step: int, m: dict) -> None:
        now = time.perf_counter()
        rows.append({"step": step, "seconds": now - t0, **m})
        if now - logged_at[0] >= STATUS_EVERY_S:
            log(f"[phase 1] step {step}/{cfg.train.phase1_steps} bc loss {m['bc/loss']:.3f} ({now - t0:.0f} s)")

    loop = run_phase1(cfg, rank=rank, world=world, log=log, on_metrics=on_metrics)
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


def run_bc(cfg, *, tracker=None, log=print) -> str:
    """Run Phase 1 on ``ray.learner_ranks`` ranks; returns ``<run_dir>/phase1``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.util.queue import Queue
    from ray.train.torch import TorchConfig, TorchTrainer

    from kdtw.atomic import make_tmp_dir, recover_dir, remove_dir, replace_dir

    r = cfg.ray
    run_dir = os.path.abspath(cfg.run_dir)
    use_gpu = r.learner_gpus > 0
    resources = {"CPU": r.learner_cpus, **({"GPU": r.learner_gpus} if use_gpu else {})}
    log(f"[phase 1] {cfg.train.phase1_steps} BC steps on {r.learner_ranks} Ray Train rank(s) "
        f"({'nccl' if use_gpu else 'gloo'})")
    t0 = time.perf_counter()
    lines = Queue(actor_options={"num_cpus": 0})  # rank 0's log lines, printed here as they come
    stop = threading.Event()
    tail = threading.Thread(target=_relay, args=(lines, log, stop), daemon=True)
    tail.start()
    trainer = TorchTrainer(
        train_loop,
        # the ranks run in Ray Train's own folders: relative paths must not reach them
        train_loop_config={"cfg": cfg.with_absolute_paths(), "lines": lines},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.learner_ranks, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"phase1-{int(time.time())}", storage_path=os.path.join(run_dir, "ray_train")),
    )
    try:
        result = _fit(trainer)
    finally:
        stop.set()
        tail.join(timeout=5)
        try:
            ray.kill(lines.actor)
        except Exception:  # Ray already going down (a signal)
            pass
    if result.checkpoint is None:
        raise RuntimeError(f"Phase 1 produced no checkpoint (Ray Train error: {result.error})")
    out = os.path.join(run_dir, "phase1")
    recover_dir(out)
    tmp = make_tmp_dir(out)
    try:
        with result.checkpoint.as_directory() as d:
            shutil.copytree(d, tmp, dirs_exist_ok=True)
        replace_dir(tmp, out)  # an earlier Phase-1 result is set aside, never deleted first
    except BaseException:
        remove_dir(tmp)
        raise
    seconds = time.perf_counter() - t0
    if tracker is not None:
        with open(os.path.join(out, METRICS_FILE)) as f:
            for line in f:
                row = json.loads(line)
                tracker.metrics({f"phase1/{k}" if not k.startswith("bc/") else k: v for k, v in row.items()
                                 if k != "step"}, step=row["step"])
        tracker.metrics({"phase1/seconds": seconds}, step=cfg.train.phase1_steps)
    log(f"[phase 1] done in {seconds:.0f}s -> {out}")
    return out


def _relay(lines, log, stop: threading.Event) -> None:
    """Print the lines rank 0 sends until ``stop``, then the ones still queued."""
    from ray.util.queue import Empty

    while True:
        try:
            log(lines.get(timeout=0.5))
        except Empty:
            if stop.is_set():
                return
        except Exception:  # the queue is gone (Ray shutting down): nothing more to print
            return


def _fit(trainer):
    """``trainer.fit()`` in a helper thread, waited for here. Ray Train replaces the process's
    SIGINT handler when fit runs in the main thread, for good (a later Ctrl-C in Phase 2 would
    then reach it instead of the job's `actors.cluster.Stopper`), and its abort ends the job with
    status 1 and no word; from another thread it leaves signals to the job, whose handler raises
    KeyboardInterrupt here."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e

    th = threading.Thread(target=run, name="phase1-fit", daemon=True)
    th.start()
    while th.is_alive():
        th.join(timeout=0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]
