"""Phase 1 (behaviour cloning with the KL oracle) on Ray Train, data-parallel over R ranks.

    python jobs/train_bc.py --config conf/default.yaml [key=value ...]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_bc.py --config conf/default.yaml ray.learner_ranks=2

A `TorchTrainer` runs ``ray.learner_ranks`` ranks (gloo on CPU, nccl with ``ray.learner_gpus``);
each rank (actors/phase1_rank.py) runs `kdtw.phase1.run_phase1` (the local loop's Phase-1
batches; gradients averaged over ranks). Rank 0's result is written to ``<run_dir>/phase1/``
(``student/``, ``learner.pt``): `jobs/train_pcl.py --phase1 <run_dir>/phase1` starts Phase 2 from it, and train_pcl.py runs this
itself when no Phase-1 folder is given. One MLflow run per job (see actors/tracking.py).

Errors print one line (``kdtw: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PROG = "python jobs/train_bc.py"


def run_bc(cfg, *, tracker=None, log=print) -> str:
    """Run Phase 1 on ``ray.learner_ranks`` ranks; returns ``<run_dir>/phase1``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.phase1_rank import METRICS_FILE, train_loop
    from kdtw.atomic import make_tmp_dir, recover_dir, remove_dir, replace_dir

    r = cfg.ray
    run_dir = os.path.abspath(cfg.run_dir)
    use_gpu = r.learner_gpus > 0
    resources = {"CPU": r.learner_cpus, **({"GPU": r.learner_gpus} if use_gpu else {})}
    log(f"[phase 1] {cfg.train.phase1_steps} BC steps on {r.learner_ranks} Ray Train rank(s) "
        f"({'nccl' if use_gpu else 'gloo'})")
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_loop,
        # the ranks run in Ray Train's own folders: relative paths must not reach them
        train_loop_config={"cfg": cfg.with_absolute_paths()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.learner_ranks, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"phase1-{int(time.time())}", storage_path=os.path.join(run_dir, "ray_train")),
    )
    result = trainer.fit()
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


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML profile (default: conf/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. ray.learner_ranks=2")
    return p


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    import train_pcl  # the shared Ray connection and error handling

    args = build_parser(prog).parse_args(argv)

    def body() -> int:
        cfg = train_pcl.load(args.config, args.overrides)
        train_pcl.connect(cfg)
        from actors.tracking import Tracker

        tracker = Tracker(cfg, run_name="train_bc")
        try:
            out = run_bc(cfg, tracker=tracker)
            tracker.artifact(out, "phase1")
        except BaseException:
            tracker.finish("FAILED")
            raise
        tracker.finish()
        print(json.dumps({"phase1_dir": out, "mlflow_run_id": tracker.run_id}))
        return 0

    return train_pcl.guarded(body)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
