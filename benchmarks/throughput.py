"""Rollout throughput of the Ray loop against the single-process loop, side by side in one run.

    python benchmarks/throughput.py [--config conf/default.yaml] [--scaling-config conf/tiny.yaml] \
        [--steps 40] [--interleave-steps 120] [--alternate-windows 8] [--workers 1,2,4,8] [--latency-ms 50]
        [key=value ...]

Prints four figures (goals from issues 4 and 12 in brackets):

1. trajectories/s of the Ray job as a user runs it (its own local Ray, the profile's resources;
   only Phase 1 and validation are left out, in every loop alike) against the single-process
   loop (`LocalLoop.collect` + `learn`, 1 and 2 torch threads: both ratios printed; 2× the
   one-thread loop is the two cores' limit on paper; what two busy processes get here is measured:
   the one-thread loop in a process of its own, alone and then two of them at once for
   ``--pair-seconds``, their sum against one alone), on ``--config`` (the embedded default with its
   pretrained models when they exist), every loop starting Phase 2 from one Phase-1 result of
   ``--phase1-steps`` BC steps (a student that calls the teacher, past the value warm-up): the
   synchronous loop with one worker and one replica [≥ 1.0×], and the asynchronous setting
   ``--async`` (printed beside its figure) [≥ 1.6×]; with the teacher positions the replicas
   computed per rollout token (prompt + output; 1.0 = each position once), the machine's cores
   busy over the steady part of each Ray run (and those the hypervisor gave to other machines:
   stolen), and the cores each role kept busy there (Ray actors by class, the driver, Ray's
   daemons; /proc) with the CPU milliseconds per trajectory; then the one-thread loop once more,
   after the Ray runs: its ratio to the first is how far the machine's own speed moved while they
   ran (on a shared machine it can move by a third within minutes), and each Ray figure is printed
   again against the mean of the two; and the synchronous loop once more, a step of it and a step
   of the one-thread local loop in turn in one run (the same paths step for step), whose ratio of
   step times the machine's drift moves alike on both sides, over ``--interleave-steps`` steps, with
   two standard errors of the step times' own jitter; and the asynchronous setting once more, in
   windows with the one-thread local loop (its own process) in turn (``--alternate-windows`` of each,
   ``--alternate-seconds`` long: the job pauses between its windows, its rollouts in flight landing
   first, while the local loop steps), whose ratio of trajectories/s the drift moves alike on both
   sides, with two standard errors of the windows' ratios;
2. scaling: trajectories/s with N = 1, 2, 4, 8 rollout workers against one teacher replica (the
   profile's; the header prints the number an override gives) that
   sleeps ``--latency-ms`` before answering each batch (``ray.teacher_latency_ms``; with the
   override ``ray.teacher_latency_floor=true``, takes that long in all, its forward within it), on
   ``--scaling-config``, relative to N = 1 [≥ 0.8·N]; teacher demonstrations go token by token
   through the pool there (``ray.teacher_side_demos=false``: a worker's demonstrations wait on
   the remote teacher ~16 times a rollout batch, in a thread beside its rollouts, which wait on it
   at their calls and scoring);
3. mean teacher batch (worker requests per teacher forward) / concurrent workers, same runs [≥ 0.7];
4. replay-buffer bytes per stored output token: the buffer's own count and the memory Python
   allocates for it (tracemalloc), filled with the single-process run's trajectories, once (a
   young buffer: each stored chunk's fixed cost weighs more) and again and again up to the
   profile's ``train.buffer_tokens`` and past it (the steady state of a run) [≤ 16].

Every Ray run is a real `jobs/train_pcl.py` Phase-2 loop (learner steps, λ, weight publication,
``train.phase1_steps=0``); its throughput counts trajectories pushed to the buffer per second of
loop time after every worker has delivered once (start-up excluded, as the local loop's first
step is). Ray starts once, with as many logical CPUs as the largest run has actors (they share
the machine's real cores). Under ``taskset -c 0`` (one core of two) every process of the run keeps
that affinity; the cores it may use are printed beside the machine's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import queue
import shutil
import statistics
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "jobs")):
    sys.path.insert(0, p)

from kdtw.buffer import ReplayBuffer  # noqa: E402
from kdtw.config import load_config  # noqa: E402
from kdtw.local import LocalLoop  # noqa: E402

# the cores this run may use (its CPU affinity, e.g. under `taskset -c 0`; every process it starts
# inherits it), as against the machine's (os.cpu_count(), what /proc/stat's busy time is shared by)
USABLE = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def phase1_folder(cfg, folder: str, steps: int) -> str:
    """A Phase-1 result of ``steps`` BC steps (the local loop's), written to ``folder`` once and
    reused: every loop starts Phase 2 from it, with a student that calls the teacher as a trained
    one does (an untrained student hardly calls, so its rollouts would cost no teacher round trips)."""
    import torch

    from kdtw.phase1 import is_complete, read_phase1, write_phase1

    if os.path.exists(os.path.join(folder, "kdtw_phase1.json")):
        meta = read_phase1(folder)
        if is_complete(meta) and int(meta["steps"]) == steps and meta.get("config") == cfg.name:
            return folder
    torch.set_num_threads(min(2, USABLE))
    t0 = time.perf_counter()
    loop = LocalLoop(cfg, log=lambda _: None)
    for _ in range(steps):
        loop.learner.bc_step(loop.teacher, *loop.phase1_batch())
    write_phase1(loop, folder)
    print(f"[bench] Phase 1: {steps} BC steps in {time.perf_counter() - t0:.0f} s -> {folder}", flush=True)
    return folder


def local_loop(cfg, phase1: str | None) -> LocalLoop:
    """The single-process loop at the start of Phase 2, from ``phase1`` as the Ray job starts."""
    from kdtw.checkpoint import load_state
    from kdtw.factory import load_teacher
    from kdtw.models import Student

    if phase1 is None:
        loop = LocalLoop(cfg, log=lambda _: None)
    else:
        s = cfg.student
        student = Student.load(os.path.join(phase1, "student"), dtype=s.dtype, device=s.device)
        loop = LocalLoop(cfg, teacher=load_teacher(cfg), student=student, log=lambda _: None)
        loop.learner.load_state_dict(load_state(os.path.join(phase1, "learner.pt")))
    loop.learner.start_phase2()
    return loop


def local_throughput(cfg, steps: int, threads: int, phase1: str | None = None) -> tuple[float, list]:
    """(trajectories/s, the batches) of the single-process loop; prints the cores it kept busy
    and those the hypervisor took meanwhile."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loop = local_loop(cfg, phase1)
        loop.learn(*loop.collect())  # warm-up
        t0, j0 = time.perf_counter(), cpu_jiffies()
        batches = []
        for _ in range(steps):
            trajs, demos = loop.collect()
            loop.learn(trajs, demos)
            batches.append(trajs + demos)
        busy, stolen = cores(j0, cpu_jiffies())
        if busy is not None:
            print(f"[local loop, {threads} thread(s)] cores busy {busy:.2f} (stolen {stolen:.2f})", flush=True)
        return sum(map(len, batches)) / (time.perf_counter() - t0), batches
    finally:
        torch.set_num_threads(before)


def _timed_local(cfg, phase1: str | None, seconds: float, start, out) -> None:
    """A process of `local_pair`: the one-thread local loop, warmed up, then (once every process
    of the pair is ready) steps for ``seconds``; puts its trajectories/s on ``out``."""
    import torch

    torch.set_num_threads(1)
    loop = local_loop(cfg, phase1)
    loop.learn(*loop.collect())  # warm-up
    start.wait()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        trajs, demos = loop.collect()
        loop.learn(trajs, demos)
        n += len(trajs) + len(demos)
    out.put(n / (time.perf_counter() - t0))


def local_pair(cfg, seconds: float, phase1: str | None = None) -> tuple[float, list[float]]:
    """(trajectories/s of the one-thread local loop in a process of its own, alone; those of two
    such processes running at once): how much of 2x two busy processes get on this machine (cores
    that share caches, memory bandwidth or a host's physical core give less). Both processes
    compute the same steps (same seeds); they start together after their warm-up, and each
    measures ``seconds`` of steps (overlapping but for the last step of one)."""
    ctx = multiprocessing.get_context("spawn")

    def run(k: int) -> list[float]:
        start, out = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_timed_local, args=(cfg, phase1, seconds, start, out)) for _ in range(k)]
        for p in procs:
            p.start()
        got, deadline = [], time.monotonic() + 600 + 2 * seconds
        try:
            while len(got) < k:
                try:
                    got.append(out.get(timeout=1.0))
                except queue.Empty:
                    failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if failed or time.monotonic() > deadline:
                        why = f"exited with {failed[0]} (its traceback is above)" if failed else "timed out"
                        raise RuntimeError(f"a local-loop process of the pair {why}") from None
            return got
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()

    alone = run(1)[0]
    return alone, run(2)


