"""The ``kdtw`` command line.

    kdtw pretrain [--config conf/default.yaml] [--force] [key=value ...]
    kdtw train --local [--overwrite] [--config conf/default.yaml] [key=value ...]
    kdtw report   [--student DIR] [--config conf/default.yaml] [--split validation] [key=value ...]
    kdtw settle   --out DIR [--student DIR] [--config ...] [--json FILE] [key=value ...]   (kdtw/settle.py)
    kdtw eval     --student PATH [--drafter PATH] --out DIR [--config ...] (jobs/evaluate.py)
                  [--call-rules argmax,sample,systematic,threshold] [--no-oracle] [--calib-n N] [--thresholds FILE]
    kdtw decode   --mode budgeted|student|teacher|speculative [--budget light] [--k 3] [--strict]
                  [--student DIR] [--config ...] [--input FILE|-] [key=value ...]
    kdtw data bible-en-es [--out data/bible_en_es] [--debs DIR] [--check]   (kdtw/prep/bible.py)

Errors print one line (``kdtw: error: ...``) and exit with status 2: bad flags, config values,
files and output folders are refused before any model loads or anything is written.

``--student DIR`` (decode, report, settle, eval) names the trained student, e.g. the one a run
exported to ``runs/default/student``; without it they use the config's student, which has never
learned when to call the teacher: a budgeted decode of it prints a note saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

SPLITS = ("train", "validation", "test")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "default.yaml")


def _config(args):
    from .config import load_config

    path = args.config
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    overrides = list(args.overrides)
    if getattr(args, "student", None) is not None:
        overrides += student_overrides(args.student)
    return load_config(path, overrides)


def student_overrides(folder: str) -> list[str]:
    """The config overrides ``--student DIR`` stands for (``student.source=pretrained
    student.name_or_path=DIR``), the folder checked first: a kdtw student folder (a training run
    exports one to ``<run_dir>/student``) or a plain model folder (``<τ>`` added untrained)."""
    from .models import STUDENT_META, ModelError, is_student_folder

    if not os.path.isdir(folder):
        raise ModelError(f"--student {folder!r} is not a folder: give a trained student folder (a run exports "
                         "it to <run_dir>/student, e.g. runs/default/student), or leave --student out")
    if not (is_student_folder(folder) or os.path.exists(os.path.join(folder, "config.json"))):
        raise ModelError(f"--student {folder!r} holds no model (no {STUDENT_META} or config.json): give the "
                         "student folder a run exported (<run_dir>/student), or leave --student out")
    return ["student.source=pretrained", f"student.name_or_path={folder}"]


def student_note(cfg) -> str | None:
    """One line for stderr where the config's student has never learned when to call the teacher
    (a pretrained or random-init model, ``<τ>`` added untrained), naming the trained student to
    give instead: a budgeted decode of it says little. None for a trained (kdtw) student."""
    from .factory import student_folder
    from .models import is_student_folder

    source = cfg.student.source
    folder = student_folder(cfg) if source != "init" else None
    if source == "pretrained" and (is_student_folder(folder) or not os.path.isdir(folder)):
        return None  # a trained student, or a hub name (not looked into)
    which = f"the config's student ({folder if folder and os.path.isdir(folder) else f'student.source={source}'})"
    trained = os.path.join(cfg.run_dir, "student")
    if is_student_folder(trained):
        return (f"kdtw: note: {which} has not learned when to call the teacher; the student trained in "
                f"run_dir is {trained}: give --student {trained}")
    return (f"kdtw: note: {which} has not learned when to call the teacher: train one (python "
            f"jobs/train_pcl.py or kdtw train --local), then give --student {trained}")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``kdtw: error: ...``, exit status 2 (as every
    other error of the command line), pointing at ``--help`` instead of printing the usage."""

    def error(self, message: str):
        self.exit(2, f"kdtw: error: {message} (see `{self.prog} --help`)\n")


