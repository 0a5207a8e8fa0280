"""Ray test helpers: one ``ray.init(num_cpus=2)`` per module (``ray_session``), token auth set
through the environment (nothing is written to ~/.ray), tiny configs, free ports."""

from __future__ import annotations

import importlib.util
import os
import secrets
import socket
import sys

import pytest

from conftest import ROOT

JOBS = os.path.join(ROOT, "jobs")
VENV_BIN = os.path.dirname(sys.executable)


def ray_env(env: dict | None = None) -> dict:
    """Token auth on, with a per-session token in the environment (children inherit it)."""
    env = os.environ if env is None else env
    env["RAY_AUTH_MODE"] = "token"
    env.setdefault("RAY_AUTH_TOKEN", os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32))
    os.environ.setdefault("RAY_AUTH_TOKEN", env["RAY_AUTH_TOKEN"])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    return env


def load_job(name: str):
    """A jobs/ script as a module (jobs/ is not a package)."""
    if JOBS not in sys.path:
        sys.path.insert(0, JOBS)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(JOBS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(run_dir, *overrides: str):
    from kdtw.config import load_config

    return load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [f"run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def ray_session():
    ray_env()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    yield ray
    ray.shutdown()
