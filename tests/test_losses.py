"""Property tests for kdtw.losses (DESIGN.md §2-5): closed forms, loop equivalence, padding."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdtw.losses import (
    bc_loss,
    demo_token_nll,
    lagrange_update,
    pcl_loss,
    pcl_residuals,
    shaped_rewards,
    student_action_logp,
)


def _random_batch(seed: int, B: int = 4, T: int = 7, dtype=torch.float64):
    """Random rewards, logp, values and a prefix mask with random lengths (one row full)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=dtype)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    values = torch.randn(B, T, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
    return rewards, logp, values, mask


def _residuals_loop(rewards, logp, values, mask, *, alpha, gamma, window):
    """Plain double loop over rows and positions, straight from DESIGN.md §3."""
    B, T = rewards.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        T_row = int(mask[b].sum())
        for t in range(T_row):
            d = T_row - t if window is None else min(window, T_row - t)
            value_end = 0.0 if t + d == T_row else float(values[b, t + d])
            c = -float(values[b, t]) + gamma**d * value_end
            for j in range(d):
                c += gamma**j * (float(rewards[b, t + j]) - alpha * float(logp[b, t + j]))
            out[b, t] = c
    return out


# --- pcl_residuals ---------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2, 3, None])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_residuals_equal_loop(window, gamma, alpha):
    for seed in range(3):
        rewards, logp, values, mask = _random_batch(seed)
        got = pcl_residuals(rewards, logp, values, mask, alpha=alpha, gamma=gamma, window=window)
        want = _residuals_loop(rewards, logp, values, mask, alpha=alpha, gamma=gamma, window=window)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_residuals_window_longer_than_sequence_equals_none():
    rewards, logp, values, mask = _random_batch(0, T=5)
    full = pcl_residuals(rewards, logp, values, mask, gamma=0.9)
    for window in (5, 6, 100):
        got = pcl_residuals(rewards, logp, values, mask, gamma=0.9, window=window)
        torch.testing.assert_close(got, full)


def test_residuals_three_step_by_hand():
    """r = [1, 2, 3], logp = [-0.5, -1, -2], V = [0.1, 0.2, 0.3], α = 1, γ = 0.9.

    r − α logp = [1.5, 3, 5].
    d = ∞:  C_0 = −0.1 + 1.5 + 0.9·3 + 0.81·5 = 8.15,  C_1 = −0.2 + 3 + 0.9·5 = 7.3,
            C_2 = −0.3 + 5 = 4.7.
    d = 1:  C_0 = −0.1 + 1.5 + 0.9·0.2 = 1.58,  C_1 = −0.2 + 3 + 0.9·0.3 = 3.07,
            C_2 = −0.3 + 5 + 0.9·V(s_3) = 4.7 (V after the end is 0).
    d = 2:  C_0 = −0.1 + 1.5 + 0.9·3 + 0.81·0.3 = 4.343,  C_1 = 7.3,  C_2 = 4.7.
    """
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    logp = torch.tensor([[-0.5, -1.0, -2.0]], dtype=torch.float64)
    values = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    expected = {
        None: [8.15, 7.3, 4.7],
        1: [1.58, 3.07, 4.7],
        2: [4.343, 7.3, 4.7],
    }
    for window, want in expected.items():
        got = pcl_residuals(rewards, logp, values, mask, gamma=0.9, window=window)
        torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float64))


def test_residuals_gamma_one_window_none_is_reverse_cumsum():
    rewards, logp, values, mask = _random_batch(1)
    step = torch.where(mask, rewards - logp, torch.zeros(()))
    returns = step.flip(1).cumsum(1).flip(1)
    want = torch.where(mask, returns - values, torch.zeros(()))
    torch.testing.assert_close(pcl_residuals(rewards, logp, values, mask), want)


