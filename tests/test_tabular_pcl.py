"""The key proof: PCL, the shaped reward and the Lagrangian on a tabular tree (DESIGN.md §1-3, §5).

The tree: tokens {a, b, EOS}; a sequence ends at EOS or after H = 3 tokens. The states are the
7 prefixes without EOS ("", a, b, aa, ab, ba, bb); the teacher p(x | prefix) is a fixed random
table. Paths have lengths 1, 2 or 3, so every batch is right-padded.

What holds (all checked below):

1. Without <τ> (α = 1, γ = 1) the soft-optimal policy is π* = p with V* = 0, its PCL residuals are
   zero on every path, and Adam on ``pcl_loss`` over all 15 paths recovers π* = p.
2. With <τ> (the joint decision/token process, DESIGN.md §2), soft value iteration gives the
   optimum of the shaped objective E[Σ r'_t − α log π(a_t | s_t)]: V*(root) equals that
   objective computed by enumeration, and perturbing π* only lowers it.
3. Writing a token is a deterministic transition, but <τ> is not (s → s·x with x ~ p). At the
   soft optimum the residual C_t is exactly 0 on every path without <τ>; on a path with a <τ>
   step it is NOT zero in general: each <τ> step j adds γ^{j−t+1}(V*(s_{j+1}) − E_{x~p}V*(s_j·x)).
   What is exact is the expected residual: E[C_t | s_t, a_t] = 0 under any behaviour policy,
   for every window, with either tau_reward. (So PCL's squared loss over <τ> steps has the
   double-sampling bias of stochastic dynamics; in this tree the PCL fixed point differs from
   the exact soft optimum by about 0.01-0.03 in π and V, and the Lagrangian absorbs it.)
4. With the "joint" reward and α = 1, E_q[Σ r_t − log π(a_t|s_t)] = −KL(q_X ‖ p) + H_q(A | X):
   reverse KL of the token sequences plus the entropy of the decisions given the tokens. Hence,
   without a penalty (λ = 0), π*(<τ>|s) ≤ 1/2 at every state (Jensen), with equality where all
   successors have equal value, so teacher use near 0.5 is what λ = 0 already gives: a budget
   of 0.5 is at the edge of what λ ≥ 0 can reach. The decision entropy is paid per step, which
   tilts q_X towards longer outputs than p (q(EOS | root) < p(EOS | root)).
5. Alternating PCL steps with ``lagrange_update`` on the exact teacher-use fraction E[Σ c_t / T]
   drives teacher use to each budget (0.2 and 0.4) within 0.03.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch

from kdtw.losses import (
    lagrange_update,
    pcl_loss,
    pcl_residuals,
    shaped_rewards,
    student_action_logp,
)

A, B, EOS = 0, 1, 2
V = 3  # vocabulary {a, b, EOS}
TAU = V  # <τ> is the last column of the student's policy
H = 3  # maximum length
PREFIXES = [()] + [(x,) for x in (A, B)] + [(x, y) for x in (A, B) for y in (A, B)]
SID = {prefix: i for i, prefix in enumerate(PREFIXES)}
N_STATES = len(PREFIXES)
DT = torch.float64


def _teacher_table(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(N_STATES, V, generator=g, dtype=DT), -1)  # [S, V]


P = _teacher_table()
LOGP = P.log()


def _terminal(prefix: tuple, x: int) -> bool:
    return x == EOS or len(prefix) + 1 == H


def _paths(with_tau: bool) -> list[list[tuple[int, int, bool]]]:
    """Every path as steps (state id, resolved token, called <τ>)."""
    out = []

    def rec(prefix, steps):
        for tau in (False, True) if with_tau else (False,):
            for x in range(V):
                path = steps + [(SID[prefix], x, tau)]
                if _terminal(prefix, x):
                    out.append(path)
                else:
                    rec(prefix + (x,), path)

    rec((), [])
    return out


def _batch(paths):
    """Right-padded tensors: state ids, tokens, tau_mask, mask, each [P, H]."""
    n = len(paths)
    sid = torch.zeros(n, H, dtype=torch.long)
    tokens = torch.full((n, H), -100, dtype=torch.long)  # padding ids that must never be read
    tau = torch.zeros(n, H, dtype=torch.bool)
    mask = torch.zeros(n, H, dtype=torch.bool)
    for i, path in enumerate(paths):
        for t, (s, x, c) in enumerate(path):
            sid[i, t], tokens[i, t], tau[i, t], mask[i, t] = s, x, c, True
    return sid, tokens, tau, mask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of steps on tiny tensors: on a busy 2-core machine, log_softmax's parallel
    region alone makes them ~10x slower with 2 threads. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOKEN_PATHS = _paths(with_tau=False)  # 1 + 2 + 12 = 15
JOINT_PATHS = _paths(with_tau=True)  # 2 + 8 + 96 = 106


def _teacher_token_logp(sid, tokens, mask):
    return torch.where(mask, LOGP[sid, tokens.clamp(min=0)], torch.zeros((), dtype=DT))  # [P, H]


def _path_probs(policy, sid, tokens, tau, mask):
    """Probability of each joint path: Π π(a_t|s_t) · p(x_t|s_t)^{c_t}. ``policy`` is [S, V+1]."""
    safe_tokens = tokens.clamp(min=0)
    actions = torch.where(tau, torch.full_like(safe_tokens, TAU), safe_tokens)
    step = policy[sid, actions] * torch.where(tau, P[sid, safe_tokens], torch.ones((), dtype=DT))
    return torch.where(mask, step, torch.ones((), dtype=DT)).prod(1)  # [P]


def _soft_value_iteration(lam, budget, *, alpha=1.0, gamma=1.0, tau_reward="joint", clip_min=-20.0):
    """Exact soft optimum of E[Σ γ^t (r'_t − α log π(a_t|s_t))] on the tree. Returns V*, π*."""
    values = torch.zeros(N_STATES, dtype=DT)
    q = torch.zeros(N_STATES, V + 1, dtype=DT)
    for prefix in sorted(PREFIXES, key=len, reverse=True):  # children before parents
        s = SID[prefix]
        nxt = torch.tensor(
            [0.0 if _terminal(prefix, x) else float(values[SID[prefix + (x,)]]) for x in range(V)],
            dtype=DT,
        )
        r_token = LOGP[s].clamp(min=clip_min) + lam * budget
        q[s, :V] = r_token + gamma * nxt
        r_tau = 0.0 if tau_reward == "joint" else P[s] @ LOGP[s].clamp(min=clip_min)
        q[s, TAU] = r_tau - lam * (1 - budget) + gamma * (P[s] @ nxt)
        values[s] = alpha * torch.logsumexp(q[s] / alpha, 0)
    policy = torch.exp((q - values[:, None]) / alpha)  # [S, V+1]
    return values, policy


def _shaped(sid, tokens, tau, mask, lam, budget, tau_reward="joint"):
    n = sid.shape[0]
    return shaped_rewards(
        _teacher_token_logp(sid, tokens, mask), tau, mask,
        lam=torch.full((n,), float(lam), dtype=DT), budget=torch.full((n,), float(budget), dtype=DT),
        tau_reward=tau_reward,
    )


def _objective(policy, lam, budget, *, alpha=1.0):
    """E_{π, p}[Σ r'_t − α log π(a_t|s_t)] (γ = 1) by enumerating all joint paths."""
    sid, tokens, tau, mask = _batch(JOINT_PATHS)
    logits = policy.log()[sid]
    logp = student_action_logp(logits, tokens, tau, mask=mask)
    rewards = _shaped(sid, tokens, tau, mask, lam, budget)
    returns = torch.where(mask, rewards - alpha * logp, torch.zeros((), dtype=DT)).sum(1)
    return (_path_probs(policy, sid, tokens, tau, mask) * returns).sum()


def _teacher_use(policy):
    """Exact E[Σ c_t / T] under the policy and the teacher (DESIGN.md §1)."""
    sid, tokens, tau, mask = _batch(JOINT_PATHS)
    w = _path_probs(policy, sid, tokens, tau, mask)
    return float((w * tau.sum(1) / mask.sum(1)).sum())


# --- 1. without <τ>: π* = p --------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2, None])
def test_teacher_is_pcl_consistent_without_tau(window):
    sid, tokens, tau, mask = _batch(TOKEN_PATHS)
    rewards = _teacher_token_logp(sid, tokens, mask)  # r = log p, no <τ>, no shaping
    logits = torch.cat([LOGP, torch.full((N_STATES, 1), float("-inf"), dtype=DT)], 1)[sid]
    logp = student_action_logp(logits, tokens, tau, mask=mask)  # log π* = log p
    values = torch.zeros(sid.shape, dtype=DT)  # V* = 0
    C = pcl_residuals(rewards, logp, values, mask, window=window)
    assert C.abs().max() < 1e-12
    # and soft value iteration agrees: with <τ> removed (λ huge) V* → 0, π* → p.
    v_star, pi_star = _soft_value_iteration(lam=60.0, budget=0.0)
    assert v_star.abs().max() < 1e-12
    torch.testing.assert_close(pi_star[:, :V], P, atol=1e-12, rtol=0)


def test_pcl_training_recovers_teacher_without_tau():
    torch.manual_seed(0)
    sid, tokens, tau, mask = _batch(TOKEN_PATHS)
    rewards = _teacher_token_logp(sid, tokens, mask)
    table = torch.zeros(N_STATES, V, dtype=DT, requires_grad=True)  # uniform start
    value_table = torch.zeros(N_STATES, dtype=DT, requires_grad=True)
    tau_column = torch.full((N_STATES, 1), float("-inf"), dtype=DT)  # <τ> disabled
    opt = torch.optim.Adam([table, value_table], lr=0.05)
    for _ in range(300):
        logits = torch.cat([table, tau_column], 1)[sid]  # [P, H, V+1]
        logp = student_action_logp(logits, tokens, tau, mask=mask)
        loss, metrics = pcl_loss(rewards, logp, value_table[sid], mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy = torch.softmax(table.detach(), -1)
    assert (policy - P).abs().max() < 0.02
    assert value_table.detach().abs().max() < 0.05
    assert metrics["pcl/residual_abs_mean"] < 0.01


# --- 2-4. with <τ>: the soft optimum of the shaped objective ------------------------------------


@pytest.mark.parametrize("lam,budget", [(0.0, 0.2), (1.0, 0.2), (0.7, 0.5)])
def test_soft_value_iteration_is_the_optimum(lam, budget):
    v_star, pi_star = _soft_value_iteration(lam, budget)
    torch.testing.assert_close(pi_star.sum(1), torch.ones(N_STATES, dtype=DT))
    best = _objective(pi_star, lam, budget)
    assert float(best) == pytest.approx(float(v_star[SID[()]]), abs=1e-10)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        noise = 0.2 * torch.randn(N_STATES, V + 1, generator=g, dtype=DT)
        other = torch.softmax(pi_star.log() + noise, -1)
        assert _objective(other, lam, budget) < best - 1e-6


@pytest.mark.parametrize("tau_reward", ["joint", "teacher_logp"])
@pytest.mark.parametrize("window", [1, 2, None])
def test_soft_optimum_residuals_exact_without_tau_zero_in_expectation_with_tau(window, tau_reward):
    lam, budget = 1.0, 0.2
    v_star, pi_star = _soft_value_iteration(lam, budget, tau_reward=tau_reward)
    sid, tokens, tau, mask = _batch(JOINT_PATHS)
    rewards = _shaped(sid, tokens, tau, mask, lam, budget, tau_reward=tau_reward)
    logp = student_action_logp(pi_star.log()[sid], tokens, tau, mask=mask)
    C = pcl_residuals(rewards, logp, v_star[sid], mask, window=window)

    # Deterministic steps only: exact path consistency.
    no_tau = ~tau.any(1)
    assert C[no_tau].abs().max() < 1e-12
    # A <τ> step: single paths are not consistent...
    assert C[~no_tau].abs().max() > 0.1
    # ...but E[C_t | s_t, a_t] = 0 under any behaviour (here uniform over V ∪ {<τ>}).
    uniform = torch.full((N_STATES, V + 1), 1.0 / (V + 1), dtype=DT)
    w = _path_probs(uniform, sid, tokens, tau, mask)
    num, den = collections.defaultdict(float), collections.defaultdict(float)
    for i, path in enumerate(JOINT_PATHS):
        # A path is determined by its steps, so its prefix up to t identifies s_t.
        for t, (s, x, c) in enumerate(path):
            key = (tuple(step[1] for step in path[:t]), TAU if c else x)
            num[key] += float(w[i] * C[i, t])
            den[key] += float(w[i])
    assert len(num) == 4 * N_STATES  # every (state, action) pair
    assert max(abs(num[k] / den[k]) for k in num) < 1e-12

    # The exact deviation of a first-step <τ>, window 1: the sampled (r_τ(x) + V*(s·x)) minus
    # its mean over x ~ p, where r_τ(x) = 0 ("joint") or log p(x) ("teacher_logp").
    if window == 1:
        root = SID[()]
        r_tau = torch.zeros(V, dtype=DT) if tau_reward == "joint" else LOGP[root]
        v_next = torch.tensor([0.0 if y == EOS else float(v_star[SID[(y,)]]) for y in range(V)], dtype=DT)
        backup = r_tau + v_next  # [V]
        for i, path in enumerate(JOINT_PATHS):
            _, x, c = path[0]
            if c:
                assert float(C[i, 0]) == pytest.approx(float(backup[x] - P[root] @ backup), abs=1e-12)


def test_joint_reward_objective_is_token_kl_plus_decision_entropy():
    """E_q[Σ r_t − log π(a_t|s_t)] = −KL(q_X ‖ p) + H_q(A | X), λ = 0, α = 1, joint reward."""
    g = torch.Generator().manual_seed(2)
    policy = torch.softmax(torch.randn(N_STATES, V + 1, generator=g, dtype=DT), -1)
    objective = _objective(policy, lam=0.0, budget=0.0)

    sid, tokens, tau, mask = _batch(JOINT_PATHS)
    q_joint = _path_probs(policy, sid, tokens, tau, mask)  # [P], q(A, X)
    q_tokens = collections.defaultdict(float)
    for i, path in enumerate(JOINT_PATHS):
        q_tokens[tuple(x for _, x, _ in path)] += float(q_joint[i])
    p_tokens = {}
    for seq in q_tokens:
        prefixes = [seq[:t] for t in range(len(seq))]
        p_tokens[seq] = float(torch.prod(torch.stack([P[SID[pre], x] for pre, x in zip(prefixes, seq)])))
    kl = sum(q * (math.log(q) - math.log(p_tokens[seq])) for seq, q in q_tokens.items())
    cond_entropy = 0.0
    for i, path in enumerate(JOINT_PATHS):
        seq = tuple(x for _, x, _ in path)
        cond_entropy -= float(q_joint[i]) * math.log(float(q_joint[i]) / q_tokens[seq])
    assert sum(q_tokens.values()) == pytest.approx(1.0)
    assert float(objective) == pytest.approx(-kl + cond_entropy, abs=1e-10)
    assert cond_entropy > 0.1  # the decision entropy is a real part of the objective


def test_tau_prob_at_most_half_without_penalty_and_length_bias():
    v_star, pi_star = _soft_value_iteration(lam=0.0, budget=0.0)
    assert torch.all(pi_star[:, TAU] <= 0.5 + 1e-12)
    for prefix in PREFIXES:
        all_terminal = all(_terminal(prefix, x) for x in range(V))  # equal successor values
        if all_terminal:
            assert float(pi_star[SID[prefix], TAU]) == pytest.approx(0.5, abs=1e-12)
        else:
            assert float(pi_star[SID[prefix], TAU]) < 0.5 - 1e-3
    # token marginal at the root: q(x) = π(x) + π(<τ>) p(x); EOS is less likely than under p.
    root = SID[()]
    q_root = pi_star[root, :V] + pi_star[root, TAU] * P[root]
    assert q_root[EOS] < P[root, EOS] - 1e-3
    # Teacher use at λ = 0 is close to 0.5 (a budget of 0.5 is at the edge of reach).
    assert abs(_teacher_use(pi_star) - 0.5) < 0.05


# --- 5. PCL + Lagrangian holds a budget ----------------------------------------------------------


@pytest.mark.parametrize("budget", [0.2, 0.4])
def test_lagrangian_pcl_reaches_budget(budget):
    """Alternate PCL steps (exact expectation over all joint paths, uniform behaviour over
    V ∪ {<τ>} and the teacher's p after <τ>: PCL is off-policy) with λ updates from the exact
    teacher use of the current policy."""
    torch.manual_seed(0)
    sid, tokens, tau, mask = _batch(JOINT_PATHS)
    uniform = torch.full((N_STATES, V + 1), 1.0 / (V + 1), dtype=DT)
    weights = _path_probs(uniform, sid, tokens, tau, mask)  # [P], behaviour path probabilities
    weights = weights / (weights * mask.sum(1)).sum()  # so the loss is a mean over positions

    table = torch.zeros(N_STATES, V + 1, dtype=DT, requires_grad=True)
    value_table = torch.zeros(N_STATES, dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([table, value_table], lr=0.05)
    lam = torch.zeros(1, dtype=DT)
    target = torch.tensor([budget], dtype=DT)
    uses = []
    for _ in range(25):
        rewards = _shaped(sid, tokens, tau, mask, float(lam), budget)
        for _ in range(30):
            logp = student_action_logp(table[sid], tokens, tau, mask=mask)
            C = pcl_residuals(rewards, logp, value_table[sid], mask)
            loss = (weights[:, None] * 0.5 * C**2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        use = _teacher_use(torch.softmax(table.detach(), -1))
        uses.append(use)
        lam = lagrange_update(lam, torch.tensor([use], dtype=DT), target, lr=2.0, lam_max=10.0)
    assert uses[0] > budget + 0.05  # it starts above the budget and is pulled down
    assert all(abs(u - budget) < 0.03 for u in uses[-5:])
    assert float(lam) > 0
    # The PCL fixed point is close to, not exactly, the soft optimum at the same λ (point 3).
    _, pi_star = _soft_value_iteration(float(lam), budget)
    assert (torch.softmax(table.detach(), -1) - pi_star).abs().max() < 0.05


# --- 6. the real regime: one PCL step per λ update, from a few sampled paths ---------------------


def _token_use(policy):
    """Exact token-weighted expected use E[Σ c_t] / E[T] of the policy (DESIGN.md §5 revision)."""
    sid, tokens, tau, mask = _batch(JOINT_PATHS)
    w = _path_probs(policy, sid, tokens, tau, mask)
    return float((w * tau.sum(1)).sum() / (w * mask.sum(1)).sum())


def _sample_paths(policy, n, gen):
    """``n`` on-policy joint paths: a ~ π(·|s); after <τ>, x ~ p(·|s). Also π(<τ>|s_t) per step."""
    paths, ptau = [], []
    for _ in range(n):
        prefix, steps, probs = (), [], []
        while True:
            s = SID[prefix]
            a = int(torch.multinomial(policy[s], 1, generator=gen))
            x = int(torch.multinomial(P[s], 1, generator=gen)) if a == TAU else a
            steps.append((s, x, a == TAU))
            probs.append(float(policy[s, TAU]))
            if _terminal(prefix, x):
                break
            prefix = prefix + (x,)
        paths.append(steps)
        ptau.append(probs)
    return paths, ptau


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("budget", [0.2, 0.4])
def test_pi_controller_holds_budget_one_pcl_step_per_update(budget, feedforward):
    """The regime of Phase 2: each step samples 16 paths from the current policy, takes ONE Adam
    PCL step on them and updates λ with the PI controller (kdtw defaults: gains, error EMA, warm
    start) from their expected use Σπ(<τ>)/ΣT. Over the last 200 of 1,500 steps the policy's
    exact token-weighted use stays within 0.03 of the budget and λ stays off its bounds.
    ``feedforward`` (train.lambda_feedforward): each change Δλ also moves the <τ> logit of every
    state by −Δλ, as the learner moves the budget's offset."""
    from kdtw.config import TrainConfig
    from kdtw.losses import pid_lagrange_init, pid_lagrange_update

    tc = TrainConfig()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    table = torch.zeros(N_STATES, V + 1, dtype=DT, requires_grad=True)
    value_table = torch.zeros(N_STATES, dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([table, value_table], lr=0.02)
    target = torch.tensor([budget])
    integral = pid_lagrange_init(target, eps=tc.lambda_eps, lam_min=tc.lambda_min, lam_max=tc.lambda_max)
    err_ema = torch.zeros(1)
    lam = integral.clone()
    uses, lams = [], []
    for _ in range(1500):
        policy = torch.softmax(table.detach(), -1)
        paths, ptau = _sample_paths(policy, 16, gen)
        sid, tokens, tau, mask = _batch(paths)
        rewards = _shaped(sid, tokens, tau, mask, float(lam), budget)
        logp = student_action_logp(table[sid], tokens, tau, mask=mask)
        C = pcl_residuals(rewards, logp, value_table[sid], mask)
        loss = 0.5 * (C**2).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        observed = torch.tensor([sum(map(sum, ptau)) / sum(map(len, ptau))])
        new_lam, integral, err_ema, _ = pid_lagrange_update(
            integral, err_ema, observed, target, k_i=tc.lambda_ki, k_p=tc.lambda_kp, ema=tc.lambda_err_ema,
            lam_min=tc.lambda_min, lam_max=tc.lambda_max, eps=tc.lambda_eps)
        if feedforward:
            with torch.no_grad():
                table[:, TAU] -= float(new_lam - lam)
        lam = new_lam
        uses.append(_token_use(torch.softmax(table.detach(), -1)))
        lams.append(float(lam))
    last = uses[-200:]
    assert max(abs(u - budget) for u in last) < 0.03, (min(last), max(last))
    assert all(tc.lambda_min < x < tc.lambda_max for x in lams[-200:])
    tail = torch.tensor(lams[-600:], dtype=DT)
    print(f"budget {budget} feedforward {feedforward}: use {min(last):.3f}..{max(last):.3f}, "
          f"λ std over the last 600 steps {float(tail.std()):.3f}")
