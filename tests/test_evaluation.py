"""The evaluation job end to end on conf/tiny.yaml (subprocess + MLflow), its bad-input errors,
and the verdict and Pareto helpers on hand-made numbers."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from kdtw.calibration import load_thresholds, save_thresholds
from kdtw.config import load_config
from kdtw.evaluation import LEARNED_RULES, evaluate_frontier, frontier_verdict, pareto_front
from kdtw.factory import load_student, load_teacher, task_tokenizer
from kdtw.models import LM, ModelError, init_model
from kdtw.tokenizer import build_word_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "evaluate.py")
TINY = os.path.join(ROOT, "conf", "tiny.yaml")
KS = (1, 2, 3, 5, 7)
COLUMNS = {
    "method", "setting", "target", "k", "do_sample", "bleu", "chrf", "teacher_forwards_per_token",
    "teacher_use", "adherence", "cost_latency_per_token", "wall_s_per_seq", "wall_s_per_seq_b1",
    "call_rule", "call_threshold", "caller_latency_per_token",
}


def _rule(cfg) -> str:
    """The configured call rule (the `budgeted` family); argmax before decoding.call_rule existed."""
    return getattr(cfg.decoding, "call_rule", "argmax")


def _overrides(tmp) -> list[str]:
    return ["task.n_validation=6", "decoding.max_new_tokens=8", f"run_dir={tmp}/run",
            f"models_dir={tmp}/models"]


def _job():
    spec = importlib.util.spec_from_file_location("evaluate_job", JOB)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Config, teacher, τ-student; the student saved as a kdtw folder and a plain drafter folder."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = load_config(TINY, _overrides(tmp))
    teacher = load_teacher(cfg)
    student = load_student(cfg, teacher)
    student.save(tmp / "student")
    tok = task_tokenizer(cfg)
    drafter = init_model(cfg.student, tok, seed=7)
    drafter.save_pretrained(tmp / "drafter")
    tok.save_pretrained(tmp / "drafter")
    return tmp, cfg, teacher, student


@pytest.fixture(scope="module")
def job_run(setup):
    tmp, cfg, _, _ = setup
    out = tmp / "out"
    uri = f"sqlite:///{tmp}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, JOB, "--config", TINY, "--student", str(tmp / "student"),
           "--drafter", str(tmp / "drafter"), "--out", str(out), "--ks", ",".join(map(str, KS)),
           *_overrides(tmp)]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kdtw: note" not in proc.stderr  # the student given is a trained (kdtw) student
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return out, uri, rows, proc, cfg


def test_job_writes_a_row_per_method_and_setting(job_run):
    out, _, rows, proc, cfg = job_run
    phrases = list(cfg.budgets)
    others = [f"budgeted_{r}" for r in LEARNED_RULES if r != _rule(cfg)]
    want = {("teacher", ""), ("student", "")}
    want |= {(m, p) for m in ("budgeted", "budgeted_strict", *others, "oracle") for p in phrases}
    want |= {(m, f"k{k}") for m in ("sd_greedy", "sd_sampling") for k in KS}
    got = [(r["method"], r["setting"]) for r in rows]
    assert sorted(got) == sorted(want)
    assert COLUMNS <= set(rows[0])
    rules = {r["method"]: r["call_rule"] for r in rows}
    assert rules["budgeted"] == rules["budgeted_strict"] == _rule(cfg) and rules["oracle"] == "oracle"
    assert {rules[m] for m in others} == set(LEARNED_RULES) - {_rule(cfg)}
    assert rules["teacher"] == rules["sd_greedy"] == ""  # not a caller
    for name in ("results.json", "verdict.txt", "command.txt", "call_thresholds.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "command.txt").read_text().startswith("python jobs/evaluate.py --config ")
    assert "budgeted" in proc.stdout and "sd_greedy" in proc.stdout  # progress lines
    assert "oracle thresholds calibrated on 6 validation examples" in proc.stdout
    verdict = (out / "verdict.txt").read_text()
    assert "oracle caller" in verdict  # the ratio, or why there is none (random tiny models)


def test_job_thresholds_are_calibrated_on_validation_and_saved(job_run):
    out, _, rows, _, cfg = job_run
    info = json.loads((out / "results.json").read_text())["info"]["call_thresholds"]
    saved = load_thresholds(out)
    for rule in ("threshold", "oracle"):
        assert info["source"][rule].startswith("calibrated on validation")
        assert saved[rule]["no"] == float("inf")  # budget 0: never call (null in the file)
        for r in rows:
            if r["call_rule"] != rule or r["method"] == "budgeted_strict":
                continue
            theta = saved[rule][r["setting"]]
            assert r["call_threshold"] == ("" if theta == float("inf") else str(theta))
            # the job evaluates the validation split: each row's use is the calibration's
            assert float(r["teacher_use"]) == pytest.approx(info["validation_use"][rule][r["setting"]])


def test_job_numbers_obey_the_definitions(job_run):
    _, _, rows, _, _ = job_run
    f = lambda r, k: float(r[k])  # noqa: E731
    teacher = next(r for r in rows if r["method"] == "teacher")
    for r in rows:
        for key in ("teacher_forwards_per_token", "cost_latency_per_token", "wall_s_per_seq", "wall_s_per_seq_b1"):
            if not (r["method"] == "oracle" and key == "wall_s_per_seq_b1"):  # not timed (see below)
                assert f(r, key) >= 0
        if r["method"].startswith("sd_"):
            k = int(r["k"])
            # every teacher forward yields at most K + 1 tokens
            assert f(r, "teacher_forwards_per_token") >= 1 / (k + 1) - 1e-12
        if r["method"] == "sd_greedy":
            # greedy speculative decoding is the teacher's greedy output, token for token
            assert f(r, "bleu") == f(teacher, "bleu") and f(r, "chrf") == f(teacher, "chrf")
            assert f(r, "same_as_teacher") == 1.0
        if r["method"].startswith("budgeted"):
            assert f(r, "adherence") == pytest.approx(abs(f(r, "teacher_use") - f(r, "target")))
        if r["method"] == "budgeted_strict":
            assert f(r, "teacher_use") <= f(r, "target") + 1e-9  # strict is a guarantee
        if r["method"] == "oracle":
            # the oracle's teacher runs at every step; the plot places it at the cost of its calls
            assert f(r, "teacher_forwards_per_token") == 1.0
            assert f(r, "caller_latency_per_token") <= f(r, "cost_latency_per_token")
            assert r["wall_s_per_seq_b1"] == ""
        elif r["call_rule"]:
            # a learned caller: one teacher forward per call, so the two latencies agree
            assert f(r, "caller_latency_per_token") == pytest.approx(f(r, "cost_latency_per_token"))
        if r["call_rule"] in ("threshold", "oracle") and f(r, "target") == 0.0:
            assert f(r, "teacher_use") == 0.0  # θ = inf: never call
    assert f(teacher, "teacher_use") == 1.0 and f(teacher, "teacher_forwards_per_token") == 1.0
    student = next(r for r in rows if r["method"] == "student")
    assert f(student, "teacher_use") == 0.0 and f(student, "teacher_forwards_per_token") == 0.0


def test_job_logs_an_mlflow_run(job_run, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    out, uri, rows, _, cfg = job_run
    # set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ: undo it after this test
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[cfg.name])
    assert len(runs) == 1
    run = runs.iloc[0]
    light = next(r for r in rows if r["method"] == "budgeted" and r["setting"] == "light")
    assert run["metrics.budgeted/light/bleu"] == pytest.approx(float(light["bleu"]))
    assert "metrics.sd_greedy/k7/teacher_forwards_per_token" in runs.columns
    assert "metrics.student/cost_latency_per_token" in runs.columns
    assert "metrics.oracle/light/bleu" in runs.columns
    assert run["params.eval.call_rules"].split(",")[0] == _rule(cfg)
    assert run["params.decoding.max_new_tokens"] == "8"
    assert run["params.budgets.light"] == "0.1"
    arts = {a.path for a in MlflowClient(uri).list_artifacts(run["run_id"])}
    assert {"results.csv", "results.json", "frontier.png", "verdict.txt", "call_thresholds.json"} <= arts


def test_default_tracking_uri_is_sqlite_under_run_dir(setup, monkeypatch):
    _, cfg, _, _ = setup
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = _job().tracking_uri(cfg)
    assert uri == "sqlite:///" + os.path.abspath(os.path.join(cfg.run_dir, "mlflow.db"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert _job().tracking_uri(cfg) == "http://example:5000"


def test_student_without_tau_is_rejected(setup):
    _, cfg, teacher, student = setup
    with pytest.raises(ValueError, match="no <τ> action"):
        evaluate_frontier(cfg, teacher, student.lm, None, log=lambda s: None)
    for bad_id in (None, 5):  # missing, or a real vocabulary token
        bad = copy.copy(student)
        bad.tau_id = bad_id
        with pytest.raises(ValueError, match="<τ> id"):
            evaluate_frontier(cfg, teacher, bad, None, log=lambda s: None)


def test_drafter_with_another_tokenizer_is_rejected(setup):
    _, cfg, teacher, student = setup
    tok = build_word_tokenizer(["alpha", "beta", "gamma"])
    drafter = LM(init_model(cfg.student, tok, seed=3), tok)
    with pytest.raises(ModelError, match="drafter's tokenizer differs"):
        evaluate_frontier(cfg, teacher, student, drafter, log=lambda s: None)


def test_empty_split_is_one_error_line_and_status_2(setup, capsys):
    tmp, *_ = setup
    rc = _job().main(["--config", TINY, "--out", str(tmp / "empty"), *_overrides(tmp), "task.n_validation=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    # refused when the config is loaded, before any model (an empty split would crash every command)
    assert err[-1].startswith("kdtw: error:") and "task.n_validation=0 must be an integer >= 1" in err[-1]


def test_evaluation_imports_neither_ray_nor_mlflow():
    code = "import sys, kdtw.evaluation; assert not {'ray', 'mlflow'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- verdict


def _row(method, setting="", *, q, lat, fwd=0.0, use=0.0, k=None):
    return {"method": method, "setting": setting, "k": k, "bleu": q, "cost_latency_per_token": lat,
            "teacher_forwards_per_token": fwd, "teacher_use": use}


def test_pareto_front_keeps_undominated_points():
    pts = [(1.0, 5.0), (0.5, 3.0), (0.5, 4.0), (2.0, 4.5), (3.0, 6.0)]
    assert pareto_front(pts) == [(0.5, 4.0), (1.0, 5.0), (3.0, 6.0)]


def test_verdict_is_computed_from_the_numbers():
    rows = [
        _row("student", q=10.0, lat=0.5),
        _row("teacher", q=30.0, lat=1.0, fwd=1.0, use=1.0),
        _row("budgeted", "light", q=20.0, lat=0.6, fwd=0.08, use=0.08),
        _row("budgeted_strict", "heavy", q=28.0, lat=0.8, fwd=0.3, use=0.3),
        _row("sd_greedy", "k1", q=30.0, lat=0.9, fwd=0.6, use=0.6, k=1),
        _row("sd_greedy", "k3", q=30.0, lat=0.7, fwd=0.3, use=0.3, k=3),
        _row("sd_greedy", "k7", q=30.0, lat=0.55, fwd=0.2, use=0.2, k=7),
    ]
    v = frontier_verdict(rows, primary="bleu", c=0.5)
    assert "SD K=1 (0.900, 30.00): best budgeted point at latency <= 0.900 is strict budget 'heavy' " \
           "(0.800, 28.00), 2.00 below" in v
    assert "SD K=3 (0.700, 30.00): best budgeted point at latency <= 0.700 is budget 'light'" in v
    assert "SD K=7 (0.550, 30.00): no budgeted point is as fast" in v
    assert "exists for 0 of 3 SD block sizes" in v
    assert "1/(7+1) = 0.125" in v and "best budgeted point is budget 'light' with bleu 20.00" in v
    assert "closes 50% of the student-to-teacher gap" in v

    rows[3]["bleu"] = 31.0  # now strict heavy beats SD K=1 and K=3 at lower latency
    v = frontier_verdict(rows, primary="bleu")
    assert "(0.800, 31.00), 1.00 above" in v and "exists for 1 of 3" in v

    rows[0]["bleu"] = 40.0  # the student beats the teacher: no gap
    assert "no student-to-teacher gap to close" in frontier_verdict(rows, primary="bleu")


def test_verdict_reports_learned_against_oracle_caller():
    rows = [
        _row("student", q=10.0, lat=0.5),
        _row("teacher", q=30.0, lat=1.0, fwd=1.0, use=1.0),
        _row("budgeted", "light", q=20.0, lat=0.6, fwd=0.08, use=0.08),
        _row("budgeted_threshold", "light", q=22.0, lat=0.6, fwd=0.09, use=0.09),
        _row("budgeted_sample", "heavy", q=25.0, lat=0.8, fwd=0.3, use=0.3),
        _row("oracle", "light", q=25.0, lat=1.5, fwd=1.0, use=0.09),
        _row("oracle", "heavy", q=29.0, lat=1.5, fwd=1.0, use=0.3),
        _row("sd_greedy", "k1", q=30.0, lat=0.9, fwd=0.6, use=0.6, k=1),
    ]
    rows[2]["call_rule"] = "argmax"
    v = frontier_verdict(rows, primary="bleu")
    assert "closes 50% of the student-to-teacher gap" in v  # the configured rule, as before
    assert "threshold rule closes 60% (budget 'light' (threshold rule), use 0.090, bleu 22.00)" in v
    assert "sample rule: no point below 0.10" in v
    assert "its best point below 0.10 teacher use is oracle 'light' (use 0.090, bleu 25.00); it closes 75%" in v
    assert ("Learned caller / oracle caller below 0.10 teacher use (share of the gap closed): 0.67 (the "
            "configured argmax rule, 50% / 75%); 0.80 (threshold rule).") in v

    no_oracle = [r for r in rows if r["method"] != "oracle"]
    assert "No oracle caller rows" in frontier_verdict(no_oracle, primary="bleu")
    high = [dict(r, teacher_use=0.3) if r["method"] == "oracle" else r for r in rows]
    assert "has no point below 0.10 teacher use" in frontier_verdict(high, primary="bleu")


def test_saved_thresholds_are_used_and_rules_are_checked(setup, tmp_path):
    _, cfg, teacher, student = setup
    phrases = list(cfg.budgets)
    saved = {"threshold": {p: (math.inf if p == "no" else 0.0) for p in phrases},
             "oracle": {p: math.inf for p in phrases}}
    save_thresholds(tmp_path, saved)
    lines: list[str] = []
    res = evaluate_frontier(cfg, teacher, student, None, n=3, ks=(1,), call_rule="argmax",
                            thresholds=load_thresholds(tmp_path), log=lines.append)
    assert not any("calibrated" in ln for ln in lines)
    assert res.info["call_thresholds"]["source"] == {"threshold": "call_thresholds.json",
                                                      "oracle": "call_thresholds.json"}
    for p in phrases:
        thr, orc = res.row("budgeted_threshold", p), res.row("oracle", p)
        assert thr["teacher_use"] == (0.0 if p == "no" else 1.0)  # θ = 0 calls at every step
        assert orc["teacher_use"] == 0.0 and orc["call_threshold"] is None  # θ = inf: never
    assert {r["method"] for r in res.rows} >= {"budgeted", "budgeted_sample", "budgeted_threshold", "oracle"}

    # only the rules asked for; no oracle
    res = evaluate_frontier(cfg, teacher, student, None, n=2, ks=(1,), call_rule="sample",
                            call_rules=["sample"], oracle=False, log=lambda s: None)
    assert {r["method"] for r in res.rows} == {"student", "teacher", "budgeted", "budgeted_strict",
                                                "sd_greedy", "sd_sampling"}
    assert res.row("budgeted", "light")["call_rule"] == "sample"
    assert res.info["oracle"] is False and res.info["call_rules"] == ["sample"]
    for bad, msg in ((dict(call_rules=["nope"]), "unknown call rule 'nope'"),
                     (dict(call_rules=["oracle"]), "not a learned call rule"),
                     (dict(call_rule="oracle"), "evaluation ceiling")):
        with pytest.raises(ValueError, match=msg):
            evaluate_frontier(cfg, teacher, student, None, n=2, ks=(1,), log=lambda s: None, **bad)


def test_job_unknown_call_rule_is_one_error_line(setup, capsys):
    tmp, *_ = setup
    rc = _job().main(["--config", TINY, "--out", str(tmp / "bad"), "--call-rules", "argmax,greedy",
                      *_overrides(tmp)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == ("kdtw: error: --call-rules 'argmax,greedy': unknown call rule 'greedy': use a "
                       "subset of argmax, sample, systematic, threshold")
    rc = _job().main(["--config", TINY, "--out", str(tmp / "bad"), "--call-rules", "oracle", *_overrides(tmp)])
    assert rc == 2 and "--no-oracle" in capsys.readouterr().err


def test_job_refuses_to_write_over_an_earlier_evaluation(job_run, capsys):
    """--out holding an earlier evaluation's files is refused before any model loads (the files
    untouched) unless --overwrite."""
    out, uri, _, proc, _ = job_run
    tmp = out.parent
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc = _job().main(["--config", TINY, "--student", str(tmp / "student"), "--out", str(out), *_overrides(tmp)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"kdtw: error: --out {str(out)!r} holds an earlier evaluation (results.csv, ")
    assert "add --overwrite" in err[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
