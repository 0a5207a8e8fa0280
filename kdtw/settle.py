"""Settling the budgets at the end of Phase 2 (train.settle_probes; kdtw addition, issue 11).

Measured on the SmolLM2 profile's λ traces (benchmarks/controller_model.py, second model): the
policy's own call logit drifts during Phase 2 like a random walk common to all budgets, 0.13–0.33
logit a step, while each budget's deviation from that common part is white noise. The λ
controller tracks such a walk only as well as its noisy probes allow (one decoded verse a budget a
step: 0.4–0.5 logit of noise), so the student at the last step misses its targets by whatever the
walk did since the controller last caught up: the model predicts every budget within 0.05 at the
end in 15–22% of runs (observed: 1 of 5). Frozen, the student has no walk, and its use on
training verses is its use on validation verses: the two-probe run's seed-1 student called
0.077 / 0.150 / 0.235 / 0.354 / 0.524 on 64 training verses and 0.085 / 0.162 / 0.248 / 0.369 /
0.542 on 64 validation verses (validation 0.008–0.018 higher at every budget).

So after the last PCL step the loop freezes the weights and settles λ once more, from many probes:
``train.settle_rounds`` rounds, each decoding ``train.settle_probes`` training prompts per
nonzero budget as validation decodes them (decoding.call_rule), measuring each budget's use ē_k
as the λ probes do (`kdtw.learner.budget_rates`: train.use_estimate, train.use_weighting), and
moving its <τ> offset (and λ_k, which the offset carries under train.lambda_feedforward) by the
logit error logit(ē_k) − logit(b_k) divided by the round's number (1, 1/2, 1/3, ...: with the weights frozen the right offset is a
constant, and these gains make the last offset the one that averages every round's measurement,
instead of the last round's noise alone; the first SmolLM2 run settled with gain 1 in both rounds
and its second round moved "moderate" from 0.165 to 0.248 on 24 verses). No gradient step is
taken; only the per-budget offsets change. Both loops call `settle_budgets` on their student
before the last validation (kdtw/local.py, jobs/train_pcl.py), with the same seeds.
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable

import torch

from .budgets import BudgetTable
from .config import Config
from .examples import Example
from .learner import budget_rates
from .models import LM, Student
from .reporting import StatusPacer
from .rollout import student_rollouts

SETTLE_SEED_OFFSET = 7919  # settling draws its verses and calls from seeds of its own


def _logit(p: float, eps: float) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


@torch.no_grad()
def settle_budgets(cfg: Config, student: Student, teacher: LM, train_set: list[Example], table: BudgetTable,
                   *, log: Callable[[str], None] = print) -> dict | None:
    """Move each nonzero budget's <τ> offset by −(logit(ē_k) − logit(b_k)) / r in round r = 1 …
    ``train.settle_rounds``, ē_k measured on ``train.settle_probes`` decoded training prompts per
    budget. Returns ``{"shift": Δ_k, "use": [ē_k of each round]}`` (lists over the budget table;
    Δ = 0 and ē = None at the zero budget): add Δ to λ to keep λ and the offsets in step; the first round's ē is the
    use of the student as Phase 2 left it. ``None`` (nothing done) when settle_probes is 0,
    without <τ>, or without per-budget offsets."""
    tc = cfg.train
    K = len(table)
    total = torch.zeros(K)
    if not tc.settle_probes or not tc.use_tau or not student.budget_targets or not student.budget_offsets.numel():
        return None
    uses: list[list[float | None]] = []
    rng = random.Random(cfg.seed + SETTLE_SEED_OFFSET)
    gen = torch.Generator().manual_seed(cfg.seed + SETTLE_SEED_OFFSET)
    ks = [k for k in range(K) if table.targets[k] > 0]
    t0, pace = time.perf_counter(), StatusPacer()
    for r in range(tc.settle_rounds):
        bids = [k for k in ks for _ in range(tc.settle_probes)]
        prompts = [table.prompt(table[k].phrase, cfg.task.instruction, rng.choice(train_set).source) for k in bids]

        def batch_done(done: int, total: int, r=r) -> None:  # a line while a round decodes (69 s on SmolLM2 here)
            if done < total and pace.due(0):
                log(f"[settle] round {r + 1}/{tc.settle_rounds}: {done}/{total} training prompts decoded "
                    f"({time.perf_counter() - t0:.0f}s)")

        paths = student_rollouts(
            student, teacher, prompts, bids, max_new_tokens=cfg.decoding.max_new_tokens, use_tau=True,
            batch_size=cfg.decoding.batch_size, generator=gen, budgets=[table.targets[b] for b in bids],
            decoded_rule=cfg.decoding.call_rule, on_batch=batch_done)[0]
        delta = torch.zeros(K)
        parts, measured = [], [None] * K
        rates = budget_rates(paths, K, tc.use_estimate, tc.use_weighting)
        for k in ks:
            use = float(rates[k])
            delta[k] = (_logit(use, tc.lambda_eps) - _logit(table.targets[k], tc.lambda_eps)) / (r + 1)
            measured[k] = float(use)
            parts.append(f"{table[k].phrase} {use:.3f}/{table.targets[k]:.2f}")
        off = student.budget_offsets
        off.sub_(delta.to(device=off.device, dtype=off.dtype))
        total += delta
        uses.append(measured)
        pace.printed()  # the round's own line below: the next is due STATUS_EVERY_S after it
        log(f"[settle] round {r + 1}/{tc.settle_rounds}, {tc.settle_probes} training prompts a budget, "
            f"{tc.use_estimate} use/target: " + ", ".join(parts))
    return {"shift": total.tolist(), "use": uses}


__all__ = ["settle_budgets"]
