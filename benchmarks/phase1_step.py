"""Seconds per Phase-1 (BC) step: the single-process loop against the job's Ray Train rank, side by
side in one run, alternating, on a profile (default: conf/default.yaml, the README's main command).

    RAY_AUTH_MODE=token python benchmarks/phase1_step.py [--config conf/default.yaml] [--steps 60] [--repeats 2]
        [--warmup 10] [key=value ...]

Both run `kdtw.phase1.run_phase1` on the same config from the pretrained models: the local loop in
this process with the rank's torch threads (``ray.phase1_threads``), the rank as jobs/train_pcl.py
runs it (`actors.phase1_rank.run_bc` on the job's own local Ray, the profile's resources and
``ray.learner_ranks``). Seconds per step are taken from step ``--warmup`` on (the first step
includes the <τ> offset's calibration); the hypervisor's share of the cores (steal, from
/proc/stat) is printed for each run, since it slows one run and not the other. The last line is
the rank's step against the local loop's and the seconds that costs the profile's Phase 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kdtw.config import load_config  # noqa: E402
from throughput import cores, cpu_jiffies  # noqa: E402  (benchmarks/throughput.py: /proc/stat readings)


def stolen(j0) -> float:
    """Cores the hypervisor took since the `cpu_jiffies` reading ``j0`` (nan without /proc)."""
    st = cores(j0, cpu_jiffies())[1]
    return float("nan") if st is None else st


def per_step(times: dict[int, float], warmup: int, steps: int) -> float:
    return (times[steps] - times[warmup]) / (steps - warmup)


def local_run(cfg, warmup: int) -> tuple[float, float]:
    import torch

    from kdtw.phase1 import run_phase1

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.ray.phase1_threads or cfg.ray.torch_threads)
    times: dict[int, float] = {}
    j0 = cpu_jiffies()
    try:
        run_phase1(cfg, log=lambda _: None, on_metrics=lambda step, _: times.__setitem__(step, time.perf_counter()))
    finally:
        torch.set_num_threads(before)
    return per_step(times, warmup, cfg.train.phase1_steps), stolen(j0)


def ray_run(cfg, warmup: int) -> tuple[float, float]:
    from actors.cluster import session
    from actors.phase1_rank import METRICS_FILE, run_bc

    j0 = cpu_jiffies()
    with session(cfg, phases=(1,), beside_teachers=False) as stopper:
        out = run_bc(cfg, log=lambda _: None, stopper=stopper)
    with open(os.path.join(out, METRICS_FILE)) as f:
        times = {r["step"]: r["seconds"] for r in map(json.loads, filter(str.strip, f))}
    return per_step(times, warmup, cfg.train.phase1_steps), stolen(j0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "conf", "default.yaml"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the figure (>= 1)")
    ap.add_argument("--repeats", type=int, default=2, help="local and Ray runs, alternating")
    ap.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "bench_phase1_step"),
                    help="scratch folder of the runs (removed at the end)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        ap.error(f"--warmup must be at least 1 and below --steps ({args.steps})")
    base = os.path.abspath(args.run_dir)
    profile = load_config(args.config, args.overrides)
    over = [*args.overrides, f"train.phase1_steps={args.steps}", "ray.checkpoint_every=0"]
    r = profile.ray
    print(f"{os.path.relpath(args.config, ROOT)}: {args.steps} Phase-1 steps a run, seconds per step from step "
          f"{args.warmup}; {r.phase1_threads or r.torch_threads} torch thread(s), Ray Train: {r.learner_ranks} "
          f"rank(s)", flush=True)
    rows: dict[str, list[tuple[float, float]]] = {"local": [], "ray": []}
    for i in range(args.repeats):
        for kind, run in (("local", local_run), ("ray", ray_run)):
            run_dir = os.path.join(base, f"{kind}{i}")
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = load_config(args.config, [*over, f"run_dir={run_dir}"]).with_absolute_paths()
            s, st = run(cfg, args.warmup)
            rows[kind].append((s, st))
            print(f"   {'single-process loop' if kind == 'local' else 'Ray Train rank':<20} run {i + 1}: "
                  f"{s:.3f} s/step (steal {st:.2f} cores)", flush=True)
    loc = sum(s for s, _ in rows["local"]) / args.repeats
    ray_s = sum(s for s, _ in rows["ray"]) / args.repeats
    n = profile.train.phase1_steps
    print(f"\nmean: single-process loop {loc:.3f} s/step, Ray Train rank {ray_s:.3f} s/step: {ray_s / loc:.2f}x "
          f"the local step, {n * (ray_s - loc):+.0f} s over the profile's {n} Phase-1 steps")
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