def buffer_bytes(cfg, batches: list, *, fill_to: int | None = None) -> tuple[float, float, int]:
    """(columns bytes / token, traced allocation bytes / token, tokens) for these batches; with
    ``fill_to``, the batches added again and again (each time as a newer policy version) into a
    buffer of that capacity until it has evicted for a while: its steady state, where the fixed
    cost of each stored chunk is spread over many more tokens than in a young buffer."""
    tc = cfg.train
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    buf = ReplayBuffer(capacity_tokens=fill_to or 10**9, demo_ratio=tc.demo_ratio, max_staleness=10**6,
                       batch_size=tc.batch_size)
    if fill_to is None:
        for b in batches:
            buf.add(b)
    else:
        version, added = 0, 0
        while added < 2 * fill_to:  # full, then as many tokens again evicted and replaced
            for b in batches:
                buf.add([dataclasses.replace(t, policy_version=version) for t in b])
                version, added = version + 1, added + sum(map(len, b))
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return buf.nbytes() / buf.tokens, traced / buf.tokens, buf.tokens


def cpu_jiffies() -> tuple[int, int, int] | None:
    """(busy, total, stolen) CPU time of the whole machine so far, in jiffies (/proc/stat; None
    elsewhere). ``stolen``: time the hypervisor gave to other machines (a shared host's noise),
    not counted as busy."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    steal = v[7] if len(v) > 7 else 0
    return sum(v[:8]) - idle - steal, sum(v[:8]), steal


def cores(j0, j1) -> tuple[float | None, float | None]:
    """(busy, stolen) cores on average between two `cpu_jiffies` readings ((None, None) without)."""
    if not (j0 and j1 and j1[1] > j0[1]):
        return None, None
    scale = (os.cpu_count() or 1) / (j1[1] - j0[1])
    return (j1[0] - j0[0]) * scale, (j1[2] - j0[2]) * scale


def cpu_by_role() -> dict[str, int]:
    """CPU time (user + system jiffies) of this machine's processes so far, by role: each Ray
    actor by its class (``ray::RolloutWorker`` -> ``RolloutWorker``), this process as ``driver``,
    Ray's own daemons by name, the rest as ``other`` ({} where /proc is missing)."""
    out: dict[str, int] = {}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        cmd, full = args[0], " ".join(args)
        if int(pid) == os.getpid():
            role = "driver"
        elif cmd.startswith("ray::"):  # a Ray worker's title: ray::<Class>[.<method>]
            role = (cmd[5:].split(".")[0].split() or ["ray::"])[0]
        elif os.path.basename(cmd.split()[0] if cmd.strip() else "") in ("gcs_server", "raylet"):
            role = os.path.basename(cmd.split()[0])
        elif "ray" in full and any(w in full for w in ("dashboard", "log_monitor", "runtime_env", "monitor.py")):
            role = "ray daemons"
        else:
            role = "other"
        out[role] = out.get(role, 0) + int(fields[11]) + int(fields[12])  # utime, stime
    return out


