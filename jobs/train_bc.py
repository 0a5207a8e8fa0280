"""Phase 1 (behaviour cloning with the KL oracle) on Ray Train, data-parallel over R ranks.

    python jobs/train_bc.py --config conf/default.yaml [--overwrite] [key=value ...]
    python jobs/train_bc.py --resume runs/default [key=value ...]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_bc.py --config conf/default.yaml ray.learner_ranks=2

A `TorchTrainer` runs ``ray.learner_ranks`` ranks (gloo on CPU, nccl with ``ray.learner_gpus``);
each rank (actors/phase1_rank.py, which also holds the driver side, `run_bc`) runs `kdtw.phase1.run_phase1` (the local loop's Phase-1
batches; gradients averaged over ranks). Rank 0's result is written to ``<run_dir>/phase1/``
(``student/``, ``learner.pt``): `jobs/train_pcl.py --phase1 <run_dir>/phase1` starts Phase 2 from it, and train_pcl.py runs this
itself when no Phase-1 folder is given. One MLflow run per job (see actors/tracking.py).

Rank 0 writes that folder every ``ray.checkpoint_every`` steps as well. Ctrl-C or SIGTERM: the
step in flight finishes, the folder is written, the MLflow run is marked KILLED and the job exits
130 with the ``--resume`` line that continues it (the same steps as a run never stopped).

A run_dir that holds another run is refused before Ray starts (``--overwrite`` deletes that run's
outputs first). Errors print one line (``kdtw: error: ...``) and exit with status 2.
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
    # a usage error is one line, as every other error
    from kdtw.cli import OneLineParser

    p = OneLineParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML profile (default: conf/default.yaml)")
    p.add_argument("--resume", help="continue a stopped Phase 1: its run folder (holding phase1/ and config.yaml)")
    p.add_argument("--overwrite", action="store_true", help="delete the outputs of an earlier run in run_dir first")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. ray.learner_ranks=2")
    return p


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    # shared by the jobs
    from actors.cluster import guarded, load, resumed_config, session
    from actors.phase1_rank import run_bc

    args = build_parser(prog).parse_args(argv)

    def body() -> int:
        from kdtw.checkpoint import CheckpointError
        from kdtw.cli import _check_run_dir, _clear_run
        from actors.tracking import check_tracking
        from kdtw.factory import check_inputs
        from kdtw.phase1 import check_phase1, read_phase1

        meta, old = None, []
        if args.resume:
            if args.config or args.overwrite:
                raise ValueError("--resume continues a run with its own config: drop --config/--overwrite "
                                 "(key=value overrides still apply)")
            here = os.path.abspath(args.resume)
            if not os.path.exists(os.path.join(here, "config.yaml")):
                raise CheckpointError(f"{args.resume!r} is not a run folder of jobs/train_bc.py (no config.yaml)")
            check_phase1(os.path.join(here, "phase1"), complete=False)
            meta = read_phase1(os.path.join(here, "phase1"))
            cfg = resumed_config(os.path.join(here, "config.yaml"), args.overrides, here).with_absolute_paths()
        else:
            cfg = load(args.config, args.overrides)
            old = _check_run_dir(cfg, overwrite=args.overwrite, resume_with=prog)  # before Ray starts
        check_inputs(cfg)
        check_tracking()
        with session(cfg, phases=(1,), beside_teachers=False) as stopper:  # signals, and a local Ray that ends with the job
            from actors.tracking import tracked

            if old:
                _clear_run(cfg.run_dir, old)
            os.makedirs(cfg.run_dir, exist_ok=True)
            cfg.save(os.path.join(cfg.run_dir, "config.yaml"))
            with tracked(cfg, run_name="train_bc", run_id=(meta or {}).get("mlflow_run_id")) as tracker:
                out = run_bc(cfg, tracker=tracker, resume=os.path.join(cfg.run_dir, "phase1") if meta else None,
                             stopper=stopper, meta={"mlflow_run_id": tracker.run_id})
                tracker.artifact(out, "phase1")
        print(json.dumps({"phase1_dir": out, "mlflow_run_id": tracker.run_id}))
        return 0

    return guarded(body, prog)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