@pytest.mark.parametrize("window", [1, 2, None])
def test_padding_changes_nothing(window):
    rewards, logp, values, mask = _random_batch(2)
    kwargs = dict(alpha=0.7, gamma=0.9, window=window)
    ref = pcl_residuals(rewards, logp, values, mask, **kwargs)
    ref_loss, _ = pcl_loss(rewards, logp, values, mask, **kwargs)

    # Garbage in the existing padding positions, plus 3 extra padding columns of garbage.
    garbage = torch.tensor(float("nan"), dtype=torch.float64)
    pad = torch.full((rewards.shape[0], 3), float("inf"), dtype=torch.float64)
    r2 = torch.cat([torch.where(mask, rewards, garbage), pad], 1)
    lp2 = torch.cat([torch.where(mask, logp, 1e30 * torch.ones(())), -pad], 1)
    v2 = torch.cat([torch.where(mask, values, garbage), pad], 1)
    m2 = torch.cat([mask, torch.zeros_like(pad, dtype=torch.bool)], 1)

    got = pcl_residuals(r2, lp2, v2, m2, **kwargs)
    torch.testing.assert_close(got[:, : mask.shape[1]], ref)
    assert torch.all(got[~m2] == 0)
    loss, _ = pcl_loss(r2, lp2, v2, m2, **kwargs)
    torch.testing.assert_close(loss, ref_loss)


def test_float_mask_equals_bool_mask():
    rewards, logp, values, mask = _random_batch(3)
    torch.testing.assert_close(
        pcl_residuals(rewards, logp, values, mask.double(), window=2),
        pcl_residuals(rewards, logp, values, mask, window=2),
    )


@pytest.mark.parametrize("window", [0, -1, 1.5])
def test_bad_window_raises(window):
    rewards, logp, values, mask = _random_batch(0)
    with pytest.raises(ValueError, match="window"):
        pcl_residuals(rewards, logp, values, mask, window=window)


def test_residuals_float32_long_sequence_close_to_float64():
    rewards, logp, values, mask = _random_batch(4, B=2, T=200)
    for window in (None, 16):
        got = pcl_residuals(rewards.float(), logp.float(), values.float(), mask, window=window)
        want = pcl_residuals(rewards, logp, values, mask, window=window)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


# --- pcl_loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, None])
def test_pcl_loss_is_mean_half_squared_residual(window):
    rewards, logp, values, mask = _random_batch(5)
    C = pcl_residuals(rewards, logp, values, mask, alpha=0.5, gamma=0.9, window=window)
    loss, metrics = pcl_loss(rewards, logp, values, mask, alpha=0.5, gamma=0.9, window=window)
    want = 0.5 * (C[mask] ** 2).mean()
    torch.testing.assert_close(loss, want)
    assert metrics["pcl/loss"] == pytest.approx(float(want))
    assert metrics["pcl/residual_abs_mean"] == pytest.approx(float(C[mask].abs().mean()))
    assert metrics["pcl/n_valid"] == float(mask.sum())
    assert all(isinstance(v, float) for v in metrics.values())
    assert all(k.startswith("pcl/") for k in metrics)


def _grads(critic_weight: float, window=None):
    rewards, logp, values, mask = _random_batch(6)
    logp = logp.clone().requires_grad_(True)
    values = values.clone().requires_grad_(True)
    loss, _ = pcl_loss(rewards, logp, values, mask, window=window, critic_weight=critic_weight)
    loss.backward()
    return loss.detach(), logp.grad, values.grad


@pytest.mark.parametrize("window", [2, None])
def test_critic_weight_scales_only_value_gradient(window):
    loss1, glogp1, gv1 = _grads(1.0, window)
    loss0, glogp0, gv0 = _grads(0.0, window)
    loss3, glogp3, gv3 = _grads(0.3, window)
    torch.testing.assert_close(loss0, loss1)
    torch.testing.assert_close(loss3, loss1)
    assert gv1.abs().max() > 0
    assert torch.all(gv0 == 0)
    torch.testing.assert_close(glogp0, glogp1)
    torch.testing.assert_close(glogp3, glogp1)
    torch.testing.assert_close(gv3, 0.3 * gv1)


@pytest.mark.parametrize("critic_weight", [1.0, 0.5])
def test_pcl_gradient_ignores_padding_positions(critic_weight):
    rewards, logp, values, mask = _random_batch(7)
    garbage = torch.tensor(float("nan"), dtype=torch.float64)
    values = torch.where(mask, values, garbage).requires_grad_(True)
    logp = torch.where(mask, logp, float("-inf")).requires_grad_(True)
    loss, _ = pcl_loss(rewards, logp, values, mask, window=2, critic_weight=critic_weight)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(values.grad).all() and torch.isfinite(logp.grad).all()
    assert torch.all(values.grad[~mask] == 0)
    assert torch.all(logp.grad[~mask] == 0)


