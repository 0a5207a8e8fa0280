"""Evaluate a τ-student's quality-latency frontier against its baselines; log to MLflow.

    python jobs/evaluate.py --config conf/tiny.yaml --student PATH --drafter PATH --out DIR \
        [--split validation] [--n N] [--ks 1,2,3,5,7] [key=value ...]

Decodes the split with the student alone, the teacher alone, budgeted decoding at every budget
(plain and strict) and speculative decoding with each K (greedy and sampled); see
kdtw/evaluation.py for the columns and how latency is measured. Writes results.csv,
results.json, frontier.png, verdict.txt and command.txt into --out, and logs one MLflow run
(experiment = the config's name): the flattened config as params, one metric per row and column
(``budgeted/light/bleu``), the files as artifacts.

--student: a kdtw student folder (Student.load); default: the config's student
(kdtw.factory.load_student). --drafter: a student folder or a plain model folder; default: the
student with <τ> masked (a stand-in: the proper drafter is the DistillSpec student trained with
train.use_tau=false).

MLflow: MLFLOW_TRACKING_URI where set, else sqlite:///<run_dir>/mlflow.db (MLflow 3.17 refuses
the plain ./mlruns file store unless MLFLOW_ALLOW_FILE_STORE=true); with a sqlite store the
artifacts go to mlartifacts/ next to the database file.

Errors print one line (``kdtw: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
from typing import Any

PROG = "python jobs/evaluate.py"
FILES = ("results.csv", "results.json", "frontier.png", "verdict.txt", "command.txt")
_MLFLOW_BAD = re.compile(r"[^\w\-. :/]")  # MLflow keys: alphanumerics, _ - . space : /
PARAM_MAX = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """MLflow could not record the run (the result files are already written)."""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML profile (default: conf/default.yaml)")
    p.add_argument("--student", help="kdtw student folder (default: the config's student)")
    p.add_argument("--drafter", help="drafter folder: a student or a plain model (default: the student, <τ> masked)")
    p.add_argument("--out", required=True, help="output folder for results, plot, verdict, command")
    p.add_argument("--split", default="validation")
    p.add_argument("--n", type=int, default=None, help="first N examples only")
    p.add_argument("--ks", default="1,2,3,5,7", help="speculative block sizes, comma-separated")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. seed=3")
    return p


def _ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ks {text!r}: give comma-separated integers, e.g. 1,2,3") from None
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"--ks {text!r}: every K must be >= 1")
    return ks


def load_drafter(path: str, cfg) -> Any:
    """A kdtw student folder (its <τ> is masked by speculative decoding) or a plain model folder."""
    from kdtw.models import STUDENT_META, ModelError, Student, load_lm

    if not os.path.isdir(path):
        raise ModelError(f"--drafter {path!r} is not a folder (give a student or a model folder)")
    spec = cfg.student
    if os.path.exists(os.path.join(path, STUDENT_META)):
        return Student.load(path, dtype=spec.dtype, device=spec.device)
    return load_lm(path, dtype=spec.dtype, device=spec.device)


def _key(text: str) -> str:
    return _MLFLOW_BAD.sub("_", text)


def tracking_uri(cfg) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    os.makedirs(cfg.run_dir, exist_ok=True)
    return "sqlite:///" + os.path.abspath(os.path.join(cfg.run_dir, "mlflow.db"))


def _artifact_location(uri: str) -> str | None:
    """Next to a sqlite database (MLflow would otherwise write ./mlruns under the cwd)."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        return os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
    return None


def log_mlflow(cfg, result, out_dir: str, *, extra_params: dict) -> str:
    """One MLflow run: params, metrics, artifacts. Returns the run id."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import mlflow
    from mlflow.exceptions import MlflowException

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    params = {**cfg.flat(), **extra_params}
    try:
        if mlflow.get_experiment_by_name(cfg.name) is None:
            mlflow.create_experiment(cfg.name, artifact_location=_artifact_location(uri))
        mlflow.set_experiment(cfg.name)
        with mlflow.start_run(run_name=f"eval-{result.info.get('split', '')}") as run:
            mlflow.log_params({_key(k): str(v)[:PARAM_MAX] for k, v in params.items()})
            mlflow.log_metrics({_key(k): v for k, v in result.metrics().items()})
            for name in FILES:
                mlflow.log_artifact(os.path.join(out_dir, name))
            return run.info.run_id
    except MlflowException as e:
        raise TrackingError(f"MLflow ({uri}): {e} (results are in {out_dir})") from None


def run(args, argv: list[str], prog: str) -> int:
    from kdtw.config import load_config
    from kdtw.evaluation import evaluate_frontier
    from kdtw.factory import load_student, load_teacher
    from kdtw.models import Student

    path = args.config
    if path is None:
        from kdtw.cli import DEFAULT_CONFIG

        path = DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None
    cfg = load_config(path, args.overrides)
    ks = _ks(args.ks)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in a job log
    teacher = load_teacher(cfg)
    if args.student:
        student = Student.load(args.student, dtype=cfg.student.dtype, device=cfg.student.device)
    else:
        student = load_student(cfg, teacher)
    if args.drafter:
        drafter = load_drafter(args.drafter, cfg)
    else:
        print("kdtw: warning: no --drafter: speculative decoding drafts with the τ-student, <τ> "
              "masked; the proper drafter is the DistillSpec student trained with "
              "train.use_tau=false", file=sys.stderr)
        drafter = None
    result = evaluate_frontier(cfg, teacher, student, drafter, split=args.split, n=args.n, ks=ks)

    out = args.out
    os.makedirs(out, exist_ok=True)
    result.to_csv(os.path.join(out, "results.csv"))
    result.to_json(os.path.join(out, "results.json"))
    result.plot(os.path.join(out, "frontier.png"))
    with open(os.path.join(out, "verdict.txt"), "w") as f:
        f.write(result.verdict + "\n")
    with open(os.path.join(out, "command.txt"), "w") as f:
        f.write(f"{prog} {shlex.join(argv)}".strip() + "\n")
    extra = {"eval.student": args.student or "(config)", "eval.drafter": args.drafter or "(student, <τ> masked)",
             "eval.split": args.split, "eval.n": result.info["n"], "eval.ks": ",".join(map(str, ks))}
    run_id = log_mlflow(cfg, result, out, extra_params=extra)
    print(f"[eval] wrote {', '.join(FILES)} to {out}; MLflow run {run_id} ({tracking_uri(cfg)})")
    return 0


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Entry point; ``prog`` is the command recorded in command.txt (e.g. "kdtw eval")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    from kdtw.cli import errors as input_errors

    # the classes `kdtw` (kdtw.cli.main) reports as one line, plus MLflow failures
    errors = (*input_errors(), TrackingError)
    try:
        return run(args, argv, prog)
    except errors as e:
        msg = " ".join(str(e).split("\n"))
        print(f"kdtw: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdtw: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