def count(flag: str, example: int):
    """An argparse ``type`` for a count flag: an integer >= 1 (``--k 0`` is refused, not read as
    "the default")."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer: give one >= 1, e.g. {flag} {example}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{n} must be >= 1, e.g. {flag} {example}")
        return n

    return parse


def check_output_file(path: str, flag: str) -> None:
    """Refuse, before any work, an output file that could not be written: a folder, a path in a
    missing folder, or one in a folder that cannot take a new file."""
    from .config import ConfigError, check_writable_dir

    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a folder: give a file path, e.g. {flag} rows.json")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path!r}: the folder {parent!r} does not exist: create it or give another path")
    check_writable_dir(parent, flag)


def cmd_pretrain(args) -> int:
    from .config import check_writable_dir
    from .pretrain import pretrain

    cfg = _config(args)
    check_writable_dir(cfg.models_dir, "models_dir")  # before hours of training, not after
    reports = pretrain(cfg, force=args.force)
    print(json.dumps({r: {k: v for k, v in rep.items() if k != "role"} for r, rep in reports.items()}, indent=2))
    return 0


def _read_inputs(path: str) -> list[str]:
    """The non-empty lines of ``path`` (``-``: stdin), read as UTF-8 bytes (not in the locale's
    encoding), so that other bytes are one clear error whatever the terminal."""
    from .examples import DataError

    if path == "-":
        where = "stdin"
        raw = getattr(sys.stdin, "buffer", None)
        data = raw.read() if raw is not None else sys.stdin.read().encode("utf-8")
    else:
        where = f"--input {path!r}"
        if not os.path.exists(path):
            raise FileNotFoundError(f"input file {path!r} does not exist: give a file with one source "
                                    "per line, or - for stdin")
        if os.path.isdir(path):
            raise DataError(f"{where} is a folder: give a file with one source per line, or - for stdin")
        with open(path, "rb") as f:
            data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}): "
                        "convert it to UTF-8, e.g. with iconv -t UTF-8") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"no input: {'stdin' if path == '-' else path} holds no non-empty line; "
                         "give one source per line")
    return lines


def cmd_decode(args) -> int:
    from .decoding import generate, speculative_generate
    from .examples import Example
    from .factory import budget_table, load_pair, load_teacher, prompts_for

    cfg = _config(args)
    table = budget_table(cfg)
    phrase = table.get(args.budget).phrase if args.budget is not None else table.phrases[min(2, len(table) - 1)]
    sources = _read_inputs(args.input)
    examples = [Example(s, "") for s in sources]
    prompts = prompts_for(cfg, examples, phrase)
    d = cfg.decoding
    if args.mode == "teacher":
        teacher, student = load_teacher(cfg), None
    else:
        teacher, student = load_pair(cfg)
    if args.mode == "budgeted" and (note := student_note(cfg)):  # after the load: not above its error
        print(note, file=sys.stderr)
    if args.mode == "speculative":
        out = speculative_generate(student, teacher, prompts, k=args.k or d.spec_k,
                                   max_new_tokens=d.max_new_tokens, do_sample=d.do_sample)
    else:
        from .calibration import call_kwargs
        from .factory import student_folder

        target = table.get(phrase).target
        kw = call_kwargs(cfg, student, student_folder(cfg), phrase, target) if args.mode == "budgeted" else {}
        out = generate(student, teacher, prompts, mode=args.mode, budgets=target,
                       max_new_tokens=d.max_new_tokens, do_sample=d.do_sample, temperature=d.temperature,
                       teacher_do_sample=d.teacher_do_sample, strict=args.strict or d.strict,
                       batch_size=d.batch_size, **kw)
    for src, row in zip(sources, out.rows()):
        print(json.dumps({"source": src, "budget": phrase, "mode": args.mode, **row}, ensure_ascii=False))
    return 0


def _check_run_dir(cfg, *, overwrite: bool, resume_with: str | None = None, keep: tuple[str, ...] = ()) -> list[str]:
    """Refuse a run_dir that cannot be written, or that holds another run's outputs unless
    ``overwrite``; returns the outputs to clear (before any model loads). ``resume_with``: the
    command that continues a run (the Ray jobs'), named in the message; ``keep``: outputs this run
    goes on from (a Phase-1 job's, for the Phase-2 job), neither refused nor cleared."""
    from .config import ConfigError, check_writable_dir, run_outputs

    check_writable_dir(cfg.run_dir, "run_dir")
    old = [n for n in run_outputs(cfg.run_dir) if n not in keep]
    if old and not overwrite:
        shown = ", ".join(n + ("/" if os.path.isdir(os.path.join(cfg.run_dir, n)) else "") for n in old)
        raise ConfigError(
            f"run_dir={cfg.run_dir!r} holds another run ({shown}): give a new run_dir, "
            + (f"continue it with `{resume_with} --resume {cfg.run_dir}`, "
               if resume_with and {"checkpoints", "phase1"} & set(old) else "")
            + "or add --overwrite to delete that run's outputs first"
        )
    return old


def _clear_run(run_dir: str, names: list[str]) -> None:
    """Delete an old run's outputs (only the names `run_outputs` found, never the folder or
    anything else in it, e.g. a models_dir inside it), once the new run has loaded and is about
    to write; each folder vanishes at once (renamed aside, then deleted), so a kill leaves it
    whole or gone, not half-deleted."""
    from .atomic import remove_dir

    for name in names:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            remove_dir(path)
        else:
            os.remove(path)
    print(f"[kdtw] --overwrite: deleted {', '.join(names)} of the earlier run in {run_dir}")


def cmd_train(args) -> int:
    cfg = _config(args)
    if not args.local:
        from .config import ConfigError

        raise ConfigError(
            "kdtw train runs only the single-process loop: add --local; the distributed loop is "
            "jobs/train_pcl.py (ray job submit ... -- python jobs/train_pcl.py)"
        )
    old = _check_run_dir(cfg, overwrite=args.overwrite)
    from .local import LocalLoop

    loop = LocalLoop(cfg)  # models and data load first: if they fail, the old run is still there
    if old:
        _clear_run(cfg.run_dir, old)
    requested: list[str] = []

    def on_signal(signum, frame) -> None:  # in Phase 2 the first signal stops after the step in flight
        name = signal.Signals(signum).name
        if loop.in_phase2 and not requested:
            requested.append(name)
            print(f"kdtw: {name}: stopping after the step in flight, then exporting the best student validated "
                  "so far (send it again to stop at once)", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # where signals can be caught
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        report = loop.run(should_stop=lambda: requested[0] if requested else None)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    sel = report["selected"]
    print(json.dumps({"run_dir": cfg.run_dir, "selected_dir": report["selected_dir"],
                      "eligible": None if sel is None else sel["eligible"]}))
    if report.get("stopped"):
        st = report["stopped"]
        where = "nothing selected" if sel is None else f"selected Phase-{sel['phase']} step {sel['step']}"
        print(f"kdtw: interrupted by {st['signal']} at Phase-2 step {st['step']}: {where}, report.json written "
              f"in {cfg.run_dir} (the local loop has no resume; jobs/train_pcl.py --resume continues a Ray run)",
              file=sys.stderr)
        return 130
    return 0


def cmd_report(args) -> int:
    """Decode a split at every budget (and student/teacher alone); print a table."""
    from .decoding import generate
    from .examples import spread
    from .factory import budget_table, load_pair, load_splits, prompts_for
    from .metrics import primary_metric, task_metrics

    kinds = ("student", "teacher", "budgets")
    wanted = {k.strip() for k in args.runs.split(",") if k.strip()}
    if not wanted or not wanted <= set(kinds):
        raise ValueError(f"--runs {args.runs!r}: give a comma-separated subset of {', '.join(kinds)}")
    if args.json:
        check_output_file(args.json, "--json")
    cfg = _config(args)
    table = budget_table(cfg)
    splits = load_splits(cfg)
    if args.split not in splits:
        raise ValueError(f"--split {args.split}: this task has the splits {', '.join(splits)}")
    examples = spread(splits[args.split], args.n)
    refs = [ex.target for ex in examples]
    if wanted == {"teacher"}:  # the teacher alone (e.g. before its fine-tune): no student needed
        from .factory import load_teacher

        teacher, student = load_teacher(cfg), None
    else:
        teacher, student = load_pair(cfg)
    if "budgets" in wanted and (note := student_note(cfg)):
        print(note, file=sys.stderr)
    d = cfg.decoding
    rows = []
    runs = [("student", "student", "student", table.phrases[0]), ("teacher", "teacher", "teacher", table.phrases[0])]
    runs += [("budgets", f"budget {b.phrase}", "budgeted", b.phrase) for b in table]
    from .calibration import call_kwargs
    from .factory import student_folder

    for i, (label, mode, phrase) in enumerate(r[1:] for r in runs if r[0] in wanted):
        t0 = time.perf_counter()
        target = table.get(phrase).target
        kw = call_kwargs(cfg, student, student_folder(cfg), phrase, target, index=table.phrases.index(phrase)) \
            if mode == "budgeted" else {}
        out = generate(student, teacher, prompts_for(cfg, examples, phrase), mode=mode,
                       budgets=target, max_new_tokens=d.max_new_tokens,
                       batch_size=d.batch_size, strict=args.strict, **kw)
        m = task_metrics(cfg.task.metric, out.texts, refs)
        use = sum(out.teacher_use()) / len(out)
        rows.append({"run": label, "target": table.get(phrase).target if mode == "budgeted" else None,
                     "teacher_use": use, **m, "seconds": time.perf_counter() - t0})
    key = primary_metric(cfg.task.metric)
    print(f"{'run':<18}{'target':>8}{'use':>8}{key:>9}   seconds")
    for r in rows:
        tgt = "" if r["target"] is None else f"{r['target']:.2f}"
        print(f"{r['run']:<18}{tgt:>8}{r['teacher_use']:>8.3f}{r[key]:>9.2f}   {r['seconds']:.1f}")
    if args.json:
        from .atomic import write_json_atomic

        write_json_atomic(args.json, rows)  # a kill mid-write leaves the old file or none, not half of one
    return 0


def cmd_settle(args) -> int:
    """Settle a trained student's budgets (kdtw/settle.py) and save it to --out."""
    from .config import ConfigError, check_writable_dir
    from .factory import budget_table, load_pair, load_splits
    from .settle import settle_budgets

    cfg = _config(args)
    tc = cfg.train
    if not tc.settle_probes:
        raise ConfigError("train.settle_probes is 0 in this config: give the probes per budget, e.g. "
                          "train.settle_probes=24 (and train.settle_rounds, now %d)" % tc.settle_rounds)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {args.out!r} exists and is not an empty folder: give a new folder")
    check_writable_dir(os.path.dirname(out), "--out")
    if args.json:
        check_output_file(args.json, "--json")
    teacher, student = load_pair(cfg)
    if note := student_note(cfg):
        print(note, file=sys.stderr)
    res = settle_budgets(cfg, student, teacher, load_splits(cfg)["train"], budget_table(cfg))
    if res is None:
        raise ConfigError("this student has no per-budget <τ> offsets to settle (train.budget_offsets, "
                          "student.budget_targets): nothing was written")
    student.save(out)
    print("[settle] shift of each budget's λ (offsets moved by its negative): "
          + " ".join(f"{x:+.3f}" for x in res["shift"]) + f"; saved to {out}")
    if args.json:
        from .atomic import write_json_atomic

        write_json_atomic(args.json, res)  # a kill mid-write leaves the old file or none, not half of one
    return 0


def cmd_data_bible(args) -> int:
    """Build (or with --check verify) the English→Spanish Bible Parquet files."""
    from .prep.bible import main as bible_main

    argv = ["check" if args.check else "build", "--out", args.out]
    if args.debs and not args.check:
        argv += ["--debs", args.debs]
    return bible_main(argv, prog="kdtw")


def student_arg(sp) -> None:
    sp.add_argument("--student", metavar="DIR",
                    help="a trained student folder, e.g. runs/default/student (default: the config's "
                         "student; the same as student.source=pretrained student.name_or_path=DIR)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="kdtw", description="Knowledge distillation with training wheels")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", help="YAML profile (default: conf/default.yaml)")
        sp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. seed=3")

    sp = sub.add_parser("pretrain", help="supervised pretraining of the default teacher and student")
    common(sp)
    sp.add_argument("--force", action="store_true", help="retrain even if cached")
    sp.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser("decode", help="decode inputs (one source per line) as JSON lines")
    common(sp)
    sp.add_argument("--mode", choices=["budgeted", "student", "teacher", "speculative"], default="budgeted")
    sp.add_argument("--budget", help="budget phrase, e.g. light")
    sp.add_argument("--k", type=count("--k", 3), help="speculative block size K (default: decoding.spec_k)")
    sp.add_argument("--strict", action="store_true", help="mask <τ> once the budget is used")
    sp.add_argument("--input", default="-", help="file with one source per line, or - for stdin")
    student_arg(sp)
    sp.set_defaults(func=cmd_decode)

    sp = sub.add_parser("train", help="train the student (Phase 1 + Phase 2); --local: one process")
    common(sp)
    sp.add_argument("--local", action="store_true", help="the single-process reference loop")
    sp.add_argument("--overwrite", action="store_true",
                    help="the run_dir may hold an earlier run: delete its outputs (report.json, student/, ...) first")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("report", help="decode a split at every budget and print a table")
    common(sp)
    sp.add_argument("--split", default="validation", choices=SPLITS)
    sp.add_argument("--n", type=count("--n", 16), default=None, help="N examples spread evenly over the split (default: all)")
    sp.add_argument("--strict", action="store_true")
    sp.add_argument("--runs", default="student,teacher,budgets",
                    help="which decoders, comma-separated (default: student,teacher,budgets)")
    sp.add_argument("--json", help="also write the rows to this JSON file")
    student_arg(sp)
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("settle", help="settle a trained student's budgets on decoded training prompts")
    common(sp)
    sp.add_argument("--out", required=True, help="a new folder for the settled student")
    sp.add_argument("--json", help="also write the shifts and each round's measured use to this JSON file")
    student_arg(sp)
    sp.set_defaults(func=cmd_settle)

    # Listed for --help only: main() hands `kdtw eval ...` to jobs/evaluate.py (it logs to MLflow,
    # which kdtw/ does not import) before this parser runs.
    sub.add_parser("eval", add_help=False,
                   help="the quality-latency frontier against speculative decoding (kdtw eval --help)")

    sp = sub.add_parser("data", help="build a dataset's files (offline tasks kdtw ships)")
    data = sp.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    dp = data.add_parser(
        "bible-en-es",
        help="English→Spanish Bible verse pairs (WEB / RV1909, public domain) as Parquet",
        description="Fetch the two SWORD .deb files with apt-get download (or take them from "
        "--debs), align the verses and write train/validation/test Parquet files and "
        "checksums.json (kdtw/prep/bible.py; ~20 s).",
    )
    dp.add_argument("--out", default="data/bible_en_es", help="output folder (default: data/bible_en_es)")
    dp.add_argument("--debs", default=None, help="folder with the .deb files (skips apt-get download)")
    dp.add_argument("--check", action="store_true",
                    help="only verify the files in --out against their checksums.json")
    dp.set_defaults(func=cmd_data_bible)
    return p


def errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: printed as one line, exit status 2."""
    from .budgets import BudgetError
    from .config import ConfigError
    from .examples import DataError
    from .models import ModelError

    return (ConfigError, BudgetError, DataError, ModelError, OSError, ValueError, FloatingPointError)


_OS_HINTS = {
    PermissionError: "check its permissions or choose another path",
    IsADirectoryError: "it is a folder: give a file",
    NotADirectoryError: "a part of the path is a file: give another path",
    FileNotFoundError: "check the path",
    FileExistsError: "remove it or choose another path",
}


def describe(e: BaseException) -> str:
    """An error of `errors` as one line that names what to change."""
    if isinstance(e, UnicodeDecodeError):
        return f"a file or input is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        hint = next((h for t, h in _OS_HINTS.items() if isinstance(e, t)), "check the path and the disk")
        return f"{e.strerror}: {e.filename!r}: {hint}"
    return " ".join(str(e).split()) or type(e).__name__


def _run_job(script: str, argv: list[str], prog: str) -> int:
    """Run a job script of the repository checkout (they hold the MLflow/Ray code kdtw/ keeps out)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", script)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{prog} needs the kdtw repository checkout ({path} is missing)")
    spec = importlib.util.spec_from_file_location(f"kdtw_job_{script[:-3]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv, prog=prog)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "eval":
            return _run_job("evaluate.py", argv[1:], "kdtw eval")
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line, status 2) or --help (0)
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except errors() as e:
        print(f"kdtw: error: {describe(e)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except errors() as e:
        print(f"kdtw: error: {describe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdtw: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
