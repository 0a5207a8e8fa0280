"""Every bad input is refused before work starts (issue 13): exit status 2, exactly one stderr
line ``kdtw: error: ...`` that names what to change, and no file left new or changed.

One table of bad inputs across config values, config files, CLI flags, stdin and input files,
and output folders, run in process (`kdtw.cli.main`) on conf/tiny.yaml from an empty working
folder. Loading a model or starting a run counts as work: those functions are replaced by ones
that fail the test, so a case passes only if it is refused before any of them. Two cases feed
raw bytes to a real `kdtw decode` subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import ROOT

import kdtw.cli
from kdtw.config import Config, ConfigError, _bounds, _leaf, _yaml, load_config

TINY = os.path.join(ROOT, "conf", "tiny.yaml")
# Every message says how to fix the input with one of these words (or points at --help).
REMEDY = re.compile(r"e\.g\.|\buse\b|\bgive\b|\bset\b|\badd\b|\braise\b|\blower\b|\bquote\b|\bkeep\b|"
                    r"\bconvert\b|\bcreate\b|\bcheck\b|\bwrite\b|\bsave\b|\bfix\b|--help|\bneed\b|\bmust\b|"
                    r"did you mean|known keys")

Setup = Callable[[Path, contextlib.ExitStack], None]


@dataclass
class Case:
    id: str
    argv: list[str]  # "{tmp}" stands for the case's working folder
    expect: str  # a part of the error line: the key, flag or path to change
    setup: Setup | None = None
    stdin: bytes = b"the dog\n"


def cfg(*overrides: str, config: str = TINY) -> list[str]:
    """--config and overrides that send every output of the command into the case's folder."""
    return ["--config", config, "run_dir={tmp}/run", "models_dir={tmp}/models", *overrides]


def bad(key_value: str, expect: str | None = None, *, cmd: tuple[str, ...] = ("train", "--local")) -> Case:
    """A bad config override (key=value), refused by the config check."""
    extra = ["--out", "{tmp}/out"] if cmd[0] == "eval" else []
    return Case(f"{cmd[0]}:{key_value}", [*cmd, *extra, *cfg(key_value)], expect or key_value.split("=")[0])


# ----------------------------------------------------------------------------- setups


def file(name: str, content: bytes | str) -> Setup:
    def setup(tmp: Path, stack) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def folder(name: str, *files: str) -> Setup:
    def setup(tmp: Path, stack) -> None:
        (tmp / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            p = tmp / name / f
            if f.endswith("/"):
                p.mkdir(parents=True, exist_ok=True)
                (p / "model.safetensors").write_bytes(b"old weights")
            else:
                p.write_text("{}\n")

    return setup


def _writable(path: Path) -> bool:
    try:
        fd, tmp = tempfile.mkstemp(dir=path)
    except OSError:
        return False
    os.close(fd)
    os.remove(tmp)
    return True


def read_only(name: str) -> Setup:
    """A folder this process cannot write into: chmod 555, and for root (whom modes do not
    stop) the immutable attribute; skipped where neither works."""

    def setup(tmp: Path, stack) -> None:
        path = tmp / name
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o555)
        stack.callback(os.chmod, path, 0o755)
        if _writable(path) and shutil.which("chattr"):
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
                stack.callback(subprocess.run, ["chattr", "-i", str(path)], capture_output=True)
        if _writable(path):
            pytest.skip("cannot make a read-only folder on this machine")

    return setup


# ----------------------------------------------------------------------------- the table

