"""The learner: Phase-1 behaviour-cloning steps, Phase-2 PCL steps, and the λ update per budget.

Holds the student, its optimiser, λ_k and the teacher-use estimates ĉ_k; its state (``state_dict``)
is everything a checkpoint needs apart from the weights. Used as is by the single-process loop
(`kdtw/local.py`) and wrapped by the Ray learner actor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .losses import bc_loss, demo_token_nll, lagrange_update, pcl_loss, shaped_rewards, student_action_logp
from .models import LM, Student
from .oracle import oracle_kl, teacher_call_targets
from .trajectory import Trajectory


@dataclass
class PathBatch:
    """Right-padded output tensors and left-padded prompts of a list of trajectories."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    tokens: torch.Tensor  # [B, T]
    tau_mask: torch.Tensor  # [B, T] bool
    mask: torch.Tensor  # [B, T] float
    teacher_logp: torch.Tensor  # [B, T]
    budget_ids: torch.Tensor  # [B]
    demo: torch.Tensor  # [B] bool: teacher demonstrations


def collate(lm: LM, trajs: list[Trajectory]) -> PathBatch:
    p_ids, p_mask = lm.pad_left([t.source_ids for t in trajs])
    B, T = len(trajs), max(len(t) for t in trajs)
    dev = lm.device
    tokens = torch.full((B, T), lm.pad_id, dtype=torch.long)
    tau = torch.zeros((B, T), dtype=torch.bool)
    mask = torch.zeros((B, T))
    tlp = torch.zeros((B, T))
    for i, t in enumerate(trajs):
        L = len(t)
        tokens[i, :L] = torch.tensor(t.tokens)
        tau[i, :L] = torch.tensor(t.actions_tau)
        mask[i, :L] = 1.0
        tlp[i, :L] = torch.tensor(t.teacher_logp)
    bids = torch.tensor([t.budget_id for t in trajs], dtype=torch.long)
    demo = torch.tensor([t.origin == "teacher_demo" for t in trajs], dtype=torch.bool)
    return PathBatch(p_ids, p_mask, tokens.to(dev), tau.to(dev), mask.to(dev), tlp.to(dev), bids.to(dev),
                     demo.to(dev))


