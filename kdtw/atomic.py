"""Crash-safe writes: a folder or file is either the old one or the new one, never missing or
half-written, whenever the writing process is killed (no Ray, no torch).

A folder is replaced in four steps, each a single rename or delete:

1. the new content is written to a temporary sibling ``.tmp-<name>-<pid>-*`` and fsynced (every
   file, every folder), so that a rename never publishes data still in the page cache;
2. the old folder is renamed aside to ``<name>.old-<pid>``;
3. the temporary folder is renamed to ``<name>`` and the parent folder is fsynced;
4. the old copy is deleted.

Killed between 2 and 3, only ``<name>.old-<pid>`` exists: `recover_dir` (called by every loader
and writer of such a folder) renames it back. Killed anywhere else, ``<name>`` is complete and
`recover_dir` only deletes the leftovers. Deleting the old folder first, as a plain
``rmtree`` + ``rename`` does, leaves nothing at all when killed between the two.

Leftovers carry the pid of their writer: one is stale when that process is gone (or is this
process, which writes synchronously). A leftover without a pid (from older kdtw versions) is
stale when it is older than this process. One writer per folder is assumed.

``KDTW_CRASH_AT=<point>`` kills the process with SIGKILL at that named point (`crash_point`):
the kill tests use it to stop a real write between any two of its steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from typing import Callable

CRASH_ENV = "KDTW_CRASH_AT"
_STARTED = time.time()
# ".tmp-<name>-<pid>-<suffix without '-'>" or "<name>.old-<pid>"; greedy, as <name> may hold "-7-"
_PID = re.compile(r"^(?:\.tmp-.*-(\d+)-[^-]*|.*\.old-(\d+))$")


def crash_point(name: str) -> None:
    """SIGKILL this process if ``KDTW_CRASH_AT`` names this point (kill tests only)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- fsync


def fsync_dir(folder: str) -> None:
    """Make a folder's entries (renames, new files) durable; a no-op where the file system
    cannot fsync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """fsync every file and folder under ``folder`` (the folder itself last)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for n in files:
            path = os.path.join(root, n)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


# ----------------------------------------------------------------------------- folders


def _split(folder: str) -> tuple[str, str]:
    folder = os.path.abspath(os.fspath(folder))
    return os.path.dirname(folder), os.path.basename(folder)


def make_tmp_dir(folder: str) -> str:
    """A new empty temporary sibling of ``folder`` (same file system, so the final rename is
    atomic), readable like a normal folder."""
    parent, name = _split(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-{os.getpid()}-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    return tmp


def replace_dir(tmp: str, folder: str) -> None:
    """Move the finished folder ``tmp`` to ``folder``, replacing what is there, so that a kill
    at any point leaves a complete copy (the module docstring lists the steps)."""
    parent, name = _split(folder)
    folder = os.path.join(parent, name)
    fsync_tree(tmp)
    crash_point("replace:written")
    old = None
    if os.path.lexists(folder):
        old = os.path.join(parent, f"{name}.old-{os.getpid()}")
        _remove(old)  # a leftover of an earlier process with this pid
        os.rename(folder, old)
        crash_point("replace:aside")
    try:
        os.rename(tmp, folder)
    except BaseException:
        if old is not None:  # put the old folder back at once rather than at the next start
            os.rename(old, folder)
        raise
    fsync_dir(parent)
    crash_point("replace:swapped")
    if old is not None:
        _remove(old)


def remove_dir(folder: str) -> None:
    """Delete a folder so that it disappears at once: renamed to a temporary name, then deleted
    (a kill during a plain ``rmtree`` leaves a half-deleted folder under its real name)."""
    parent, name = _split(folder)
    if not os.path.lexists(os.path.join(parent, name)):
        return
    trash = os.path.join(parent, f".tmp-{name}-{os.getpid()}-deleted")
    _remove(trash)
    os.rename(os.path.join(parent, name), trash)
    fsync_dir(parent)
    crash_point("remove:aside")
    _remove(trash)


def recover_dir(folder: str) -> str | None:
    """Undo or finish a replacement of ``folder`` that a killed process left half done: an old
    copy set aside is renamed back when ``folder`` is missing, and stale leftovers are deleted.
    Returns a line saying what was restored, or None. Touches nothing when all is clean."""
    parent, name = _split(folder)
    folder = os.path.join(parent, name)
    try:
        entries = os.listdir(parent)
    except OSError:  # no parent (e.g. a hub model name): nothing to recover
        return None
    olds = [n for n in entries if (n == f"{name}.old" or n.startswith(f"{name}.old-"))
            and _stale(os.path.join(parent, n))]
    note = None
    if olds and not os.path.lexists(folder):
        newest = max(olds, key=lambda n: os.path.getmtime(os.path.join(parent, n)))
        os.rename(os.path.join(parent, newest), folder)
        fsync_dir(parent)
        olds.remove(newest)
        note = f"restored {folder} from {newest}: a replacement of it was interrupted"
    for n in olds:
        _remove(os.path.join(parent, n))
    clean_tmp(parent, name)
    return note


def clean_tmp(parent: str, name: str | None = None) -> list[str]:
    """Delete stale ``.tmp-*`` leftovers in ``parent`` (only those of ``name`` if given);
    returns what was deleted."""
    prefix = ".tmp-" if name is None else f".tmp-{name}-"
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    gone = [n for n in entries if n.startswith(prefix) and _stale(os.path.join(parent, n))]
    for n in gone:
        _remove(os.path.join(parent, n))
    return gone


def _stale(path: str) -> bool:
    """Left by a process that is gone (see the module docstring)."""
    m = _PID.match(os.path.basename(path))
    if m is None:
        try:
            return os.path.getmtime(path) < _STARTED
        except OSError:
            return False
    pid = int(m.group(1) or m.group(2))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by someone else
        return False
    return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except OSError:
            pass


# ----------------------------------------------------------------------------- files


def write_atomic_with(path: str, write: Callable[[str], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, filled by ``write(tmp)`` (a
    writer that takes a path: a DataFrame's, a plot's; the temporary name ends with ``path``'s
    extension, from which such writers take the format): fsync, rename, fsync the folder. Readers
    see the old content or the new, never a prefix."""
    parent, name = _split(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}-{os.getpid()}-", suffix=os.path.splitext(name)[1], dir=parent)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        crash_point("file:written")
        os.replace(tmp, os.path.join(parent, name))
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(parent)


def write_bytes_atomic(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic_with(path, write)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj, *, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
