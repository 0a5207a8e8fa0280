"""Atomic training checkpoints with checksums, and state files that run no code (no Ray, no MLflow).

A checkpoint is a folder ``<run_dir>/checkpoints/step_<NNNNNNN>/`` holding whatever files the
writer puts there (the Ray loop writes ``student/``, ``learner.pt``, ``buffer.parquet``,
``driver.pt``, ``config.yaml``) and ``kdtw_checkpoint.json``: the step, the writer's metadata and
the SHA-256 of every file. It is written to a temporary folder, fsynced and renamed into place
(kdtw/atomic.py: an existing folder of that step is set aside, never deleted first), then
``checkpoints/latest`` (a one-line file) is replaced: a kill at any point leaves the previous
checkpoint intact and ``latest`` naming a complete one. Opening one checks every checksum, so a
truncated or edited file is refused with a one-line error instead of resuming from garbage; a run
folder whose ``latest`` is missing or corrupt falls back to its newest intact ``step_*``.

The checksums prove integrity, not origin (they sit in the same folder), so ``.pt`` state files
are read with `load_state`: ``torch.load(weights_only=True)``, whose unpickler builds tensors and
plain data only and refuses any other object, so a crafted file cannot run code. `save_state`
checks the same rule when writing, so a checkpoint that could not be read back is never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from typing import Any, Callable

from .atomic import clean_tmp, crash_point, make_tmp_dir, recover_dir, remove_dir, replace_dir, write_text_atomic

META = "kdtw_checkpoint.json"
FORMAT = 2  # 2: state files hold tensors and plain data only (1 pickled dataclasses)
LATEST = "latest"
CHECKPOINTS = "checkpoints"  # <run_dir>/checkpoints/step_NNNNNNN/
Log = Callable[[str], None]


class CheckpointError(ValueError):
    """A folder that is not a usable checkpoint; the message says what is wrong."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), folder)
            if rel != META:
                out.append(rel)
    return sorted(out)


# ----------------------------------------------------------------------------- state files

