"""Trajectory records, the replay buffer, the learner and the single-process loop."""

from __future__ import annotations

import copy
import math
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import PROMPTS, ROOT
from kdtw.buffer import BufferError, ReplayBuffer
from kdtw.config import TrainConfig
from kdtw.decoding import generate
from kdtw.learner import Learner, collate
from kdtw.models import Student
from kdtw.rollout import prompt_ids, score_paths, student_rollouts, teacher_demos
from kdtw.trajectory import Trajectory, TrajectoryError


def traj(n=3, *, origin="student", version=0, budget=0, tau=None):
    tau = tau if tau is not None else [False] * n
    return Trajectory(source_ids=[3, 4, 1], budget_id=budget, tokens=list(range(5, 5 + n)), actions_tau=tau,
                      behaviour_logp=[-0.5] * n, teacher_logp=[-1.0] * n, origin=origin, policy_version=version)


def test_trajectory_is_validated():
    with pytest.raises(TrajectoryError, match="actions_tau has 2 entries for 3 tokens"):
        Trajectory([3], 0, [5, 6, 7], [False, False], [-1.0] * 3, [-1.0] * 3)
    with pytest.raises(TrajectoryError, match="origin"):
        traj(origin="robot")
    with pytest.raises(TrajectoryError, match="no <τ>"):
        traj(origin="teacher_demo", tau=[True, False, False])
    with pytest.raises(TrajectoryError, match="finite"):
        Trajectory([3], 0, [5], [False], [float("nan")], [-1.0])
    with pytest.raises(TrajectoryError, match="at least one"):
        Trajectory([3], 0, [], [], [], [])
    assert traj(4, tau=[True, False, True, False]).teacher_use == 0.5


def test_buffer_mixes_evicts_drops_stale_and_roundtrips(tmp_path):
    buf = ReplayBuffer(capacity_tokens=30, demo_ratio=0.25, max_staleness=1, batch_size=4, seed=0)
    buf.add([traj(3, version=v) for v in range(6)] + [traj(3, origin="teacher_demo") for _ in range(2)])
    assert buf.tokens == 24 and buf.counts() == {"student": 6, "teacher_demo": 2}
    buf.add([traj(3, version=6) for _ in range(3)])  # 33 tokens > 30: oldest student path goes
    assert buf.tokens <= 30 and buf.counts()["student"] == 8
    batch = buf.sample(4, current_version=6)
    assert sum(t.origin == "teacher_demo" for t in batch) == 1
    assert all(6 - t.policy_version <= 1 for t in batch if t.origin == "student")
    assert buf.counts()["student"] == 4  # versions 5 and 6 only
    path = str(tmp_path / "buffer.parquet")
    buf.save(path)
    other = ReplayBuffer(capacity_tokens=30, demo_ratio=0.25, max_staleness=1, batch_size=4)
    other.load(path)
    key = lambda t: (t.origin, t.policy_version, t.tokens)  # noqa: E731
    assert sorted(map(key, other._items["student"])) == sorted(map(key, buf._items["student"]))
    assert other.tokens == buf.tokens
    with pytest.raises(BufferError, match="a batch of 40 needs"):
        buf.sample(40)
    with pytest.raises(BufferError, match="does not fit"):
        ReplayBuffer(capacity_tokens=2, demo_ratio=0.0, max_staleness=0, batch_size=1).add([traj(3)])
    assert 0 < buf.nbytes()


def _learner(student, **kw):
    cfg = TrainConfig(lr=1e-3, **kw)
    return Learner(student, targets=[0.0, 0.2, 0.5], train_cfg=cfg)


def test_rollouts_scores_and_collate(pair):
    teacher, student = pair
    g = torch.Generator().manual_seed(0)
    trajs, out = student_rollouts(student, teacher, PROMPTS, [0, 1, 2], max_new_tokens=6, generator=g, budgets=[0.0, 0.2, 0.5])
    demos = teacher_demos(teacher, PROMPTS, [0, 1, 2], max_new_tokens=6, generator=g)
    assert [t.origin for t in trajs + demos] == ["student"] * 3 + ["teacher_demo"] * 3
    for t in trajs:
        assert t.source_ids == prompt_ids(teacher, [PROMPTS[trajs.index(t)]])[0]
    # teacher log-probs equal a fresh teacher-forced pass, token by token
    again = score_paths(teacher, PROMPTS, [t.tokens for t in trajs], batch_size=1)
    for a, t in zip(again, trajs):
        assert torch.allclose(torch.tensor(a), torch.tensor(t.teacher_logp), atol=1e-5)
    b = collate(student.lm, trajs + demos)
    assert b.tokens.shape == b.mask.shape == b.tau_mask.shape and b.mask.sum() == sum(len(t) for t in trajs + demos)


