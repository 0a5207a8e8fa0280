"""Phase 1 (behaviour cloning with the KL oracle) on Ray Train, data-parallel over R ranks.

    python jobs/train_bc.py --config conf/default.yaml [key=value ...]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_bc.py --config conf/default.yaml ray.learner_ranks=2

A `TorchTrainer` runs ``ray.learner_ranks`` ranks (gloo on CPU, nccl with ``ray.learner_gpus``);
each rank (actors/phase1_rank.py, which also holds the driver side, `run_bc`) runs `kdtw.phase1.run_phase1` (the local loop's Phase-1
batches; gradients averaged over ranks). Rank 0's result is written to ``<run_dir>/phase1/``
(``student/``, ``learner.pt``): `jobs/train_pcl.py --phase1 <run_dir>/phase1` starts Phase 2 from it, and train_pcl.py runs this
itself when no Phase-1 folder is given. One MLflow run per job (see actors/tracking.py).

Errors print one line (``kdtw: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PROG = "python jobs/train_bc.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML profile (default: conf/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. ray.learner_ranks=2")
    return p


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    from actors.cluster import connect, guarded, load  # the shared Ray connection and error handling
    from actors.phase1_rank import run_bc

    args = build_parser(prog).parse_args(argv)

    def body() -> int:
        cfg = load(args.config, args.overrides)
        connect(cfg)
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

    return guarded(body, prog)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
