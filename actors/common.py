"""What every role shares: Ray options from config, thread limits, weight packing, waiting for
actors to start."""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

RETRY_ERRORS: tuple[type[BaseException], ...]
try:
    from ray.exceptions import ActorUnavailableError, RayActorError

    RETRY_ERRORS = (RayActorError, ActorUnavailableError)
except ImportError:  # pragma: no cover
    RETRY_ERRORS = ()


def options(cfg, role: str, *, restarts: bool = False, placement=None) -> dict:
    """``.options(...)`` of a role from ``cfg.ray``: CPUs, GPUs, restarts, placement group."""
    r = cfg.ray
    opts = {"num_cpus": getattr(r, f"{role}_cpus"), "num_gpus": getattr(r, f"{role}_gpus")}
    if restarts:
        opts["max_restarts"] = r.max_restarts
    if placement is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg, index = placement
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
    return opts


def _counted(n: int, label: str) -> str:
    return label if n == 1 else f"{n} {label}s"


def await_started(groups: dict[str, list], *, every_s: float = 30.0, log: Callable[[str], None] = print) -> None:
    """Block until every actor of ``groups`` (a label, e.g. "rollout worker", to its handles) has
    run its constructor, with a line every ``every_s`` seconds while some have not: on a cluster
    without room for them Ray keeps them pending, and the job would otherwise wait in silence. A
    constructor's error is raised here, as Ray raises it."""
    import ray

    label = {a.__ray_ready__.remote(): name for name, handles in groups.items() for a in handles}
    total = {name: len(handles) for name, handles in groups.items()}
    pending, start = list(label), time.monotonic()
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=every_s)
        ray.get(done)
        if pending:
            left = Counter(label[ref] for ref in pending)
            what = ", ".join(_counted(n, name) if n == total[name] else f"{n} of {total[name]} {name}s"
                             for name, n in left.items())
            free = ray.available_resources()
            log(f"[ray] waiting {time.monotonic() - start:.0f} s for {what} to start (free now: "
                f"{free.get('CPU', 0.0):g} CPU, {free.get('GPU', 0.0):g} GPU; `ray status` shows what the "
                "cluster has, `ray list actors --filter state=PENDING_CREATION` what waits)")


def get_with_lines(ref, what: str, *, log: Callable[[str], None] = print, every_s: float | None = None):
    """``ray.get(ref)``, with the line ``what (N s)`` every ``every_s`` seconds
    (`kdtw.reporting.STATUS_EVERY_S`) while it waits: the driver waits on a validation or a
    calibration on a teacher replica (30-110 s on SmolLM2 here) and would otherwise be silent."""
    import ray

    from kdtw import reporting

    every = reporting.STATUS_EVERY_S if every_s is None else every_s
    start = time.monotonic()
    while not ray.wait([ref], timeout=every)[0]:
        log(f"{what} ({time.monotonic() - start:.0f}s)")
    return ray.get(ref)


def setup_threads(cfg) -> None:
    torch.set_num_threads(cfg.ray.torch_threads)


def on_device(cfg, role: str, *models: str):
    """``cfg`` with ``models`` (teacher/student) on cuda when the role was given GPUs."""
    if getattr(cfg.ray, f"{role}_gpus") <= 0:
        return cfg
    cfg = copy.deepcopy(cfg)
    for m in models:
        if getattr(cfg, m).device == "cpu":
            getattr(cfg, m).device = "cuda"
    return cfg


def pack_weights(module: torch.nn.Module) -> dict:
    """A state dict as numpy arrays (zero-copy through the object store); bf16/fp16 stay tensors."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        out[k] = v.numpy() if v.dtype in (torch.float32, torch.float64, torch.int64, torch.int32) else v.clone()
    return out


def unpack_weights(module: torch.nn.Module, packed: dict) -> None:
    state = {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in packed.items()}
    module.load_state_dict(state)
