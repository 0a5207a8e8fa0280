"""The kdtw command line end to end on conf/tiny.yaml (subprocesses, as a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

TINY = os.path.join(ROOT, "conf", "tiny.yaml")


def kdtw(*args, stdin: str | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "kdtw.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cli"))


@pytest.mark.parametrize("mode", ["budgeted", "student", "teacher", "speculative"])
def test_decode_writes_json_lines(mode, run_dir):
    out = kdtw("decode", "--config", TINY, "--mode", mode, "--budget", "light", "--k", "2",
               f"run_dir={run_dir}", stdin="the dog\nsee a cat\n")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert {"text", "tokens", "teacher_calls", "student_steps", "teacher_forwards"} <= set(r)
        assert r["budget"] == "light" and r["mode"] == mode


@pytest.mark.parametrize(
    "args,stdin,message",
    [
        (["decode", "--budget", "lots"], "a b\n", "unknown budget phrase 'lots'"),
        (["decode", "decoding.max_new_tokenz=3"], "a b\n", "unknown config key"),
        (["decode"], "\n  \n", "no input"),
        (["decode", "--input", "/no/such/file"], None, "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(args, stdin, message, run_dir):
    out = kdtw(*args[:1], "--config", TINY, *args[1:], f"run_dir={run_dir}", stdin=stdin)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("kdtw: error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_missing_column_is_one_clear_line(tmp_path, run_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"en": "a b", "xx": "c d"}\n')
    out = kdtw("report", "--config", TINY, "task.kind=datasets", f"task.dataset={tmp_path}",
               "task.data_files={train: d.jsonl, validation: d.jsonl}", "teacher.tokenizer=x",
               "student.tokenizer=x", f"run_dir={run_dir}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "'source'" in out.stderr and "task.source_column" in out.stderr, out.stderr[-2000:]


def test_pretrain_caches_and_report_prints_a_table(tmp_path):
    models = str(tmp_path / "models")
    common = ["--config", TINY, f"models_dir={models}", "teacher.source=pretrain", "student.source=pretrain",
              "pretrain.teacher_steps=3", "pretrain.student_steps=3"]
    out = kdtw("pretrain", *common)
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.path.exists(os.path.join(models, "teacher", "pretrain_report.json"))
    assert "[pretrain teacher] step 3/3" in out.stdout
    again = kdtw("pretrain", *common, "seed=3")  # the models every seed's runs start from
    assert "cached" in again.stdout
    # another spec or task than the cached models were made from: refused, not taken as cached
    other = kdtw("pretrain", *common, "teacher.hidden_size=48", "task.generator.lexicon_size=50")
    assert other.returncode == 2 and "cached" not in other.stdout, other.stdout
    assert other.stderr.strip().splitlines()[-1] == (
        f"kdtw: error: the cached teacher in {models}/teacher was pretrained with teacher.hidden_size=32, the config "
        "now gives 48 (and 1 more): add --force to pretrain it again, or give another models_dir")
    rep = kdtw("report", *common, "--n", "4")
    assert rep.returncode == 0, rep.stderr[-2000:]
    for label in ("student", "teacher", "budget no", "budget full"):
        assert label in rep.stdout
    only = kdtw("report", *common, "--n", "4", "--runs", "teacher", "--json", str(tmp_path / "t.json"))
    assert only.returncode == 0, only.stderr[-2000:]
    assert [r["run"] for r in json.load(open(tmp_path / "t.json"))] == ["teacher"]
    bad = kdtw("report", *common, "--runs", "teacher,drafter")
    assert bad.returncode != 0 and "comma-separated subset of student, teacher, budgets" in bad.stderr
    missing = kdtw("report", "--config", TINY, f"models_dir={tmp_path / 'none'}", "teacher.source=pretrain")
    assert missing.returncode == 2 and "run `kdtw pretrain" in missing.stderr


def test_ctrl_c_in_the_local_loop_exports_the_best_so_far(tmp_path):
    """SIGINT to `kdtw train --local` in Phase 2: the step in flight finishes, the best student
    validated so far is exported with report.json (which says where it stopped), exit 130 with
    one line; nothing of the run is lost."""
    from conftest import signal_when

    run = tmp_path / "run"
    rc, _, err, _ = signal_when([sys.executable, "-m", "kdtw.cli", "train", "--local", "--config", TINY, f"run_dir={run}",
                                 "train.phase2_steps=100000", "train.validate_every=3", "train.log_every=1"],
                                "[validate] phase-2 step 3")
    assert rc == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("kdtw: interrupted by SIGINT at Phase-2 step ") and "report.json written" in last, err
    with open(run / "report.json") as f:
        report = json.load(f)
    step = int(last.split("Phase-2 step ")[1].split(":")[0])
    assert report["stopped"] == {"signal": "SIGINT", "phase": 2, "step": step} and step >= 3
    assert len(report["lambda_trace"]) == step and report["selected"] is not None
    assert (run / "student" / "kdtw_student.json").exists() and not (run / "candidate").exists()


def test_a_diverging_phase_2_in_the_local_loop_exports_the_best_so_far(tmp_path):
    """`kdtw train --local` whose Phase-2 rate sends the weights off: one error line naming the
    rate (status 2), and the best student validated so far exported with report.json, which says
    where and why it stopped."""
    run = tmp_path / "run"
    out = kdtw("train", "--local", "--config", TINY, f"run_dir={run}", "train.phase2_lr=1e30",
               "train.phase2_steps=12", "train.validate_every=1000")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith("kdtw: error: ") and "train.phase2_lr" in last, out.stderr[-3000:]
    assert "exporting the selection among the validations so far" in out.stdout
    assert f"[kdtw] to use it: kdtw report --student {run / 'student'}," in out.stdout  # the next command
    with open(run / "report.json") as f:
        report = json.load(f)
    assert report["stopped"]["phase"] == 2 and report["stopped"]["step"] < 12 and "train.phase2_lr" in report["stopped"]["error"]
    assert report["selected"]["phase"] == 1 and (run / "student" / "kdtw_student.json").exists()


def test_help_lists_every_command_eval_included(capsys):
    """`kdtw --help` names every subcommand; `kdtw eval` runs jobs/evaluate.py and is listed too."""
    from kdtw.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("pretrain", "decode", "train", "report", "settle", "eval", "data"):
        assert command in out.split("positional arguments:")[1].split("options:")[0], command
    assert main(["eval", "--help"]) == 0
    assert "--drafter" in capsys.readouterr().out


def test_settle_saves_a_settled_student_and_refuses_bad_input(tmp_path):
    """`kdtw settle` (kdtw/settle.py) on a saved student: a new folder whose per-budget offsets
    moved by minus the reported shifts; nothing else of the student changed; bad input: one line."""
    import torch
    from safetensors.torch import load_file

    from kdtw.config import load_config
    from kdtw.factory import load_student

    cfg = load_config(TINY, [f"models_dir={tmp_path / 'models'}", f"run_dir={tmp_path / 'run'}"])
    student = load_student(cfg)
    with torch.no_grad():
        student.tau_offset.fill_(3.0)
    student.save(tmp_path / "s")
    common = ["--config", TINY, f"models_dir={tmp_path / 'models'}", "student.source=pretrained",
              f"student.name_or_path={tmp_path / 's'}", "decoding.call_rule=systematic"]
    out = kdtw("settle", *common, "train.settle_probes=4", "train.settle_rounds=1", "--out", str(tmp_path / "settled"),
               "--json", str(tmp_path / "settle.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[settle] round 1/1" in out.stdout and "saved to" in out.stdout
    res = json.load(open(tmp_path / "settle.json"))
    before = load_file(str(tmp_path / "s" / "value_head.safetensors"))
    after = load_file(str(tmp_path / "settled" / "value_head.safetensors"))
    assert torch.allclose(before["budget_offsets"] - after["budget_offsets"], torch.tensor(res["shift"]), atol=1e-6)
    assert any(x != 0 for x in res["shift"]) and torch.equal(before["tau_offset"], after["tau_offset"])
    again = kdtw("settle", *common, "train.settle_probes=4", "--out", str(tmp_path / "settled"))
    assert again.returncode == 2 and "not an empty folder" in again.stderr
    off = kdtw("settle", *common, "--out", str(tmp_path / "other"))
    assert off.returncode == 2 and "train.settle_probes=24" in off.stderr and not (tmp_path / "other").exists()


def test_decode_report_and_settle_take_the_trained_student(tmp_path):
    """`--student DIR` decodes with the student a run exported (here one whose <τ> offset makes it
    call at every step); without it a budgeted decode says that the config's student never learned
    when to call, and names the run's trained student where one exists; a wrong folder is one line."""
    import torch

    from kdtw.config import load_config
    from kdtw.factory import load_student

    student = load_student(load_config(TINY, []))
    with torch.no_grad():
        student.tau_offset.fill_(50.0)
    trained = tmp_path / "run" / "student"
    student.save(str(trained))
    common = ("--config", TINY, "--budget", "light", f"run_dir={tmp_path / 'run'}")
    given = kdtw("decode", *common, "--student", str(trained), stdin="the dog\n")
    assert given.returncode == 0 and "kdtw: note" not in given.stderr, given.stderr[-2000:]
    assert set(json.loads(given.stdout)["call_mask"]) == {1}
    plain = kdtw("decode", *common, stdin="the dog\n")
    assert plain.returncode == 0 and 0 in json.loads(plain.stdout)["call_mask"], plain.stdout
    assert (f"kdtw: note: the config's student (student.source=init) has not learned when to call the teacher; the "
            f"student trained in run_dir is {trained}: give --student {trained}") in plain.stderr
    fresh = kdtw("decode", *common[:4], f"run_dir={tmp_path / 'other'}", stdin="the dog\n")
    assert "train one (python jobs/train_pcl.py or kdtw train --local)" in fresh.stderr, fresh.stderr[-2000:]
    assert "kdtw: note" not in kdtw("decode", *common, "--mode", "student", stdin="the dog\n").stderr
    rep = kdtw("report", "--config", TINY, "--n", "2", "--runs", "budgets", "--student", str(trained),
               "--json", str(tmp_path / "rows.json"))
    assert rep.returncode == 0 and "kdtw: note" not in rep.stderr, rep.stderr[-2000:]
    assert all(r["teacher_use"] == 1.0 for r in json.loads((tmp_path / "rows.json").read_text()) if r["target"])
    (tmp_path / "empty").mkdir()
    for cmd, folder, message in (("decode", tmp_path / "none", "is not a folder"),
                                 ("report", tmp_path / "empty", "holds no model"),
                                 ("settle", tmp_path / "none", "is not a folder")):
        extra = ("--out", str(tmp_path / "settled")) if cmd == "settle" else ()
        bad = kdtw(cmd, "--config", TINY, *extra, "--student", str(folder), stdin="a\n")
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-2000:]
        assert lines[0].startswith(f"kdtw: error: --student {str(folder)!r} {message}")
        assert lines[0].endswith("or leave --student out")