def test_learner_steps_lower_the_loss_and_refuse_nan(pair):
    teacher, student = pair
    student = copy.deepcopy(student)
    g = torch.Generator().manual_seed(1)
    trajs, _ = student_rollouts(student, teacher, PROMPTS, [0, 1, 2], max_new_tokens=6, generator=g, budgets=[0.0, 0.2, 0.5])
    learner = _learner(student)
    first = learner.pcl_step(trajs)["pcl/loss"]
    for _ in range(15):
        last = learner.pcl_step(trajs)["pcl/loss"]
    assert last < first
    before = [p.detach().clone() for p in student.parameters()]
    bad = copy.deepcopy(trajs)
    bad[0].teacher_logp[0] = float("nan")  # bypasses validation on purpose
    with pytest.raises(FloatingPointError, match="no update was applied"):
        learner.pcl_step(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    m = learner.bc_step(teacher, teacher_demos(teacher, PROMPTS, [0, 1, 2], max_new_tokens=6, generator=g))
    assert m["bc/loss"] > 0
    # a rate far too high: the weights run past float range (or the loss does first), said at that
    # step with the rate to lower as it is now
    learner.set_lr(1e38, tau_offset_lr=1e38)
    with pytest.raises(FloatingPointError, match=r"(weights are not finite after pcl|pcl loss is (inf|nan) at) "
                                                 r"learner step \d+: .*lower train\.(phase2_)?lr \(now 1e\+38\)"):
        for _ in range(4):  # Adam moves each weight by about the rate a step: float32 ends at 3.4e38
            learner.pcl_step(trajs)


def test_bc_step_reads_the_teacher_logits_kept_while_decoding(pair):
    """Phase 1 keeps the logits its demonstrations were drawn from and skips a second teacher
    pass: the same paths (the random stream is untouched), the same logits as a teacher-forced
    pass over them, and so the same BC steps, up to float rounding."""
    teacher, student = pair
    plain = teacher_demos(teacher, PROMPTS, [0, 1, 2], max_new_tokens=6, generator=torch.Generator().manual_seed(4))
    demos, logits = teacher_demos(teacher, PROMPTS, [0, 1, 2], max_new_tokens=6,
                                  generator=torch.Generator().manual_seed(4), keep_logits=True)
    assert [d.tokens for d in demos] == [d.tokens for d in plain]
    assert [d.teacher_logp for d in demos] == [d.teacher_logp for d in plain]
    b = collate(student.lm, demos)
    fresh = teacher.forward(b.prompt_ids, b.prompt_mask, b.tokens)[..., : teacher.vocab_size].float()
    for i, (d, lg) in enumerate(zip(demos, logits)):
        assert lg.shape == (len(d), teacher.vocab_size)
        torch.testing.assert_close(lg, fresh[i, : len(d)], atol=1e-4, rtol=1e-4)
    # each token's logged log p is the one the kept logits give it
    for d, lg in zip(demos, logits):
        lp = torch.log_softmax(lg, -1).gather(-1, torch.tensor(d.tokens)[:, None]).squeeze(-1)
        torch.testing.assert_close(lp, torch.tensor(d.teacher_logp), atol=1e-5, rtol=1e-5)
    a, k = _learner(copy.deepcopy(student)), _learner(copy.deepcopy(student))
    for step in range(3):
        ma, mk = a.bc_step(teacher, demos), k.bc_step(teacher, demos, logits)
        for key in ("bc/loss", "bc/kl", "bc/call_nll", "bc/oracle_kl_mean"):
            assert ma[key] == pytest.approx(mk[key], rel=1e-4, abs=1e-5), key
        if step == 0:  # the same gradients (later parameters drift apart where Adam's first steps
            # turn a near-zero gradient's rounding into ±lr)
            for pa, pk in zip(a.student.parameters(), k.student.parameters()):
                if pa.grad is not None:
                    torch.testing.assert_close(pa.grad, pk.grad, atol=1e-5, rtol=1e-3)
    with pytest.raises(ValueError, match=r"path 0: teacher logits of shape .* expected"):
        k.bc_step(teacher, demos, [lg[:-1] for lg in logits] if len(demos[0]) > 1 else [lg[:, :-1] for lg in logits])
    with pytest.raises(ValueError, match="2 teacher logit tensors for 3 paths"):
        k.bc_step(teacher, demos, logits[:2])
    with pytest.raises(ValueError, match="keep_teacher_logits needs mode='teacher'"):
        generate(student, teacher, PROMPTS, mode="student", max_new_tokens=4, keep_teacher_logits=True)


def test_demo_nll_anchor_raises_the_student_likelihood_of_demonstrations(pair):
    teacher, student = pair
    g = torch.Generator().manual_seed(2)
    trajs, _ = student_rollouts(student, teacher, PROMPTS, [0, 1, 2], max_new_tokens=6, generator=g,
                                budgets=[0.0, 0.2, 0.5])
    demos = teacher_demos(teacher, PROMPTS, [0, 1, 2], max_new_tokens=6, generator=g)
    off = _learner(copy.deepcopy(student)).pcl_step(trajs + demos)
    assert "pcl/demo_nll" not in off
    s = copy.deepcopy(student)
    learner = _learner(s, demo_nll_weight=1.0)
    assert "pcl/demo_nll" not in learner.pcl_step(trajs)  # no demonstration in the batch: no term
    first = learner.pcl_step(trajs + demos)["pcl/demo_nll"]
    for _ in range(10):
        last = learner.pcl_step(trajs + demos)["pcl/demo_nll"]
    assert last < first


def test_without_tau_the_learner_is_plain_distillation(pair):
    """train.use_tau=false (the DistillSpec drafter): BC fits the token everywhere, PCL never
    puts mass on <τ>, λ stays 0 whatever the teacher use."""
    teacher, student = pair
    g = torch.Generator().manual_seed(3)
    demos = teacher_demos(teacher, PROMPTS, [0, 1, 2], max_new_tokens=6, generator=g)
    s = copy.deepcopy(student)
    offset = float(s.tau_offset.detach())
    learner = _learner(s, use_tau=False)
    m = learner.bc_step(teacher, demos)
    assert m["bc/call_frac"] == 0.0 and m["bc/tau_prob_nocall"] == 0.0
    assert float(s.tau_offset.detach()) == offset  # no calibration of a <τ> that is never used
    trajs, out = student_rollouts(s, teacher, PROMPTS, [0, 1, 2], max_new_tokens=6, use_tau=False, generator=g)
    assert not any(any(t.actions_tau) for t in trajs)
    m = learner.pcl_step(trajs + demos)
    assert math.isfinite(m["pcl/loss"])
    assert learner.observe_use(trajs + [traj(4, budget=2)]) == {} and torch.all(learner.lam == 0)


def test_bc_call_detach_keeps_the_values_and_moves_only_the_tau_row(pair):
    """train.bc_call_detach: the <τ> logit keeps its value; its gradient reaches the <τ> output
    row and nothing of the body; Phase-1 steps with it train each nonzero budget's <τ> offset."""
    teacher, student = pair
    s = copy.deepcopy(student)
    g = torch.Generator().manual_seed(4)
    demos = teacher_demos(teacher, PROMPTS, [0, 1, 2], max_new_tokens=6, generator=g)
    b = collate(s.lm, demos)
    logits, hid = s.lm.forward(b.prompt_ids, b.prompt_mask, b.tokens, hidden=True)
    out = s.detach_call_path(logits, hid)
    torch.testing.assert_close(out, logits)
    # the read-out is the head's own input: hidden @ w_τ is the <τ> logit (untied heads)
    w = s.lm.model.get_output_embeddings().weight[s.tau_id]
    torch.testing.assert_close(hid @ w, logits[..., s.tau_id], atol=1e-4, rtol=1e-4)
    s.zero_grad(set_to_none=True)
    out[..., s.tau_id].sum().backward()
    head = s.lm.model.get_output_embeddings().weight
    assert head.grad is not None and head.grad[s.tau_id].abs().sum() > 0
    others = torch.ones(head.shape[0], dtype=torch.bool)
    others[s.tau_id] = False
    assert torch.all(head.grad[others] == 0)
    body = [n for n, p in s.named_parameters() if p is not head and p.grad is not None and p.grad.abs().sum() > 0]
    assert body == []
    # without the detach the same sum moves the body
    s.zero_grad(set_to_none=True)
    logits, _ = s.lm.forward(b.prompt_ids, b.prompt_mask, b.tokens, hidden=True)
    logits[..., s.tau_id].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters() if p is not head)
    # a learner step: bc_call_weight and the detach together train calls and tokens, finite
    s2 = copy.deepcopy(student)
    learner = _learner(s2, bc_call_detach=True, bc_token_kl_at_calls=True, bc_call_weight=0.5)
    assert torch.all(s2.budget_offsets == 0)
    for _ in range(3):
        m = learner.bc_step(teacher, demos)
        assert math.isfinite(m["bc/loss"]) and m["bc/call_frac"] > 0
    # each nonzero budget's offset carries its call rate (the body does not learn the budget)
    off = s2.budget_offsets.detach()
    assert off[0] == 0 and torch.all(off[1:] != 0)


