"""train.settle_probes (issue 11, kdtw/settle.py): after the last PCL step, with the weights
frozen, each nonzero budget's <τ> offset moves by its logit error measured on decoded training
prompts; the last validation sees the settled student; nothing else changes."""

from __future__ import annotations

import math

import pytest
import torch

from conftest_ray import tiny
from kdtw.config import ConfigError
from kdtw.local import LocalLoop
from kdtw.rollout import student_rollouts
from kdtw.settle import settle_budgets

SETTLE = ["train.phase1_steps=0", "decoding.call_rule=systematic", "train.val_examples=4"]


def _logit(p: float) -> float:
    p = min(max(p, 1e-3), 1 - 1e-3)
    return math.log(p / (1 - p))


def _errors(loop: LocalLoop, n: int = 24, seed: int = 123) -> dict[int, float]:
    """|logit(mean decoded π(<τ>)) − logit(b)| per nonzero budget, on n training prompts of its own."""
    c, table = loop.cfg, loop.table
    out = {}
    for k in (k for k in range(len(table)) if table.targets[k] > 0):
        prompts = [table.prompt(table[k].phrase, c.task.instruction, ex.source) for ex in loop.train_set[:n]]
        paths = student_rollouts(loop.student, loop.teacher, prompts, [k] * n, max_new_tokens=c.decoding.max_new_tokens,
                                 batch_size=c.decoding.batch_size, generator=torch.Generator().manual_seed(seed),
                                 budgets=[table.targets[k]] * n, decoded_rule="systematic")[0]
        out[k] = abs(_logit(sum(p.expected_use for p in paths) / n) - _logit(table.targets[k]))
    return out


def test_settling_moves_only_the_budget_offsets_toward_the_targets(tmp_path):
    cfg = tiny(tmp_path, *SETTLE, "train.settle_probes=16", "train.settle_rounds=2", "train.use_weighting=sequence")
    loop = LocalLoop(cfg, log=lambda _: None)
    with torch.no_grad():
        loop.student.tau_offset.fill_(2.5)  # this untrained student then calls at ~0.04 at every budget
    before = _errors(loop)
    params = {n: p.detach().clone() for n, p in loop.student.named_parameters()}
    lines = []
    res = settle_budgets(cfg, loop.student, loop.teacher, loop.train_set, loop.table, log=lines.append)
    shift = torch.tensor(res["shift"])
    after = _errors(loop)
    assert len(res["use"]) == 2 and all(res["use"][r][k] is None for r in range(2) for k in range(len(shift))
                                        if loop.table.targets[k] == 0)
    # round r moves by its measured logit error / r: the rounds add up to the total
    assert sum((_logit(u[1]) - _logit(0.05)) / (r + 1) for r, u in enumerate(res["use"])) == pytest.approx(
        float(shift[1]), abs=1e-4)
    zero = [k for k in range(len(loop.table)) if loop.table.targets[k] == 0]
    assert zero and all(shift[k] == 0 for k in zero)
    assert all(shift[k] < 0 for k in before if k > 1)  # below target: λ down, offsets up
    for name, p in loop.student.named_parameters():
        if name == "budget_offsets":
            assert torch.allclose(params[name] - p.detach(), shift)
        else:
            assert torch.equal(params[name], p.detach()), name
    assert sum(after.values()) < 0.4 * sum(before.values()), (before, after)
    assert len(lines) == 2 and lines[0].startswith("[settle] round 1/2")


def test_settling_off_changes_nothing_and_bad_settings_are_refused(tmp_path):
    cfg = tiny(tmp_path, *SETTLE)
    loop = LocalLoop(cfg, log=lambda _: None)
    off = loop.student.budget_offsets.detach().clone()
    assert settle_budgets(cfg, loop.student, loop.teacher, loop.train_set, loop.table) is None
    assert torch.equal(loop.student.budget_offsets.detach(), off)
    with pytest.raises(ConfigError, match="train.settle_probes"):
        tiny(tmp_path, "train.settle_probes=4", "decoding.call_rule=threshold")
    with pytest.raises(ConfigError, match="train.settle_probes"):
        tiny(tmp_path, "train.settle_probes=4", "train.budget_offsets=false", "train.lambda_feedforward=false")
    with pytest.raises(ConfigError, match="settle_rounds"):
        tiny(tmp_path, "train.settle_rounds=0")


def test_the_local_loop_settles_before_its_last_validation(tmp_path):
    cfg = tiny(tmp_path, *SETTLE, "train.phase2_steps=2", "train.validate_every=2", "train.value_warmup_steps=0",
               "train.settle_probes=2", "train.settle_rounds=1")
    lines = []
    loop = LocalLoop(cfg, log=lines.append)
    report = loop.run()
    settled = report["settled"]["shift"]
    assert len(settled) == len(loop.table) and any(s != 0 for s in settled)
    last_trace = report["lambda_trace"][-1]["lam"]  # λ after the last PCL step, before settling
    last_val = report["validations"][-1]
    assert last_val["step"] == 2
    assert last_val["lam"] == pytest.approx([a + s for a, s in zip(last_trace, settled)], abs=1e-5)
    assert any(line.startswith("[settle] round 1/1") for line in lines)
    assert lines.index(next(x for x in lines if x.startswith("[settle]"))) < lines.index(
        next(x for x in lines if x.startswith("[validate] phase-2 step 2")))