class RunningStd:
    """Running standard deviation (Welford) for reward scaling; never subtracts the mean."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        for v in x.flatten().tolist():
            self.n += 1
            d = v - self.mean
            self.mean += d / self.n
            self.m2 += d * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 1.0


class Learner:
    def __init__(self, student: Student, *, targets: list[float], train_cfg) -> None:
        self.student = student
        self.cfg = train_cfg
        self.targets = torch.tensor(targets, dtype=torch.float32)  # [K]
        self.lam = torch.zeros(len(targets))  # [K]
        self.use_hat = torch.full((len(targets),), float("nan"))  # [K] ĉ_k, nan until observed
        self.step = 0
        self.version = 0
        self.reward_std = RunningStd()
        body = [p for n, p in student.named_parameters() if n != "tau_offset"]
        self.opt = torch.optim.AdamW(
            [{"params": body, "lr": train_cfg.lr},
             {"params": [student.tau_offset], "lr": train_cfg.tau_offset_lr}],
            weight_decay=0.0,
        )

    # -- Phase 1

    def bc_step(self, teacher: LM, trajs: list[Trajectory]) -> dict[str, float]:
        """Behaviour cloning with the KL oracle on teacher (or reference) paths (DESIGN.md §4).
        The trajectories' ``tokens`` are the paths; their budget sets the oracle's call count."""
        s = self.student
        b = collate(s.lm, trajs)
        with torch.no_grad():
            t_logits = teacher.forward(b.prompt_ids, b.prompt_mask, b.tokens)[..., : teacher.vocab_size].float()
        logits = s.lm.forward(b.prompt_ids, b.prompt_mask, b.tokens)
        if self.step == 0 and self.cfg.calibrate_tau and self.cfg.use_tau:
            # start π(<τ>) at the mean budget rather than at a random spare row's ~e^-11
            s.calibrate_tau(logits.detach(), b.mask, max(float(self.targets.mean()), 1e-3))
            logits = s.lm.forward(b.prompt_ids, b.prompt_mask, b.tokens)
        pol = self._policy(logits)  # [B, T, V+1]
        kl = oracle_kl(pol.detach(), t_logits)  # [B, T]
        if self.cfg.use_tau:
            targets = teacher_call_targets(kl, b.mask, self.targets[b.budget_ids.cpu()].to(kl.device))
        else:  # plain distillation (the DistillSpec drafter): the token KL everywhere
            targets = torch.zeros_like(b.mask, dtype=torch.bool)
        loss, metrics = bc_loss(pol, torch.log_softmax(t_logits, -1), targets, b.mask,
                                token_kl_at_calls=self.cfg.bc_token_kl_at_calls)
        self._apply(loss, "bc")
        metrics["bc/oracle_kl_mean"] = float((kl * b.mask).sum() / b.mask.sum())
        return metrics

    # -- Phase 2

    def pcl_step(self, trajs: list[Trajectory]) -> dict[str, float]:
        """One PCL gradient step on a mixed batch (DESIGN.md §2–3)."""
        c, s = self.cfg, self.student
        b = collate(s.lm, trajs)
        logits, hidden = s.lm.forward(b.prompt_ids, b.prompt_mask, b.tokens, hidden=True)
        pol = self._policy(logits)  # [B, T, V+1]
        logp = student_action_logp(pol, b.tokens, b.tau_mask, mask=b.mask)  # [B, T]
        values = s.values(hidden).float()  # [B, T]
        bid = b.budget_ids.cpu()
        rewards = shaped_rewards(
            b.teacher_logp, b.tau_mask, b.mask,
            lam=self.lam[bid].to(logp.device), budget=self.targets[bid].to(logp.device),
            tau_reward=c.tau_reward, clip_min=c.reward_clip_min,
        )
        if c.reward_scaling:
            self.reward_std.update(rewards[b.mask.bool()])
            rewards = rewards / max(self.reward_std.std, 1e-6)
        loss, metrics = pcl_loss(
            rewards, logp, values, b.mask, alpha=c.alpha, gamma=c.gamma,
            window=c.pcl_window, critic_weight=c.critic_weight,
        )
        if c.demo_nll_weight > 0 and bool(b.demo.any()):
            # kdtw option (off in DESIGN.md): keep the student's own token distribution (over V,
            # <τ> removed, so call decisions are untouched) close to the teacher's samples.
            nll = demo_token_nll(pol, b.tokens, b.mask * b.demo.unsqueeze(1).to(b.mask.dtype))
            loss = loss + c.demo_nll_weight * nll
            metrics["pcl/demo_nll"] = float(nll.detach())
        self._apply(loss, "pcl")
        n = b.mask.sum()
        metrics["pcl/reward_mean"] = float((rewards * b.mask).sum() / n)
        metrics["pcl/logp_mean"] = float((logp.detach() * b.mask).sum() / n)
        return metrics

    def _policy(self, logits: torch.Tensor) -> torch.Tensor:
        """Policy logits ``[B, T, V+1]`` in float32; with ``train.use_tau=false`` the ``<τ>``
        column is -inf, so the policy is the student over ``V`` (what student-mode decoding and
        speculative drafting sample from)."""
        pol = self.student.policy_logits(logits).float()
        if not self.cfg.use_tau:
            pol = pol.clone()
            pol[..., -1] = float("-inf")
        return pol

    def _apply(self, loss: torch.Tensor, phase: str) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{phase} loss is {loss.item()} at learner step {self.step}: no update was applied; "
                f"lower train.lr (now {self.cfg.lr}) or train.lambda_max, or turn on train.reward_scaling"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step += 1

    def set_lr(self, lr: float) -> None:
        """Change the body's learning rate (the <τ> offset keeps its own)."""
        self.opt.param_groups[0]["lr"] = lr

    # -- λ

    def observe_use(self, trajs: list[Trajectory]) -> dict[str, float]:
        """Update ĉ_k (moving average of on-policy teacher use) and λ_k (DESIGN.md §5) from the
        student paths of a rollout batch; budgets with no path in the batch keep their values."""
        est = self.cfg.use_estimate
        K = len(self.targets)
        sums, counts = torch.zeros(K), torch.zeros(K)
        for t in trajs:
            if t.origin != "student":
                continue
            sums[t.budget_id] += t.greedy_use if est == "greedy" else t.teacher_use
            counts[t.budget_id] += 1
        seen = counts > 0
        if not seen.any() or not self.cfg.use_tau:
            return {}  # without <τ> there is no budget to hold: λ stays 0
        obs = sums[seen] / counts[seen]
        prev = self.use_hat[seen]
        ema = self.cfg.use_ema
        self.use_hat[seen] = torch.where(torch.isnan(prev), obs, ema * prev + (1 - ema) * obs)
        new_lam = lagrange_update(self.lam, torch.nan_to_num(self.use_hat, nan=0.0), self.targets,
                                  lr=self.cfg.lr_lambda, lam_max=self.cfg.lambda_max,
                                  lam_min=self.cfg.lambda_min)
        self.lam = torch.where(seen, new_lam, self.lam)
        return {f"lambda/{k}": float(self.lam[k]) for k in range(K)} | {
            f"use_hat/{k}": float(self.use_hat[k]) for k in range(K)
        }

    # -- state

    def state_dict(self) -> dict:
        return {
            "optimizer": self.opt.state_dict(),
            "lam": self.lam.clone(),
            "use_hat": self.use_hat.clone(),
            "step": self.step,
            "version": self.version,
            "reward_std": (self.reward_std.n, self.reward_std.mean, self.reward_std.m2),
        }

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.lam = state["lam"].clone()
        self.use_hat = state["use_hat"].clone()
        self.step = int(state["step"])
        self.version = int(state["version"])
        self.reward_std.n, self.reward_std.mean, self.reward_std.m2 = state["reward_std"]