CONFIG_VALUES = [
    # learning rates: negative, zero, NaN, infinite, a boolean
    bad("train.lr=-0.1", "train.lr=-0.1 must be a finite number > 0"),
    bad("train.lr=.nan", "train.lr=nan"),
    bad("train.lr=.inf", "train.lr=inf"),
    bad("train.lr=true", "train.lr=True"),
    bad("pretrain.lr=0", "pretrain.lr=0"),
    bad("pretrain.lr=-.inf", "pretrain.lr=-inf", cmd=("pretrain",)),
    bad("train.phase2_lr=-1", "train.phase2_lr=-1 must be a finite number > 0"),
    bad("train.value_lr=.nan", "train.value_lr=nan"),
    bad("train.tau_offset_lr=-0.01"),
    # step counts, intervals
    bad("pretrain.teacher_steps=-1", cmd=("pretrain",)),
    bad("pretrain.student_steps=-1", cmd=("pretrain",)),
    bad("train.phase1_steps=-1"),
    bad("train.phase2_steps=-5"),
    bad("pretrain.log_every=0", cmd=("pretrain",)),
    bad("train.log_every=0"),
    bad("train.validate_every=0"),
    bad("train.value_warmup_steps=-2"),
    bad("pretrain.warmup_steps=1.5", "pretrain.warmup_steps=1.5 must be an integer"),
    # model sizes
    bad("student.num_heads=0", cmd=("decode",)),
    bad("teacher.hidden_size=-8", cmd=("decode",)),
    bad("student.intermediate_size=0"),
    bad("teacher.max_positions=0", cmd=("decode",)),
    bad("student.num_layers=0"),
    bad("teacher.hidden_size=30", "divisible by teacher.num_heads"),
    bad("student.max_positions=8", "student.max_positions=8 leaves no room"),
    # batch sizes and other counts
    bad("decoding.batch_size=0", cmd=("decode",)),
    bad("train.batch_size=-1"),
    bad("pretrain.batch_size=0", cmd=("pretrain",)),
    bad("decoding.max_new_tokens=0", cmd=("decode",)),
    bad("decoding.spec_k=0", cmd=("decode",)),
    bad("task.n_validation=0", cmd=("report",)),
    bad("ray.num_rollout_workers=0"),
    bad("ray.teacher_gpus=-1"),
    bad("ray.steps_per_batch=0"),
    bad("seed=-1"),
    bad("seed=abc", "seed='abc' must be an integer"),
    # probabilities, rates, temperatures
    bad("train.gamma=1.5"),
    bad("train.phase2_lr_final_factor=0", "train.phase2_lr_final_factor=0 must be a finite number in (0, 1]"),
    bad("train.demo_ratio=1.5"),
    bad("train.use_ema=1"),
    bad("train.eligibility_delta=-0.1"),
    bad("train.lambda_eps=0.5"),
    bad("decoding.temperature=0", cmd=("decode",)),
    bad("train.rollout_temperature=-1"),
    bad("train.grad_clip=-1"),
    # budgets
    bad("budgets.light=true", "budgets.light=True", cmd=("decode",)),
    bad("budgets.light=1.5", "budgets.light=1.5"),
    bad("budgets.light=-0.1", "budgets.light=-0.1"),
    bad("budgets.light=.nan", "budgets.light=nan", cmd=("report",)),
    bad("budgets.light=lots", "budgets.light='lots'"),
    bad("budgets.Light=0.1", "budgets.light"),
    bad("budgets={}", "give at least one phrase"),
    # devices, dtypes, choices
    bad("teacher.device=gpu", "cpu | cuda | cuda:N", cmd=("decode",)),
    bad("student.device=cuda:x", "student.device='cuda:x'"),
    bad("teacher.dtype=float8"),
    bad("decoding.call_rule=foo", cmd=("eval",)),
    bad("task.kind=foo"),
    bad("train.tau_reward=other"),
    # prompt templates
    bad("prompt_template=With {phrase} use, {task}", "unknown placeholder(s) {task}", cmd=("decode",)),
    bad("prompt_template=Do {instruction}", "has no {phrase}"),
    bad("prompt_template=With {phrase teacher", "not a valid template"),
    bad("prompt_template=With {} {phrase} {instruction}", "unknown placeholder"),
    # generated-task knobs
    bad("task.generator.lexicon_size=2"),
    bad("task.generator.bogus=3", "task.generator.bogus: unknown knob"),
    bad("task.generator.zipf_exponent=-1"),
    bad("task.generator.seed=3", "set task.seed instead"),
    Case("train:min_len>max_len", ["train", "--local", *cfg("task.generator.min_len=9", "task.generator.max_len=3")],
         "task.generator.min_len=9 is above task.generator.max_len=3"),
    # cross-field rules, keys, override syntax
    Case("train:models_dir=run_dir", ["train", "--local", *cfg(), "models_dir={tmp}/run"], "models_dir and run_dir"),
    bad("train.buffer_tokens=10", "raise train.buffer_tokens"),
    bad("train.lambda_min=30", "train.lambda_min=30.0 is above train.lambda_max"),
    bad("train.demo_ratio=1", "leaves no on-policy row"),
    bad("run_dir=", "run_dir='' must be a non-empty string"),
    bad("task.splits.dev=dev", "task.splits.dev"),
    bad("train.lrr=0.1", "did you mean 'lr'"),
    bad("train=3", "train: expected a mapping"),
    bad("budgets={a: 0.1, a: 0.2}", "duplicate key 'a'"),
    Case("train:override-without-=", ["train", "--local", *cfg("seed")], "write overrides as key=value"),
]

