"""Losses for kdtw: shaped rewards, PCL (DESIGN.md §2-3), behaviour cloning (§4), λ update (§5).

Pure functions of tensors and floats. Conventions used throughout:

- ``B`` sequences, ``T`` positions, vocabulary ``V``. The student's policy is over ``V ∪ {<τ>}``:
  student logits are ``[B, T, V+1]`` with ``<τ>`` at index ``V`` (the last column). Teacher
  log-probs are over ``V``: ``[B, T, V]``, or ``[B, T]`` for the log-prob of the resolved token.
- ``mask`` is a float or bool ``[B, T]``, nonzero/True at valid positions; the valid positions of
  a row are a prefix (right padding). Whatever padding positions hold is ignored.
- Each loss returns ``(loss, metrics)``; ``metrics`` is a flat ``dict[str, float]``.

A note on the math of PCL with ``<τ>`` (checked numerically in ``tests/test_tabular_pcl.py``):
writing a token is a deterministic transition, but ``<τ>`` is stochastic (the next state is
``s·x`` with ``x ~ p(· | s)``). At the soft optimum of the shaped objective the path residual
``C_t`` is exactly zero on every path without ``<τ>``, while on a path with a ``<τ>`` step it is
zero only in expectation over the teacher's token: each ``<τ>`` step ``j`` inside the window adds
``γ^{j-t+1} (V(s_{j+1}) − E_{x~p} V(s_j·x))`` to ``C_t`` (under ``tau_reward="teacher_logp"``
also ``γ^{j-t}`` times the deviation of ``log p(x_j)`` from its mean), and
``E[C_t | s_t, a_t] = 0`` under any behaviour policy. Path consistency (Nachum et al. 2017)
is exact for deterministic dynamics only, so ``E[½ C²]`` over stochastic ``<τ>`` steps carries
the usual double-sampling variance term, which pulls the values of sibling states together.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TAU_REWARDS = ("joint", "teacher_logp")


def _valid(mask: Tensor) -> Tensor:
    """A float or bool ``[B, T]`` mask as bool."""
    return mask if mask.dtype == torch.bool else mask != 0


def _discount_matrix(T: int, gamma: float, window: int | None, *, dtype, device) -> Tensor:
    """``W[t, s] = γ^(s−t)`` for ``t ≤ s < t + d``, else 0. ``[T, T]``."""
    idx = torch.arange(T, device=device)
    lag = idx[None, :] - idx[:, None]  # [T, T], s − t
    inside = lag >= 0
    if window is not None:
        inside = inside & (lag < window)
    powers = torch.tensor(gamma, dtype=dtype, device=device) ** lag.clamp(min=0).to(dtype)
    return torch.where(inside, powers, torch.zeros((), dtype=dtype, device=device))


def pcl_residuals(
    rewards: Tensor,
    logp: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    window: int | None = None,
    normalize: bool = False,
) -> Tensor:
    """Path-consistency residuals ``C_t`` (DESIGN.md §3).

        C_t = −V(s_t) + γ^{d'} V(s_{t+d'}) + Σ_{j<d'} γ^j (r'_{t+j} − α logp_{t+j}),
        d' = min(d, T_row − t)

    Args:
        rewards: ``[B, T]`` shaped rewards ``r'`` (see ``shaped_rewards``).
        logp: ``[B, T]`` ``log π(a_t | s_t)`` of the action taken (see ``student_action_logp``).
        values: ``[B, T]`` ``V(s_t)``. ``V`` after the last valid position of a row is 0; values
            (and rewards, logp) at padding positions are ignored, whatever they hold.
        mask: ``[B, T]`` float or bool, valid positions a prefix of each row.
        alpha: entropy coefficient α.
        gamma: discount γ.
        window: rollout length ``d ≥ 1``; ``None`` means ``d = ∞`` (to the end of the row).
        normalize: divide ``C_t`` by its step count ``d'`` (a kdtw option, issue 11): a residual
            then has the scale of one step's error whatever the remaining length, so the loss of
            long paths does not grow with T² and no single long row picks the clipped direction.
            The zero set of the residuals (PCL's fixed point) is unchanged.

    Returns:
        ``[B, T]`` residuals, 0 at padding positions.

    Vectorised with a ``[T, T]`` discount matrix, which is numerically stable for any γ (a
    cumulative sum scaled by ``γ^{-t}`` is not). With ``V`` and ``r' − α logp`` zeroed past the
    end of a row, ``d' = min(d, T_row − t)`` needs no special case: the window's terms past the
    end are 0 and so is the bootstrap ``V(s_{T_row})``.
    """
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    valid = _valid(mask)
    B, T = rewards.shape
    if logp.shape != (B, T) or values.shape != (B, T) or valid.shape != (B, T):
        raise ValueError(
            f"rewards, logp, values, mask must all be [B, T]; got {tuple(rewards.shape)}, "
            f"{tuple(logp.shape)}, {tuple(values.shape)}, {tuple(valid.shape)}"
        )
    # At least float32: sums of many half-precision terms lose the residual.
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, logp.dtype), values.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    # torch.where, not multiplication: padding may hold inf or nan.
    step = torch.where(valid, rewards.to(dtype) - alpha * logp.to(dtype), zero)  # [B, T]
    v = torch.where(valid, values.to(dtype), zero)  # [B, T]

    W = _discount_matrix(T, gamma, window, dtype=dtype, device=rewards.device)  # [T, T]
    residual = -v + step @ W.T  # [B, T]
    if window is not None and window < T:
        # γ^d V(s_{t+d}); beyond T it is 0 (the row has ended).
        bootstrap = torch.cat([v[:, window:], v.new_zeros(B, window)], dim=1)  # [B, T]
        residual = residual + gamma**window * bootstrap
    if normalize:
        remaining = valid.to(dtype).flip(1).cumsum(1).flip(1)  # [B, T], T_row − t at valid t
        steps = remaining if window is None else remaining.clamp(max=float(window))
        residual = residual / steps.clamp(min=1.0)
    return torch.where(valid, residual, zero)


def pcl_loss(
    rewards: Tensor,
    logp: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    window: int | None = None,
    critic_weight: float = 1.0,
    normalize: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """PCL loss ``Σ_valid ½ C_t² / (number of valid t in the batch)`` (DESIGN.md §3).

    Args: as ``pcl_residuals`` (all ``[B, T]``), plus
        critic_weight: scales the gradient that reaches ``values``. ``C`` is built from
            ``v_eff = critic_weight · values + (1 − critic_weight) · values.detach()``, whose
            value equals ``values`` and whose gradient is ``critic_weight`` times that of
            ``values``. So the loss value is mean ½C², its gradient wrt ``logp`` is that of ½C²,
            and its gradient wrt ``values`` is ``critic_weight`` times that of ½C².

    Returns:
        ``(loss, metrics)``: scalar loss; metrics ``pcl/loss``, ``pcl/residual_abs_mean``,
        ``pcl/residual_abs_max``, ``pcl/value_mean``, ``pcl/n_valid``.
    """
    valid = _valid(mask)
    v_eff = critic_weight * values + (1.0 - critic_weight) * values.detach()
    C = pcl_residuals(rewards, logp, v_eff, valid, alpha=alpha, gamma=gamma, window=window, normalize=normalize)
    n_valid = valid.sum()
    loss = 0.5 * (C**2).sum() / n_valid.clamp(min=1)

    with torch.no_grad():
        n = max(int(n_valid), 1)
        abs_c = C.abs()  # 0 at padding
        v = torch.where(valid, values.detach(), torch.zeros_like(values.detach()))
        metrics = {
            "pcl/loss": float(loss.detach()),
            "pcl/residual_abs_mean": float(abs_c.sum()) / n,
            "pcl/residual_abs_max": float(abs_c.max()) if abs_c.numel() else 0.0,
            "pcl/value_mean": float(v.sum()) / n,
            "pcl/n_valid": float(n_valid),
        }
    return loss, metrics


def shaped_rewards(
    teacher_logp: Tensor,
    tau_mask: Tensor,
    mask: Tensor,
    *,
    lam: Tensor | float,
    budget: Tensor | float,
    tau_reward: str = "joint",
    clip_min: float = -20.0,
) -> Tensor:
    """Budget-shaped rewards ``r'_t = r_t − λ (c_t − b)`` (DESIGN.md §2).

        r_t = max(log p(x_t | s_t), clip_min)      for a student token (c_t = 0)
        r_t = 0                                     for <τ> (c_t = 1), tau_reward="joint"
        r_t = max(log p(x_t | s_t), clip_min)      for <τ>, tau_reward="teacher_logp"

    Under "joint" the teacher's log-probability of its own token cancels against the same term
    in log q of the joint (decision, token) process, leaving ``−α log π(<τ> | s)``.

    Args:
        teacher_logp: ``[B, T]`` teacher log-prob of the resolved token ``x_t``.
        tau_mask: ``[B, T]`` bool, True where the action was ``<τ>`` (``c_t = 1``).
        mask: ``[B, T]`` float or bool, valid positions.
        lam: ``[B]`` multiplier λ of each sequence's budget (or a float for all rows).
        budget: ``[B]`` target teacher-use fraction ``b`` of each sequence (or a float).
        tau_reward: "joint" or "teacher_logp".
        clip_min: lower clip of the teacher log-prob.

    Returns:
        ``[B, T]`` shaped rewards, 0 at padding positions.
    """
    if tau_reward not in TAU_REWARDS:
        raise ValueError(f"tau_reward must be one of {TAU_REWARDS}, got {tau_reward!r}")
    valid = _valid(mask)
    tau = tau_mask.to(torch.bool)
    dtype = torch.promote_types(teacher_logp.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=teacher_logp.device)

    r = teacher_logp.to(dtype).clamp(min=clip_min)  # [B, T]
    if tau_reward == "joint":
        r = torch.where(tau, zero, r)
    lam_b = torch.as_tensor(lam, dtype=dtype, device=r.device).reshape(-1, 1)  # [B, 1] or [1, 1]
    budget_b = torch.as_tensor(budget, dtype=dtype, device=r.device).reshape(-1, 1)
    cost = tau.to(dtype)  # [B, T]
    shaped = r - lam_b * (cost - budget_b)
    return torch.where(valid, shaped, zero)


def student_action_logp(
    student_logits: Tensor,
    tokens: Tensor,
    tau_mask: Tensor,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """``log π(a_t | s_t)`` of the action taken (DESIGN.md §1).

    ``a_t = <τ>`` (index ``V``) where ``tau_mask``, else ``a_t = tokens_t``; ``log π`` is the
    log-softmax over all ``V + 1`` columns.

    Args:
        student_logits: ``[B, T, V+1]``.
        tokens: ``[B, T]`` long, resolved tokens in ``[0, V)``.
        tau_mask: ``[B, T]`` bool.
        mask: optional ``[B, T]`` valid positions; where given, padding positions may hold any
            token id (e.g. -100) and their output is 0.

    Returns:
        ``[B, T]`` log-probs.
    """
    V = student_logits.shape[-1] - 1
    tau = tau_mask.to(torch.bool)
    actions = torch.where(tau, torch.full_like(tokens, V), tokens)  # [B, T]
    if mask is not None:
        actions = torch.where(_valid(mask), actions, torch.zeros_like(actions))
    logp_all = torch.log_softmax(student_logits, dim=-1)  # [B, T, V+1]
    logp = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # [B, T]
    if mask is not None:
        logp = torch.where(_valid(mask), logp, torch.zeros_like(logp))
    return logp


def conditional_demo_logp(student_logits: Tensor, logp: Tensor, tokens: Tensor, demo: Tensor) -> Tensor:
    """Action log-probs with demonstration rows scored conditional on writing (issue 11).

    A teacher demonstration is a path the student did not choose: its steps are "write x_t".
    Scored as ``log π(x_t) = log(1 − π(<τ>)) + log π̃(x_t)`` (π̃: the policy over V without
    <τ>), the PCL gradient lowers the <τ> logit at every demo step by about π(<τ>), whatever
    the budget, and off-policy demos outweigh the on-policy rows that carry the call signal.
    Here the decision part ``log(1 − π(<τ>))`` keeps its value but not its gradient: the
    residuals (and so PCL's fixed point) are those of the joint policy, while demos train the
    token distribution π̃ and the values, never the <τ> logit (∂/∂z_<τ> is exactly 0).

    Args:
        student_logits: ``[B, T, V+1]`` policy logits, ``<τ>`` last.
        logp: ``[B, T]`` ``log π(a_t | s_t)`` of the joint policy (``student_action_logp``).
        tokens: ``[B, T]`` long, the resolved tokens (padding may hold any id).
        demo: ``[B]`` bool, the demonstration rows.

    Returns:
        ``[B, T]``: ``logp`` on student rows; on demo rows ``log π̃(x_t) + sg(log(1 − π(<τ>)))``
        (equal in value to ``logp`` there).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    V = student_logits.shape[-1] - 1
    ids = tokens.clamp(min=0, max=V - 1)
    log_tilde = torch.log_softmax(student_logits[..., :V].to(dtype), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        write = torch.logsumexp(torch.log_softmax(student_logits.to(dtype), -1)[..., :V], dim=-1)  # log(1 − π(<τ>))
    conditional = (log_tilde + write).to(logp.dtype)
    return torch.where(demo.to(torch.bool)[:, None], conditional, logp)


def demo_token_nll(student_logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean ``−log π̃(x_t | s_t)`` over the valid positions of ``mask``, where ``π̃`` is the
    student's distribution over ``V`` with ``<τ>`` removed and renormalised (DESIGN.md §4's
    ``π̃``). A kdtw option for Phase 2 (``train.demo_nll_weight``), not in DESIGN.md.

    Args:
        student_logits: ``[B, T, V+1]``.
        tokens: ``[B, T]`` long; padding positions may hold any id.
        mask: ``[B, T]`` positions to count (e.g. the valid positions of demonstration rows).

    Returns:
        scalar; 0 when ``mask`` is empty.
    """
    valid = _valid(mask)
    logp = torch.log_softmax(student_logits[..., :-1], dim=-1)
    ids = torch.where(valid, tokens, torch.zeros_like(tokens))
    nll = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    return nll.sum() / valid.sum().clamp(min=1)


def bc_loss(
    student_logits: Tensor,
    teacher_logp_full: Tensor,
    call_targets: Tensor,
    mask: Tensor,
    *,
    token_kl_at_calls: bool = False,
    call_weight: float = 1.0,
    call_on_tau_only: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """Behaviour cloning with the KL oracle's call targets (DESIGN.md §4).

        L_BC = mean_valid-t [ 1[t ∈ M] (−log π(<τ> | s_t)) + 1[t ∉ M] KL(p(·|s_t) ‖ π(·|s_t)) ]

    ``π`` is the student's softmax over ``V ∪ {<τ>}`` and ``p(<τ>) = 0``, so the KL is
    ``Σ_{x∈V} p(x) (log p(x) − log π(x))``: it pulls ``π`` over ``V`` towards ``p`` and pushes
    ``<τ>`` down where no call is wanted. Each term is ≥ 0 (``Σ_{x∈V} π(x) ≤ 1``).

    Args:
        student_logits: ``[B, T, V+1]``, ``<τ>`` last.
        teacher_logp_full: ``[B, T, V]`` teacher log-probs over ``V`` (may hold -inf).
        call_targets: ``[B, T]`` bool, the oracle's ``M`` (see ``kdtw.oracle``).
        mask: ``[B, T]`` float or bool, valid positions.
        token_kl_at_calls: also add ``KL(p ‖ π̃)`` at call targets, ``π̃`` the student over ``V``
            with ``<τ>`` removed and renormalised (a kdtw option, off in DESIGN.md): the student
            keeps learning its own token where it learns to call, which it needs under the
            budgets that call less.
        call_weight: with ``token_kl_at_calls`` the loss factors exactly, writing
            ``π = (1−q)·π̃ + q·<τ>``: ``KL(p‖π) = KL(p‖π̃) − log(1−q)`` at the other positions, so
            the loss is ``KL(p‖π̃)`` at every valid position plus the binary cross-entropy of
            ``q = π(<τ>)`` against ``M``. ``call_weight`` scales that cross-entropy (1 gives the
            loss above exactly; < 1 lets the call decision bend the shared body less, a kdtw
            option). A weight other than 1 needs ``token_kl_at_calls``.
        call_on_tau_only: in that factored form, the cross-entropy's log-odds
            ``log q/(1−q) = z_τ − logsumexp(z_V)`` take the token logits' ``logsumexp`` as a
            constant, so the call decision's gradient reaches the ``<τ>`` logit alone and the token
            logits learn from ``KL(p‖π̃)`` only (same value; needs ``token_kl_at_calls``; with
            ``Student.detach_call_path`` no call gradient reaches the body).

    Returns:
        ``(loss, metrics)``: scalar loss, the mean over all valid positions of the batch;
        metrics ``bc/loss``, ``bc/call_nll`` (mean over call targets), ``bc/kl`` (mean over the
        other valid positions), ``bc/call_frac``, ``bc/tau_prob_call``, ``bc/tau_prob_nocall``.
    """
    V = teacher_logp_full.shape[-1]
    if student_logits.shape[-1] != V + 1:
        raise ValueError(
            f"student_logits must be [B, T, V+1] with V={V} from teacher_logp_full, "
            f"got last dim {student_logits.shape[-1]}"
        )
    if call_weight < 0 or not math.isfinite(call_weight):
        raise ValueError(f"call_weight must be a finite number >= 0, got {call_weight}")
    if call_weight != 1.0 and not token_kl_at_calls:
        raise ValueError("call_weight other than 1 needs token_kl_at_calls=True "
                         "(set train.bc_token_kl_at_calls=true with train.bc_call_weight)")
    if call_on_tau_only and not token_kl_at_calls:
        raise ValueError("call_on_tau_only needs token_kl_at_calls=True "
                         "(set train.bc_token_kl_at_calls=true with train.bc_call_detach)")
    valid = _valid(mask)
    call = call_targets.to(torch.bool) & valid
    no_call = valid & ~call

    # Half precision is upcast: the KL of near-equal distributions is a small difference.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logpi = torch.log_softmax(student_logits.to(dtype), dim=-1)  # [B, T, V+1]
    teacher_logp_full = teacher_logp_full.to(logpi.dtype)
    p = teacher_logp_full.exp()  # [B, T, V]
    # p log p at p = 0 is 0; torch.where also keeps -inf - x from making nan.
    kl_terms = torch.where(p > 0, p * (teacher_logp_full - logpi[..., :V]), torch.zeros_like(p))
    kl = kl_terms.sum(-1)  # [B, T]
    call_nll = -logpi[..., V]  # [B, T]

    zero = torch.zeros((), dtype=logpi.dtype, device=logpi.device)
    per_pos = torch.where(call, call_nll, torch.where(no_call, kl, zero))  # [B, T]
    if token_kl_at_calls:
        log_tilde = torch.log_softmax(student_logits[..., :V].to(dtype), dim=-1)  # [B, T, V]
        kl_tilde = torch.where(p > 0, p * (teacher_logp_full - log_tilde), torch.zeros_like(p)).sum(-1)
        if call_weight == 1.0 and not call_on_tau_only:
            per_pos = per_pos + torch.where(call, kl_tilde, zero)
        else:  # the factored form: KL(p‖π̃) everywhere + call_weight · BCE(q, M)
            z = student_logits.to(dtype)
            lse = torch.logsumexp(z[..., :V], dim=-1)
            log_odds = z[..., V] - (lse.detach() if call_on_tau_only else lse)  # log q/(1−q)
            bce = torch.nn.functional.softplus(torch.where(call, -log_odds, log_odds))
            per_pos = torch.where(valid, kl_tilde + call_weight * bce, zero)
    n_valid = valid.sum()
    loss = per_pos.sum() / n_valid.clamp(min=1)

    with torch.no_grad():
        n_call, n_no_call = int(call.sum()), int(no_call.sum())
        tau_prob = logpi[..., V].exp()

        def _mean(x: Tensor, where: Tensor, n: int) -> float:
            return float(torch.where(where, x, zero).sum()) / n if n else 0.0

        metrics = {
            "bc/loss": float(loss.detach()),
            "bc/call_nll": _mean(call_nll, call, n_call),
            "bc/kl": _mean(kl, no_call, n_no_call),
            "bc/call_frac": n_call / max(int(n_valid), 1),
            "bc/tau_prob_call": _mean(tau_prob, call, n_call),
            "bc/tau_prob_nocall": _mean(tau_prob, no_call, n_no_call),
        }
    return loss, metrics


@torch.no_grad()
def lagrange_update(
    lam: Tensor,
    observed: Tensor,
    target: Tensor,
    *,
    lr: float,
    lam_max: float,
    lam_min: float = 0.0,
) -> Tensor:
    """Dual ascent on the budget multipliers (DESIGN.md §5).

        λ_k ← clip(λ_k + η_λ (ĉ_k − b_k), λ_min, λ_max)

    DESIGN.md fixes λ_min = 0 (the budget as an upper bound). A negative ``lam_min`` treats the
    budget as an equality constraint (the multiplier of an equality has no sign): λ < 0 then
    rewards calls where use is below target, which λ ≥ 0 cannot do (kdtw deviation, opt-in).

    Args:
        lam: ``[K]`` current multipliers.
        observed: ``[K]`` observed teacher-use fraction ``ĉ_k`` (e.g. a moving average).
        target: ``[K]`` budgets ``b_k``.
        lr: step size η_λ.
        lam_max: upper clip λ_max.

    Returns:
        ``[K]`` new multipliers (a new tensor; ``lam`` is not modified).
    """
    if lam_max < 0:
        raise ValueError(f"lam_max must be >= 0, got {lam_max}")
    if lam_min > lam_max:
        raise ValueError(f"lam_min={lam_min} must be <= lam_max={lam_max}")
    lam = torch.as_tensor(lam)
    dtype = lam.dtype if lam.is_floating_point() else torch.float32
    observed = torch.as_tensor(observed, dtype=dtype, device=lam.device)
    target = torch.as_tensor(target, dtype=dtype, device=lam.device)
    return (lam.to(dtype) + lr * (observed - target)).clamp(min=lam_min, max=lam_max)


def _logit(x: Tensor, eps: float) -> Tensor:
    x = x.clamp(min=eps, max=1 - eps)
    return torch.log(x) - torch.log1p(-x)


def pid_lagrange_init(target: Tensor, *, eps: float, lam_min: float, lam_max: float) -> Tensor:
    """Warm start of the integral: ``I⁰_k = log((1 − b_k) / b_k)``, clipped to [λ_min, λ_max].

    Under the joint reward (α = 1) a state whose successors have equal values has
    π*(<τ>|s) = σ(−λ) (the +λb of a token and the −λ(1−b) of <τ> differ by λ), so λ = logit(1−b)
    is the soft optimum that calls at rate b; the controller starts there, not at 0.
    """
    b = torch.as_tensor(target, dtype=torch.float32)
    return (-_logit(b, eps)).clamp(min=lam_min, max=lam_max)


@torch.no_grad()
def pid_lagrange_update(
    integral: Tensor,
    err_ema: Tensor,
    observed: Tensor,
    target: Tensor,
    *,
    k_i: float,
    k_p: float,
    ema: float,
    lam_min: float,
    lam_max: float,
    eps: float = 1e-3,
    k_c: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PI Lagrangian on the logit scale (DESIGN.md §5 revision; Stooke, Achiam & Abbeel 2020).

        e_k = logit(clip(ē_k, ε, 1−ε)) − logit(clip(b_k, ε, 1−ε))
        ē_c = mean of e_k over the budgets observed this step
        I_k ← clip(I_k + K_I e_k + K_C ē_c, λ_min, λ_max)   (anti-windup: the integral is clipped)
        ē_k^EMA ← ema · ē_k^EMA + (1 − ema) e_k
        λ_k = clip(I_k + K_P · EMA(e_k), λ_min, λ_max)

    On the logit scale a step of λ moves the soft-optimal call rate by the same amount wherever
    the budget lies (π(<τ>) ≈ σ(δ − λ)), so one gain serves 0.05 and 0.5 alike; the integral
    alone (the old rule) winds up and oscillates, the proportional term damps it.

    ``k_c`` (kdtw addition, issue 11) is a common-mode integral gain: every observed budget's
    integral also moves by K_C times the error pooled over the observed budgets. Measured on the
    SmolLM2 traces, the policy's own call logit drifts like a random walk common to all budgets
    (0.13–0.33 logit a step) while each budget's deviation from that common part is white noise;
    the pooled error has 1/K of one budget's noise variance, so the common part can be tracked
    with a much higher gain than each budget's own. ``k_c = 0`` is the plain PI rule.

    Args:
        integral, err_ema: ``[K]`` controller state (start: ``pid_lagrange_init``, zeros).
        observed: ``[K]`` ē_k; ``nan`` where a budget had no row this step: its state is kept.
        target: ``[K]`` b_k.
        k_i, k_p: integral and proportional gains (≥ 0).
        k_c: common-mode integral gain (≥ 0) on the mean error of the observed budgets.
        ema: weight of the old value in the error's moving average, in [0, 1).
        lam_min, lam_max: bounds of λ and of the integral.
        eps: clip of rates before the logit.

    Returns:
        ``(lam, integral, err_ema, err)``, each ``[K]``, new tensors (``err`` is 0 where unseen).
    """
    if k_i < 0 or k_p < 0 or k_c < 0:
        raise ValueError(f"controller gains must be >= 0, got k_i={k_i}, k_p={k_p}, k_c={k_c}")
    if not 0 <= ema < 1:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    if lam_min > lam_max:
        raise ValueError(f"lam_min={lam_min} must be <= lam_max={lam_max}")
    integral = torch.as_tensor(integral, dtype=torch.float32)
    err_ema = torch.as_tensor(err_ema, dtype=torch.float32)
    observed = torch.as_tensor(observed, dtype=torch.float32)
    target = torch.as_tensor(target, dtype=torch.float32)
    seen = ~torch.isnan(observed)
    err = torch.where(seen, _logit(torch.nan_to_num(observed, nan=0.5), eps) - _logit(target, eps),
                      torch.zeros_like(observed))
    common = err[seen].mean() if bool(seen.any()) else torch.zeros(())
    new_integral = torch.where(seen, (integral + k_i * err + k_c * common).clamp(min=lam_min, max=lam_max),
                               integral)
    new_ema = torch.where(seen, ema * err_ema + (1 - ema) * err, err_ema)
    lam = (new_integral + k_p * new_ema).clamp(min=lam_min, max=lam_max)
    return lam, new_integral, new_ema, err


__all__ = [
    "TAU_REWARDS",
    "bc_loss",
    "conditional_demo_logp",
    "lagrange_update",
    "pcl_loss",
    "pcl_residuals",
    "pid_lagrange_init",
    "pid_lagrange_update",
    "shaped_rewards",
    "student_action_logp",
]
