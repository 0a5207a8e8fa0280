"""Checkpoints run no code and are never lost: a crafted ``.pt`` with a valid manifest is refused
and nothing in it runs; a writer SIGKILLed at any step leaves a checkpoint ``--resume`` continues
from; ``latest`` naming a missing or corrupt step falls back to the newest intact one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT
from conftest_ray import load_job
from kdtw.checkpoint import META, CheckpointError, load_state, open_checkpoint, save_state, write_checkpoint
from test_atomic import killed_at


class Exploit:
    """Unpickling this runs ``exec`` (what a crafted checkpoint would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


class SystemExploit(Exploit):
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _rehash(ckpt: str) -> None:
    """Recompute the manifest's checksums: the attacker controls the whole folder."""
    path = os.path.join(ckpt, META)
    with open(path) as f:
        manifest = json.load(f)
    for rel in manifest["files"]:
        with open(os.path.join(ckpt, rel), "rb") as f:
            manifest["files"][rel] = hashlib.sha256(f.read()).hexdigest()
    with open(path, "w") as f:
        json.dump(manifest, f)


def _state_checkpoint(run_dir: str, step: int = 3) -> str:
    """A checkpoint with honest ``learner.pt`` and ``driver.pt`` (no student: enough to restore
    up to the point where the state files are read)."""

    def write(folder: str) -> dict:
        save_state({"step": step, "lam": torch.zeros(2)}, os.path.join(folder, "learner.pt"))
        save_state({"torch_rng": torch.get_rng_state(), "counters": {}}, os.path.join(folder, "driver.pt"))
        return {"mlflow_run_id": None}

    return write_checkpoint(run_dir, step, write)


def _poison(ckpt: str, name: str, exploit: Exploit, *, raw: bool = False) -> None:
    """Replace a state file by one that runs ``exploit`` when unpickled: a ``torch.save`` zip,
    or (``raw``) a bare pickle, which ``torch.load`` also accepts. Pickling runs nothing."""
    path = os.path.join(ckpt, name)
    if raw:
        with open(path, "wb") as f:
            pickle.dump({"step": 3, "lam": exploit}, f)
    else:
        torch.save({"step": 3, "lam": exploit}, path)
    _rehash(ckpt)


# ----------------------------------------------------------------------------- no code from disk


@pytest.mark.parametrize("name", ["learner.pt", "driver.pt"])
@pytest.mark.parametrize("kind,raw", [(Exploit, False), (SystemExploit, False), (SystemExploit, True)])
def test_a_crafted_state_file_is_refused_and_runs_nothing(tmp_path, name, kind, raw):
    marker = tmp_path / "pwned"
    ckpt = _state_checkpoint(str(tmp_path / "run"))
    _poison(ckpt, name, kind(str(marker)), raw=raw)
    ckpt, manifest = open_checkpoint(str(tmp_path / "run"))  # the manifest is valid: integrity is not origin
    with pytest.raises(CheckpointError) as err:
        load_state(os.path.join(ckpt, name))
    msg = str(err.value)
    assert "\n" not in msg and "holds objects other than tensors and plain data and will not be loaded" in msg
    # the job's own restore path (actors/system.py), which reads the state files before it builds anything
    load_job("train_pcl")  # puts the repository on sys.path, as the job does
    from actors.system import Actors

    with pytest.raises(CheckpointError, match="will not be loaded"):
        Actors.restore(SimpleNamespace(), ckpt)
    assert not marker.exists()


def test_a_crafted_phase1_learner_is_refused_before_ray_starts(tmp_path):
    """``--phase1 DIR`` has no manifest: `check_phase1` reads ``learner.pt`` the safe way."""
    from kdtw.phase1 import PHASE1_META, check_phase1

    marker = tmp_path / "pwned"
    folder = tmp_path / "phase1"
    (folder / "student").mkdir(parents=True)
    (folder / "student" / "kdtw_student.json").write_text("{}")
    (folder / PHASE1_META).write_text("{}")
    torch.save({"step": SystemExploit(str(marker))}, folder / "learner.pt")
    with pytest.raises(CheckpointError, match="will not be loaded"):
        check_phase1(str(folder))
    assert not marker.exists()


def test_resume_from_a_crafted_checkpoint_is_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _state_checkpoint(str(tmp_path / "run"))
    _poison(ckpt, "driver.pt", SystemExploit(str(marker)))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "train_pcl.py"), "--resume", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdtw: error: ") and "will not be loaded" in lines[0], proc.stderr
    assert not marker.exists()