DUPLICATE = "seed: 0\ntrain:\n  lr: 0.001\ntrain:\n  lr: 0.1\n"
CONFIG_FILES = [
    Case("config:missing", ["train", "--local", *cfg(config="{tmp}/nope.yaml")], "does not exist"),
    Case("config:folder", ["train", "--local", *cfg(config="{tmp}/conf")], "is a folder", folder("conf")),
    Case("config:not-utf8", ["decode", *cfg(config="{tmp}/c.yaml")], "is not UTF-8 text",
         file("c.yaml", b"name: caf\xe9\n")),
    Case("config:duplicate-section", ["train", "--local", *cfg(config="{tmp}/c.yaml")],
         "duplicate key 'train' (first on line 2)", file("c.yaml", DUPLICATE)),
    Case("config:duplicate-nested", ["pretrain", *cfg(config="{tmp}/c.yaml")], "duplicate key 'lr'",
         file("c.yaml", "train:\n  lr: 0.001\n  lr: -1\n")),
    Case("config:bad-yaml", ["train", "--local", *cfg(config="{tmp}/c.yaml")], "not valid YAML",
         file("c.yaml", "train: [1,\n")),
    Case("config:list", ["train", "--local", *cfg(config="{tmp}/c.yaml")], "top level must be a mapping",
         file("c.yaml", "- seed\n- 3\n")),
    Case("config:unknown-key", ["report", *cfg(config="{tmp}/c.yaml")], "unknown config key 'trian'",
         file("c.yaml", "trian:\n  lr: 0.1\n")),
    Case("config:unquoted-no", ["train", "--local", *cfg(config="{tmp}/c.yaml")], "quote it",
         file("c.yaml", "budgets: {no: 0.0, light: 0.1}\n")),
]

