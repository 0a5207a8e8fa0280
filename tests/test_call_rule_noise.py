"""benchmarks/call_rule_noise.py: its figures go into the README, so its measurement is run on
the tiny profile (random-init models from the config) and checked against the decodes it stands
for."""

import importlib.util
import os

import pytest
import torch

from kdtw.config import load_config
from kdtw.decoding import generate
from kdtw.factory import budget_table, load_splits, load_student, load_teacher, prompts_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "conf", "tiny.yaml")


def _module():
    spec = importlib.util.spec_from_file_location("call_rule_noise", os.path.join(ROOT, "benchmarks", "call_rule_noise.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_measure_reports_each_nonzero_budget_and_rule_from_seeded_decodes(tmp_path):
    cfg = load_config(TINY, [f"models_dir={tmp_path}/models", f"run_dir={tmp_path}/run"])
    teacher = load_teacher(cfg)
    student = load_student(cfg, teacher)
    with torch.no_grad():
        student.tau_offset.fill_(2.0)  # calls at every budget, so the draws matter
    examples = load_splits(cfg)["validation"][:6]
    res = _module().measure(cfg, student, teacher, examples, seeds=2)
    table = budget_table(cfg)
    assert set(res) == {b.phrase for b in table if b.target > 0}
    b = next(b for b in table if b.target > 0)
    for rule in ("sample", "systematic"):
        r = res[b.phrase][rule]
        assert r["target"] == b.target and r["std_dev"] >= 0 and 0 <= r["quality"] <= 100
        # the first seed's decode, redone here: its use enters the mean with the second's
        uses = []
        for s in range(2):
            d = generate(student, teacher, prompts_for(cfg, examples, b.phrase), budgets=b.target,
                         max_new_tokens=cfg.decoding.max_new_tokens, batch_size=cfg.decoding.batch_size,
                         call_rule=rule, generator=torch.Generator().manual_seed(1000 * s + 7))
            uses.append(sum(d.teacher_use()) / len(d))
        assert r["mean_dev"] == pytest.approx(sum(uses) / 2 - b.target)
        assert r["max_abs_dev"] == pytest.approx(max(abs(u - b.target) for u in uses))


def test_main_rejects_one_seed_and_a_missing_student(capsys):
    mod = _module()
    with pytest.raises(SystemExit):
        mod.main(["--student", ROOT, "--seeds", "1"])
    assert "--seeds must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(["--student", "/no/such/folder"])
    assert "is not a folder" in capsys.readouterr().err