def test_every_saved_state_reads_back_without_pickle_code(tmp_path):
    """What the job writes: optimizer state, RNG states of Python, torch and numpy scalars in
    metrics, observations as dicts, bytes; and arbitrary nested extras (the learner grows some)."""
    from kdtw.teacher_service import UseObservation

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(3)
    opt.step()
    rng = random.Random(5)
    state = {"optimizer": opt.state_dict(), "reward_std": (3, 0.5, 1.25), "gen": torch.Generator().get_state(),
             "rng": rng.getstate(), "initial": {"bleu": np.float64(12.5), "n": np.int64(4)}, "none": None,
             "uses": [dataclasses.asdict(UseObservation(0, 0.25, 0.0))], "blob": b"\x00parquet",
             "extra": {"integral": torch.zeros(2), "nested": [{"x": float("inf")}]}}
    path = str(tmp_path / "state.pt")
    save_state(state, path)
    back = load_state(path)
    assert back["initial"] == {"bleu": 12.5, "n": 4} and type(back["initial"]["bleu"]) is float
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["reward_std"] == (3, 0.5, 1.25) and back["blob"] == b"\x00parquet"
    assert UseObservation(**back["uses"][0]) == UseObservation(0, 0.25, 0.0)
    again = random.Random()
    again.setstate(back["rng"])
    assert again.random() == rng.random()
    assert back["extra"]["nested"][0]["x"] == float("inf")


def test_a_damaged_state_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "learner.pt"
    save_state({"lam": torch.zeros(1000)}, str(path))
    for damage in (path.read_bytes()[:500], b"state garbage"):
        path.write_bytes(damage)
        with pytest.raises(CheckpointError, match="learner.pt is corrupt") as err:
            load_state(str(path))
        assert "\n" not in str(err.value)


def test_an_object_that_could_not_be_read_back_is_not_written(tmp_path):
    from kdtw.teacher_service import UseObservation

    with pytest.raises(CheckpointError, match=r"driver\.pt\['buffer'\]\['uses'\]\[0\] is a kdtw.teacher_service.UseObservation"):
        save_state({"buffer": {"uses": [UseObservation(0, 0.5, 0.0)]}}, str(tmp_path / "driver.pt"))
    assert not (tmp_path / "driver.pt").exists()


def test_no_torch_load_outside_load_state():
    """Every ``.pt`` read goes through `load_state` (a new ``torch.load`` would bypass it)."""
    hits = []
    for top in ("kdtw", "actors", "jobs"):
        for root, _, names in os.walk(os.path.join(ROOT, top)):
            for n in names:
                if n.endswith(".py"):
                    with open(os.path.join(root, n)) as f:
                        for i, line in enumerate(f, 1):
                            if re.search(r"torch\.load\(|weights_only\s*=\s*False", line):
                                hits.append(f"{os.path.relpath(os.path.join(root, n), ROOT)}:{i}")
    assert hits and all(h.startswith("kdtw/checkpoint.py:") for h in hits), hits


# ----------------------------------------------------------------------------- no checkpoint lost


def _write_script(run_dir: str, step: int, keep: int = 2) -> str:
    return f"""
import os
from kdtw.checkpoint import write_checkpoint
def write(folder):
    os.makedirs(os.path.join(folder, "sub"))
    open(os.path.join(folder, "sub", "a.txt"), "w").write("s{step}")
    return {{}}
write_checkpoint({run_dir!r}, {step}, write, keep={keep})
"""