def test_lambda_moves_toward_each_budget_and_state_roundtrips(pair):
    """The first (integral) rule on the sampled-call estimate; the zero budget is masked, so its
    λ never moves (it used to integrate without bound: its use can never undershoot 0)."""
    _, student = pair
    learner = _learner(copy.deepcopy(student), lr_lambda=1.0, lambda_max=5.0, lambda_min=0.0, use_ema=0.0,
                       lambda_controller="integral", use_estimate="sampled")
    over = [traj(4, budget=1, tau=[True, True, False, False])]  # use 0.5 > target 0.2
    under = [traj(4, budget=2, tau=[False] * 4)]  # use 0 < target 0.5
    zero = [traj(4, budget=0, tau=[True, False, False, False])]
    learner.observe_use(over + under + zero + [traj(4, origin="teacher_demo", budget=1)])
    assert learner.lam[1] == pytest.approx(0.3) and learner.lam[2] == 0.0 and learner.lam[0] == 0.0
    for _ in range(20):
        learner.observe_use(over + zero)
    assert learner.lam[1] == 5.0 and learner.lam[0] == 0.0  # clipped at λ_max; zero budget untouched
    neg = _learner(copy.deepcopy(student), lr_lambda=1.0, lambda_min=-2.0, use_ema=0.0,
                   lambda_controller="integral", use_estimate="sampled")
    neg.observe_use(under)
    assert neg.lam[2] == pytest.approx(-0.5)  # opt-in equality constraint
    state = learner.state_dict()
    fresh = _learner(copy.deepcopy(student))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.lam, learner.lam) and fresh.step == learner.step
    assert torch.equal(fresh.integral, learner.integral)


