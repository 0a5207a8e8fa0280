"""Evaluate a τ-student's quality-latency frontier against its baselines; log to MLflow.

    python jobs/evaluate.py --config conf/tiny.yaml --student PATH --drafter PATH --out DIR \
        [--split validation] [--n N] [--ks 1,2,3,5,7] [--call-rules argmax,sample,systematic,threshold] \
        [--no-oracle] [--calib-n N] [--thresholds FILE] [key=value ...]

Decodes the split with the student alone, the teacher alone, budgeted decoding at every budget
(the configured call rule ``decoding.call_rule``, plain and strict; each other learned call rule
of --call-rules), the KL oracle caller at every budget (unless --no-oracle) and speculative
decoding with each K (greedy and sampled); see kdtw/evaluation.py for the columns and how
latency is measured. Writes results.csv, results.json, frontier.png, verdict.txt, command.txt
and the call thresholds used (call_thresholds.json, when the threshold or oracle rule ran) into
--out (refused where it holds an earlier evaluation's files, unless --overwrite; each file
written whole), and logs one MLflow run (experiment = the config's name): the flattened config as params,
one metric per row and column (``budgeted/light/bleu``), the files as artifacts.

Thresholds of the threshold and oracle rules: --thresholds FILE, else the student folder's
call_thresholds.json, else calibrated on --calib-n examples spread over the validation split
(default: --n) so that each budget's use is its target there (kdtw/calibration.py).

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
THRESHOLDS_OUT = "call_thresholds.json"  # written beside FILES when a rule used thresholds
_MLFLOW_BAD = re.compile(r"[^\w\-. :/]")  # MLflow keys: alphanumerics, _ - . space : /
PARAM_MAX = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """MLflow could not record the run (the result files are already written)."""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from kdtw.cli import SPLITS, OneLineParser, count

    p = OneLineParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML profile (default: conf/default.yaml)")
    p.add_argument("--student", help="kdtw student folder (default: the config's student)")
    p.add_argument("--drafter", help="drafter folder: a student or a plain model (default: the student, <τ> masked)")
    p.add_argument("--out", required=True, help="output folder for results, plot, verdict, command")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation's files in --out")
    p.add_argument("--split", default="validation", choices=SPLITS)
    p.add_argument("--n", type=count("--n", 16), default=None, help="N examples spread evenly over the split (default: all)")
    p.add_argument("--ks", default="1,2,3,5,7", help="speculative block sizes, comma-separated")
    p.add_argument("--call-rules", default="argmax,sample,systematic,threshold",
                   help="learned call rules to report, comma-separated (the configured "
                        "decoding.call_rule is always the 'budgeted' rows)")
    p.add_argument("--no-oracle", action="store_true", help="leave out the KL oracle caller rows")
    p.add_argument("--calib-n", type=count("--calib-n", 16), default=None,
                   help="validation examples to calibrate thresholds on (default: --n, else all)")
    p.add_argument("--thresholds", default=None,
                   help="a call_thresholds.json (default: the student folder's, when it has one)")
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


def _call_rules(text: str, call_rule: str) -> list[str]:
    """--call-rules as a list, checked before any model is loaded."""
    from kdtw.evaluation import LEARNED_RULES, resolve_call_rules

    rules = [r.strip() for r in text.split(",") if r.strip()]
    if not rules:
        raise ValueError(f"--call-rules {text!r}: give a comma-separated subset of {','.join(LEARNED_RULES)}")
    try:
        resolve_call_rules(call_rule, rules)
    except ValueError as e:
        raise ValueError(f"--call-rules {text!r}: {e}") from None
    return rules


def check_args(args, cfg) -> None:
    """Everything about the flags that can be checked before a model loads: the input folders
    and files exist, and --out (and the MLflow store under run_dir) can be written."""
    from kdtw.config import check_writable_dir
    from kdtw.models import STUDENT_META, ModelError, is_student_folder

    for flag, path in (("--student", args.student), ("--drafter", args.drafter)):
        if path is not None and not os.path.isdir(path):
            raise ModelError(f"{flag} {path!r} is not a folder: give a kdtw student folder"
                             + (" or a model folder" if flag == "--drafter" else "")
                             + f", or leave {flag} out")
    if args.student is not None and not is_student_folder(args.student):
        raise ModelError(f"--student {args.student!r} is not a kdtw student folder (no {STUDENT_META}): give the "
                         "student a run exported (<run_dir>/student, e.g. runs/default/student)")
    if args.thresholds is not None and not os.path.exists(args.thresholds):
        raise FileNotFoundError(f"--thresholds {args.thresholds!r}: no such file (give a call_thresholds.json "
                                "or a folder holding one, or leave --thresholds out)")
    check_writable_dir(args.out, "--out")
    old = [n for n in (*FILES, THRESHOLDS_OUT) if os.path.exists(os.path.join(args.out, n))]
    if old and not args.overwrite:
        raise FileExistsError(f"--out {args.out!r} holds an earlier evaluation ({', '.join(old)}): give a new "
                              "folder, or add --overwrite to replace its files")
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # the default store is <run_dir>/mlflow.db
        check_writable_dir(cfg.run_dir, "run_dir")


def _student_dir(args, cfg) -> str | None:
    """The folder the student was loaded from (where its call_thresholds.json lives), if any."""
    from kdtw.factory import student_folder

    if args.student:
        return args.student
    path = student_folder(cfg)
    return path if cfg.student.source != "init" and path and os.path.isdir(path) else None


def _thresholds(args, cfg) -> tuple[dict | None, str | None]:
    """Saved call thresholds and where they came from: --thresholds, else the student folder's
    call_thresholds.json; (None, None) when there are none (evaluate_frontier calibrates)."""
    from kdtw.calibration import THRESHOLDS_FILE, load_thresholds

    if args.thresholds:
        saved = load_thresholds(args.thresholds)
        if saved is None:
            raise FileNotFoundError(f"--thresholds {args.thresholds!r}: no such file (give a "
                                    f"{THRESHOLDS_FILE} or a folder holding one)")
        return saved, args.thresholds
    folder = _student_dir(args, cfg)
    saved = load_thresholds(folder) if folder is not None else None
    return saved, (os.path.join(folder, THRESHOLDS_FILE) if saved is not None else None)


def load_drafter(path: str, cfg) -> Any:
    """A kdtw student folder (its <τ> is masked by speculative decoding) or a plain model folder."""
    from kdtw.models import ModelError, Student, is_student_folder, load_lm

    if not os.path.isdir(path):
        raise ModelError(f"--drafter {path!r} is not a folder (give a student or a model folder)")
    spec = cfg.student
    if is_student_folder(path):
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


def log_mlflow(cfg, result, out_dir: str, *, extra_params: dict, files: tuple | list = FILES) -> str:
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
            for name in files:
                mlflow.log_artifact(os.path.join(out_dir, name))
            return run.info.run_id
    except MlflowException as e:
        raise TrackingError(f"MLflow ({uri}): {e} (results are in {out_dir})") from None


def run(args, argv: list[str], prog: str) -> int:
    from kdtw.atomic import write_atomic_with, write_text_atomic
    from kdtw.calibration import SCORED_RULES, save_thresholds
    from kdtw.cli import student_note
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
    call_rule = getattr(cfg.decoding, "call_rule", "argmax")  # the `budgeted` rows' rule
    call_rules = _call_rules(args.call_rules, call_rule)
    check_args(args, cfg)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in a job log
    teacher = load_teacher(cfg)
    if args.student:
        student = Student.load(args.student, dtype=cfg.student.dtype, device=cfg.student.device)
    else:
        student = load_student(cfg, teacher)
        if note := student_note(cfg):
            print(note, file=sys.stderr)
    if args.drafter:
        drafter = load_drafter(args.drafter, cfg)
    else:
        print("kdtw: warning: no --drafter: speculative decoding drafts with the τ-student, <τ> "
              "masked; the proper drafter is the DistillSpec student trained with "
              "train.use_tau=false", file=sys.stderr)
        drafter = None
    saved, saved_from = _thresholds(args, cfg)
    if saved_from:
        print(f"[eval] call thresholds from {saved_from}")
    result = evaluate_frontier(cfg, teacher, student, drafter, split=args.split, n=args.n, ks=ks,
                               call_rule=call_rule, call_rules=call_rules, oracle=not args.no_oracle,
                               thresholds=saved, calib_n=args.calib_n)

    out = args.out
    os.makedirs(out, exist_ok=True)

    for name, how in (("results.csv", result.to_csv), ("results.json", result.to_json), ("frontier.png", result.plot)):
        write_atomic_with(os.path.join(out, name), how)  # each file whole or not at all
    write_text_atomic(os.path.join(out, "verdict.txt"), result.verdict + "\n")
    write_text_atomic(os.path.join(out, "command.txt"), f"{prog} {shlex.join(argv)}".strip() + "\n")
    written = list(FILES)
    record = result.info.get("call_thresholds") or {}
    if any(rule in record for rule in SCORED_RULES):
        save_thresholds(out, record)
        written.append(THRESHOLDS_OUT)
    extra = {"eval.student": args.student or "(config)", "eval.drafter": args.drafter or "(student, <τ> masked)",
             "eval.split": args.split, "eval.n": result.info["n"], "eval.ks": ",".join(map(str, ks)),
             "eval.call_rule": call_rule, "eval.call_rules": ",".join(result.info["call_rules"]),
             "eval.oracle": not args.no_oracle,
             "eval.thresholds": "; ".join(f"{k}: {v}" for k, v in record.get("source", {}).items()) or "(none)"}
    run_id = log_mlflow(cfg, result, out, extra_params=extra, files=written)
    print(f"[eval] wrote {', '.join(written)} to {out}; MLflow run {run_id} ({tracking_uri(cfg)})")
    return 0


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Entry point; ``prog`` is the command recorded in command.txt (e.g. "kdtw eval")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    from kdtw.cli import describe
    from kdtw.cli import errors as input_errors

    # the classes `kdtw` (kdtw.cli.main) reports as one line, plus MLflow failures
    errors = (*input_errors(), TrackingError)
    try:
        return run(args, argv, prog)
    except errors as e:
        print(f"kdtw: error: {describe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdtw: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