CLI_FLAGS = [
    Case("decode:--k 0", ["decode", "--k", "0", *cfg()], "argument --k: 0 must be >= 1"),
    Case("decode:--k -2", ["decode", "--mode", "speculative", "--k", "-2", *cfg()], "argument --k"),
    Case("decode:--k abc", ["decode", "--k", "abc", *cfg()], "'abc' is not an integer"),
    Case("decode:--mode fast", ["decode", "--mode", "fast", *cfg()], "argument --mode"),
    Case("decode:--budget lots", ["decode", "--budget", "lots", *cfg()], "unknown budget phrase 'lots'"),
    Case("decode:--budget ''", ["decode", "--budget", "", *cfg()], "unknown budget phrase ''"),
    Case("data:--check missing", ["data", "bible-en-es", "--check", "--out", "{tmp}/bible"],
         "create the files with `kdtw data bible-en-es --out {tmp}/bible`"),
    Case("data:--debs empty", ["data", "bible-en-es", "--debs", "{tmp}/debs", "--out", "{tmp}/bible"],
         "no sword-text-web_*.deb in {tmp}/debs", file("debs/README", "not a .deb")),
    Case("report:--n -1", ["report", "--n", "-1", *cfg()], "argument --n"),
    Case("report:--n 0", ["report", "--n", "0", *cfg()], "argument --n"),
    Case("report:--split dev", ["report", "--split", "dev", *cfg()], "argument --split"),
    Case("report:--runs", ["report", "--runs", "teacher,drafter", *cfg()], "comma-separated subset"),
    Case("train:no --local", ["train", *cfg()], "--local"),
    Case("train:--bogus", ["train", "--local", "--bogus", *cfg()], "unrecognized arguments: --bogus"),
    Case("no such command", ["trian"], "invalid choice: 'trian'"),
    Case("eval:--n -1", ["eval", "--out", "{tmp}/out", "--n", "-1", *cfg()], "argument --n"),
    Case("eval:--calib-n 0", ["eval", "--out", "{tmp}/out", "--calib-n", "0", *cfg()], "argument --calib-n"),
    Case("eval:--ks 0", ["eval", "--out", "{tmp}/out", "--ks", "0", *cfg()], "--ks '0': every K must be >= 1"),
    Case("eval:--call-rules", ["eval", "--out", "{tmp}/out", "--call-rules", "bogus", *cfg()], "--call-rules 'bogus'"),
    Case("eval:--split", ["eval", "--out", "{tmp}/out", "--split", "dev", *cfg()], "argument --split"),
    Case("eval:no --out", ["eval", *cfg()], "--out"),
    Case("eval:--student missing", ["eval", "--out", "{tmp}/out", "--student", "{tmp}/nope", *cfg()],
         "--student '{tmp}/nope' is not a folder"),
    Case("eval:--student plain model", ["eval", "--out", "{tmp}/out", "--student", "{tmp}/plain", *cfg()],
         "--student '{tmp}/plain' is not a kdtw student folder (no kdtw_student.json)", folder("plain", "config.json")),
    Case("decode:--student empty", ["decode", "--student", "{tmp}/empty", *cfg()],
         "--student '{tmp}/empty' holds no model", folder("empty"), stdin=b"a\n"),
    Case("eval:--drafter missing", ["eval", "--out", "{tmp}/out", "--drafter", "{tmp}/nope", *cfg()],
         "--drafter '{tmp}/nope' is not a folder"),
    Case("eval:--thresholds missing", ["eval", "--out", "{tmp}/out", "--thresholds", "{tmp}/t.json", *cfg()],
         "--thresholds '{tmp}/t.json'"),
]

INPUTS = [
    Case("stdin:not-utf8", ["decode", *cfg()], "stdin is not UTF-8 text (byte 0xff", stdin=b"\xff\xfe the dog\n"),
    Case("stdin:latin-1", ["decode", "--mode", "teacher", *cfg()], "stdin is not UTF-8 text (byte 0xe9",
         stdin="café\n".encode("latin-1")),
    Case("stdin:empty", ["decode", *cfg()], "no input: stdin", stdin=b""),
    Case("stdin:blank lines", ["decode", *cfg()], "no input: stdin", stdin=b"\n   \n\t\n"),
    Case("--input missing", ["decode", "--input", "{tmp}/in.txt", *cfg()], "does not exist"),
    Case("--input folder", ["decode", "--input", "{tmp}/in", *cfg()], "is a folder", folder("in")),
    Case("--input not-utf8", ["decode", "--input", "{tmp}/in.txt", *cfg()], "is not UTF-8 text",
         file("in.txt", b"the dog\n\x80\x81\n")),
]

