"""Measure the causes issue 11 names for Phase 2 not settling, on a trained student.

    python benchmarks/phase2_causes.py --student runs/p1_seed0/student [--config conf/default.yaml]

On one rollout batch of the student (sampled paths at every budget, as Phase 2 collects them,
plus teacher demonstrations), it prints:

1. The demonstration push: ∂L_PCL/∂z_<τ> summed over the demo rows and over the on-policy rows
   (z_<τ>: the policy's <τ> logit at each position), with demos scored under the joint policy
   (train.demo_logp=joint, the first design) and conditional on writing (=conditional).
2. Greedy against expected use as the <τ> logit is shifted by Δ (what a change of λ does to a
   soft-optimal policy): on the batch's states, per budget, the argmax-<τ> rate and the mean
   π(<τ>). A flat greedy curve near 0 at small budgets and a steep one near 0.5 is what makes a
   controller on the greedy rate wind up at one end and oscillate at the other.
3. Residual scale with a zero value head: mean and max |C_t| for γ=1 with no window (the first
   design) against γ=0.95, window 8, residuals divided by their step count (the new defaults).
4. Mean of per-sequence fractions against the token-weighted Σc/ΣT of the same rollouts.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kdtw.config import load_config  # noqa: E402
from kdtw.factory import budget_table, load_splits, load_teacher  # noqa: E402
from kdtw.learner import collate  # noqa: E402
from kdtw.losses import conditional_demo_logp, pcl_loss, shaped_rewards, student_action_logp  # noqa: E402
from kdtw.models import Student  # noqa: E402
from kdtw.rollout import sample_tasks, student_rollouts, teacher_demos  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="conf/default.yaml")
    ap.add_argument("--student", required=True, help="a kdtw student folder (e.g. the Phase-1 student)")
    ap.add_argument("--n", type=int, default=240, help="on-policy rows (demos: a third of that)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.config, a.overrides)
    torch.manual_seed(0)
    teacher = load_teacher(cfg)
    student = Student.load(a.student)
    table = budget_table(cfg)
    train = load_splits(cfg)["train"]
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    prompts, bids, _ = sample_tasks(train, table, a.n, rng, cfg.task.instruction)
    # the first design's rollouts: <τ> not masked at the zero budget
    trajs, _ = student_rollouts(student, teacher, prompts, bids, max_new_tokens=cfg.decoding.max_new_tokens,
                                batch_size=cfg.decoding.batch_size, generator=gen)
    d_prompts, d_bids, _ = sample_tasks(train, table, a.n // 3, rng, cfg.task.instruction)
    demos = teacher_demos(teacher, d_prompts, d_bids, max_new_tokens=cfg.decoding.max_new_tokens,
                          batch_size=cfg.decoding.batch_size, generator=gen)
    batch = trajs + demos
    b = collate(student.lm, batch)
    targets = torch.tensor(table.targets)
    lam = torch.tensor([float(torch.log(torch.tensor((1 - max(t, 1e-3)) / max(t, 1e-3)))) for t in table.targets])

    print(f"[1] demonstration push on the <τ> logit: {len(trajs)} on-policy rows, {len(demos)} demo rows")
    for how in ("joint", "conditional"):
        logits = student.lm.forward(b.prompt_ids, b.prompt_mask, b.tokens).detach()
        pol = student.policy_logits(logits).float().requires_grad_(True)  # [B, T, V+1]
        logp = student_action_logp(pol, b.tokens, b.tau_mask, mask=b.mask)
        if how == "conditional":
            logp = conditional_demo_logp(pol, logp, b.tokens, b.demo)
        rewards = shaped_rewards(b.teacher_logp, b.tau_mask, b.mask, lam=lam[b.budget_ids], budget=targets[b.budget_ids])
        values = torch.zeros_like(logp)
        loss, _ = pcl_loss(rewards, logp, values, b.mask, gamma=1.0, window=None)
        (g,) = torch.autograd.grad(loss, pol)
        gz = g[..., -1]  # [B, T]
        demo_push = float(gz[b.demo].sum())
        on_push = float(gz[~b.demo].sum())
        print(f"    demos scored {how:<11}: dL/dz_τ summed over demo rows {demo_push:+.4f}, "
              f"over on-policy rows {on_push:+.4f} (a gradient step moves z_τ by −lr·grad)")

    print("[2] greedy vs expected use on the rollout states as the <τ> logit shifts by Δ")
    with torch.no_grad():
        logits = student.lm.forward(b.prompt_ids, b.prompt_mask, b.tokens)
        pol = student.policy_logits(logits).float()
    on = ~b.demo
    valid = b.mask.bool() & on[:, None]
    header = "    Δ     " + " ".join(f"{p[:8]:>17}" for p in table.phrases)
    print(header + "\n    " + " " * 6 + " ".join(f"{'greedy  E[π]':>17}" for _ in table.phrases))
    for delta in (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0):
        shifted = pol.clone()
        shifted[..., -1] += delta
        greedy = shifted.argmax(-1) == shifted.shape[-1] - 1
        p_tau = torch.softmax(shifted, -1)[..., -1]
        cells = []
        for k in range(len(table)):
            m = valid & (b.budget_ids == k)[:, None]
            n = m.sum().clamp(min=1)
            cells.append(f"{float((greedy & m).sum() / n):>8.3f} {float((p_tau * m).sum() / n):>8.3f}")
        print(f"    {delta:+.1f}  " + " ".join(cells))

    print("[3] |C_t| with a zero value head on the same batch (joint-scored, λ at warm start)")
    with torch.no_grad():
        logp = student_action_logp(pol, b.tokens, b.tau_mask, mask=b.mask)
        rewards = shaped_rewards(b.teacher_logp, b.tau_mask, b.mask, lam=lam[b.budget_ids], budget=targets[b.budget_ids])
        for name, kw in (("γ=1, no window", dict(gamma=1.0, window=None)),
                         ("γ=0.95, d=8, /d'", dict(gamma=0.95, window=8, normalize=True))):
            _, m = pcl_loss(rewards, logp, torch.zeros_like(logp), b.mask, **kw)
            print(f"    {name:<18} loss {m['pcl/loss']:9.2f}  mean |C| {m['pcl/residual_abs_mean']:7.2f}  "
                  f"max |C| {m['pcl/residual_abs_max']:7.2f}")

    print("[4] mean of per-sequence fractions vs token-weighted Σc/ΣT (sampled calls), per budget")
    for k, phrase in enumerate(table.phrases):
        rows = [t for t in trajs if t.budget_id == k]
        if not rows:
            continue
        per_seq = sum(t.teacher_use for t in rows) / len(rows)
        tok = sum(sum(t.actions_tau) for t in rows) / sum(len(t) for t in rows)
        print(f"    {phrase:<9} target {table.targets[k]:.2f}: per-sequence mean {per_seq:.3f}, token-weighted {tok:.3f}")


if __name__ == "__main__":
    main()
