"""The learner: Phase-1 behaviour-cloning steps, Phase-2 PCL steps, and the λ update per budget.

Holds the student, its optimiser, λ_k and the teacher-use estimates ĉ_k; its state (``state_dict``)
is everything a checkpoint needs apart from the weights. Used as is by the single-process loop
(`kdtw/local.py`) and wrapped by the Ray learner actor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .losses import (
    bc_loss,
    conditional_demo_logp,
    demo_token_nll,
    lagrange_update,
    pcl_loss,
    pid_lagrange_init,
    pid_lagrange_update,
    shaped_rewards,
    student_action_logp,
)
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


def padded_logits(logits: list[torch.Tensor], trajs: list[Trajectory], vocab_size: int) -> torch.Tensor:
    """Per-path logits [L_i, V] right-padded with zeros to ``collate``'s [B, T, V] (the padding
    is masked wherever it is read)."""
    if len(logits) != len(trajs):
        raise ValueError(f"{len(logits)} teacher logit tensors for {len(trajs)} paths")
    B, T = len(trajs), max(len(t) for t in trajs)
    out = torch.zeros((B, T, vocab_size), device=logits[0].device if logits else "cpu")
    for i, (lg, t) in enumerate(zip(logits, trajs)):
        if tuple(lg.shape) != (len(t), vocab_size):
            raise ValueError(f"path {i}: teacher logits of shape {tuple(lg.shape)}, expected "
                             f"({len(t)}, {vocab_size}) (its length by the teacher's vocabulary)")
        out[i, : len(t)] = lg
    return out


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


@dataclass
class StepStats:
    """What one Phase-2 learner step reports (`Learner.learn`), the same in both loops. Per
    budget k: λ after the update, the EMA of the controlled estimate, this step's fresh
    on-policy use three ways (expected Σπ(<τ>)/ΣT, sampled Σc/ΣT, greedy; nan where the step had
    no row of that budget) and the controller error."""

    step: int  # learner steps done (both phases)
    version: int  # policy version after the step
    loss: float
    residual_abs_mean: float
    value_warmup: bool
    lam: list[float]
    use_hat: list[float]
    use_expected: list[float]
    use_sampled: list[float]
    use_greedy: list[float]
    lambda_err: list[float]
    rollout_use: float | None = None  # mean Σc/T over the step's fresh student paths
    extra: dict[str, float] = field(default_factory=dict)  # the loss's other figures (``pcl/...``)

    PER_BUDGET = ("lambda", "use_hat", "use_expected", "use_sampled", "use_greedy", "lambda_err")

    def per_budget(self, name: str) -> list[float]:
        return self.lam if name == "lambda" else getattr(self, name)

    def metrics(self) -> dict[str, float]:
        """Flat figures as the logs name them (``pcl/loss``, ``lambda/<k>`` ...)."""
        out = {**self.extra, "pcl/loss": self.loss, "pcl/residual_abs_mean": self.residual_abs_mean,
               "pcl/value_warmup": float(self.value_warmup)}
        for name in self.PER_BUDGET:
            out |= {f"{name}/{k}": float(v) for k, v in enumerate(self.per_budget(name))}
        if self.rollout_use is not None:
            out["rollout/teacher_use"] = self.rollout_use
        return out


USE_ESTIMATES = {"expected": "expected_use", "sampled": "teacher_use", "greedy": "greedy_use"}


def budget_rates(paths: list[Trajectory], K: int, estimate: str, weighting: str) -> torch.Tensor:
    """``[K]`` per-budget use of ``paths`` (``nan`` where a budget has none): the paths'
    ``estimate`` (``expected`` Σπ(<τ>)/T, ``sampled`` Σc/T, ``greedy``; train.use_estimate),
    weighted by ``weighting`` (``token``: Σ f·T / Σ T; ``sequence``: the mean of f over paths;
    train.use_weighting). The λ estimate (`Learner.observe_use`) and settling (kdtw/settle.py)."""
    if not paths:
        return torch.full((K,), float("nan"))
    ids = torch.tensor([t.budget_id for t in paths], dtype=torch.long)
    weight = torch.tensor([1.0 if weighting == "sequence" else float(len(t)) for t in paths])
    total = torch.zeros(K).index_add_(0, ids, weight)
    f = torch.tensor([getattr(t, USE_ESTIMATES[estimate]) for t in paths], dtype=torch.float32)
    sums = torch.zeros(K).index_add_(0, ids, f * weight)
    return torch.where(total > 0, sums / total.clamp(min=1e-9), torch.full((K,), float("nan")))


class Learner:
    def __init__(self, student: Student, *, targets: list[float], train_cfg) -> None:
        self.student = student
        self.cfg = train_cfg
        self.targets = torch.tensor(targets, dtype=torch.float32)  # [K]
        K = len(targets)
        if train_cfg.budget_offsets and train_cfg.use_tau:
            student.set_budgets(targets)
        # λ controller state (DESIGN.md §5 revision): the PI integral starts at the soft optimum
        self.integral = pid_lagrange_init(self.targets, eps=train_cfg.lambda_eps, lam_min=train_cfg.lambda_min,
                                          lam_max=train_cfg.lambda_max)  # [K]
        self.err_ema = torch.zeros(K)  # [K]
        pi = train_cfg.lambda_controller == "pi" and train_cfg.use_tau
        self.lam = self.integral.clone() if pi else torch.zeros(K)  # [K]
        self.use_hat = torch.full((K,), float("nan"))  # [K] EMA of the controlled use, nan until observed
        self.step = 0
        self.version = 0
        self.phase2_step = 0
        self.reward_std = RunningStd()
        special = ("tau_offset", "budget_offsets")
        head = [p for n, p in student.named_parameters() if n.startswith("value_head.")]
        body = [p for n, p in student.named_parameters() if n not in special and not n.startswith("value_head.")]
        self.opt = torch.optim.AdamW(
            [{"params": body, "lr": train_cfg.lr},
             {"params": [student.tau_offset, student.budget_offsets], "lr": train_cfg.tau_offset_lr},
             {"params": head, "lr": train_cfg.value_lr if train_cfg.value_lr is not None else train_cfg.lr}],
            weight_decay=0.0,
        )

    # -- Phase 1

    def bc_step(self, teacher: LM, trajs: list[Trajectory],
                teacher_logits: list[torch.Tensor] | None = None) -> dict[str, float]:
        """Behaviour cloning with the KL oracle on teacher (or reference) paths (DESIGN.md §4).
        The trajectories' ``tokens`` are the paths; their budget sets the oracle's call count.
        ``teacher_logits``: the teacher's logits [len(path), V] over each path, as decoding the
        demonstrations computed them (`kdtw.rollout.teacher_demos` with ``keep_logits``); without
        them the teacher runs over the paths here (the same values up to float rounding)."""
        s = self.student
        b = collate(s.lm, trajs)
        if teacher_logits is not None:
            t_logits = padded_logits(teacher_logits, trajs, teacher.vocab_size).to(b.tokens.device)
        else:
            with torch.no_grad():
                t_logits = teacher.forward(b.prompt_ids, b.prompt_mask, b.tokens)[..., : teacher.vocab_size].float()
        detach = self.cfg.bc_call_detach and self.cfg.use_tau

        def student_logits() -> torch.Tensor:
            if not detach:
                return s.lm.forward(b.prompt_ids, b.prompt_mask, b.tokens)
            # the call decision reads the body's features without moving them
            return s.detach_call_path(*s.lm.forward(b.prompt_ids, b.prompt_mask, b.tokens, hidden=True))

        logits = student_logits()
        if self.step == 0 and self.cfg.calibrate_tau and self.cfg.use_tau:
            # start π(<τ>) at the mean budget rather than at a random spare row's ~e^-11
            s.calibrate_tau(logits.detach(), b.mask, max(float(self.targets.mean()), 1e-3))
            logits = student_logits()
        # With the call decision a read-out of token features, the body does not learn which
        # budget a row has: each budget's <τ> offset carries it (the zero budget masks <τ>).
        pol = self._policy(logits, b.budget_ids if detach else None)  # [B, T, V+1]
        kl = oracle_kl(pol.detach(), t_logits)  # [B, T]
        if self.cfg.use_tau:
            targets = teacher_call_targets(kl, b.mask, self.targets[b.budget_ids.cpu()].to(kl.device))
        else:  # plain distillation (the DistillSpec drafter): the token KL everywhere
            targets = torch.zeros_like(b.mask, dtype=torch.bool)
        loss, metrics = bc_loss(pol, torch.log_softmax(t_logits, -1), targets, b.mask,
                                token_kl_at_calls=self.cfg.bc_token_kl_at_calls,
                                call_weight=self.cfg.bc_call_weight,
                                call_on_tau_only=detach)
        self._apply(loss, "bc")
        metrics["bc/oracle_kl_mean"] = float((kl * b.mask).sum() / b.mask.sum())
        return metrics

    # -- Phase 2

    def pcl_step(self, trajs: list[Trajectory], *, value_only: bool = False) -> dict[str, float]:
        """One PCL gradient step on a mixed batch (DESIGN.md §2–3). ``value_only``: the value
        head alone learns (the policy's log-probs are constants): Phase 2's warm-up."""
        c, s = self.cfg, self.student
        b = collate(s.lm, trajs)
        logits, hidden = s.lm.forward(b.prompt_ids, b.prompt_mask, b.tokens, hidden=True)
        pol = self._policy(logits, b.budget_ids, b.tau_mask)  # [B, T, V+1]
        logp = student_action_logp(pol, b.tokens, b.tau_mask, mask=b.mask)  # [B, T]
        if c.demo_logp == "conditional" and bool(b.demo.any()):
            logp = conditional_demo_logp(pol, logp, b.tokens, b.demo)  # demos never move the <τ> logit
        if value_only:
            logp = logp.detach()
        # the value head reads detached hidden states (kdtw option, on by default): its early,
        # large errors must not reach the LM body through the critic's gradient
        values = s.values(hidden.detach() if c.value_detach else hidden).float()  # [B, T]
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
            window=c.pcl_window, critic_weight=c.critic_weight, normalize=c.residual_norm,
        )
        if c.demo_nll_weight > 0 and bool(b.demo.any()) and not value_only:
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

    def start_phase2(self) -> None:
        """Phase-2 learning rates: ``train.phase2_lr`` (else ``train.lr``) for the body and, at
        the same rate, the <τ> offsets (issue 11: at Phase 1's fast rate a wound-up λ dragged
        every budget through the shared offset); the value head keeps its own."""
        lr = self.phase2_lr()
        self.set_lr(lr, tau_offset_lr=lr)  # learn() sets it again before each step

    def phase2_lr(self) -> float:
        """The body's (and the offsets') rate at this Phase-2 step: ``train.phase2_lr`` (else
        ``train.lr``), falling linearly to ``train.phase2_lr_final_factor`` of it at the last
        step of ``train.phase2_steps``."""
        c = self.cfg
        lr = c.phase2_lr if c.phase2_lr is not None else c.lr
        if c.phase2_steps <= 1:
            return lr
        frac = min(self.phase2_step / (c.phase2_steps - 1), 1.0)
        return lr * (1.0 - (1.0 - c.phase2_lr_final_factor) * frac)

    def learn(self, batch: list[Trajectory], fresh: list) -> StepStats:
        """One Phase-2 learner step: a PCL step on ``batch`` (replayed, mixed with
        demonstrations), then the λ update from ``fresh`` (this step's new on-policy paths, or
        their `UseObservation`s). The first ``train.value_warmup_steps`` steps of Phase 2 train
        the value head alone and leave λ as it is (the policy does not move: nothing to steer)."""
        warm = self.phase2_step < self.cfg.value_warmup_steps
        self.start_phase2()  # this step's rate (train.phase2_lr_final_factor)
        m = self.pcl_step(batch, value_only=warm)
        self.version += 1
        self.phase2_step += 1
        use = self.observe_use(fresh, update=not warm)
        K, nan = len(self.targets), float("nan")

        def col(name: str) -> list[float]:
            return [use.get(f"{name}/{k}", nan) for k in range(K)]

        students = [t for t in fresh if t.origin == "student" and not t.decoded]  # probes are not rollouts
        return StepStats(
            step=self.step, version=self.version, loss=m.pop("pcl/loss"),
            residual_abs_mean=m.pop("pcl/residual_abs_mean", nan), value_warmup=warm, lam=self.lam.tolist(),
            use_hat=self.use_hat.tolist(), use_expected=col("use_expected"), use_sampled=col("use_sampled"),
            use_greedy=col("use_greedy"), lambda_err=col("lambda_err"),
            rollout_use=sum(t.teacher_use for t in students) / len(students) if students else None, extra=m)

    def _policy(self, logits: torch.Tensor, budget_ids: torch.Tensor | None = None,
                tau_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Policy logits ``[B, T, V+1]`` in float32, with the per-budget <τ> offset of each row;
        with ``train.use_tau=false`` the ``<τ>`` column is -inf, so the policy is the student
        over ``V`` (what student-mode decoding and speculative drafting sample from), and so
        it is on the rows of a zero budget (decoding masks <τ> there)."""
        index = budget_ids if (budget_ids is not None and self.student.budget_targets) else None
        pol = self.student.policy_logits(logits, index).float()
        if not self.cfg.use_tau:
            pol = pol.clone()
            pol[..., -1] = float("-inf")
        elif budget_ids is not None:
            zero = (self.targets.to(pol.device)[budget_ids.to(pol.device)] == 0)  # [B]
            if bool(zero.any()) and tau_mask is not None and bool((tau_mask & zero[:, None]).any()):
                raise ValueError("a path of a zero budget has <τ> actions, but the zero budget masks <τ>: "
                                 "collect rollouts with their budgets (kdtw.rollout.student_rollouts(budgets=...))")
            if bool(zero.any()):
                tau = torch.where(zero[:, None], torch.full_like(pol[..., -1], float("-inf")), pol[..., -1])
                pol = torch.cat([pol[..., :-1], tau.unsqueeze(-1)], dim=-1)
        return pol

    def _rate(self, phase: str) -> str:
        """The key of the body's learning rate in ``phase`` and its value now, for a message."""
        key = "train.phase2_lr" if phase == "pcl" and self.cfg.phase2_lr is not None else "train.lr"
        return f"{key} (now {self.opt.param_groups[0]['lr']:g})"

    def _apply(self, loss: torch.Tensor, phase: str) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{phase} loss is {loss.item()} at learner step {self.step}: no update was applied; "
                f"lower {self._rate(phase)} or train.lambda_max, or turn on train.reward_scaling"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step += 1

    def set_lr(self, lr: float, *, tau_offset_lr: float | None = None) -> None:
        """Change the body's learning rate, and the <τ> offsets' where given (the value head
        keeps its own)."""
        self.opt.param_groups[0]["lr"] = lr
        if tau_offset_lr is not None:
            self.opt.param_groups[1]["lr"] = tau_offset_lr

    # -- λ

    def observe_use(self, trajs: list[Trajectory], *, update: bool = True) -> dict[str, float]:
        """Update λ_k from the fresh on-policy student paths of one rollout batch (DESIGN.md §5
        and its revision); budgets with no path in the batch keep their values. Teacher
        demonstrations never enter the estimate.

        ``train.use_estimate``: ``expected`` (Σπ(<τ>)/ΣT, the quantity PCL moves), ``sampled``
        (the calls made, Σc/ΣT) or ``greedy`` (argmax <τ> states); ``train.use_weighting``:
        ``token`` (pooled over the batch's tokens) or ``sequence`` (the mean of each path's own
        fraction, DESIGN.md §1's definition, which validation reports).
        ``train.lambda_controller``: ``pi`` (PI on the logit scale) or ``integral`` (the first
        rule, on an EMA of the estimate). Zero budgets are masked, not controlled: their λ stays.
        Returns per-budget logs: λ, the three use estimates, the controller error.
        ``update=False`` only measures (λ and the controller state stay). With
        ``train.decoded_per_budget`` > 0 only the λ probes (rows decoded as validation decodes
        them, ``Trajectory.decoded``) count."""
        c = self.cfg
        K = len(self.targets)
        student = [t for t in trajs if t.origin == "student" and (c.decoded_per_budget == 0 or t.decoded)]
        if not student or not c.use_tau:
            return {}  # without <τ> there is no budget to hold: λ stays
        expected, sampled, greedy = (budget_rates(student, K, e, c.use_weighting)
                                     for e in ("expected", "sampled", "greedy"))
        seen = ~torch.isnan(expected) & (self.targets > 0)  # budget k has a path this step
        obs = {"expected": expected, "sampled": sampled, "greedy": greedy}[c.use_estimate]
        obs = torch.where(seen, obs, torch.full((K,), float("nan")))
        prev = self.use_hat  # the logged estimate follows the rollouts, warm-up included
        ema_obs = torch.where(torch.isnan(prev), obs, c.use_ema * prev + (1 - c.use_ema) * obs)
        self.use_hat = torch.where(seen, ema_obs, prev)
        seen = seen & update
        obs = torch.where(seen, obs, torch.full((K,), float("nan")))
        err, lam = torch.zeros(K), self.lam
        if c.lambda_controller == "pi":
            lam, self.integral, self.err_ema, err = pid_lagrange_update(
                self.integral, self.err_ema, obs, self.targets, k_i=c.lambda_ki, k_p=c.lambda_kp,
                ema=c.lambda_err_ema, lam_min=c.lambda_min, lam_max=c.lambda_max, eps=c.lambda_eps,
                k_c=c.lambda_kc)
        elif bool(seen.any()):
            lam = lagrange_update(self.lam, torch.nan_to_num(self.use_hat, nan=0.0), self.targets,
                                  lr=c.lr_lambda, lam_max=c.lambda_max, lam_min=c.lambda_min)
            err = torch.where(seen, self.use_hat - self.targets, err)
        lam = torch.where(seen, lam, self.lam)  # unseen budgets keep theirs
        self._feed_forward(lam - self.lam)
        self.lam = lam
        out: dict[str, float] = {}
        for k in range(K):
            out |= {f"lambda/{k}": float(self.lam[k]), f"use_hat/{k}": float(self.use_hat[k]),
                    f"use_expected/{k}": float(expected[k]), f"use_sampled/{k}": float(sampled[k]),
                    f"use_greedy/{k}": float(greedy[k]), f"lambda_err/{k}": float(err[k])}
        return out

    @torch.no_grad()
    def _feed_forward(self, delta: torch.Tensor) -> None:
        """``train.lambda_feedforward``: move each budget's <τ> offset by −Δλ_k (kdtw deviation
        from DESIGN.md §5). Under the joint reward the soft-optimal call logit is δ(s) − λ_k, and
        with budget shaping −λ(c − b) the values change by −Δλ·E[Σ(c − b)] ≈ 0 at target, so the
        shifted policy stays PCL-consistent to first order; π(<τ>) then follows λ at once instead
        of through the slow policy gradient, which made λ wind up and unwind over ~1,000 steps."""
        if not self.cfg.lambda_feedforward or not self.student.budget_targets:
            return
        off = self.student.budget_offsets
        off.sub_(delta.to(device=off.device, dtype=off.dtype))

    # -- state

    def state_dict(self) -> dict:
        return {
            "optimizer": self.opt.state_dict(),
            "lam": self.lam.clone(),
            "use_hat": self.use_hat.clone(),
            "integral": self.integral.clone(),
            "err_ema": self.err_ema.clone(),
            "step": self.step,
            "version": self.version,
            "phase2_step": self.phase2_step,
            "reward_std": (self.reward_std.n, self.reward_std.mean, self.reward_std.m2),
        }

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.lam = state["lam"].clone()
        self.use_hat = state["use_hat"].clone()
        if "integral" in state:  # states written before the PI controller lack it
            self.integral = state["integral"].clone()
            self.err_ema = state["err_ema"].clone()
        self.step = int(state["step"])
        self.version = int(state["version"])
        self.phase2_step = int(state.get("phase2_step", 0))
        self.reward_std.n, self.reward_std.mean, self.reward_std.m2 = state["reward_std"]