OUTPUTS = [
    Case("eval:--out is a file", ["eval", "--out", "{tmp}/out", *cfg()], "--out '{tmp}/out' is a file",
         file("out", "results\n")),
    Case("eval:--out below a file", ["eval", "--out", "{tmp}/f/out", *cfg()], "is a file, so no folder",
         file("f", "x\n")),
    Case("eval:--out read-only", ["eval", "--out", "{tmp}/ro/out", *cfg()], "is not writable", read_only("ro")),
    Case("eval:run_dir read-only", ["eval", "--out", "{tmp}/out", *cfg(), "run_dir={tmp}/ro"],
         "run_dir='{tmp}/ro' is not writable", read_only("ro")),
    Case("pretrain:models_dir read-only", ["pretrain", *cfg(), "models_dir={tmp}/ro/models"],
         "models_dir='{tmp}/ro/models' is not writable", read_only("ro")),
    Case("pretrain:models_dir is a file", ["pretrain", *cfg(), "models_dir={tmp}/m"], "is a file, not a folder",
         file("m", "x\n")),
    Case("train:run_dir is a file", ["train", "--local", *cfg(), "run_dir={tmp}/r"], "run_dir='{tmp}/r' is a file",
         file("r", "x\n")),
    Case("train:run_dir read-only", ["train", "--local", *cfg(), "run_dir={tmp}/ro"], "is not writable",
         read_only("ro")),
    Case("train:run_dir holds a report", ["train", "--local", *cfg()], "holds another run (report.json)",
         folder("run", "report.json")),
    Case("train:run_dir holds a Phase-1 checkpoint", ["train", "--local", *cfg()], "holds another run (phase1/)",
         folder("run", "phase1/")),
    Case("train:run_dir holds a student", ["train", "--local", *cfg()],
         "(student/, config.yaml): give a new run_dir, or add --overwrite",
         folder("run", "config.yaml", "student/")),
    Case("train:run_dir holds checkpoints", ["train", "--local", *cfg()], "checkpoints/",
         folder("run", "checkpoints/")),
    Case("report:--json is a folder", ["report", "--json", "{tmp}/j", *cfg()], "--json '{tmp}/j' is a folder",
         folder("j")),
    Case("report:--json in a missing folder", ["report", "--json", "{tmp}/no/rows.json", *cfg()], "does not exist"),
    Case("report:--json read-only", ["report", "--json", "{tmp}/ro/rows.json", *cfg()], "is not writable",
         read_only("ro")),
]

CASES = CONFIG_VALUES + CONFIG_FILES + CLI_FLAGS + INPUTS + OUTPUTS
SUBPROCESS_CASES = [
    Case("subprocess:stdin-binary", ["decode", *cfg()], "stdin is not UTF-8 text", stdin=b"\x00\xff\xfe\xfd\n"),
    Case("subprocess:stdin-utf16", ["decode", "--budget", "light", *cfg()], "stdin is not UTF-8 text",
         stdin="the dog\n".encode("utf-16")),
]


# ----------------------------------------------------------------------------- checks


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder below ``folder``: kind, size, content hash (what "changed" means)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = ("dir",)
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = ("file", os.path.getsize(p), hashlib.sha256(fh.read()).hexdigest())
    return out


def _no_work(*args, **kwargs):
    raise RuntimeError("work started: a model load or run was reached before the input was refused")


@pytest.fixture(scope="module")
def no_work():
    """Loading a model, pretraining, training: each fails the test if a case gets that far."""
    import kdtw.factory
    import kdtw.local
    import kdtw.pretrain

    with pytest.MonkeyPatch.context() as mp:
        for mod, name in ((kdtw.factory, "load_pair"), (kdtw.factory, "load_teacher"),
                          (kdtw.factory, "load_student"), (kdtw.pretrain, "pretrain"), (kdtw.local, "LocalLoop")):
            mp.setattr(mod, name, _no_work)
        yield


