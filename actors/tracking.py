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

_BAD = re.compile(r"[^\w\-. :/]")
PARAM_MAX = 6000


def tracking_uri(run_dir: str) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    os.makedirs(run_dir, exist_ok=True)
    return "sqlite:///" + os.path.abspath(os.path.join(run_dir, "mlflow.db"))


def _key(text: str) -> str:
    return _BAD.sub("_", text)


class Tracker:
    def __init__(self, cfg, *, run_name: str, run_id: str | None = None) -> None:
        os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg.run_dir)
        self.client = MlflowClient(self.uri)
        if run_id:
            self.run_id = self.client.get_run(run_id).info.run_id  # raises on an unknown id
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
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        for s in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[s : s + 500])

    def artifact(self, path: str, folder: str | None = None) -> None:
        if os.path.isdir(path):
            self.client.log_artifacts(self.run_id, path, folder)
        elif os.path.exists(path):
            self.client.log_artifact(self.run_id, path, folder)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