def test_pi_controller_warm_start_expected_estimate_and_demos_ignored(pair):
    _, student = pair
    learner = _learner(copy.deepcopy(student), lambda_ki=0.1, lambda_kp=0.0)
    # warm start at the joint reward's soft optimum log((1−b)/b); 0.5 -> 0
    assert float(learner.lam[1]) == pytest.approx(math.log(0.8 / 0.2), abs=1e-5)
    assert float(learner.lam[2]) == pytest.approx(0.0, abs=1e-6)
    lam0 = learner.lam.clone()
    # expected use: Σπ(<τ>)/ΣT over budget-1 rows = (0.4·4 + 0.4·2)/6 = 0.4 > 0.2 although no call was made
    rows = [traj(4, budget=1), traj(2, budget=1)]
    for t in rows:
        t.tau_prob = [0.4] * len(t)
    demo = traj(4, origin="teacher_demo", budget=2)
    m = learner.observe_use(rows + [demo])
    err = math.log(0.4 / 0.6) - math.log(0.2 / 0.8)
    assert m["use_expected/1"] == pytest.approx(0.4) and m["use_sampled/1"] == 0.0
    assert m["lambda_err/1"] == pytest.approx(err, rel=1e-5)
    assert float(learner.lam[1]) == pytest.approx(float(lam0[1]) + 0.1 * err, rel=1e-5)
    assert torch.equal(learner.lam[[0, 2]], lam0[[0, 2]])  # no student row of budget 2; 0 is masked
    # measuring without updating (the value warm-up) leaves λ alone
    lam1 = learner.lam.clone()
    learner.observe_use(rows, update=False)
    assert torch.equal(learner.lam, lam1)
    # train.lambda_kc: the common-mode gain reaches the observed budgets (budget 1 alone here:
    # its own error is the mean), not the unobserved ones
    common = _learner(copy.deepcopy(student), lambda_ki=0.1, lambda_kp=0.0, lambda_kc=0.3)
    common.observe_use(rows + [demo])
    assert float(common.lam[1]) == pytest.approx(float(lam0[1]) + 0.4 * err, rel=1e-5)
    assert torch.equal(common.lam[[0, 2]], lam0[[0, 2]])