def assert_refused(rc: int, stderr: str, expect: str, before: dict, after: dict) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert rc == 2, f"exit status {rc}; stderr: {stderr[-2000:]}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr[-2000:]}"
    line = lines[0]
    assert line.startswith("kdtw: error: "), line
    assert expect in line, f"{expect!r} not in {line!r}"
    assert REMEDY.search(line), f"the message does not say what to change: {line!r}"
    assert after == before, f"files changed: {sorted(set(after.items()) ^ set(before.items()))}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_before_work(case: Case, tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)  # a relative write would land here, and be seen
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with contextlib.ExitStack() as stack:
        if case.setup is not None:
            case.setup(tmp_path, stack)
        argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(case.stdin)))
        before = snapshot(tmp_path)
        rc = kdtw.cli.main(argv)
        after = snapshot(tmp_path)
        out = capsys.readouterr()
    assert_refused(rc, out.err, case.expect.replace("{tmp}", str(tmp_path)), before, after)


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c.id for c in SUBPROCESS_CASES])
def test_bad_stdin_bytes_in_a_real_process(case: Case, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
    env = {**os.environ, "PYTHONIOENCODING": "latin-1", "OMP_NUM_THREADS": "1"}
    before = snapshot(tmp_path)
    out = subprocess.run([sys.executable, "-m", "kdtw.cli", *argv], input=case.stdin, capture_output=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert_refused(out.returncode, out.stderr.decode("utf-8", "replace"), case.expect, before, snapshot(tmp_path))


def test_the_table_covers_at_least_70_bad_inputs_of_every_kind():
    kinds = {"config values": CONFIG_VALUES, "config files": CONFIG_FILES, "flags": CLI_FLAGS,
             "stdin and input files": INPUTS + SUBPROCESS_CASES, "output folders": OUTPUTS}
    assert all(len(v) >= 5 for v in kinds.values())
    assert len(CASES) + len(SUBPROCESS_CASES) >= 70
    assert len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- the rules themselves


def test_every_numeric_field_declares_its_range():
    """A new int/float field must declare its range in kdtw/config.py (PosInt, Fraction, ...,
    or Field(ge=...)), or only its type is checked; train.lambda_min is any finite number."""
    unbounded = []

    def walk(cls, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            base, constraints, _, _ = _leaf(cls, f.name)
            if base in (int, float) and not _bounds(constraints):
                unbounded.append(prefix + f.name)

    walk(Config, "")
    assert unbounded == ["train.lambda_min"], f"no range declared for {unbounded}"


def test_validate_checks_types_of_configs_built_in_code():
    c = Config()
    c.train.lr = True
    c.budgets = {"light": True}
    with pytest.raises(ConfigError, match=r"train.lr=True must be a finite number > 0, e.g. train.lr=0.0001"):
        c.validate()
    c.train.lr = 1e-4
    with pytest.raises(ConfigError, match=r"budgets.light=True: a budget must be a number"):
        c.validate()


def test_messages_name_the_key_and_a_valid_value():
    with pytest.raises(ConfigError, match=r"train.lr=-0.1 must be a finite number > 0, e.g. train.lr=0.0001"):
        load_config(TINY, ["train.lr=-0.1"])
    with pytest.raises(ConfigError, match=r"teacher.hidden_size=-8 must be an integer >= 1, e.g. "
                                          r"teacher.hidden_size=256"):
        load_config(None, ["teacher.hidden_size=-8"])
    with pytest.raises(ConfigError, match=r"train.pcl_window=0 must be an integer >= 1 or null \(the whole rest"):
        load_config(None, ["train.pcl_window=0"])


def test_yaml_merge_keys_are_not_duplicates_and_valid_edge_values_pass():
    assert _yaml("a: &x {b: 1, c: 2}\nd:\n  <<: *x\n  b: 3\n") == {"a": {"b": 1, "c": 2}, "d": {"b": 3, "c": 2}}
    cfg = load_config(TINY, ["train.gamma=1", "train.demo_ratio=0", "pretrain.teacher_steps=0",
                             "teacher.device=cuda:1", "student.device=auto",
                             "prompt_template=[{phrase}] {instruction}:", "train.lambda_min=-0.5"])
    assert cfg.train.gamma == 1.0 and cfg.teacher.device == "cuda:1"


def test_overwrite_clears_only_the_old_runs_outputs(tmp_path, monkeypatch, capsys):
    """--overwrite deletes the old run's report, student and candidate (nothing else in the
    folder, e.g. the models cached inside it) once the new run has loaded, then runs it; a new
    run that fails to load leaves the old one whole."""
    import kdtw.local

    run = tmp_path / "run"
    folder("run", "report.json", "config.yaml", "student/", "candidate/")(tmp_path, None)
    (run / "models" / "teacher").mkdir(parents=True)
    (run / "models" / "teacher" / "config.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    started = []

    class FakeLoop:
        in_phase2 = False

        def __init__(self, cfg):
            if cfg.seed == 1:
                raise FileNotFoundError("no model")
            self.cfg = cfg

        def run(self, *, should_stop=None):
            started.append(sorted(os.listdir(self.cfg.run_dir)))
            return {"selected": None, "selected_dir": None}

    monkeypatch.setattr(kdtw.local, "LocalLoop", FakeLoop)
    argv = ["train", "--local", "--config", TINY, f"run_dir={run}", f"models_dir={run}/models"]
    before = snapshot(tmp_path)
    assert kdtw.cli.main(argv) == 2  # refused without the flag, nothing touched
    assert "holds another run" in capsys.readouterr().err and not started
    assert kdtw.cli.main([*argv[:2], "--overwrite", *argv[2:], "seed=1"]) == 2  # the new run cannot load
    assert "no model" in capsys.readouterr().err and snapshot(tmp_path) == before
    assert kdtw.cli.main([*argv[:2], "--overwrite", *argv[2:]]) == 0
    assert started == [["models", "notes.txt"]]
    assert (run / "models" / "teacher" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("exc", [PermissionError(13, "Permission denied", "/data/x"),
                                 IsADirectoryError(21, "Is a directory", "/data/x"),
                                 OSError(28, "No space left on device", "/data/x"),
                                 UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")])
def test_os_and_decoding_errors_inside_a_command_are_one_line(exc, monkeypatch, capsys):
    def fail(args):
        raise exc

    monkeypatch.setattr(kdtw.cli, "cmd_decode", fail)
    assert kdtw.cli.main(["decode"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdtw: error: ") and "Traceback" not in lines[0]
    assert ("/data/x" in lines[0]) != isinstance(exc, UnicodeDecodeError)


def test_resume_refuses_overrides_that_change_what_the_saved_state_means(tmp_path):
    """--resume goes on with the run's budgets, prompt, task and models (their shapes and what
    the saved λ, offsets and weights mean); a model may move to another device or dtype, and
    the training and Ray settings may change."""
    from actors.cluster import resumed_config

    path = tmp_path / "config.yaml"
    load_config(TINY).save(path)
    ok = resumed_config(str(path), ["train.phase2_steps=9", "student.device=cpu", "teacher.dtype=bfloat16"],
                        str(tmp_path / "here"))
    assert ok.train.phase2_steps == 9 and ok.run_dir == str(tmp_path / "here")
    for override, named in (("budgets.extra=0.4", "budgets.extra was None"),
                            ("student.hidden_size=8", "student.hidden_size was 16"),
                            ("task.instruction=summarise", "task.instruction was"),
                            ("prompt_template={instruction} ({phrase}):", "prompt_template was")):
        with pytest.raises(ConfigError, match=re.escape(named)) as e:
            resumed_config(str(path), [override])
        assert REMEDY.search(str(e.value)), str(e.value)
