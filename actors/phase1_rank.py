"""Phase 1 on Ray Train. `train_loop` is one rank (`TorchTrainer`): `kdtw.phase1.run_phase1` on
this rank (torch.distributed is already set up by Ray Train). Rank 0 writes ``<run_dir>/phase1/``
(``student/``, ``learner.pt``, every rank's random state and the per-step metrics) atomically
every ``ray.checkpoint_every`` steps, on a stop request and at the end; its marker says how many
steps it holds. `run_bc` is the driver side (jobs/train_bc.py,
and jobs/train_pcl.py before Phase 2): it runs the trainer, passes a Ctrl-C on to the ranks, and
continues an unfinished Phase 1 from that folder."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import ray.train
import torch

from actors.common import on_device
from kdtw.phase1 import check_phase1, is_complete, read_phase1, run_phase1, write_phase1

METRICS_FILE = "phase1_metrics.jsonl"


def train_loop(config: dict) -> None:
    cfg = on_device(config["cfg"], "learner", "student", "teacher")
    torch.set_num_threads(cfg.ray.phase1_threads or cfg.ray.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out, resume = config["out"], config.get("resume")
    rows: list[dict] = []
    if resume and rank == 0 and os.path.exists(os.path.join(resume, METRICS_FILE)):
        with open(os.path.join(resume, METRICS_FILE)) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    t0 = time.perf_counter() - (rows[-1]["seconds"] if rows else 0.0)
    # rank 0 sends its lines to the driver, which prints them: a print here would reach the
    # terminal through Ray's log forwarding, with a prefix, among Ray's own lines (and twice)
    lines = config.get("lines") if rank == 0 else None
    control = config.get("control")

    def log(line: str) -> None:  # run_phase1's status lines come every train.log_every steps or 20 s
        if lines is not None:
            lines.put(line)

    def on_metrics(step: int, m: dict) -> None:
        rows.append({"step": step, "seconds": time.perf_counter() - t0, **m})

    def stopping() -> bool:  # the driver puts one item in the control queue on Ctrl-C / SIGTERM
        return control is not None and not control.empty()

    def checkpoint(loop, rngs: list[dict]) -> None:
        # written by rank 0 straight into <run_dir>/phase1 (the run folder is on storage every
        # node reaches, as Ray Train's own storage_path is), atomically: a kill leaves the last one
        write(loop, rngs)
        log(f"[phase 1] checkpoint at step {loop.learner.step} -> {out}")

    def write(loop, rngs: list[dict] | None) -> None:
        # the marker records the threads each rank ran with (`ray.phase1_threads`): Phase-1 timings read with it
        write_phase1(loop, out, world=world, rngs=rngs, extra={**(config.get("meta") or {}),
                                                                "torch_threads": torch.get_num_threads()},
                     files={METRICS_FILE: "".join(json.dumps(r) + "\n" for r in rows)})

    loop = run_phase1(cfg, rank=rank, world=world, log=log, on_metrics=on_metrics, resume=resume,
                      checkpoint_every=cfg.ray.checkpoint_every, should_stop=stopping, on_checkpoint=checkpoint)
    if rank == 0 and loop.learner.step >= cfg.train.phase1_steps:
        write(loop, None)  # finished: no rank's random state is needed again
    # no ray.train.report: the result is the folder rank 0 wrote (a report only added a line of
    # Ray Train's own to the terminal)


def run_bc(cfg, *, tracker=None, log=print, resume: str | None = None, stopper=None, meta: dict | None = None) -> str:
    """Run Phase 1 on ``ray.learner_ranks`` ranks (from the Phase-1 checkpoint ``resume``, if
    given); returns ``<run_dir>/phase1``. With a ``stopper`` (actors/cluster.py), the first
    signal lets the step in flight finish, writes a checkpoint there and raises `Interrupted`.
    ``meta`` goes into the folder's marker (the MLflow run, the validation before training)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.util.queue import Queue
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.cluster import Interrupted, Stopper

    r = cfg.ray
    run_dir = os.path.abspath(cfg.run_dir)
    out = os.path.join(run_dir, "phase1")
    use_gpu = r.learner_gpus > 0
    resources = {"CPU": r.learner_cpus, **({"GPU": r.learner_gpus} if use_gpu else {})}
    log(f"[phase 1] {cfg.train.phase1_steps} BC steps on {r.learner_ranks} Ray Train rank(s) "
        f"({'nccl' if use_gpu else 'gloo'}, {r.phase1_threads or r.torch_threads} torch thread(s) each), "
        f"a checkpoint every {r.checkpoint_every or 'no'} steps")
    # Ray Train's preemption watcher (one more actor, polled every 5 s, for ray.train.get_preemption_info,
    # which kdtw does not read) is off unless the environment turns it on: it is one of the small
    # daemons that take CPU from a rank on a small machine; read by TorchTrainer.fit
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    t0 = time.perf_counter()
    lines = Queue(actor_options={"num_cpus": 0})  # rank 0's log lines, printed here as they come
    control = Queue(actor_options={"num_cpus": 0})  # one item: stop after the step in flight
    tail = threading.Thread(target=_relay, args=(lines, log), daemon=True)
    tail.start()
    trainer = TorchTrainer(
        train_loop,
        # the ranks run in Ray Train's own folders: relative paths must not reach them
        train_loop_config={"cfg": cfg.with_absolute_paths(), "lines": lines, "control": control, "out": out,
                           "resume": None if resume is None else os.path.abspath(resume), "meta": meta or {}},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.learner_ranks, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"phase1-{int(time.time())}", storage_path=os.path.join(run_dir, "ray_train")),
    )
    try:
        with Stopper.deferred(stopper):
            result = _fit(trainer, stopper, control)
    finally:
        # after the ranks' last line: the relay prints everything before it, then ends (if Ray is
        # already going down, on a signal, the relay's wait fails and it ends as well)
        with contextlib.suppress(Exception):
            lines.put(None)
        tail.join(timeout=5)
        for q in (lines, control):
            try:
                ray.kill(q.actor)
            except Exception:  # Ray already going down (a signal)
                pass
    if result.error is not None:
        raise RuntimeError(f"Phase 1 failed on Ray Train: {result.error}")
    check_phase1(out, complete=False)
    done = read_phase1(out)
    seconds = time.perf_counter() - t0
    if stopper is not None and stopper.requested:  # also when the signal came as the last step ended
        raise Interrupted(stopper.requested, int(done["steps"]), out, run_dir, phase=1)
    if not is_complete(done):
        raise RuntimeError(f"Phase 1 ended at step {done['steps']} of {done['of']} without a stop request")
    if tracker is not None:
        with open(os.path.join(out, METRICS_FILE)) as f:
            for line in f:
                row = json.loads(line)
                tracker.metrics({f"phase1/{k}" if not k.startswith("bc/") else k: v for k, v in row.items()
                                 if k != "step"}, step=row["step"])
        tracker.metrics({"phase1/seconds": seconds}, step=cfg.train.phase1_steps)
    log(f"[phase 1] done in {seconds:.0f}s -> {out}")
    return out


