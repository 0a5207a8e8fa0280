"""MLflow for the Ray jobs: one run per job, continued by a resumed job.

The store is ``MLFLOW_TRACKING_URI`` where set, else ``sqlite:///<run_dir>/mlflow.db`` with
artifacts in ``<run_dir>/mlartifacts`` (as jobs/evaluate.py does); the experiment is the config's
name. Params are the flattened config; metric keys use budget phrases (``lambda/light``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from contextlib import contextmanager

_BAD = re.compile(r"[^\w\-. :/]")
PARAM_MAX = 6000
# MLflow retries a request to a tracking server 7 times with backoff (minutes against a server
# that is down): a job's logging gives up sooner and training goes on. Set them to change that.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


# After the store fails, the tracker stops calling it for this long (doubling up to PAUSE_MAX_S while
# it keeps failing): each call to a server that is down costs MLflow's retries (~7 s here, minutes
# where packets are dropped), which every learner step would otherwise pay.
PAUSE_S, PAUSE_MAX_S = 60.0, 600.0


class TrackingError(RuntimeError):
    """The tracking server of ``MLFLOW_TRACKING_URI`` does not answer."""


def check_tracking() -> None:
    """A tracking server (``MLFLOW_TRACKING_URI`` http or https) that nothing answers at, found
    before the job starts Ray or writes anything (MLflow would retry for minutes, then fail)."""
    import socket
    from urllib.parse import urlparse

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    url = urlparse(uri)
    if url.scheme not in ("http", "https") or not url.hostname:
        return
    from urllib.request import getproxies, proxy_bypass

    if url.scheme in getproxies() and not proxy_bypass(url.hostname):
        return  # reached through a proxy (as MLflow's requests would): nothing to connect to here
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as e:
        raise TrackingError(f"MLFLOW_TRACKING_URI={uri}: nothing answers at {url.hostname}:{port} "
                            f"({e.strerror or e}): start the tracking server, fix the variable, or unset it to "
                            "track into <run_dir>/mlflow.db") from None


def _own_store(run_dir: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(run_dir, "mlflow.db"))


def tracking_uri(run_dir: str) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    os.makedirs(run_dir, exist_ok=True)
    return _own_store(run_dir)


def relocate(uri: str, run_dir: str) -> list[str]:
    """A run folder moved or copied with its own store (``sqlite:///<run_dir>/mlflow.db``):
    the store still names the artifact folder where the run was made (MLflow keeps absolute
    locations). Re-point every location under another ``.../mlartifacts`` to this run folder's
    ``mlartifacts`` (copied along with the store), so nothing is written to the old place.
    Returns the old locations changed. Other stores (``MLFLOW_TRACKING_URI``) are left alone."""
    db = uri[len("sqlite:///"):]
    if uri != _own_store(run_dir) or not os.path.exists(db):
        return []
    import sqlite3

    new = os.path.abspath(os.path.join(run_dir, "mlartifacts"))
    changed = []
    con = sqlite3.connect(db)
    try:
        with con:
            for exp_id, loc in con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall():
                if loc and loc.rstrip("/").endswith("/mlartifacts") and os.path.abspath(loc) != new:
                    old = loc.rstrip("/")
                    con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, exp_id))
                    con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                                "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                                (new, len(old) + 1, exp_id, len(old), old))
                    changed.append(old)
    finally:
        con.close()
    return changed


def _key(text: str) -> str:
    return _BAD.sub("_", text)


class Tracker:
    """One MLflow run. ``run_id`` continues a run (a resumed job): metric points at steps the run
    already holds are not logged again, so the steps a resumed job redoes after its checkpoint
    (up to where the first session stopped) keep one point each. A ``run_id`` the store does not
    know (the checkpoint was made under another store) starts a new run, with a line saying so."""

    def __init__(self, cfg, *, run_name: str, run_id: str | None = None, log=print) -> None:
        os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        self.log, self.failures, self.dropped = log, 0, 0
        self.retry_at, self.pause = 0.0, PAUSE_S  # after a failure, calls wait this long before trying again
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg.run_dir)
        for old in relocate(self.uri, cfg.run_dir) if run_id else []:
            log(f"[mlflow] the run folder moved: artifacts go to {cfg.run_dir}/mlartifacts, not {old}")
            try:  # MLflow keeps each run's artifact folder for the process: forget the old one
                from mlflow.tracking._tracking_service import utils

                utils._artifact_repos_cache.pop(run_id, None)
            except (ImportError, AttributeError):
                pass
        self.client = MlflowClient(self.uri)
        self.logged: dict[str, int] = {}  # metric key -> the last step the run holds
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException:
                log(f"[mlflow] the checkpoint's run {run_id} is not in {self.uri}: continuing in a new run")
            else:
                self.run_id = run.info.run_id
                for key in run.data.metrics:
                    self.logged[key] = max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
                self.client.update_run(self.run_id, status="RUNNING")
                return
        exp = self.client.get_experiment_by_name(cfg.name)
        if exp is None:
            loc = None
            if self.uri.startswith("sqlite:///"):
                loc = os.path.join(os.path.dirname(self.uri[len("sqlite:///"):]), "mlartifacts")
            exp_id = self.client.create_experiment(cfg.name, artifact_location=loc)
        else:
            exp_id = exp.experiment_id
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self.params(cfg.flat())

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(_key(k), str(v)[:PARAM_MAX]) for k, v in params.items()]
        for s in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[s : s + 100])

    def metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_key(k), float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v)) and step > self.logged.get(_key(k), -1)]
        def send():
            for s in range(0, len(items), 500):
                self.client.log_batch(self.run_id, metrics=items[s : s + 500])

        self._call(f"step {step}'s metrics", send)

    def artifact(self, path: str, folder: str | None = None) -> None:
        if not os.path.exists(path):
            return

        def send():
            if os.path.isdir(path):
                self.client.log_artifacts(self.run_id, path, folder)
            else:
                self.client.log_artifact(self.run_id, path, folder)

        self._call(os.path.basename(path), send)

    def _call(self, what: str, send, *, force: bool = False) -> None:
        """``send()`` to the store, unless it failed less than ``self.pause`` ago (``force``: try
        anyway). A store that fails during the run (a server gone: MLflow's connection errors and
        5xx answers, or a disk full) costs what was being logged, with a line each time it fails,
        not the training: the run folder holds everything (report.json, checkpoints). A 4xx answer
        (a request the store refuses) is a defect and raises."""
        from mlflow.exceptions import MlflowException

        if not force and time.monotonic() < self.retry_at:
            self.dropped += 1
            return
        try:
            send()
        except (MlflowException, OSError) as e:
            if isinstance(e, MlflowException) and e.get_http_status_code() < 500:
                raise
            self.failures += 1
            self.log(f"[mlflow] not logged: {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training "
                     f"goes on (the run folder has everything), the next {self.pause:.0f} s not sent to the store "
                     f"({self.failures} failure(s), {self.dropped} call(s) not sent so far)")
            self.retry_at = time.monotonic() + self.pause
            self.pause = min(2 * self.pause, PAUSE_MAX_S)
        else:
            self.pause = PAUSE_S

    def run_artifacts(self, run_dir: str, selected_dir: str | None) -> None:
        """A training run's files: config, report, λ plot and the selected student (the store is
        tried again for them, whatever failed before; if it fails again, the rest are not sent)."""
        self.retry_at = 0.0
        for name in ("config.yaml", "report.json", "lambda_trace.png"):
            self.artifact(os.path.join(run_dir, name))
        if selected_dir:
            self.artifact(selected_dir, "student")

    def finish(self, status: str = "FINISHED") -> None:
        self._call(f"the run's status ({status})", lambda: self.client.set_terminated(self.run_id, status=status),
                   force=True)  # tried once more, whatever failed before


@contextmanager
def tracked(cfg, *, run_name: str, run_id: str | None = None, log=print, enabled: bool = True):
    """One MLflow run for a block (None when not ``enabled``): FINISHED when the block ends,
    KILLED when a signal ends it (`actors.cluster.Interrupted`, KeyboardInterrupt), FAILED on an error."""
    from actors.cluster import Interrupted

    tracker = Tracker(cfg, run_name=run_name, run_id=run_id, log=log) if enabled else None
    if tracker is not None:
        log(f"[mlflow] run {tracker.run_id} ({tracker.uri})")
    try:
        yield tracker
    except BaseException as e:
        if tracker is not None:
            tracker.finish("KILLED" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "FAILED")
        raise
    if tracker is not None:
        tracker.finish()
