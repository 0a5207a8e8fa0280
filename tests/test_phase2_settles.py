"""benchmarks/phase2_settles.py recomputes issue 11's criteria from committed reports: its figures
go into the README, so its arithmetic is tested on a report small enough to check by hand."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location("phase2_settles", os.path.join(ROOT, "benchmarks", "phase2_settles.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _val(step, uses, pis, phase=2):
    budgets = {p: {"target": t, "use": u, "tau_prob": q, "bleu": 50.0 + 10 * t}
               for (p, t), u, q in zip([("no", 0.0), ("half", 0.5)], uses, pis)}
    dev = max(abs(b["use"] - b["target"]) for b in budgets.values())
    return {"phase": phase, "step": step, "budgets": budgets, "max_deviation": dev, "mean_quality": 52.5}


def test_summary_and_decomposition_of_late_deviations():
    trace = [{"step": s, "lam": [0.0, 0.1 * (s % 2)], "expected": [0.0, 0.52], "residual_abs_mean": 1.0,
              "warmup": s <= 2} for s in range(1, 41)]
    report = {
        "phrases": ["no", "half"], "targets": [0.0, 0.5], "lambda_trace": trace,
        "validations": [_val(0, [0.0, 0.4], [0.0, 0.4], phase=1), _val(20, [0.0, 0.49], [0.0, 0.50]),
                        _val(40, [0.0, 0.46], [0.0, 0.47])],
        "selected": {"step": 20, "phase": 2, "eligible": True, "validation": _val(20, [0.0, 0.49], [0.0, 0.5])},
        "initial": _val(0, [0.0, 0.3], [0.0, 0.3], phase=1),
    }
    s = _module().summarise(report, from_step=10, delta=0.03, lam_bounds=(-10.0, 20.0))
    assert s["n_validations"] == 2 and s["share_within_delta"] == 0.5  # 0.49 within 0.03, 0.46 not
    assert s["max_deviation_late"] == pytest.approx(0.04)
    assert s["lambda_std_last60"]["half"] == pytest.approx(0.05)  # alternating 0 / 0.1
    assert s["peak_to_peak_use_half_last60"] == pytest.approx(0.03)  # steps 20 and 40 are past 0.4 · 40
    # deviation = (ē − b) + (val π − ē) + (use − val π), per budget, averaged over late validations
    assert s["late_mean_train_minus_target"]["half"] == pytest.approx(0.02)
    assert s["late_mean_val_pi_minus_train"]["half"] == pytest.approx((-0.02 - 0.05) / 2)
    assert s["late_mean_use_minus_val_pi"]["half"] == pytest.approx(-0.01)
    assert "no" not in s["late_mean_use_minus_val_pi"]  # the zero budget is not controlled
    assert s["mean_abs_residual_after_warmup"] == pytest.approx(1.0)
    assert "settling_shift" not in s
    report["settled"] = {"shift": [0.0, 0.2], "use": [[None, 0.55], [None, 0.51]]}
    t = _module().summarise(report, from_step=10, delta=0.03, lam_bounds=(-10.0, 20.0))
    assert t["before_settling_max_deviation_on_training_prompts"] == pytest.approx(0.05)
    assert t["settling_shift"] == {"half": 0.2}
