"""kdtw/atomic.py: a folder or file replaced while the writer is SIGKILLed at any step is found
whole afterwards (the old copy or the new one, never nothing), and leftovers are cleaned."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from kdtw.atomic import CRASH_ENV, clean_tmp, make_tmp_dir, recover_dir, replace_dir, write_json_atomic

FOLDER_POINTS = ["replace:written", "replace:aside", "replace:swapped"]


def killed_at(point: str, script: str) -> None:
    """Run ``script`` in a fresh Python with ``KDTW_CRASH_AT=point``; assert it died by SIGKILL
    there (a run that never reaches the point would make the test vacuous)."""
    env = {**os.environ, CRASH_ENV: point, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, f"not killed at {point}: rc {proc.returncode}\n{proc.stderr[-2000:]}"


def _fill(folder, text: str) -> None:
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    for rel in ("a.txt", os.path.join("sub", "b.txt")):
        with open(os.path.join(folder, rel), "w") as f:
            f.write(text)


def _contents(folder) -> set[str]:
    out = set()
    for rel in ("a.txt", os.path.join("sub", "b.txt")):
        with open(os.path.join(folder, rel)) as f:
            out.add(f.read())
    return out


def _leftovers(parent) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(".tmp-") or ".old" in n)


def test_replace_dir_swaps_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "model"
    for text in ("v1", "v2"):
        tmp = make_tmp_dir(folder)
        _fill(tmp, text)
        replace_dir(tmp, folder)
        assert _contents(folder) == {text}
    assert _leftovers(tmp_path) == []
    assert oct(os.stat(folder).st_mode & 0o777) == "0o755"  # not mkdtemp's private 0o700


@pytest.mark.parametrize("point", FOLDER_POINTS)
def test_a_kill_between_the_renames_leaves_the_old_folder_or_the_new(tmp_path, point):
    folder = tmp_path / "model"
    folder.mkdir()
    _fill(folder, "old")
    killed_at(point, f"""
import os
from kdtw.atomic import make_tmp_dir, replace_dir
tmp = make_tmp_dir({str(folder)!r})
os.makedirs(os.path.join(tmp, "sub"))
for rel in ("a.txt", "sub/b.txt"):
    open(os.path.join(tmp, rel), "w").write("new")
replace_dir(tmp, {str(folder)!r})
""")
    note = recover_dir(str(folder))
    assert _contents(folder) == ({"new"} if point == "replace:swapped" else {"old"})
    assert (note is not None) == (point == "replace:aside"), note
    assert _leftovers(tmp_path) == []


def test_a_failed_swap_puts_the_old_folder_back(tmp_path):
    folder = tmp_path / "model"
    _fill(folder, "old")
    with pytest.raises(FileNotFoundError):
        replace_dir(str(tmp_path / ".tmp-model-gone"), str(folder))
    assert _contents(folder) == {"old"} and _leftovers(tmp_path) == []


def test_recover_dir_leaves_a_live_writers_files_alone(tmp_path):
    folder = tmp_path / "model"
    _fill(folder, "v1")
    live = tmp_path / f".tmp-model-{os.getppid()}-abcdefgh"  # our parent process is alive
    live.mkdir()
    aside = tmp_path / f"model.old-{os.getppid()}"
    aside.mkdir()
    assert recover_dir(str(folder)) is None
    assert live.exists() and aside.exists()
    assert clean_tmp(str(tmp_path)) == []


def test_json_written_in_place_survives_a_kill(tmp_path):
    path = tmp_path / "report.json"
    write_json_atomic(str(path), {"v": 1})
    killed_at("file:written", f"from kdtw.atomic import write_json_atomic; write_json_atomic({str(path)!r}, {{'v': 2}})")
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert clean_tmp(str(tmp_path)) != [] and _leftovers(tmp_path) == []
    write_json_atomic(str(path), {"v": 2})
    assert path.read_text() == '{\n  "v": 2\n}\n'


def test_student_save_killed_mid_swap_still_loads(llama_close, tmp_path):
    """`Student.save` over an existing folder, killed after the old copy is set aside and before
    the new one is in: `Student.load` finds the old student."""
    from kdtw.models import Student

    _, student = llama_close
    folder = tmp_path / "student"
    student.save(folder)
    killed_at("replace:aside", f"""
import torch
from kdtw.models import Student
s = Student.load({str(folder)!r})
with torch.no_grad():
    s.tau_offset.fill_(3.0)
s.save({str(folder)!r})
""")
    assert not folder.exists()  # the window the old code lost the model in
    back = Student.load(folder)
    assert back.tau_offset.item() == student.tau_offset.item() != 3.0
    assert _leftovers(tmp_path) == []