_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def plain_state(obj: Any, where: str = "state") -> Any:
    """``obj`` with tensors detached on the CPU and numpy scalars as Python numbers, checked to
    hold only what ``torch.load(weights_only=True)`` rebuilds: tensors, dicts, lists, tuples,
    sets and Python scalars. Anything else is a `CheckpointError` naming where it sits (convert
    it, e.g. a dataclass with ``dataclasses.asdict``)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if type(obj).__module__ == "numpy" and getattr(obj, "ndim", None) == 0:  # np.float64 is a float subclass
        return obj.item()
    if type(obj) in _PLAIN:  # exact types: the unpickler rebuilds no subclass (enums, numpy scalars)
        return obj
    if type(obj) is dict:
        for k in obj:
            if type(k) not in _PLAIN:
                raise CheckpointError(f"{where} has a key of type {type(k).__name__}: checkpoint keys are plain values")
        return {k: plain_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if type(obj) in (list, tuple, set):
        return type(obj)(plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise CheckpointError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds "
                          "tensors and plain data only (convert it to a dict, list or number)")


def save_state(obj: Any, path: str) -> None:
    """``torch.save`` of `plain_state(obj)`: a file `load_state` reads back without pickle code."""
    import torch

    torch.save(plain_state(obj, os.path.basename(path)), path)


def load_state(path: str) -> Any:
    """Read a ``.pt`` state file without running code from it (``torch.load`` with
    ``weights_only=True``, tensors on the CPU). A file that holds anything but tensors and plain
    data, as a crafted pickle does, is a one-line `CheckpointError`; nothing in it runs."""
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a plain pickle file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path} is corrupt: {' '.join(str(e).split())[:200]}") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it names {found.group(1)}; " if found else ""
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data and will not be loaded ({what}a kdtw "
            "checkpoint never does: it was written by an older kdtw or by someone else)"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # a truncated zip, garbage bytes: whatever torch raises, one line
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


# ----------------------------------------------------------------------------- checkpoints


def write_checkpoint(run_dir: str, step: int, write: Callable[[str], dict], *, keep: int = 2) -> str:
    """Create ``checkpoints/step_<step>``: ``write(tmp_folder)`` fills it and returns metadata
    (JSON-able) for the manifest. Returns the final folder. Keeps the newest ``keep`` (always the
    new one); stale ``.tmp-*`` leftovers of killed writers are deleted first."""
    root = os.path.join(run_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    for name in {n.split(".old")[0] for n in os.listdir(root) if ".old" in n}:
        recover_dir(os.path.join(root, name))  # a step set aside by a killed rewrite of it
    clean_tmp(root)
    final = os.path.join(root, f"step_{step:07d}")
    tmp = make_tmp_dir(final)
    try:
        meta = write(tmp) or {}
        manifest = {"format": FORMAT, "step": step, **meta,
                    "files": digests(tmp)}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(manifest, f, indent=1)
        replace_dir(tmp, final)  # fsyncs every file first
    except BaseException:
        remove_dir(tmp)
        raise
    crash_point("checkpoint:renamed")
    # only now, with the step complete on disk, may `latest` name it
    write_text_atomic(os.path.join(root, LATEST), os.path.basename(final) + "\n")
    crash_point("checkpoint:latest")
    olds = sorted(d for d in os.listdir(root) if _is_step(d) and d != os.path.basename(final))
    for d in olds[: max(len(olds) - (keep - 1), 0)]:
        remove_dir(os.path.join(root, d))
    return final


def _is_step(name: str) -> bool:
    return name.startswith("step_") and name[5:].isdigit()


def find_checkpoint(path: str, *, log: Log = print) -> str:
    """The checkpoint folder meant by ``path`` (verified: see `open_checkpoint`)."""
    return open_checkpoint(path, log=log)[0]


def open_checkpoint(path: str, *, log: Log = print) -> tuple[str, dict]:
    """Find, read and verify a checkpoint; returns (folder, manifest). ``path`` is a checkpoint
    folder itself, or a run folder: the one its ``checkpoints/latest`` names, or, when that one is
    missing or corrupt, the newest intact ``step_*`` (``log`` gets a line saying so)."""
    if not os.path.exists(path):
        raise CheckpointError(f"resume folder {path!r} does not exist: give a run folder of jobs/train_pcl.py "
                              "(its run_dir) or one of its checkpoints/step_* folders")
    if not os.path.isdir(path):
        raise CheckpointError(f"resume path {path!r} is a file; give a run folder or a checkpoint folder")
    if os.path.exists(os.path.join(path, META)):
        return path, _verify(path)
    root = os.path.join(path, CHECKPOINTS)
    steps = sorted((d for d in _listdir(root) if _is_step(d)), reverse=True)
    latest = os.path.join(root, LATEST)
    named = None
    if os.path.exists(latest):
        with open(latest) as f:
            named = f.read().strip()
        if named:
            recover_dir(os.path.join(root, named))  # a kill while that step was being replaced
        steps = sorted((d for d in _listdir(root) if _is_step(d)), reverse=True)
    if named is None and not steps:
        raise CheckpointError(
            f"{path!r} is not a kdtw checkpoint (no {META}, no checkpoints/latest): give a run folder "
            "of jobs/train_pcl.py or one of its checkpoints/step_* folders"
        )
    first_error = None
    for name in ([named] if named else []) + [d for d in steps if d != named]:
        ckpt = os.path.join(root, name)
        try:
            if not os.path.exists(os.path.join(ckpt, META)):
                raise CheckpointError(f"{latest} names {name!r}, which is not a checkpoint: the run folder is corrupt")
            manifest = _verify(ckpt)
        except CheckpointError as e:
            first_error = first_error or e
            continue
        why = ([f"{path} has no checkpoints/latest"] if named is None else []) + (
            [" ".join(str(first_error).split())] if first_error is not None else [])
        if why:
            log(f"[resume] {'; '.join(why)}; using {ckpt}, the newest intact checkpoint")
        return ckpt, manifest
    raise first_error


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _verify(ckpt: str) -> dict:
    """The manifest of ``ckpt``, after checking the format and every file's checksum."""
    try:
        with open(os.path.join(ckpt, META)) as f:
            manifest = json.load(f)
        files = manifest["files"]
        int(manifest["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: unreadable {META} ({e.__class__.__name__})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {ckpt} has format {manifest.get('format')!r}; this kdtw reads {FORMAT} "
                              "(format 1 pickled Python objects, which are no longer loaded: start a new run)")
    verify_digests(ckpt, files, what=f"checkpoint {ckpt}")
    return manifest


def digests(folder: str, *, skip: str = META) -> dict[str, str]:
    """SHA-256 of every file below ``folder`` (relative paths) but ``skip``, the marker that holds them."""
    return {rel: _sha256(os.path.join(folder, rel)) for rel in _files(folder) if rel != skip}


def verify_digests(folder: str, files: dict[str, str], *, what: str) -> None:
    """A `CheckpointError` naming ``what`` unless every file of ``files`` is there with its digest."""
    for rel, digest in files.items():
        p = os.path.join(folder, rel)
        if not os.path.exists(p):
            raise CheckpointError(f"{what} is corrupt: {rel} is missing")
        if _sha256(p) != digest:
            raise CheckpointError(f"{what} is corrupt: {rel} does not match its checksum")


def run_folder(ckpt: str) -> str | None:
    """The run folder a checkpoint lies in (``<run>/checkpoints/step_N``), as the path is now;
    None for a checkpoint folder kept elsewhere."""
    parent = os.path.dirname(os.path.abspath(ckpt))
    return os.path.dirname(parent) if os.path.basename(parent) == CHECKPOINTS else None