def _writer(text: str):
    def write(folder: str) -> dict:
        os.makedirs(os.path.join(folder, "sub"))
        with open(os.path.join(folder, "sub", "a.txt"), "w") as f:
            f.write(text)
        return {}

    return write


def _check(run_dir: str, steps: set[int], notes: list) -> int:
    """The checkpoint a resume picks: intact, one of ``steps``, its content its own."""
    ckpt, manifest = open_checkpoint(run_dir, log=notes.append)
    with open(os.path.join(ckpt, "sub", "a.txt")) as f:
        assert f.read() == f"s{manifest['step']}"
    assert manifest["step"] in steps, (manifest["step"], steps)
    return manifest["step"]


NEW_STEP_POINTS = ["replace:written", "replace:swapped", "checkpoint:renamed", "file:written", "checkpoint:latest",
                   "remove:aside"]


@pytest.mark.parametrize("point", NEW_STEP_POINTS)
def test_a_kill_while_checkpointing_leaves_a_checkpoint_to_resume_from(tmp_path, point):
    run = str(tmp_path)
    for step in (1, 2):
        write_checkpoint(run, step, _writer(f"s{step}"), keep=2)
    killed_at(point, _write_script(run, 3))
    notes: list = []
    got = _check(run, {2, 3}, notes)
    assert got == (3 if point in ("checkpoint:latest", "remove:aside") else 2)
    assert notes == []  # `latest` always names a complete step: no fallback needed
    write_checkpoint(run, 4, _writer("s4"), keep=2)  # the next write cleans what the kill left
    root = tmp_path / "checkpoints"
    kept = "step_0000002" if point == "replace:written" else "step_0000003"  # step 3 complete on disk or not
    assert sorted(os.listdir(root)) == ["latest", kept, "step_0000004"]
    assert _check(run, {4}, notes) == 4


def test_a_kill_while_rewriting_the_same_step_keeps_the_old_one(tmp_path):
    run = str(tmp_path)
    write_checkpoint(run, 1, _writer("s1"))
    write_checkpoint(run, 2, _writer("s2"))
    killed_at("replace:aside", _write_script(run, 2))
    assert not (tmp_path / "checkpoints" / "step_0000002").exists()  # `latest` names a step set aside
    notes: list = []
    assert _check(run, {2}, notes) == 2 and notes == []  # put back from step_0000002.old-<pid>
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_0000001", "step_0000002"]


def test_latest_naming_a_missing_or_corrupt_step_falls_back_to_the_newest_intact(tmp_path):
    run = str(tmp_path)
    for step in (1, 2, 3):
        write_checkpoint(run, step, _writer(f"s{step}"), keep=3)
    root = tmp_path / "checkpoints"
    with open(root / "step_0000003" / "sub" / "a.txt", "a") as f:
        f.write("!")
    notes: list = []
    assert _check(run, {2}, notes) == 2
    assert len(notes) == 1 and "step_0000003 is corrupt: sub/a.txt does not match its checksum" in notes[0]
    assert "using" in notes[0] and "step_0000002, the newest intact checkpoint" in notes[0]
    (root / "latest").write_text("step_0000009\n")
    notes.clear()
    assert _check(run, {3, 2}, notes) == 2 and "names 'step_0000009', which is not a checkpoint" in notes[0]
    (root / "latest").unlink()
    notes.clear()
    assert _check(run, {2}, notes) == 2 and "has no checkpoints/latest" in notes[0]
    for step in (1, 2):
        (root / f"step_000000{step}" / META).write_text("{")
    (root / "latest").write_text("step_0000003\n")
    with pytest.raises(CheckpointError, match="step_0000003 is corrupt: sub/a.txt does not match its checksum"):
        open_checkpoint(run, log=notes.append)