def test_half_precision_inputs_computed_in_float32():
    rewards, logp, values, mask = _random_batch(8)
    got = pcl_residuals(rewards.bfloat16(), logp.bfloat16(), values.bfloat16(), mask)
    assert got.dtype == torch.float32
    want = pcl_residuals(rewards.bfloat16().double(), logp.bfloat16().double(), values.bfloat16().double(), mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# --- shaped_rewards ---------------------------------------------------------------------------


def _reward_inputs():
    teacher_logp = torch.tensor([[-0.5, -30.0, -2.0, -1.0], [-25.0, -0.1, -3.0, 9.0]])
    tau_mask = torch.tensor([[False, False, True, True], [True, False, False, True]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    return teacher_logp, tau_mask, mask


def test_shaped_rewards_no_lambda_joint_and_clip():
    teacher_logp, tau_mask, mask = _reward_inputs()
    r = shaped_rewards(teacher_logp, tau_mask, mask, lam=torch.zeros(2), budget=torch.zeros(2))
    want = torch.tensor([[-0.5, -20.0, 0.0, 0.0], [0.0, -0.1, -3.0, 0.0]])
    torch.testing.assert_close(r, want)


def test_shaped_rewards_teacher_logp_option():
    teacher_logp, tau_mask, mask = _reward_inputs()
    r = shaped_rewards(
        teacher_logp, tau_mask, mask, lam=torch.zeros(2), budget=torch.zeros(2),
        tau_reward="teacher_logp", clip_min=-10.0,
    )
    want = torch.tensor([[-0.5, -10.0, -2.0, -1.0], [-10.0, -0.1, -3.0, 0.0]])
    torch.testing.assert_close(r, want)


def test_shaped_rewards_lambda_term_per_sequence():
    teacher_logp, tau_mask, mask = _reward_inputs()
    lam = torch.tensor([2.0, 0.5])
    budget = torch.tensor([0.1, 0.3])
    base = shaped_rewards(teacher_logp, tau_mask, mask, lam=torch.zeros(2), budget=budget)
    r = shaped_rewards(teacher_logp, tau_mask, mask, lam=lam, budget=budget)
    cost = tau_mask.float()
    want = torch.where(mask.bool(), base - lam[:, None] * (cost - budget[:, None]), 0.0)
    torch.testing.assert_close(r, want)
    # A call is penalised by λ(1 − b), a student token rewarded by λb.
    assert r[0, 2] - base[0, 2] == pytest.approx(-2.0 * 0.9)
    assert r[0, 0] - base[0, 0] == pytest.approx(2.0 * 0.1)


def test_shaped_rewards_zero_at_padding_even_with_garbage():
    teacher_logp, tau_mask, mask = _reward_inputs()
    teacher_logp[1, 3] = float("nan")
    r = shaped_rewards(teacher_logp, tau_mask, mask, lam=torch.ones(2), budget=torch.full((2,), 0.2))
    assert r[1, 3] == 0.0
    assert torch.isfinite(r).all()


def test_shaped_rewards_bad_tau_reward_raises():
    teacher_logp, tau_mask, mask = _reward_inputs()
    with pytest.raises(ValueError, match="joint.*teacher_logp"):
        shaped_rewards(teacher_logp, tau_mask, mask, lam=torch.zeros(2), budget=torch.zeros(2),
                       tau_reward="literal")


# --- student_action_logp ----------------------------------------------------------------------


def test_student_action_logp_picks_tau_column():
    torch.manual_seed(0)
    B, T, V = 2, 5, 4
    logits = torch.randn(B, T, V + 1)
    tokens = torch.randint(0, V, (B, T))
    tau_mask = torch.rand(B, T) < 0.5
    got = student_action_logp(logits, tokens, tau_mask)
    logp_all = torch.log_softmax(logits, -1)
    for b in range(B):
        for t in range(T):
            a = V if tau_mask[b, t] else int(tokens[b, t])
            assert got[b, t] == pytest.approx(float(logp_all[b, t, a]), abs=1e-6)


def test_student_action_logp_padding_token_ids_ignored_with_mask():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 4)
    tokens = torch.tensor([[0, 2, -100]])
    tau_mask = torch.tensor([[False, True, False]])
    mask = torch.tensor([[True, True, False]])
    got = student_action_logp(logits, tokens, tau_mask, mask=mask)
    logp_all = torch.log_softmax(logits, -1)
    torch.testing.assert_close(got, torch.stack([logp_all[0, 0, 0], logp_all[0, 1, 3], torch.tensor(0.0)])[None])


# --- bc_loss ----------------------------------------------------------------------------------


def _bc_setup(seed: int, B: int = 3, T: int = 6, V: int = 5):
    g = torch.Generator().manual_seed(seed)
    teacher_logp_full = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    call_targets = torch.rand(B, T, generator=g) < 0.4
    call_targets[0, 0], call_targets[0, 1] = True, False  # at least one of each
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return teacher_logp_full, call_targets, mask


def _bc_optimum(teacher_logp_full, call_targets, big: float = 40.0):
    """Student logits: log p over V; <τ> logit +big at call targets, −big elsewhere."""
    tau_logit = torch.where(call_targets, big, -big).to(teacher_logp_full.dtype)
    return torch.cat([teacher_logp_full, tau_logit[..., None]], -1)  # [B, T, V+1]


def test_bc_loss_zero_at_matching_student_and_increases_under_perturbation():
    teacher_logp_full, call_targets, mask = _bc_setup(0)
    logits = _bc_optimum(teacher_logp_full, call_targets)
    loss, metrics = bc_loss(logits, teacher_logp_full, call_targets, mask)
    assert float(loss) < 1e-12
    assert metrics["bc/tau_prob_call"] == pytest.approx(1.0)
    assert metrics["bc/tau_prob_nocall"] < 1e-12
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        noise = 0.1 * torch.randn(logits.shape, generator=g, dtype=logits.dtype)
        perturbed, _ = bc_loss(logits + noise, teacher_logp_full, call_targets, mask)
        assert perturbed > loss + 1e-6


def test_bc_loss_closed_form_and_mean_over_valid_positions():
    teacher_logp_full, call_targets, mask = _bc_setup(2)
    logits = torch.randn(*teacher_logp_full.shape[:2], teacher_logp_full.shape[-1] + 1,
                         dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss, metrics = bc_loss(logits, teacher_logp_full, call_targets, mask)
    logpi = torch.log_softmax(logits, -1)
    p = teacher_logp_full.exp()
    total, n = 0.0, 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            n += 1
            if call_targets[b, t]:
                total += -float(logpi[b, t, -1])
            else:
                total += float((p[b, t] * (teacher_logp_full[b, t] - logpi[b, t, :-1])).sum())
    assert float(loss) == pytest.approx(total / n, rel=1e-10)
    assert metrics["bc/call_frac"] == pytest.approx(float((call_targets & mask).sum()) / n)


def test_bc_loss_nonnegative_and_finite_with_zero_teacher_probs():
    for seed in range(5):
        teacher_logp_full, call_targets, mask = _bc_setup(seed)
        teacher_logp_full[..., 0] = float("-inf")  # p(x) = 0 for one token
        teacher_logp_full = torch.log_softmax(teacher_logp_full, -1)
        logits = 3 * torch.randn(*teacher_logp_full.shape[:2], teacher_logp_full.shape[-1] + 1,
                                 dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        logits.requires_grad_(True)
        loss, _ = bc_loss(logits, teacher_logp_full, call_targets, mask)
        assert float(loss.detach()) >= 0
        loss.backward()
        assert torch.isfinite(logits.grad).all()


def test_bc_loss_padding_changes_nothing():
    teacher_logp_full, call_targets, mask = _bc_setup(4)
    logits = torch.randn(*teacher_logp_full.shape[:2], teacher_logp_full.shape[-1] + 1, dtype=torch.float64)
    ref, _ = bc_loss(logits, teacher_logp_full, call_targets, mask)
    logits2 = torch.where(mask[..., None], logits, 1e3)
    teacher2 = torch.where(mask[..., None], teacher_logp_full, float("nan"))
    calls2 = call_targets | ~mask
    loss, _ = bc_loss(logits2, teacher2, calls2, mask.double())
    torch.testing.assert_close(loss, ref)


def test_bc_loss_call_weight_factors_the_loss_exactly():
    """With the token KL at calls the loss is KL(p‖π̃) + w·BCE(q, M): affine in w, and the
    unweighted loss (w = 1, computed the direct way) lies on that line."""
    for seed in range(4):
        teacher_logp_full, call_targets, mask = _bc_setup(10 + seed)
        logits = 2 * torch.randn(*teacher_logp_full.shape[:2], teacher_logp_full.shape[-1] + 1,
                                 dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        kw = dict(token_kl_at_calls=True)
        l0 = bc_loss(logits, teacher_logp_full, call_targets, mask, call_weight=0.0, **kw)[0]
        l2 = bc_loss(logits, teacher_logp_full, call_targets, mask, call_weight=2.0, **kw)[0]
        l1 = bc_loss(logits, teacher_logp_full, call_targets, mask, **kw)[0]
        l03 = bc_loss(logits, teacher_logp_full, call_targets, mask, call_weight=0.3, **kw)[0]
        assert float(l1) == pytest.approx(float(l0 + (l2 - l0) / 2), rel=1e-10)
        assert float(l03) == pytest.approx(float(l0 + 0.3 * (l2 - l0) / 2), rel=1e-10)
        # w = 0: the token KL over V with <τ> removed, at every valid position
        logt = torch.log_softmax(logits[..., :-1], -1)
        p = teacher_logp_full.exp()
        kl = (p * (teacher_logp_full - logt)).sum(-1)
        assert float(l0) == pytest.approx(float(kl[mask].mean()), rel=1e-10)


def test_bc_loss_call_weight_zero_leaves_tau_alone_and_still_fits_tokens():
    teacher_logp_full, call_targets, mask = _bc_setup(6)
    logits = torch.randn(*teacher_logp_full.shape[:2], teacher_logp_full.shape[-1] + 1,
                         dtype=torch.float64, requires_grad=True)
    loss, _ = bc_loss(logits, teacher_logp_full, call_targets, mask, token_kl_at_calls=True, call_weight=0.0)
    loss.backward()
    assert torch.all(logits.grad[..., -1] == 0)
    assert logits.grad[..., :-1][mask].abs().sum() > 0
    logits.grad = None
    loss, _ = bc_loss(logits, teacher_logp_full, call_targets, mask, token_kl_at_calls=True, call_weight=0.5)
    loss.backward()
    g = logits.grad[..., -1]
    assert torch.all(g[call_targets & mask] < 0) and torch.all(g[~call_targets & mask] > 0)


def test_bc_loss_call_on_tau_only_same_value_call_gradient_on_tau_alone():
    """call_on_tau_only: the loss value is unchanged; the token logits get the gradient of the
    token KL alone (as with call_weight 0) and the <τ> logit that of the full loss."""
    for seed in range(3):
        teacher_logp_full, call_targets, mask = _bc_setup(20 + seed)
        base = 2 * torch.randn(*teacher_logp_full.shape[:2], teacher_logp_full.shape[-1] + 1,
                               dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        grads, values = {}, {}
        for name, kw in {"tau_only": dict(call_on_tau_only=True), "full": {}, "tokens": dict(call_weight=0.0)}.items():
            x = base.clone().requires_grad_(True)
            loss, _ = bc_loss(x, teacher_logp_full, call_targets, mask, token_kl_at_calls=True, **kw)
            loss.backward()
            grads[name], values[name] = x.grad, float(loss.detach())
        assert values["tau_only"] == pytest.approx(values["full"], rel=1e-12)
        torch.testing.assert_close(grads["tau_only"][..., :-1], grads["tokens"][..., :-1])
        torch.testing.assert_close(grads["tau_only"][..., -1], grads["full"][..., -1])
        assert not torch.allclose(grads["full"][..., :-1], grads["tokens"][..., :-1])


def test_bc_loss_call_weight_needs_token_kl_and_a_valid_number():
    teacher_logp_full, call_targets, mask = _bc_setup(7)
    logits = torch.randn(*teacher_logp_full.shape[:2], teacher_logp_full.shape[-1] + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="token_kl_at_calls"):
        bc_loss(logits, teacher_logp_full, call_targets, mask, call_weight=0.5)
    with pytest.raises(ValueError, match="train.bc_call_detach"):
        bc_loss(logits, teacher_logp_full, call_targets, mask, call_on_tau_only=True)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="call_weight"):
            bc_loss(logits, teacher_logp_full, call_targets, mask, token_kl_at_calls=True, call_weight=bad)


def test_bc_loss_pushes_tau_down_where_no_call():
    """p(<τ>) = 0, so at a non-call position the gradient on the <τ> logit is +π(<τ>) > 0."""
    teacher_logp_full, _, mask = _bc_setup(5)
    no_calls = torch.zeros_like(mask)
    logits = torch.zeros(*teacher_logp_full.shape[:2], teacher_logp_full.shape[-1] + 1,
                         dtype=torch.float64, requires_grad=True)
    loss, _ = bc_loss(logits, teacher_logp_full, no_calls, mask)
    loss.backward()
    assert torch.all(logits.grad[..., -1][mask] > 0)


# --- lagrange_update --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    lam=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=6),
    observed=st.floats(0.0, 1.0),
    target=st.floats(0.0, 1.0),
    lr=st.floats(0.0, 100.0),
    lam_max=st.floats(0.0, 10.0),
)
def test_lagrange_update_stays_in_range(lam, observed, target, lr, lam_max):
    lam_t = torch.tensor(lam, dtype=torch.float64).clamp(max=lam_max)
    K = len(lam)
    new = lagrange_update(lam_t, torch.full((K,), observed, dtype=torch.float64),
                          torch.full((K,), target, dtype=torch.float64), lr=lr, lam_max=lam_max)
    assert new.shape == (K,)
    assert torch.all(new >= 0) and torch.all(new <= lam_max)
    if observed > target:
        assert torch.all(new >= lam_t)
    elif observed < target:
        assert torch.all(new <= lam_t)


def test_lagrange_update_direction_and_values():
    lam = torch.tensor([1.0, 1.0, 0.05, 4.9])
    observed = torch.tensor([0.3, 0.1, 0.0, 0.9])
    target = torch.tensor([0.2, 0.2, 0.1, 0.1])
    new = lagrange_update(lam, observed, target, lr=1.0, lam_max=5.0)
    torch.testing.assert_close(new, torch.tensor([1.1, 0.9, 0.0, 5.0]))
    torch.testing.assert_close(lam, torch.tensor([1.0, 1.0, 0.05, 4.9]))  # not modified
    assert not math.isnan(float(new.sum()))


def test_bc_token_kl_at_calls_adds_the_renormalised_kl_at_call_positions():
    torch.manual_seed(0)
    B, T, V = 2, 5, 6
    logits = torch.randn(B, T, V + 1)
    t_logp = torch.log_softmax(torch.randn(B, T, V), -1)
    calls = torch.zeros(B, T, dtype=torch.bool)
    calls[0, 1] = calls[1, 3] = True
    mask = torch.ones(B, T)
    plain, _ = bc_loss(logits, t_logp, calls, mask)
    extra, _ = bc_loss(logits, t_logp, calls, mask, token_kl_at_calls=True)
    tilde = torch.log_softmax(logits[..., :V], -1)
    kl = (t_logp.exp() * (t_logp - tilde)).sum(-1)
    assert torch.allclose(extra, plain + kl[calls].sum() / mask.sum())
    # no calls: identical to the DESIGN.md loss
    none = torch.zeros(B, T, dtype=torch.bool)
    assert torch.allclose(bc_loss(logits, t_logp, none, mask)[0],
                          bc_loss(logits, t_logp, none, mask, token_kl_at_calls=True)[0])


def test_demo_token_nll_is_renormalised_nll_over_masked_positions_and_ignores_tau():
    torch.manual_seed(1)
    B, T, V = 3, 4, 5
    logits = torch.randn(B, T, V + 1, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    tokens[2, 3] = -100  # padding id, masked out
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float)
    got = demo_token_nll(logits, tokens, mask)
    want, n = 0.0, 0
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                want -= torch.log_softmax(logits[i, t, :V], -1)[tokens[i, t]].item()
                n += 1
    assert got.item() == pytest.approx(want / n, rel=1e-6)
    got.backward()
    assert torch.all(logits.grad[..., V] == 0)  # the <τ> column gets no gradient
    assert torch.all(logits.grad[1] == 0) and torch.all(logits.grad[:, 3] == 0)
    assert demo_token_nll(logits, tokens, torch.zeros(B, T)).item() == 0.0


# ----------------------------------------------------------------------------- issue 11


def test_normalized_residuals_divide_by_step_count_and_keep_zero_set():
    from kdtw.losses import pcl_residuals

    torch.manual_seed(0)
    B, T = 3, 7
    rewards, logp, values = torch.randn(B, T), -torch.rand(B, T), torch.randn(B, T)
    lengths = [7, 4, 1]
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    for window in (None, 1, 3, 10):
        plain = pcl_residuals(rewards, logp, values, mask, gamma=0.9, window=window)
        norm = pcl_residuals(rewards, logp, values, mask, gamma=0.9, window=window, normalize=True)
        for i, n in enumerate(lengths):
            for t in range(T):
                if t >= n:
                    assert norm[i, t] == 0
                    continue
                d = n - t if window is None else min(window, n - t)
                assert float(norm[i, t]) == pytest.approx(float(plain[i, t]) / d, rel=1e-5, abs=1e-6)
    # a path that is consistent stays consistent: zero residuals stay zero
    r = torch.tensor([[-1.0, -2.0, -0.5]])
    lp = torch.zeros(1, 3)
    v = torch.tensor([[-3.5, -2.5, -0.5]])  # V(s_t) = Σ_{j>=t} r_j with γ = 1
    assert pcl_residuals(r, lp, v, torch.ones(1, 3, dtype=torch.bool), normalize=True).abs().max() < 1e-6


def test_conditional_demo_logp_keeps_value_zeroes_tau_gradient_and_leaves_student_rows():
    from kdtw.losses import conditional_demo_logp, student_action_logp

    torch.manual_seed(1)
    B, T, V = 3, 4, 5
    logits = torch.randn(B, T, V + 1, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    tau = torch.zeros(B, T, dtype=torch.bool)
    tau[0, 1] = True
    demo = torch.tensor([False, True, True])
    joint = student_action_logp(logits, tokens, tau)
    cond = conditional_demo_logp(logits, joint, tokens, demo)
    assert torch.allclose(cond, joint, atol=1e-6)  # same values: PCL's fixed point is unchanged
    (g,) = torch.autograd.grad(cond.sum(), logits, retain_graph=True)
    assert torch.all(g[1:, :, V] == 0)  # demos: exactly zero on the <τ> logit
    assert g[1:, :, :V].abs().sum() > 0  # ... but they train the token distribution
    (g_joint,) = torch.autograd.grad(joint.sum(), logits)
    assert torch.allclose(g[0], g_joint[0])  # student rows are untouched
    assert g_joint[1:, :, V].abs().sum() > 0  # the joint scoring did push <τ> on demos


def test_pid_lagrange_update_properties():
    from kdtw.losses import pid_lagrange_init, pid_lagrange_update

    target = torch.tensor([0.05, 0.2, 0.5])
    I0 = pid_lagrange_init(target, eps=1e-3, lam_min=-10, lam_max=20)
    assert torch.allclose(I0, torch.log((1 - target) / target))
    kw = dict(k_i=0.1, k_p=0.5, ema=0.5, lam_min=-10.0, lam_max=20.0)
    # on target: nothing moves
    lam, I, e_ema, err = pid_lagrange_update(I0, torch.zeros(3), target, target, **kw)
    assert torch.allclose(lam, I0) and torch.allclose(err, torch.zeros(3), atol=1e-6)
    # above target raises λ, below lowers it; the error is on the logit scale
    obs = torch.tensor([0.1, 0.1, 0.6])
    lam, I, e_ema, err = pid_lagrange_update(I0, torch.zeros(3), obs, target, **kw)
    logit = lambda x: torch.log(x / (1 - x))  # noqa: E731
    assert torch.allclose(err, logit(obs) - logit(target), atol=1e-6)
    assert lam[0] > I0[0] and lam[1] < I0[1] and lam[2] > I0[2]
    assert torch.allclose(I, I0 + 0.1 * err) and torch.allclose(e_ema, 0.5 * err)
    assert torch.allclose(lam, I + 0.5 * e_ema)
    # the same logit error moves λ by the same amount at any budget
    a = pid_lagrange_update(torch.zeros(2), torch.zeros(2), torch.sigmoid(logit(torch.tensor([0.05, 0.5])) + 0.3),
                            torch.tensor([0.05, 0.5]), **kw)[0]
    assert torch.allclose(a[0], a[1], atol=1e-5)
    # anti-windup: a persistent error leaves the integral at the bound, not beyond; it comes back at once
    I, e = I0.clone(), torch.zeros(3)
    for _ in range(1000):
        lam, I, e, _ = pid_lagrange_update(I, e, torch.ones(3), target, **kw)
    assert torch.all(I == 20.0) and torch.all(lam == 20.0)
    lam, I2, _, _ = pid_lagrange_update(I, torch.zeros(3), torch.full((3,), 1e-4), target, **kw)
    assert torch.all(I2 < 20.0)
    # an unseen budget (nan) keeps its state
    lam, I3, e3, err = pid_lagrange_update(I0, torch.ones(3), torch.tensor([float("nan"), 0.3, 0.5]), target, **kw)
    assert I3[0] == I0[0] and e3[0] == 1.0 and err[0] == 0
    with pytest.raises(ValueError, match="gains"):
        pid_lagrange_update(I0, torch.zeros(3), obs, target, k_i=-1.0, k_p=0.0, ema=0.5, lam_min=0, lam_max=1)


def test_pid_common_mode_gain():
    """k_c moves every observed budget's integral by k_c × the mean error of the observed ones
    (unobserved budgets keep theirs); k_c = 0 is the plain rule; a drift common to all budgets
    is tracked with less lag, a budget's own offset is not mistaken for a common one."""
    from kdtw.losses import pid_lagrange_init, pid_lagrange_update

    logit = lambda x: torch.log(x / (1 - x))  # noqa: E731
    target = torch.tensor([0.05, 0.2, 0.5])
    I0 = pid_lagrange_init(target, eps=1e-3, lam_min=-10, lam_max=20)
    kw = dict(k_i=0.1, k_p=0.0, ema=0.5, lam_min=-10.0, lam_max=20.0)
    obs = torch.tensor([float("nan"), 0.3, 0.4])
    _, I_plain, _, err = pid_lagrange_update(I0, torch.zeros(3), obs, target, **kw)
    _, I_c, _, _ = pid_lagrange_update(I0, torch.zeros(3), obs, target, k_c=0.5, **kw)
    common = (err[1] + err[2]) / 2  # the unseen budget is not in the mean
    assert I_c[0] == I0[0]
    assert torch.allclose(I_c[1:], I_plain[1:] + 0.5 * common)
    assert torch.equal(pid_lagrange_update(I0, torch.zeros(3), obs, target, k_c=0.0, **kw)[1], I_plain)
    with pytest.raises(ValueError, match="gains"):
        pid_lagrange_update(I0, torch.zeros(3), obs, target, k_c=-0.1, **kw)

    def run(k_c: float, drift: torch.Tensor, steps: int = 60) -> torch.Tensor:
        """Closed loop with feedforward: use logit = logit(b) + x − (λ − λ⁰), x drifting."""
        I, e, lam, x = I0.clone(), torch.zeros(3), I0.clone(), torch.zeros(3)
        errs = []
        for _ in range(steps):
            x = x + drift
            u = logit(target) + x - (lam - I0)
            lam, I, e, err = pid_lagrange_update(I, e, torch.sigmoid(u), target, k_c=k_c, **kw)
            errs.append(err.abs().max())
        return torch.stack(errs[-20:]).mean()

    common_drift = torch.full((3,), 0.05)
    assert run(0.4, common_drift) < 0.25 * run(0.0, common_drift)  # ramp lag r/(k_i + k_c) vs r/k_i
    own = torch.tensor([0.0, 0.0, 0.05])  # one budget drifts alone: tracked no worse
    assert run(0.4, own) <= run(0.0, own)