def phase1_for_job(cfg, resume: str | None, *, initial: dict | None, tracker=None, log=print, stopper=None) -> str:
    """Phase 1 as jobs/train_pcl.py runs it: the run's Phase-1 folder ``resume`` when it is
    finished, else `run_bc` (from ``resume``'s step, if given); returns the Phase-1 folder."""
    if resume is not None:
        steps = int(read_phase1(resume)["steps"])
        if steps >= cfg.train.phase1_steps:
            log(f"[resume] Phase 1 finished ({steps} steps, {resume}): Phase 2 starts")
            return resume
    return run_bc(cfg, tracker=tracker, log=log, resume=resume, stopper=stopper,
                  meta={"mlflow_run_id": getattr(tracker, "run_id", None), "initial": initial})


def _relay(lines, log) -> None:
    """Print the lines rank 0 sends until the ``None`` that `run_bc` puts last, or until the queue
    is gone. It waits on the queue: the half-second polling it replaced kept the queue actor and
    this thread at about 0.03 cores during Phase 1."""
    while True:
        try:
            line = lines.get()
        except Exception:  # the queue is gone (Ray shutting down): nothing more to print
            return
        if line is None:
            return
        log(line)


def _fit(trainer, stopper=None, control=None):
    """``trainer.fit()`` in a helper thread, waited for here. Ray Train replaces the process's
    SIGINT handler when fit runs in the main thread, for good (a later Ctrl-C in Phase 2 would
    then reach it instead of the job's `actors.cluster.Stopper`), and its abort ends the job with
    status 1 and no word; from another thread it leaves signals to the job. The first signal
    (``stopper.requested``) is passed to the ranks through ``control``: they finish the step in
    flight, write a checkpoint and return; a second one raises KeyboardInterrupt here."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e

    th = threading.Thread(target=run, name="phase1-fit", daemon=True)
    th.start()
    told = False
    while th.is_alive():
        th.join(timeout=0.5)
        if stopper is not None and stopper.requested and not told and control is not None:
            control.put("stop")
            told = True
    if "error" in box:
        raise box["error"]
    return box["result"]
