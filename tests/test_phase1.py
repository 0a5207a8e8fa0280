"""Phase-1 checkpoints (kdtw/phase1.py, no Ray): a Phase 1 stopped after the step in flight and
resumed from its folder takes exactly the steps of one never stopped; the folder says how far it
got, refuses to stand in for a finished Phase 1, and refuses a damaged file."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest_ray import tiny
from kdtw.checkpoint import CheckpointError, load_state
from kdtw.phase1 import PHASE1_META, check_phase1, phase1_to_resume, read_phase1, run_phase1, write_phase1

STEPS = ["train.phase1_steps=4", "train.batch_size=4", "train.log_every=100"]


def _weights(loop) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loop.student.state_dict().items()}


@pytest.mark.parametrize("ahead", [1, 3])
def test_a_stopped_phase1_resumes_bitwise_where_it_stopped(tmp_path, ahead):
    """``ahead`` = train.phase1_demo_steps: with 3, the stop comes after the second of three
    batches decoded together; the resumed run decodes them again and trains on the third."""
    steps = [*STEPS, f"train.phase1_demo_steps={ahead}"]
    cfg = tiny(tmp_path / "a", *steps)
    whole = run_phase1(cfg, log=lambda _: None)
    assert whole.learner.step == 4

    folder = str(tmp_path / "b" / "phase1")
    asked = []

    def stop() -> bool:  # Ctrl-C arrives during step 2
        asked.append(1)
        return len(asked) == 2

    def save(loop, rngs):
        write_phase1(loop, folder, rngs=rngs, extra={"mlflow_run_id": "r1"})

    first = run_phase1(tiny(tmp_path / "b", *steps), log=lambda _: None, should_stop=stop, on_checkpoint=save)
    assert first.learner.step == 2 and len(asked) == 2  # the step in flight finished, then it stopped
    assert load_state(os.path.join(folder, "rng.pt"))[0]["phase1_taken"] == (2 if ahead == 3 else 0)
    meta = read_phase1(folder)
    assert (meta["steps"], meta["of"], meta["mlflow_run_id"]) == (2, 4, "r1")
    with pytest.raises(ValueError, match=r"unfinished Phase 1 \(step 2 of 4\): continue it with --resume"):
        check_phase1(folder)  # not a finished Phase 1 for --phase1
    assert check_phase1(folder, complete=False) == folder

    lines: list[str] = []
    rest = run_phase1(tiny(tmp_path / "b", *steps), log=lines.append, resume=folder)
    assert rest.learner.step == 4
    assert any("resumed at step 2/4" in ln for ln in lines), lines
    a, b = _weights(whole), _weights(rest)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the same tasks, teacher samples and updates
    sa, sb = whole.learner.opt.state_dict()["state"], rest.learner.opt.state_dict()["state"]
    for k in sa:
        for name, v in sa[k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[k][name])), (k, name)


def test_checkpoints_come_every_n_steps_but_not_at_the_end(tmp_path):
    seen = []
    run_phase1(tiny(tmp_path, "train.phase1_steps=5", "train.batch_size=2"), log=lambda _: None,
               checkpoint_every=2, on_checkpoint=lambda loop, rngs: seen.append((loop.learner.step, len(rngs))))
    assert seen == [(2, 1), (4, 1)]


def test_a_damaged_phase1_folder_is_refused(tmp_path):
    cfg = tiny(tmp_path, "train.phase1_steps=1", "train.batch_size=2")
    loop = run_phase1(cfg, log=lambda _: None)
    folder = str(tmp_path / "phase1")
    write_phase1(loop, folder)
    assert check_phase1(folder) == folder
    assert isinstance(load_state(os.path.join(folder, "rng.pt"))[0]["gen"], torch.Tensor)
    weights = os.path.join(folder, "student", "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-10] ^= 0xFF  # one flipped byte: still parseable, so only the checksum tells
    open(weights, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum"):
        check_phase1(folder)


def test_resume_finds_a_phase1_checkpoint_only_where_phase2_has_none(tmp_path):
    cfg = tiny(tmp_path, "train.phase1_steps=1", "train.batch_size=2")
    loop = run_phase1(cfg, log=lambda _: None)
    assert phase1_to_resume(str(tmp_path)) is None  # nothing there yet
    write_phase1(loop, str(tmp_path / "phase1"))
    with pytest.raises(CheckpointError, match="no config.yaml"):
        phase1_to_resume(str(tmp_path))
    cfg.save(str(tmp_path / "config.yaml"))
    assert phase1_to_resume(str(tmp_path)) == str(tmp_path / "phase1")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_0000001\n")
    assert phase1_to_resume(str(tmp_path)) is None  # Phase 2 has checkpoints: resume those
    meta = json.loads((tmp_path / "phase1" / PHASE1_META).read_text())
    assert meta["steps"] == meta["of"] == 1


@pytest.mark.parametrize("point", ["replace:written", "replace:aside", "replace:swapped"])
def test_a_phase1_checkpoint_killed_mid_write_leaves_one_to_resume(tmp_path, point):
    """SIGKILL between the renames of a Phase-1 checkpoint: ``--resume`` finds the previous one
    (step 1) or the new one (step 2), whole."""
    from test_atomic import _leftovers, killed_at

    cfg = tiny(tmp_path, "train.phase1_steps=1", "train.batch_size=2")
    cfg.save(str(tmp_path / "config.yaml"))
    write_phase1(run_phase1(cfg, log=lambda _: None), str(tmp_path / "phase1"))
    killed_at(point, f"""
import os, sys
sys.path.insert(0, {os.path.join(os.path.dirname(__file__))!r})
from conftest_ray import tiny
import kdtw.phase1 as p1
from kdtw.atomic import CRASH_ENV
from kdtw.phase1 import run_phase1, write_phase1
point, real = os.environ.pop(CRASH_ENV), p1.replace_dir

def swap_killed(tmp, folder):  # the kill in the checkpoint's own swap, not in the student's inside it
    os.environ[CRASH_ENV] = point
    real(tmp, folder)

p1.replace_dir = swap_killed
cfg = tiny({str(tmp_path)!r}, "train.phase1_steps=2", "train.batch_size=2")
write_phase1(run_phase1(cfg, log=lambda _: None), {str(tmp_path / "phase1")!r})
""")
    folder = phase1_to_resume(str(tmp_path))
    assert folder == str(tmp_path / "phase1")
    assert read_phase1(folder)["steps"] == (2 if point == "replace:swapped" else 1)
    assert _leftovers(tmp_path) == []
