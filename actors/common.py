"""What every role shares: Ray options from config, thread limits, weight packing."""

from __future__ import annotations

import copy

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