def test_use_weighting_token_pools_tokens_sequence_averages_paths(pair):
    """train.use_weighting: ``token`` pools a budget's rows (Σπ/ΣT), ``sequence`` averages each
    row's own fraction (DESIGN.md §1, what validation reports); the controller's error follows."""
    _, student = pair
    rows = [traj(4, budget=1, tau=[True, True, False, False]), traj(2, budget=1)]
    rows[0].tau_prob, rows[1].tau_prob = [0.4] * 4, [0.1] * 2
    seen = {}
    for w in ("token", "sequence"):
        learner = _learner(copy.deepcopy(student), lambda_ki=0.1, lambda_kp=0.0, use_weighting=w)
        seen[w] = learner.observe_use(rows)
    assert seen["token"]["use_expected/1"] == pytest.approx((0.4 * 4 + 0.1 * 2) / 6)
    assert seen["sequence"]["use_expected/1"] == pytest.approx((0.4 + 0.1) / 2)
    assert seen["token"]["use_sampled/1"] == pytest.approx(2 / 6)
    assert seen["sequence"]["use_sampled/1"] == pytest.approx((0.5 + 0.0) / 2)
    for w, e in (("token", 0.3), ("sequence", 0.25)):
        assert seen[w]["lambda_err/1"] == pytest.approx(math.log(e / (1 - e)) - math.log(0.2 / 0.8), rel=1e-5)


def test_lambda_feedforward_moves_the_budget_offset_by_minus_delta_lambda(pair):
    """train.lambda_feedforward: each change Δ of λ_k moves budget k's <τ> offset by −Δ, so the
    policy's <τ> logit on rows of budget k drops by exactly Δ at once; other budgets, the zero
    budget and measuring without updating (the value warm-up) leave the offsets alone."""
    _, student = pair
    s = copy.deepcopy(student)
    learner = _learner(s, lambda_ki=0.1, lambda_kp=0.5, lambda_feedforward=True)
    ids = torch.tensor([0, 1, 2])
    logits = torch.randn(3, 2, s.lm.model.config.vocab_size)
    z0 = s.policy_logits(logits, ids)[..., -1].detach().clone()
    off0, lam0 = s.budget_offsets.detach().clone(), learner.lam.clone()
    rows = [traj(4, budget=1), traj(4, budget=0, tau=[True, False, False, False])]
    rows[0].tau_prob = [0.4] * 4
    learner.observe_use(rows, update=False)
    assert torch.equal(s.budget_offsets.detach(), off0) and torch.equal(learner.lam, lam0)
    for _ in range(3):
        learner.observe_use(rows)
    delta = learner.lam - lam0
    assert float(delta[1]) > 0 and float(delta[0]) == 0 and float(delta[2]) == 0
    assert torch.allclose(s.budget_offsets.detach(), off0 - delta, atol=1e-6)
    z1 = s.policy_logits(logits, ids)[..., -1].detach()
    assert torch.allclose(z1 - z0, -delta[ids].unsqueeze(1).expand_as(z0), atol=1e-5)
    # without the option the offsets never move with λ
    plain = _learner(copy.deepcopy(student), lambda_ki=0.1)
    before = plain.student.budget_offsets.detach().clone()
    plain.observe_use(rows)
    assert float(plain.lam[1]) > float(lam0[1]) and torch.equal(plain.student.budget_offsets.detach(), before)


def _tau_grad(learner, batch):
    """∂L_PCL/∂z_<τ> per position: a hook on the policy logits of one pcl_step (no update)."""
    grads = {}
    orig = learner._policy

    def policy(logits, budget_ids=None, tau_mask=None):
        pol = orig(logits, budget_ids, tau_mask)
        pol.register_hook(lambda g: grads.setdefault("g", g.detach().clone()))
        return pol

    learner._policy = policy
    learner.cfg.grad_clip = 0.0
    for g in learner.opt.param_groups:
        g["lr"] = 0.0
    learner.pcl_step(batch)
    learner._policy = orig
    return grads["g"][..., -1]


