"""actors/tracking.py on a local MLflow store: a continued run gets one point per step, a run id
the store does not know starts a new run with a line saying so, and a run folder moved with its
own store sends artifacts to where it is now."""

from __future__ import annotations

import os
import shutil

from conftest import ROOT

from actors.tracking import Tracker
from kdtw.config import load_config


def _cfg(run_dir):
    return load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [f"run_dir={run_dir}"])


def test_a_continued_run_logs_each_step_once(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path / "run")
    first = Tracker(cfg, run_name="t", log=lambda _: None)
    for step in range(1, 6):
        first.metrics({"loss": float(step), "lambda/light": 0.5}, step=step)
    first.finish("KILLED")
    lines: list[str] = []
    again = Tracker(cfg, run_name="t", run_id=first.run_id, log=lines.append)
    assert again.run_id == first.run_id and not lines
    for step in range(3, 8):  # a resume from the step-2 checkpoint redoes steps 3-5
        again.metrics({"loss": 10.0 * step, "lambda/light": 0.5}, step=step)
    again.finish()
    hist = {m.step: m.value for m in again.client.get_metric_history(first.run_id, "loss")}
    assert sorted(hist) == [1, 2, 3, 4, 5, 6, 7] and len(again.client.get_metric_history(first.run_id, "loss")) == 7
    assert hist[5] == 5.0 and hist[6] == 60.0  # the first session's points stand
    assert again.client.get_run(first.run_id).info.status == "FINISHED"


def test_an_unknown_run_id_starts_a_new_run_with_a_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lines: list[str] = []
    t = Tracker(_cfg(tmp_path / "run"), run_name="t", run_id="0123456789abcdef0123456789abcdef", log=lines.append)
    assert t.run_id != "0123456789abcdef0123456789abcdef"
    assert len(lines) == 1 and "is not in" in lines[0] and "new run" in lines[0]
    t.metrics({"loss": 1.0}, step=1)
    assert [m.step for m in t.client.get_metric_history(t.run_id, "loss")] == [1]


def test_a_moved_run_folder_keeps_its_artifacts_where_it_is(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old_dir, new_dir = tmp_path / "a" / "run", tmp_path / "b" / "run"
    first = Tracker(_cfg(old_dir), run_name="t", log=lambda _: None)
    (tmp_path / "note.txt").write_text("x")
    first.artifact(str(tmp_path / "note.txt"))
    first.finish("KILLED")
    shutil.copytree(old_dir, new_dir)
    shutil.rmtree(old_dir)
    lines: list[str] = []
    again = Tracker(_cfg(new_dir), run_name="t", run_id=first.run_id, log=lines.append)
    again.artifact(str(tmp_path / "note.txt"), "more")
    assert not old_dir.exists() and len(lines) == 1 and "moved" in lines[0]
    assert {a.path for a in again.client.list_artifacts(first.run_id)} == {"note.txt", "more"}
    assert again.client.get_run(first.run_id).info.artifact_uri.startswith(str(new_dir / "mlartifacts"))


def test_a_tracking_server_that_goes_away_costs_the_logging_not_the_run(tmp_path, monkeypatch):
    """Started against a store, then the store's server is gone (here a client pointed at a port
    nothing listens on), with the jobs' own retry settings: the first failed call says so in a line
    and the next calls are not sent for a while (each would pay MLflow's retries), so 100 learner
    steps cost one call's retries, not 100; the run's files and status are tried once more at the
    end; nothing raises. A request the store refuses (4xx) is a defect and raises. A server down
    before the job starts is refused by `check_tracking` in one error naming the variable."""
    import socket
    import time

    import pytest
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from actors.tracking import HTTP_DEFAULTS, TrackingError, check_tracking

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for k in HTTP_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    check_tracking()  # the run folder's own store: nothing to reach
    lines: list[str] = []
    tracker = Tracker(_cfg(tmp_path / "run"), run_name="t", log=lines.append)
    tracker.metrics({"loss": 1.0}, step=1)
    with pytest.raises(MlflowException):  # a 4xx from the store: not swallowed
        tracker._call("a bad key", lambda: tracker.client.log_batch(tracker.run_id, params=[]) or
                      tracker.client.get_run("no-such-run"))
    tracker.client = MlflowClient(f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    for step in range(2, 102):
        tracker.metrics({"loss": float(step)}, step=step)
    one_call = time.monotonic() - t0
    assert tracker.failures == 1 and tracker.dropped == 99 and one_call < 30, (tracker.failures, one_call)
    (tmp_path / "run" / "report.json").write_text("{}")
    tracker.run_artifacts(str(tmp_path / "run"), None)  # tried again: report.json fails (the others are absent)
    tracker.finish()  # tried again
    assert tracker.failures == 3 and len(lines) == 3, lines
    assert all(ln.startswith("[mlflow] not logged: ") and "training goes on" in ln for ln in lines), lines
    assert "step 2's metrics" in lines[0] and "the next 60 s not sent" in lines[0]
    assert "report.json" in lines[1] and "the next 120 s" in lines[1] and "the run's status (FINISHED)" in lines[2]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    for k in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(TrackingError, match=rf"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: nothing answers"):
        check_tracking()
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    check_tracking()  # reached through a proxy, as MLflow's requests would: not checked here