def ray_run(cfg, *, own_ray: bool = False, phase1: str | None = None, keep: str | None = None) -> dict:
    """One Phase-2 run of the job (from ``phase1``, if given); ``own_ray``: in a local Ray of its
    own, as the job starts one. ``cpu_busy``: the machine's cores busy on average from the middle
    learner step to the one before the last (every process on the machine: run the benchmark alone).
    ``keep``: a folder the run's report.json is copied into."""
    import ray
    import train_pcl

    # the steady window: from the middle learner step to the one before the last
    n = cfg.train.phase2_steps
    window = (n // 2, n - 2) if n > 3 else ()
    marks = {}  # i -> (the machine's CPU jiffies, CPU by role) after the i-th learner step (from 0)
    steps = [0]

    def hook(_system, _step):
        if steps[0] in window:
            marks[steps[0]] = (cpu_jiffies(), cpu_by_role())
        steps[0] += 1

    try:
        report, _ = train_pcl.train(cfg, phase1=phase1, log=lambda _: None, track=False, hooks=[hook])
    finally:
        if own_ray:
            ray.shutdown()
    (j0, r0), (j1, r1) = (marks[i] for i in window) if len(marks) == 2 else ((None, {}), (None, {}))
    busy, stolen = cores(j0, j1)
    # cores each role kept busy over the same window (sorted, largest first)
    scale = (os.cpu_count() or 1) / (j1[1] - j0[1]) if busy is not None else 0.0
    by_role = sorted(((k, (v - r0.get(k, 0)) * scale) for k, v in r1.items()), key=lambda kv: -kv[1]) if scale else []
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(os.path.join(cfg.run_dir, "report.json"), os.path.join(keep, "report.json"))
    r = report["ray"]
    warm_s, warm_n = r.get("warm_seconds", 0.0), r.get("warm_trajectories", 0)
    nb = max(r["teacher_batches"], 1)
    return {"traj_per_s": (r["trajectories"] - warm_n) / max(r["seconds"] - warm_s, 1e-9),
            "requests_per_batch": r["teacher_requests"] / nb, "rows_per_batch": r["teacher_rows"] / nb,
            "positions_per_token": r.get("rollout_teacher_positions", 0) / max(r.get("rollout_tokens", 0), 1),
            "in_workers": cfg.ray.teacher_in_workers, "replicas": cfg.ray.num_teacher_replicas, "cpu_busy": busy, "cpu_stolen": stolen, "by_role": by_role,
            # per teacher batch: ms waited for more requests once the replica was free, ms to answer
            "wait_ms": 1000 * r.get("teacher_wait_s", 0.0) / nb, "serve_ms": 1000 * r.get("teacher_serve_s", 0.0) / nb,
            "timeouts": r.get("teacher_timeouts", 0) / nb,
            # per request: ms from its arrival to its batch leaving, and the part behind a busy replica
            "queued_ms": 1000 * r.get("teacher_queued_s", 0.0) / max(r["teacher_requests"], 1),
            "behind_ms": 1000 * r.get("teacher_behind_s", 0.0) / max(r["teacher_requests"], 1),
            # a worker's wall time per rollout batch: fetching new weights, decoding, pushing to the buffer
            "worker_ms": {k: 1000 * r.get(f"worker_{k}_s", 0.0) / max(r["rollout_batches"], 1)
                          for k in ("sync", "rollout", "push")}}


def interleaved(cfg, phase1: str | None, *, skip: int = 3) -> dict:
    """The synchronous job (``cfg``: one worker, ``max_staleness`` 0) and the one-thread local
    loop a step of each in turn, in one run: after each learner step of the job (a hook in the
    driver, while its actors wait for the next collect) one local step (collect + learn). Both start
    from ``phase1`` with the same seeds, so they compute the same paths step for step (the parity
    the tests hold) and the ratio of their step times is the ratio of their trajectories/s, with
    the machine's drift shared by both (a step of each every ~1 s). A job step is the time from the
    end of one local step to the start of the next: collect (weights, decoding, push) then learn,
    with the driver's round trips. The first ``skip`` steps of each are left out (start-up, warm-up),
    and the last; the rest is cut to whole periods of the demonstrations' decode. Each step's λ
    of the two are compared (``lambda_apart_steps``: the steps where they differed), the check
    that both did the same work; and what taking turns does to each side: the machine's cores busy
    while each stepped (``cores_busy``) and the local steps' wall time against their thread's CPU
    time (``local_wall_per_cpu``; above 1, the local loop waited for a core)."""
    import ray
    import torch
    import train_pcl

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    loop = local_loop(cfg, phase1)
    job_ms, local_ms, apart = [], [], []  # apart: the steps whose λ differed between the two
    paths = [0]  # paths a step (the same every step: batch, demonstrations and probes)
    local_cpu_ms = []  # the CPU time of the local loop's thread in its steps (wall time above it: waiting for a core)
    last = [None]
    # the machine's busy and total jiffies during the local steps and during the job's (after the
    # first ``skip`` steps): whether anything of the job ran while the local loop stepped
    jiffies = {"local": [0, 0, 0], "job": [0, 0, 0]}  # (busy, total, stolen), summed as `cpu_jiffies` gives them
    mark = [None]

    def count(side, j1, add=True):
        if add and mark[0] is not None and j1 is not None and len(job_ms) > skip:
            jiffies[side] = [a + b - c for a, b, c in zip(jiffies[side], j1, mark[0])]
        mark[0] = j1

    def hook(system, step):
        t0, c0 = time.perf_counter(), time.thread_time()
        count("job", cpu_jiffies(), add=step != cfg.train.phase2_steps)  # the last holds the final validation
        if last[0] is not None:
            job_ms.append(1000 * (t0 - last[0]))
        trajs, demos = loop.collect()
        lam = loop.learn(trajs, demos).lam
        if max(abs(a - b) for a, b in zip(lam, system.lam)) > 1e-5:
            apart.append(step)
        paths[0] = len(trajs) + len(demos)
        t1 = time.perf_counter()
        local_ms.append(1000 * (t1 - t0))
        local_cpu_ms.append(1000 * (time.thread_time() - c0))
        count("local", cpu_jiffies())
        last[0] = t1

    try:
        train_pcl.train(cfg, phase1=phase1, log=lambda _: None, track=False, hooks=[hook])
    finally:
        ray.shutdown()
        torch.set_num_threads(before)
    # job_ms[i] is the job's step i + 1, beside the local loop's local_ms[i + 1]; the job's last step
    # (its final validation and checkpoint run before the hook) is left out with its local step
    job, local, local_cpu = job_ms[skip:-1], local_ms[skip + 1:-1], local_cpu_ms[skip + 1:-1]
    # whole periods of the demonstrations' decode (train.phase2_demo_steps): the local loop decodes
    # them in its step every that many steps, so each side's mean takes every phase alike
    period = cfg.train.phase2_demo_steps
    keep = len(job) - len(job) % period or len(job)
    job, local, local_cpu = job[len(job) - keep:], local[len(local) - keep:], local_cpu[len(local_cpu) - keep:]
    # the steps' own jitter (a job step's time varies by a quarter from one to the next): the ratio
    # of each period's sums, and two standard errors of their mean
    blocks = [sum(local[i:i + period]) / sum(job[i:i + period]) for i in range(0, len(job) - period + 1, period)]
    spread = 2 * statistics.stdev(blocks) / len(blocks) ** 0.5 if len(blocks) > 1 else float("nan")
    return {"steps": len(job), "job_step_ms": job, "local_step_ms": local, "paths_per_step": paths[0],
            "ratio": sum(local) / sum(job), "blocks": len(blocks), "block_steps": period,
            "two_standard_errors": spread, "lambda_apart_steps": apart,
            "local_wall_per_cpu": sum(local) / sum(local_cpu),
            # cores busy on average (the whole machine) while each side stepped
            "cores_busy": {k: cores((0, 0, 0), tuple(v))[0] for k, v in jiffies.items()}}


def _gated_local(cfg, phase1: str | None, go, idle, stop, out) -> None:
    """The process of `alternated`: the one-thread local loop, warmed up, stepping only while ``go``
    is set (``idle`` set while it waits); puts (start, end, trajectories) of each step on ``out``
    (time.monotonic: one clock for every process here), and the CPU time of its thread."""
    import torch

    torch.set_num_threads(1)
    loop = local_loop(cfg, phase1)
    loop.learn(*loop.collect())  # warm-up
    while not stop.is_set():
        if not go.is_set():
            idle.set()
            go.wait(0.2)
            continue
        idle.clear()
        t0, c0 = time.monotonic(), time.thread_time()
        trajs, demos = loop.collect()
        loop.learn(trajs, demos)
        out.put((t0, time.monotonic(), len(trajs) + len(demos), time.thread_time() - c0))


def alternated(cfg, phase1: str | None, *, windows: int, local_s: float, skip: int = 10) -> dict:
    """The asynchronous job (``cfg``, with ``train.phase2_steps`` enough for ``windows`` + 1
    windows of up to (phase2_steps - 2·skip - 1) / windows steps) and the one-thread local loop (a
    process of its own) in turn, in one run: the job runs ``job_steps`` learner steps, then pauses (a hook in its driver
    waits for the rollout batches in flight to land and starts nothing), the local loop steps for
    ``local_s`` seconds (and ends its step), and so on, ``windows`` times. Each side's
    trajectories/s over its own windows; the machine's drift moves both alike (a window of each
    every ~20 s). The job's windows end with its collects draining (workers finishing their batch,
    the learner idle), counted as job time: this leans against the job. ``job_steps`` is chosen
    from a first window of ``skip`` steps' pace to last about ``local_s`` seconds."""
    import ray
    import train_pcl

    ctx = multiprocessing.get_context("spawn")
    go, idle, stop, out = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_gated_local, args=(cfg, phase1, go, idle, stop, out))
    proc.start()
    job = []  # (seconds, trajectories) of each job window
    busy = []  # the machine's cores busy in each local window
    local_windows = []  # (start, end) of each local window
    st = {"t": None, "count": 0, "drained": 0, "steps": 0, "job_steps": None}

    def drain(system) -> int:
        refs = [r for r, (kind, _) in system.inflight.items() if kind == "collect"]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=120)
        return sum(ray.get(r)["paths"] for r in refs)  # landed, counted by the driver after the hook

    def hook(system, step):
        st["steps"] += 1
        if st["t"] is None:
            if step == skip:  # past start-up and every worker's first delivery: the first window starts
                st.update(t=time.monotonic(), count=system.counters["trajectories"], steps=0)
            return
        if len(local_windows) == windows or st["steps"] < (st["job_steps"] or skip):
            return
        drained = drain(system)
        t1 = time.monotonic()
        done = system.counters["trajectories"] - st["count"] + drained - st["drained"]
        job.append((t1 - st["t"], done))
        if st["job_steps"] is None:  # the windows' length from the first one's pace, within the run's steps
            cap = (cfg.train.phase2_steps - 2 * skip - 1) // windows
            st["job_steps"] = min(cap, max(skip, round(skip * local_s / (t1 - st["t"]))))
        if not idle.wait(600):
            raise RuntimeError("the local loop's process did not become ready")
        w0, j0 = time.monotonic(), cpu_jiffies()
        go.set()
        time.sleep(local_s)
        go.clear()
        if not idle.wait(120):
            raise RuntimeError("the local loop's process did not end its step")
        local_windows.append((w0, time.monotonic()))
        busy.append(cores(j0, cpu_jiffies())[0])
        st.update(t=time.monotonic(), count=system.counters["trajectories"], drained=drained, steps=0)

    try:
        train_pcl.train(cfg, phase1=phase1, log=lambda _: None, track=False, hooks=[hook])
    finally:
        ray.shutdown()
        stop.set()
        go.set()
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    steps_done = []
    while True:
        try:
            steps_done.append(out.get_nowait())
        except queue.Empty:
            break
    if len(local_windows) < windows:
        raise RuntimeError(f"only {len(local_windows)} of {windows} windows ran: the job ended first")
    # the job's first window (warm-up, and the one that sets the windows' length) is left out
    job = job[1:]
    local = [[(t1 - t0, n) for t0, t1, n, _ in steps_done if a <= t0 <= b] for a, b in local_windows[1:]]
    cpu = sum(c for t0, _, _, c in steps_done if any(a <= t0 <= b for a, b in local_windows[1:]))
    # each job window against the local window after it
    ratios = [(n / s) / (sum(m for _, m in w) / sum(t for t, _ in w)) for (s, n), w in zip(job, local) if w]
    spread = 2 * statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    job_rate = sum(n for _, n in job) / sum(s for s, _ in job)
    local_rate = sum(n for w in local for _, n in w) / sum(s for w in local for s, _ in w)
    return {"windows": len(ratios), "job_traj_per_s": job_rate, "local_traj_per_s": local_rate,
            "ratio": job_rate / local_rate, "window_ratios": ratios, "two_standard_errors": spread,
            "job_window_s": [s for s, _ in job], "local_window_s": [b - a for a, b in local_windows[1:]],
            "job_steps_per_window": st["job_steps"],
            # what the job's idle processes leave the local loop: the machine's cores busy while it
            # stepped (1.0: its one thread alone) and its steps' wall time against their CPU time
            "local_cores_busy": None if None in busy[1:] else statistics.mean(busy[1:] or [float("nan")]),
            "local_wall_per_cpu": sum(s for w in local for s, _ in w) / max(cpu, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    default = os.path.join(ROOT, "conf", "default.yaml")
    tiny = os.path.join(ROOT, "conf", "tiny.yaml")
    have_default = os.path.exists(os.path.join(ROOT, "models", "default", "teacher", "config.json"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=default if have_default else tiny, help="profile of comparison 1 and 4")
    ap.add_argument("--scaling-config", default=tiny, help="profile of the latency runs (2-3)")
    ap.add_argument("--steps", type=int, default=40, help="learner steps per run (scaling runs: max(steps, 6N))")
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--async", dest="async_", action="append",
                    help="an asynchronous setting of comparison 1 (comma-separated key=value; repeat the option to "
                    "measure several side by side; default: the profile's own ray section)")
    ap.add_argument("--sync", action="append",
                    help="extra settings of the synchronous run (comma-separated key=value; repeat the option to "
                    "measure several side by side)")
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--max-wait-ms", type=float, default=None,
                    help="ray.teacher_max_wait_ms of the latency runs (default: half the latency)")
    ap.add_argument("--phase1-steps", type=int, default=100,
                    help="comparison 1 starts every loop from a Phase 1 of this many BC steps (0: from the "
                    "untrained student, which hardly calls the teacher)")
    ap.add_argument("--pair-seconds", type=float, default=30.0,
                    help="comparison 1 also runs the one-thread local loop alone and two of it at once, each in "
                    "a process of its own, for this long (the two cores' ceiling for two busy processes; 0: skip)")
    ap.add_argument("--interleave-steps", type=int, default=120,
                    help="learner steps of the synchronous job measured a step of it and a step of the local loop "
                         "in turn (0: not measured)")
    ap.add_argument("--alternate-windows", type=int, default=8,
                    help="windows of the asynchronous job and the one-thread local loop in turn (0: not measured)")
    ap.add_argument("--alternate-seconds", type=float, default=10.0, help="seconds of each local window (and about "
                    "each job window)")
    ap.add_argument("--skip-compare", action="store_true", help="only the latency runs (2-3)")
    ap.add_argument("--skip-scaling", action="store_true", help="only comparisons 1 and 4")
    ap.add_argument("--out", default=None,
                    help="folder to keep the figures (throughput.json) and each Ray run's report.json "
                         "(<out>/sync<i>/, async<i>/, scaling_n<N>/) in")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args(argv)
    if 0 < args.interleave_steps < 12:
        ap.error(f"--interleave-steps {args.interleave_steps} leaves too few steps to count after the first and "
                 "the last: use at least 12, or 0 to leave the interleaved comparison out")
    ns = [int(x) for x in args.workers.split(",")]
    run_dir = os.path.join(ROOT, "runs", "bench_throughput")
    # comparison 1 runs the job as a user does: the profile's resources, its own local Ray
    # from a shared Phase-1 result, past the value warm-up (whose steps leave the policy alone)
    user = [f"run_dir={run_dir}", "train.phase1_steps=0", "train.val_examples=2", "train.log_every=100000",
            "ray.checkpoint_every=0", "train.value_warmup_steps=0", *args.overrides]
    # the latency runs put N workers on the cores' logical CPUs (they sleep on the teacher)
    base = [*user, "ray.rollout_worker_cpus=0.1", "ray.teacher_cpus=0.1", "ray.learner_cpus=0.1", "train.max_staleness=8",
            "ray.max_staleness=8"]
    sync_sets = [[x for x in a.split(",") if x] for a in (args.sync or [""])]
    async_sets = [[x for x in a.split(",") if x] for a in (args.async_ or [""])]

    def cfg(path, *extra, over=base):
        return load_config(path, [*over, *extra])

    def keep(label):
        return os.path.join(args.out, label) if args.out else None

    # 1 (local) and 4 first, before Ray's processes exist
    local_by_threads, batches, p1 = {}, None, None
    if not args.skip_compare and args.phase1_steps:
        p1 = phase1_folder(cfg(args.config), os.path.join(run_dir + "_phase1"), args.phase1_steps)
    for t in [] if args.skip_compare else sorted({1, min(2, USABLE)}):
        local_by_threads[t], got = local_throughput(cfg(args.config), args.steps, t, p1)
        batches = batches or got
    pair = None
    if not args.skip_compare and args.pair_seconds > 0:
        pair = local_pair(cfg(args.config), args.pair_seconds, p1)
        print(f"[local loop, 1 thread, own process] alone {pair[0]:.1f}, two at once "
              f"{' + '.join(f'{v:.1f}' for v in pair[1])} trajectories/s", flush=True)
    if not args.skip_compare:
        local = max(local_by_threads.values())
        cols, traced, n_tokens = buffer_bytes(cfg(args.config), batches)
        full = buffer_bytes(cfg(args.config), batches, fill_to=cfg(args.config).train.buffer_tokens)

    sync, fast, again, inter, alt = [], [], None, None, None
    if not args.skip_compare:  # each run starts and stops its own Ray, as the job does
        steps = [f"train.phase2_steps={args.steps}", f"train.validate_every={10 * args.steps}"]
        sync_one = ["train.max_staleness=0", "ray.max_staleness=0", "ray.num_rollout_workers=1", "ray.num_teacher_replicas=1"]
        sync = [ray_run(cfg(args.config, *steps, *sync_one, *a, over=user), own_ray=True,
                        phase1=p1, keep=keep(f"sync{i}")) for i, a in enumerate(sync_sets)]
        fast = [ray_run(cfg(args.config, *steps, *a, over=user), own_ray=True, phase1=p1, keep=keep(f"async{i}"))
                for i, a in enumerate(async_sets)]
        # the 1-thread local loop once more, after the Ray runs: how far the machine's own speed moved
        # while they ran (a shared machine's can move by a third within minutes), so a ratio can be read with it
        again, _ = local_throughput(cfg(args.config), args.steps, 1, p1)
        if args.interleave_steps:  # the same two, a step of each in turn: the drift moves both alike
            inter = interleaved(cfg(args.config, f"train.phase2_steps={args.interleave_steps}",
                                    f"train.validate_every={10 * args.interleave_steps}", *sync_one, over=user), p1)
        if args.alternate_windows:  # the asynchronous job and the local loop, windows of each in turn
            n = 2 * 10 + 1 + args.alternate_windows * 60  # the first window, then up to 60 steps each
            alt = alternated(cfg(args.config, f"train.phase2_steps={n}", f"train.validate_every={10 * n}",
                                 *async_sets[0], over=user), p1, windows=args.alternate_windows,
                             local_s=args.alternate_seconds)
    if args.skip_scaling:
        ns = []

    import ray

    ray.init(num_cpus=max(ns, default=1) + 6, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        wait = args.latency_ms / 2 if args.max_wait_ms is None else args.max_wait_ms
        scaling = {}
        for n in ns:
            steps = max(args.steps, 6 * n)
            scaling[n] = ray_run(cfg(args.scaling_config, f"train.phase2_steps={steps}", f"train.validate_every={steps}",
                                     f"ray.num_rollout_workers={n}", f"train.max_staleness={max(8, 2 * n)}",
                                     f"ray.max_staleness={max(8, 2 * n)}",
                                     f"ray.teacher_latency_ms={args.latency_ms}", f"ray.teacher_max_wait_ms={wait}",
                                     "ray.teacher_side_demos=false"), keep=keep(f"scaling_n{n}"))
    finally:
        ray.shutdown()

    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    busy = lambda r: "-" if r["cpu_busy"] is None else f"{r['cpu_busy']:.2f} ({r['cpu_stolen']:.2f})"  # noqa: E731
    usable = "" if USABLE == os.cpu_count() else f" ({USABLE} usable by this run: its CPU affinity)"
    print(f"\n{os.cpu_count()} CPU cores{usable}; {args.steps} learner steps per run (start-up excluded)")
    if sync:
        one_thread = local_by_threads[1]
        start = (f"from a {args.phase1_steps}-step Phase 1" if p1 else "from the untrained student") + \
            ", train.value_warmup_steps=0"
        print(f"\n1. rollout throughput, {rel(args.config)}, the profile's resources, no added latency, {start}")
        print(f"   {'':<72}{'traj/s':>8}  {'vs 1 thread':>11}  {'vs faster':>9}  goal    cores busy (stolen)  teacher positions / rollout token")
        for t, v in local_by_threads.items():
            print(f"   {f'single-process loop (kdtw/local.py), {t} torch thread(s)':<72}{v:>8.1f}")
        if pair:
            both = sum(pair[1])
            print(f"   {'two 1-thread loops at once, a process each (alone: ' + f'{pair[0]:.1f})':<72}{both:>8.1f}  "
                  f"{both / one_thread:>10.2f}x  {both / local:>8.2f}x  (what two busy processes get here: "
                  f"{both / pair[0]:.2f}x one alone)")
        rows = [(f"sync Ray loop (max_staleness 0), 1 worker, 1 teacher replica{' ' if a else ''}{' '.join(a)}",
                 r, "1.0x", " ".join(["sync", *a])) for a, r in zip(sync_sets, sync)]
        rows += [(f"async Ray loop ({' '.join(a) or 'the profile'})", r, "1.6x", " ".join(["async", *a]))
                 for a, r in zip(async_sets, fast)]
        for name, r, goal, _ in rows:
            v = r["traj_per_s"]
            ppt = f"{r['positions_per_token']:.3f}"
            if r["in_workers"]:  # the replicas computed the demonstrations only, if anything
                ppt = "- (calls and scoring in the workers" + (f"; demonstrations on the replica: {ppt})"
                                                              if r["positions_per_token"] else ")")
            print(f"   {name:<72}{v:>8.1f}  {v / one_thread:>10.2f}x  {v / local:>8.2f}x  >= {goal}  {busy(r):>19}  {ppt}")
        mid = (one_thread + again) / 2
        print(f"   {'single-process loop, 1 torch thread, again after the Ray runs':<72}{again:>8.1f}  "
              f"{again / one_thread:>10.2f}x  (the machine's drift over the comparison; against the mean of the "
              f"two 1-thread runs, {mid:.1f}: " + ", ".join(f"{short} {r['traj_per_s'] / mid:.2f}x"
                                                            for _, r, _, short in rows) + ")")
        if inter:
            j, lo = (sum(v) / len(v) for v in (inter["job_step_ms"], inter["local_step_ms"]))
            apart = inter["lambda_apart_steps"]
            same = "the same λ at every step" if not apart else f"λ apart from step {apart[0]} on: not the same work"
            print(f"   {'sync Ray loop and the 1-thread local loop, a step of each in turn':<72}{'':>8}  "
                  f"{inter['ratio']:>10.2f}x  {'':>9}  >= 1.0x  (one run, the same paths step for step, {same}: "
                  f"{inter['steps']} steps of {inter['paths_per_step']} paths, {j:.0f} ms a job step against "
                  f"{lo:.0f} ms a local one; the drift moves both alike; ±{inter['two_standard_errors']:.2f}: two "
                  f"standard errors over {inter['blocks']} blocks of {inter['block_steps']} steps; cores busy "
                  + " / ".join("-" if v is None else f"{v:.2f}" for v in inter["cores_busy"].values())
                  + f" while the local loop / the job stepped; the local steps' wall time "
                  f"{inter['local_wall_per_cpu']:.2f}x their thread's CPU time)")
        if alt:
            print(f"   {'async Ray loop and the 1-thread local loop, windows of each in turn':<72}{'':>8}  "
                  f"{alt['ratio']:>10.2f}x  {'':>9}  >= 1.6x  (one run: {alt['job_traj_per_s']:.1f} against "
                  f"{alt['local_traj_per_s']:.1f} trajectories/s over {alt['windows']} windows of each, "
                  f"{statistics.mean(alt['job_window_s']):.1f} s of the job ({alt['job_steps_per_window']} steps, "
                  f"ending with its rollouts in flight landing) and {statistics.mean(alt['local_window_s']):.1f} s of "
                  f"the local loop in turn; the drift moves both alike; ±{alt['two_standard_errors']:.2f}: two standard "
                  f"errors of the windows' ratios, " + " ".join(f"{r:.2f}" for r in alt["window_ratios"])
                  + "; cores busy " + ("-" if alt["local_cores_busy"] is None else f"{alt['local_cores_busy']:.2f}")
                  + " while the local loop stepped, its steps' wall time "
                  f"{alt['local_wall_per_cpu']:.2f}x their thread's CPU time)")
        print("   cores busy by role (same window) and CPU ms per trajectory (the 1-thread local loop: "
              f"{1000 / one_thread:.1f} ms, one core):")
        for name, r, _, _ in rows:
            roles = ", ".join(f"{k} {c:.2f}" for k, c in r["by_role"] if c >= 0.005)
            ms = 1000 * r["cpu_busy"] / r["traj_per_s"] if r["cpu_busy"] else float("nan")
            w = r["worker_ms"]
            print(f"   {name[:40]:<40} {ms:5.1f} ms/traj: {roles}; a worker's rollout batch: weights "
                  f"{w['sync']:.0f} ms, decoding {w['rollout']:.0f} ms, push {w['push']:.0f} ms")
    if not scaling:
        ns = []
    one = scaling[ns[0]]["traj_per_s"] / ns[0] if ns else 0.0
    if ns:
        reps = scaling[ns[0]]["replicas"]  # the profile's, unless an override set it
        how = ("the whole answer, its forward within: ray.teacher_latency_floor"
               if cfg(args.scaling_config).ray.teacher_latency_floor else "slept before its forward")
        print(f"\n2-3. {rel(args.scaling_config)}, teacher latency {args.latency_ms:.0f} ms per batch ({how}), "
              f"{reps} teacher replica{'s' if reps > 1 else ''}, "
              f"ray.teacher_max_wait_ms={wait:g}")
        print("   workers    traj/s   speed-up   /N (goal >= 0.8)   teacher batch / workers (goal >= 0.7)"
              f"   cores busy (of {os.cpu_count()}; stolen)   per batch: ms waiting / ms answering, share left at max wait"
              "   per request: ms queued (of them behind the busy replica)")
    for n, r in scaling.items():
        up = r["traj_per_s"] / one
        print(f"   {n:>7} {r['traj_per_s']:>9.1f} {up:>9.2f}x {up / n:>10.2f}         "
              f"{r['requests_per_batch']:>5.2f} / {n} = {r['requests_per_batch'] / n:.2f}"
              f"   ({r['rows_per_batch']:.1f} sequences per forward)   {busy(r)}"
              f"   {r['wait_ms']:.1f} / {r['serve_ms']:.1f}, {r['timeouts']:.2f}"
              f"   {r['queued_ms']:.1f} ({r['behind_ms']:.1f})")
    for n, r in scaling.items():
        print(f"   cores busy by role, {n} worker(s): " + ", ".join(f"{k} {c:.2f}" for k, c in r["by_role"] if c >= 0.005))
    if ns and scaling[ns[0]]["worker_ms"]["rollout"] > 0 and scaling[ns[0]]["serve_ms"] > 0:
        # a worker's rollout batch as a chain of teacher round trips: as many at every N as at the
        # first (its demonstrations' steps, or its calls and scoring); what a round trip costs at N,
        # queued + answering + the rest (the worker's side: from an answer to its next request)
        r1 = scaling[ns[0]]
        chain = r1["worker_ms"]["rollout"] / (r1["queued_ms"] + r1["serve_ms"])
        print(f"   a worker's rollout batch as {chain:.1f} teacher round trips (N = {ns[0]}'s), ms a round trip: "
              + "; ".join(f"N = {n} {r['worker_ms']['rollout'] / chain:.1f} = {r['queued_ms']:.1f} queued + "
                          f"{r['serve_ms']:.1f} answering + "
                          f"{r['worker_ms']['rollout'] / chain - r['queued_ms'] - r['serve_ms']:.1f} the rest"
                          for n, r in scaling.items()))
    if sync:
        print(f"\n4. replay buffer, {rel(args.config)} trajectories ({n_tokens} output tokens): "
              f"{cols:.2f} bytes/token in its columns, {traced:.2f} bytes/token allocated (goal <= 16)")
        print(f"   the same trajectories again and again into a buffer of the profile's capacity "
              f"(train.buffer_tokens, {full[2]} tokens held): {full[0]:.2f} bytes/token in its columns, "
              f"{full[1]:.2f} allocated (goal <= 16)")
    if args.out:  # the figures printed above, to recompute them from
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "throughput.json"), "w") as f:
            json.dump({"argv": argv if argv is not None else sys.argv[1:], "cpu_count": os.cpu_count(),
                       "usable_cores": USABLE,
                       "local_traj_per_s": {str(t): v for t, v in local_by_threads.items()},
                       "local_1_thread_after_ray": again,
                       "local_pair": None if pair is None else {"seconds": args.pair_seconds, "alone": pair[0],
                                                                "two_at_once": pair[1]},
                       "sync": dict(zip((" ".join(a) for a in sync_sets), sync)),
                       "async": dict(zip((" ".join(a) for a in async_sets), fast)),
                       "sync_interleaved": inter,
                       "async_alternated": alt,
                       "scaling": {str(n): r for n, r in scaling.items()},
                       "buffer": None if not sync else {"tokens": n_tokens, "columns": cols, "allocated": traced,
                                                        "at_capacity": dict(zip(("columns", "allocated", "tokens"),
                                                                                full))}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
