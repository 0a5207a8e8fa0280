"""benchmarks/controller_model.py fits a plant to a report's λ trace and simulates the real
controller against it: the fit must recover a plant it is given, and the simulation must settle
where the plant has no noise."""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from kdtw.losses import pid_lagrange_init, pid_lagrange_update

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cm():
    spec = importlib.util.spec_from_file_location("controller_model",
                                                  os.path.join(ROOT, "benchmarks", "controller_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_report(g: float, star: list[float], noise: float, steps: int = 120, warmup: int = 10,
                     seed: int = 0) -> dict:
    """A λ trace made by the plant the benchmark assumes: feedforward u = x − (λ − λ⁰), PCL
    x ← x + g(λ* − (λ − λ⁰)), the profile's controller on one noisy observation a step."""
    targets = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]
    rng = np.random.default_rng(seed)
    b = torch.tensor(targets[1:])
    lam0 = pid_lagrange_init(b, eps=1e-3, lam_min=-10, lam_max=20)
    integral, err_ema, lam = lam0.clone(), torch.zeros(5), lam0.clone()
    x = np.zeros(5)
    base = (torch.log(b) - torch.log1p(-b)).numpy()
    trace = []
    for step in range(1, steps + 1):
        warm = step <= warmup
        rel = (lam - lam0).numpy()
        obs = 1 / (1 + np.exp(-(base + x - rel + rng.normal(0, noise, 5))))
        if not warm:  # the loop's order: collect (above), PCL step at that λ, λ update
            x = x + g * (np.array(star) - rel)
            lam, integral, err_ema, _ = pid_lagrange_update(integral, err_ema, torch.tensor(obs, dtype=torch.float32),
                                                            b, k_i=0.1, k_p=0.5, ema=0.9, lam_min=-10, lam_max=20)
        trace.append({"step": step, "lam": [6.9] + lam.tolist(), "expected": [None] + obs.tolist(), "warmup": warm})
    return {"targets": targets, "lambda_trace": trace}


def test_fit_recovers_the_plant_it_is_given(cm):
    star = [1.8, 1.4, 1.0, 0.9, 0.7]
    m = cm.fit(synthetic_report(0.15, star, noise=0.02))
    assert m["g"] == pytest.approx(0.15, rel=0.2)
    assert m["lam_star"] == pytest.approx(star, abs=0.25)
    assert m["sigma"] < 0.1
    assert m["steps"] == 110


def test_probe_noise_is_measured(cm):
    m = cm.fit(synthetic_report(0.15, [1.0] * 5, noise=0.5, seed=1))
    assert 0.35 < m["sigma"] < 0.7


def test_noise_free_simulation_settles_and_noise_hurts(cm):
    m = {"ks": [1, 2, 3, 4, 5], "targets": [0.05, 0.1, 0.2, 0.3, 0.5], "g": 0.15,
         "lam_star": [1.5, 1.2, 1.0, 0.9, 0.8], "x0": [0.5, 0.0, -0.3, -0.3, -0.5], "sigma": 0.0, "steps": 200}
    end = cm.simulate(m, 0.5, 0.9, 0.1, 1, np.random.default_rng(0))
    assert end.max() < 1e-3
    noisy = dict(m, sigma=0.6, steps=90)
    rng = np.random.default_rng(0)
    one = np.mean([cm.simulate(noisy, 0.5, 0.9, 0.1, 1, rng).max() for _ in range(60)])
    four = np.mean([cm.simulate(noisy, 0.5, 0.9, 0.1, 4, rng).max() for _ in range(60)])
    assert four < one
    assert math.isfinite(one)


def test_a_short_trace_is_refused(cm):
    with pytest.raises(SystemExit, match="at least 20"):
        cm.fit(synthetic_report(0.15, [1.0] * 5, noise=0.1, steps=25, warmup=10))


def common_walk_report(q: float, noise: float, steps: int = 200, seed: int = 0) -> dict:
    """A λ trace whose policy logit is a common random walk (step q) plus fixed per-budget offsets,
    observed with white noise, under the profile's controller with the feedforward."""
    targets = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]
    rng = np.random.default_rng(seed)
    b = torch.tensor(targets[1:])
    lam0 = pid_lagrange_init(b, eps=1e-3, lam_min=-10, lam_max=20)
    integral, err_ema, lam = lam0.clone(), torch.zeros(5), lam0.clone()
    c, d = 0.0, np.array([0.3, -0.2, 0.1, 0.0, -0.4])
    base = (torch.log(b) - torch.log1p(-b)).numpy()
    trace = []
    for step in range(1, steps + 1):
        rel = (lam - lam0).numpy()
        obs = 1 / (1 + np.exp(-(base + c + d - rel + rng.normal(0, noise, 5))))
        c += rng.normal(0, q)
        lam, integral, err_ema, _ = pid_lagrange_update(integral, err_ema, torch.tensor(obs, dtype=torch.float32),
                                                        b, k_i=0.1, k_p=0.5, ema=0.9, lam_min=-10, lam_max=20)
        trace.append({"step": step, "lam": [6.9] + lam.tolist(), "expected": [None] + obs.tolist(), "warmup": False})
    return {"targets": targets, "lambda_trace": trace}


def test_common_walk_fit_separates_the_walk_from_the_noise(cm):
    m = cm.fit_common(common_walk_report(0.2, noise=0.4))
    assert m["q"] == pytest.approx(0.2, rel=0.35)
    assert m["q_d"] < 0.08  # the deviations from the common part are white
    assert m["sigma"] == pytest.approx(0.4, rel=0.25)
    still = cm.fit_common(common_walk_report(0.0, noise=0.4, seed=1))
    assert still["q"] < 0.08


def test_common_gain_helps_against_a_common_walk(cm):
    m = {"ks": [1, 2, 3, 4, 5], "targets": [0.05, 0.1, 0.2, 0.3, 0.5], "q": 0.2, "x0": [0.0] * 5,
         "sigma": 0.45, "steps": 90}
    rng = np.random.default_rng(0)
    plain = np.mean([cm.simulate_common(m, 0.5, 0.9, 0.1, 0.0, 1, rng).max() for _ in range(80)])
    common = np.mean([cm.simulate_common(m, 0.5, 0.9, 0.05, 0.5, 1, rng).max() for _ in range(80)])
    assert common < 0.8 * plain