def test_demonstrations_never_push_tau_but_train_tokens_and_values(pair):
    teacher, student = pair
    g = torch.Generator().manual_seed(0)
    trajs, _ = student_rollouts(student, teacher, PROMPTS, [1, 1, 2], max_new_tokens=6, generator=g,
                                budgets=[0.2, 0.2, 0.5])
    demos = teacher_demos(teacher, PROMPTS, [1, 2, 2], max_new_tokens=6, generator=g)
    # the first design: demos scored under the joint policy push <τ> (the gradient is nonzero)
    joint = _learner(copy.deepcopy(student), demo_logp="joint", residual_norm=False)
    assert float(_tau_grad(joint, demos).abs().sum()) > 1e-6
    cond = _learner(copy.deepcopy(student))
    assert float(_tau_grad(cond, demos).abs().max()) == 0.0
    # in a mixed batch the demo rows' <τ> gradient is zero, the on-policy rows' is not
    gz = _tau_grad(_learner(copy.deepcopy(student)), trajs + demos)
    assert float(gz[len(trajs):].abs().max()) == 0.0 and float(gz[: len(trajs)].abs().sum()) > 0
    # ... and a step on demos alone still moves the token distribution and the value head
    s = copy.deepcopy(student)
    learner = _learner(s, value_lr=1e-2)
    before = {n: p.detach().clone() for n, p in s.named_parameters()}
    learner.pcl_step(demos)
    moved = {n for n, p in s.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.startswith("value_head.") for n in moved) and any(n.startswith("model.") for n in moved)
    assert "tau_offset" not in moved and "budget_offsets" not in moved


def test_value_warmup_moves_only_the_value_head_and_zero_budget_is_masked(pair):
    teacher, student = pair
    g = torch.Generator().manual_seed(0)
    trajs, out = student_rollouts(student, teacher, PROMPTS, [0, 1, 2], max_new_tokens=6, generator=g,
                                  budgets=[0.0, 0.2, 0.5])
    assert not any(trajs[0].actions_tau) and all(p == 0.0 for p in trajs[0].tau_prob)
    assert len(trajs[1].tau_prob) == len(trajs[1]) and all(0 < p < 1 for p in trajs[1].tau_prob)
    s = copy.deepcopy(student)
    learner = _learner(s, value_warmup_steps=1)
    learner.start_phase2()
    before = {n: p.detach().clone() for n, p in s.named_parameters()}
    lam0 = learner.lam.clone()
    m = learner.learn(trajs, trajs)
    moved = {n for n, p in s.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert m.value_warmup is True and moved and all(n.startswith("value_head.") for n in moved)
    assert torch.equal(learner.lam, lam0)
    m = learner.learn(trajs, trajs)
    assert m.value_warmup is False and not torch.equal(learner.lam, lam0)
    assert learner.opt.param_groups[1]["lr"] == learner.opt.param_groups[0]["lr"]  # offsets at the body's rate


def test_phase2_rate_falls_linearly_to_its_final_factor(pair):
    """train.phase2_lr_final_factor: the body's and the offsets' rate at Phase-2 step i is
    phase2_lr·(1 − (1 − f)·i/(steps − 1)); f = 1 keeps it constant."""
    teacher, student = pair
    g = torch.Generator().manual_seed(0)
    trajs, _ = student_rollouts(student, teacher, PROMPTS[:2], [1, 2], max_new_tokens=6, generator=g,
                                budgets=[0.2, 0.5])
    learner = _learner(copy.deepcopy(student), phase2_lr=1e-3, phase2_steps=5, phase2_lr_final_factor=0.2,
                       value_warmup_steps=0)
    learner.start_phase2()
    seen = []
    for _ in range(5):
        learner.learn(trajs, trajs)
        seen.append((learner.opt.param_groups[0]["lr"], learner.opt.param_groups[1]["lr"]))
    assert [a for a, _ in seen] == pytest.approx([1e-3, 8e-4, 6e-4, 4e-4, 2e-4])
    assert all(a == b for a, b in seen)
    assert learner.phase2_lr() == pytest.approx(2e-4)  # past the end it stays at the floor
    flat = _learner(copy.deepcopy(student), phase2_lr=1e-3, phase2_steps=5, value_warmup_steps=0)
    flat.start_phase2()
    flat.learn(trajs, trajs)
    flat.learn(trajs, trajs)
    assert flat.opt.param_groups[0]["lr"] == 1e-3


def test_local_training_run_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "kdtw.cli", "train", "--local", "--config", os.path.join(ROOT, "conf", "tiny.yaml"),
         f"run_dir={run_dir}", "train.phase1_steps=3", "train.phase2_steps=4", "train.validate_every=2",
         "train.log_every=2", "train.val_examples=4", "train.lambda_min=-1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[phase 1] step 3/3" in out.stdout and "[phase 2] step 4/4" in out.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["lambda_trace"]) == 4 and len(report["lambda_trace"][0]["lam"]) == 6
    assert {v["step"] for v in report["validations"] if v["phase"] == 2} == {2, 4}
    assert report["selected"] is not None and os.path.exists(run_dir / "lambda_trace.png")
    student = Student.load(run_dir / "student")
    assert student.tau_id == student.vocab_size
    assert not os.path.exists(run_dir / "candidate")


