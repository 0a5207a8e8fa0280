"""Seconds per Phase-2 learner step: the single-process loop against the synchronous Ray job, side
by side in one run, on a profile (default: the real one, conf/smollm2_bible_en_es.yaml).

    python benchmarks/phase2_step.py [--config conf/smollm2_bible_en_es.yaml] [--steps 4] [key=value ...]

Both start from the profile's Phase-1 start point (``train.phase1_steps=0``: the pretrained
student), run ``--steps`` Phase-2 steps (collect + learn) after one warm-up step, without
validation; the Ray run is the job as a user runs it (its own local Ray, the profile's
resources, ``train.max_staleness=0``, one worker, one replica). Prints seconds per step of each
and the teacher positions the replicas computed per rollout token.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "jobs")):
    sys.path.insert(0, p)

from kdtw.config import load_config  # noqa: E402
from kdtw.local import LocalLoop  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "conf", "smollm2_bible_en_es.yaml"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    run_dir = os.path.join(ROOT, "runs", "bench_phase2_step")
    over = [f"run_dir={run_dir}", "train.phase1_steps=0", "train.val_examples=2", "ray.checkpoint_every=0",
            "train.max_staleness=0", "ray.num_rollout_workers=1", "ray.num_teacher_replicas=1", *args.overrides]

    t = time.perf_counter()
    loop = LocalLoop(load_config(args.config, over), log=lambda _: None)
    loop.learner.start_phase2()
    print(f"local loop loaded in {time.perf_counter() - t:.0f} s", flush=True)
    loop.learn(*loop.collect())  # warm-up
    t = time.perf_counter()
    for i in range(args.steps):
        loop.learn(*loop.collect())
        print(f"  local step {i + 1}: {time.perf_counter() - t:.1f} s", flush=True)
    local = (time.perf_counter() - t) / args.steps
    del loop

    import ray
    import train_pcl

    n = args.steps + 1
    cfg = load_config(args.config, [*over, f"train.phase2_steps={n}", f"train.validate_every={10 * n}"])
    t = time.perf_counter()
    try:
        report, _ = train_pcl.train(cfg, log=lambda s: print("  " + s, flush=True) if "step" in s else None, track=False)
    finally:
        ray.shutdown()
    r = report["ray"]
    warm_s, warm_n = r.get("warm_seconds", 0.0), r.get("warm_trajectories", 0)
    steps_after_warm = max(r["rollout_batches"] - 1, 1) if warm_n else r["rollout_batches"]
    per_step = (r["seconds"] - warm_s) / steps_after_warm
    ppt = r["rollout_teacher_positions"] / max(r["rollout_tokens"], 1)
    print(f"\n{os.path.relpath(args.config, ROOT)}, {args.steps} Phase-2 steps after a warm-up, no validation")
    print(f"   single-process loop           {local:7.1f} s/step")
    print(f"   sync Ray job, 1 worker         {per_step:7.1f} s/step   {per_step / local:.2f}x the local step "
          f"(goal <= 1.0x); teacher positions / rollout token {ppt:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
