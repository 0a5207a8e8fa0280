"""Atomic training checkpoints with checksums (no Ray, no MLflow).

A checkpoint is a folder ``<run_dir>/checkpoints/step_<NNNNNNN>/`` holding whatever files the
writer puts there (the Ray loop writes ``student/``, ``learner.pt``, ``buffer.parquet``,
``driver.pt``, ``config.yaml``) and ``kdtw_checkpoint.json``: the step, the writer's metadata and
the SHA-256 of every file. It is written to a temporary folder and renamed into place, then
``checkpoints/latest`` (a one-line file) is replaced: a crash at any point leaves the previous
checkpoint intact. Opening one checks every checksum, so a truncated or edited file is refused
with a one-line error instead of resuming from garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable

META = "kdtw_checkpoint.json"
FORMAT = 1


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


def write_checkpoint(run_dir: str, step: int, write: Callable[[str], dict], *, keep: int = 2) -> str:
    """Create ``checkpoints/step_<step>``: ``write(tmp_folder)`` fills it and returns metadata
    (JSON-able) for the manifest. Returns the final folder. Keeps the newest ``keep``."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:07d}")
    tmp = tempfile.mkdtemp(prefix=".tmp-step_", dir=root)
    try:
        meta = write(tmp) or {}
        manifest = {"format": FORMAT, "step": step, **meta,
                    "files": {rel: _sha256(os.path.join(tmp, rel)) for rel in _files(tmp)}}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest = os.path.join(root, "latest")
    with open(latest + ".tmp", "w") as f:
        f.write(os.path.basename(final) + "\n")
    os.replace(latest + ".tmp", latest)
    olds = sorted(d for d in os.listdir(root) if d.startswith("step_") and d != os.path.basename(final))
    for d in olds[: max(len(olds) - (keep - 1), 0)]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final


def find_checkpoint(path: str) -> str:
    """The checkpoint folder meant by ``path``: a checkpoint folder itself, or a run folder
    (its ``checkpoints/latest``)."""
    if not os.path.exists(path):
        raise CheckpointError(f"resume folder {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"resume path {path!r} is a file; give a run folder or a checkpoint folder")
    if os.path.exists(os.path.join(path, META)):
        return path
    latest = os.path.join(path, "checkpoints", "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            name = f.read().strip()
        ckpt = os.path.join(path, "checkpoints", name)
        if not name or not os.path.exists(os.path.join(ckpt, META)):
            raise CheckpointError(f"{latest} names {name!r}, which is not a checkpoint: the run folder is corrupt")
        return ckpt
    raise CheckpointError(
        f"{path!r} is not a kdtw checkpoint (no {META}, no checkpoints/latest): give a run folder "
        "of jobs/train_pcl.py or one of its checkpoints/step_* folders"
    )


def open_checkpoint(path: str) -> tuple[str, dict]:
    """Find, read and verify a checkpoint; returns (folder, manifest)."""
    ckpt = find_checkpoint(path)
    try:
        with open(os.path.join(ckpt, META)) as f:
            manifest = json.load(f)
        files = manifest["files"]
        int(manifest["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: unreadable {META} ({e.__class__.__name__})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {ckpt} has format {manifest.get('format')!r}; this kdtw reads {FORMAT}")
    for rel, digest in files.items():
        p = os.path.join(ckpt, rel)
        if not os.path.exists(p):
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {rel} is missing")
        if _sha256(p) != digest:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: {rel} does not match its checksum")
    return ckpt, manifest