def test_a_learner_step_reports_step_stats_named_by_budget(pair):
    """`Learner.learn` returns a `StepStats`; its flat figures and the MLflow names agree, and a
    budget with no fresh row this step is nan there and absent from MLflow."""
    from kdtw.reporting import format_step, step_metrics, trace_entry

    teacher, student = pair
    g = torch.Generator().manual_seed(0)
    trajs, _ = student_rollouts(student, teacher, PROMPTS[:2], [1, 2], max_new_tokens=6, generator=g,
                                budgets=[0.2, 0.5])
    learner = _learner(copy.deepcopy(student))
    learner.start_phase2()
    st = learner.learn(trajs, trajs)
    assert st.version == learner.version and st.lam == learner.lam.tolist() and math.isfinite(st.loss)
    assert math.isnan(st.use_expected[0]) and 0 < st.use_expected[1] < 1  # no row of budget 0 this step
    assert st.rollout_use == pytest.approx(sum(t.teacher_use for t in trajs) / 2)
    flat = st.metrics()
    assert flat["pcl/loss"] == st.loss and flat["use_expected/1"] == st.use_expected[1]
    named = step_metrics(st, ["no", "light", "full"])
    assert named["lambda/light"] == st.lam[1] and named["use_expected/full"] == st.use_expected[2]
    assert "use_expected/no" not in named and named["loss"] == st.loss
    rec = trace_entry(7, st)
    assert rec["step"] == 7 and rec["expected"][0] is None and rec["lam"] == st.lam
    assert "pcl loss" in format_step(st)


def test_decoded_per_budget_estimate_reads_the_probes_alone(pair):
    """train.decoded_per_budget > 0: λ's estimate comes from the probes decoded as validation
    decodes them; the step's sampled rows do not enter it."""
    _, student = pair
    rows = [traj(4, budget=1), traj(4, budget=1), traj(2, budget=2)]
    rows[0].tau_prob, rows[1].tau_prob, rows[2].tau_prob = [0.6] * 4, [0.1] * 4, [0.9] * 2
    rows[1].decoded = True
    plain = _learner(copy.deepcopy(student), lambda_ki=0.1)
    both = plain.observe_use(rows)
    assert both["use_expected/1"] == pytest.approx(0.35) and both["use_expected/2"] == pytest.approx(0.9)
    learner = _learner(copy.deepcopy(student), lambda_ki=0.1, lambda_kp=0.0, decoded_per_budget=1)
    lam0 = learner.lam.clone()
    dec = learner.observe_use(rows)
    assert dec["use_expected/1"] == pytest.approx(0.1)
    assert math.isnan(dec["use_expected/2"]) and float(learner.lam[2]) == float(lam0[2])  # no decoded row
    assert dec["lambda_err/1"] == pytest.approx(math.log(0.1 / 0.9) - math.log(0.2 / 0.8), rel=1e-5)
    assert float(learner.lam[1]) < float(lam0[1])  # under target: λ falls
    with pytest.raises(TrajectoryError, match="only a student path"):
        Trajectory(**{**vars(traj(2, origin="teacher_demo")), "decoded": True})
