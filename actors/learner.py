"""Learner actor around `kdtw.learner.Learner`: PCL steps on batches from the replay buffer,
the λ update from the rollouts' teacher use, weight publication every ``ray.publish_every``
steps (one ``ray.put`` per version, handed out as ``(version, [ref])``), and its state for
checkpoints. One rank (Phase 2); Phase 1's data-parallel ranks run in jobs/train_bc.py."""

from __future__ import annotations

import os
import time

import ray
import torch

from actors.common import on_device, pack_weights, setup_threads, unpack_weights
from kdtw.checkpoint import load_state
from kdtw.factory import budget_table, load_student
from kdtw.learner import Learner
from kdtw.models import Student


@ray.remote
class LearnerActor:
    def __init__(self, cfg, buffer, phase1_dir: str | None = None) -> None:
        setup_threads(cfg)
        cfg = on_device(cfg, "learner", "student")
        torch.manual_seed(cfg.seed)
        self.cfg, self.buffer = cfg, buffer
        if phase1_dir:
            s = cfg.student
            student = Student.load(os.path.join(phase1_dir, "student"), dtype=s.dtype, device=s.device)
        else:
            student = load_student(cfg)
        self.learner = Learner(student, targets=budget_table(cfg).targets, train_cfg=cfg.train)
        if phase1_dir:
            self.learner.load_state_dict(load_state(os.path.join(phase1_dir, "learner.pt")))
        self.learner.start_phase2()
        self.published = None

    def publish(self) -> tuple[int, list]:
        self.published = (self.learner.version, [ray.put(pack_weights(self.learner.student))])
        return self.published

    def step(self, publish: bool = False) -> dict | None:
        """One PCL step and λ update (`LocalLoop.learn`), or None if the buffer is not ready."""
        t0 = time.perf_counter()
        tc, lrn = self.cfg.train, self.learner
        got = ray.get(self.buffer.sample_step.remote(tc.batch_size, lrn.version, tc.max_staleness == 0))
        if got is None:
            return None
        batch, uses, unseen = got
        lags = [lrn.version - t.policy_version for t in batch if t.origin == "student"]
        out = {"stats": lrn.learn(batch, uses), "policy_lag": sum(lags) / max(len(lags), 1),
               "buffer_unseen": unseen, "seconds": time.perf_counter() - t0}
        if publish or lrn.version % self.cfg.ray.publish_every == 0:
            out["weights"] = self.publish()
        return out

    def state(self) -> dict:
        out = {"student": pack_weights(self.learner.student), "learner": _cpu(self.learner.state_dict()),
               "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():  # dropout and sampling on a GPU learner draw from these
            out["cuda_rng"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
        return out

    def load_state(self, state: dict) -> None:
        unpack_weights(self.learner.student, state["student"])
        self.learner.load_state_dict(state["learner"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def _cpu(obj):
    """Tensors of a nested state moved to the CPU (a checkpoint must load without a GPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj
