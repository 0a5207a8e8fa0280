"""A model of Phase 2's λ loop fitted to committed training reports, and the controller
settings it predicts to hold the budgets at the end of a short run (issue 11, SmolLM2 profile).

    python benchmarks/controller_model.py docs/runs/smollm2_bible_en_es-*-seed*/report.json \
        [--sims 400] [--delta 0.05]

What it measures in each report's λ trace (the steps after the value warm-up), per nonzero
budget k, on the logit scale relative to the start (target b_k, λ_k at its warm start λ⁰_k):

  x_t = logit(ē_t) + λ_{t−1} − logit(b_k) − λ⁰_k    the policy's call logit without λ's feedforward

(ē_t was measured on paths collected under λ_{t−1}, before step t's update.) With
train.lambda_feedforward each change of λ moves the budget's <τ> offset by −Δλ at once, so the
use logit is u_t = x_t − (λ_{t−1} − λ⁰_k); x is what PCL itself moves. The fit regresses the
change of x (averaged over 5 steps) over 5 steps on the sum of λ over those steps, with one
intercept per budget: x_{t+1} − x_t = g(λ*_k − λ_{t−1}), i.e. PCL integrates the distance to an
equilibrium multiplier λ*_k with gain g a step: a second integrator in the loop, beside the
controller's. (λ responds to the noise of x, so the fit is not free of closed-loop bias.) The
noise of one λ probe is the standard deviation of the step-to-step change of x / √2 (× √n for a
run with n probes a budget, read from the config.yaml beside its report; 1 without one).

Then it runs the real controller (`kdtw.losses.pid_lagrange_update`) against that plant, in the
loop's order (collect, PCL step, λ update), observing the logit of the mean use of n
probes as u_t + N(0, σ²/n) (a simplification: the estimate averages rates, not logits), from the
run's own start x at the end of the warm-up, for the run's Phase-2 steps, and prints for a grid of
gains and probe counts the share of simulated runs whose every budget ends within ``--delta``
of its target, and the median of the largest end deviation. It is a model: it leaves out the
validation set's own sampling error (32 verses) and any drift of λ* during the run; its use is
to rank settings before spending a 50-minute run on one.

A second model (`fit_common`, `simulate_common`; printed below the first for each report) drops
the plant's λ dependence and asks how x moves by itself: split x into its mean over budgets (the
common part) and each budget's deviation from it, and read each one's variogram
Var(x_{s+h} − x_s) over lags h. On the SmolLM2 traces the common part's grows linearly with h (a
random walk of 0.13–0.33 logit a step) and the deviations' stays flat (white noise, the probes'):
so the simulation walks x in common, observes each budget with one probe's noise, and runs the
real controller with its common-mode gain k_c (train.lambda_kc). This model predicts the profile's
old controller's end (15–22% of runs within 0.05; observed 1 of 5), where the first predicted
52–74%.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kdtw.losses import pid_lagrange_update  # noqa: E402

GRID = [  # (k_p, error EMA, k_i)
    (0.5, 0.9, 0.1),   # conf/smollm2_bible_en_es.yaml and kdtw/config.py's k_p, EMA
    (1.0, 0.8, 0.05),  # the gain experiment of 2026-12-01
    (0.5, 0.9, 0.05),
    (1.0, 0.9, 0.1),
    (0.0, 0.9, 0.1),
]
GRID_COMMON = [  # (k_p, error EMA, k_i, k_c)
    (0.5, 0.9, 0.1, 0.0),   # the profile until now
    (0.5, 0.9, 0.1, 0.2),
    (0.5, 0.9, 0.1, 0.4),
    (0.5, 0.9, 0.1, 0.6),
    (0.5, 0.9, 0.05, 0.4),
    (0.5, 0.5, 0.05, 0.4),
    (0.0, 0.9, 0.05, 0.5),
]


def logit(p: float) -> float:
    p = min(max(p, 1e-3), 1 - 1e-3)
    return math.log(p / (1 - p))


def probes_of_run(report_path: str) -> int:
    """train.decoded_per_budget of the run (its config.yaml beside report.json; 1 without one)."""
    cfg_path = os.path.join(os.path.dirname(report_path), "config.yaml")
    if not os.path.exists(cfg_path):
        return 1
    with open(cfg_path) as f:
        train = (yaml.safe_load(f) or {}).get("train", {})
    return max(1, int(train.get("decoded_per_budget", 1) or 1))


def intrinsic_logits(report: dict) -> tuple[list[int], np.ndarray, np.ndarray, int]:
    """(nonzero budgets, λ_{s−1} − λ⁰ and x_s per Phase-2 step after the warm-up [S, K], S).

    The trace's order within a step (`kdtw.local`): collect with the policy and λ of the step
    before, the PCL step (its rewards and offsets at that λ), then the λ update logged with the
    step; so x_s = logit(ē_s) + λ_{s−1} − logit(b) − λ⁰."""
    targets = report["targets"]
    ks = [k for k, b in enumerate(targets) if b > 0]
    trace = report["lambda_trace"]
    lam0 = np.array([trace[0]["lam"][k] for k in ks])
    first = next((i for i, r in enumerate(trace) if not r.get("warmup")), None)
    if first is None or len(trace) - first < 20:
        raise SystemExit("a report needs at least 20 Phase-2 steps after the value warm-up in its λ trace")
    tr = trace[first:]
    prev = [trace[first - 1] if first > 0 else trace[0]] + tr[:-1]
    if any(r["expected"][k] is None for r in tr for k in ks):
        raise SystemExit("the λ trace has steps without an estimate for some budget (too few paths a step)")
    base = np.array([logit(targets[k]) for k in ks])
    L = np.array([[p["lam"][k] for k in ks] for p in prev]) - lam0  # λ_{s−1} − λ⁰
    X = np.array([[logit(r["expected"][k]) for k in ks] for r in tr]) - base + L
    return ks, L, X, len(tr)


def fit(report: dict, probes: int = 1) -> dict:
    """g, λ*_k − λ⁰_k, x at the end of warm-up, probe noise σ, Phase-2 steps after warm-up:
    x_{s+1} − x_s = g(λ* − λ_{s−1}) (see `intrinsic_logits` for the loop's order)."""
    targets = report["targets"]
    ks, L, X, steps = intrinsic_logits(report)
    sigma = float(np.mean(np.diff(X, axis=0).std(0) / math.sqrt(2))) * math.sqrt(probes)
    w, h = 5, 5  # x averaged over w steps; its change over h steps
    n = len(X) - w - h + 1
    cum = np.vstack([np.zeros(len(ks)), np.cumsum(L, axis=0)])
    rows, ys = [], []
    for j in range(len(ks)):
        for t in range(n):
            ys.append(X[t + h: t + h + w, j].mean() - X[t: t + w, j].mean())
            reg = np.mean([cum[t + i + h, j] - cum[t + i, j] for i in range(w)])  # mean Σ of λ_{s−1}
            rows.append([h if i == j else 0.0 for i in range(len(ks))] + [reg])
    A, y = np.array(rows), np.array(ys)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    r2 = 1 - ((y - A @ coef) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    g = -coef[-1]  # y = h·gλ* − g·Σλ
    lam_star = [coef[j] / g if g > 0 else float("nan") for j in range(len(ks))]
    return {"ks": ks, "targets": [targets[k] for k in ks], "g": float(g), "lam_star": lam_star,
            "x0": X[:3].mean(0).tolist(), "sigma": sigma, "r2": float(r2), "steps": steps}


LAGS = (1, 2, 3, 5, 8, 12)


def fit_common(report: dict, probes: int = 1) -> dict:
    """The second model: x_k,s = c_s + d_k + noise, the common part c a random walk, each
    budget's deviation d_k fixed. Split x into its mean over budgets (c) and the rest; the
    variogram of c, Var(c_{s+h} − c_s) = 2σ_c² + h·q², gives the walk's step q (least squares over
    ``LAGS``); the rest's step-to-step change gives one probe's noise σ (× √(K/(K−1)) for the
    mean removed, × √probes). Also returns the same check on the rest (its walk step q_d: ~0
    where the deviations are white noise)."""
    targets = report["targets"]
    ks, _, X, steps = intrinsic_logits(report)
    K = len(ks)
    c = X.mean(1)
    d = X - c[:, None]
    A = np.array([[1.0, h] for h in LAGS])

    def walk(series: np.ndarray) -> tuple[float, list[float]]:
        v = [float(np.mean(np.var(series[h:] - series[:-h], axis=0))) for h in LAGS]
        (_, slope), *_ = np.linalg.lstsq(A, np.array(v), rcond=None)
        return math.sqrt(max(float(slope), 0.0)), v

    q, vc = walk(c[:, None])
    q_d, _ = walk(d)
    sigma = math.sqrt(float(np.mean(np.diff(d, axis=0).var(0))) / 2 * K / (K - 1)) * math.sqrt(probes)
    return {"ks": ks, "targets": [targets[k] for k in ks], "q": q, "q_d": q_d, "variogram": vc,
            "x0": X[:3].mean(0).tolist(), "sigma": sigma, "steps": steps}


def simulate(m: dict, kp: float, ema: float, ki: float, probes: int, rng: np.random.Generator,
             kc: float = 0.0) -> np.ndarray:
    """End deviation |use − b| per budget of one simulated run against either plant: `fit`'s
    (the PCL step moves x by g(λ* − λ)) or `fit_common`'s (x takes one common random-walk step
    N(0, q²)), each after that step's paths were observed, with one probe's noise σ/√probes."""
    K = len(m["ks"])
    b = torch.tensor(m["targets"], dtype=torch.float32)
    base = (torch.log(b) - torch.log1p(-b)).numpy()  # logit(b)
    integral, err_ema = torch.zeros(K), torch.zeros(K)  # relative to λ⁰ (the controller is shift-invariant)
    lam = torch.zeros(K)
    x = np.array(m["x0"], dtype=np.float64)
    for _ in range(m["steps"]):
        obs_logit = base + x - lam.numpy() + rng.normal(0, m["sigma"] / math.sqrt(probes), K)  # λ of the step before
        if "g" in m:
            x = x + m["g"] * (np.array(m["lam_star"]) - lam.numpy())  # the PCL step, at that λ
        else:
            x = x + rng.normal(0, m["q"])  # the common walk
        obs = torch.tensor(1 / (1 + np.exp(-obs_logit)), dtype=torch.float32)
        lam, integral, err_ema, _ = pid_lagrange_update(integral, err_ema, obs, b, k_i=ki, k_p=kp, ema=ema,
                                                        lam_min=-30.0, lam_max=30.0, k_c=kc)
    end = 1 / (1 + np.exp(-(base + x - lam.numpy())))
    return np.abs(end - b.numpy())


def simulate_common(m: dict, kp: float, ema: float, ki: float, kc: float, probes: int,
                    rng: np.random.Generator) -> np.ndarray:
    """`simulate` against `fit_common`'s plant, with the common-mode gain k_c."""
    return simulate(m, kp, ema, ki, probes, rng, kc=kc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--sims", type=int, default=400)
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--probes", default="1,2,4")
    args = ap.parse_args()
    probes = [int(p) for p in args.probes.split(",")]
    for path in args.reports:
        with open(path) as f:
            report = json.load(f)
        m = fit(report, probes_of_run(path))
        print(f"{path}: g {m['g']:.3f} a step (R² {m['r2']:.2f}), λ* − λ⁰ "
              + " ".join(f"{s:+.2f}" for s in m["lam_star"])
              + ", x at the end of warm-up " + " ".join(f"{x:+.2f}" for x in m["x0"])
              + f", one probe's σ {m['sigma']:.2f} logit, {m['steps']} steps")
        print(f"   k_p   EMA   k_i   probes   all within {args.delta} at the end   median max |use − b|")
        for kp, ema, ki in GRID:
            for n in probes:
                rng = np.random.default_rng(0)
                ends = np.array([simulate(m, kp, ema, ki, n, rng) for _ in range(args.sims)])
                ok = (ends <= args.delta).all(1).mean()
                print(f"   {kp:<5} {ema:<5} {ki:<5} {n:>6}   {ok:>26.2f}   {np.median(ends.max(1)):>20.3f}")
        c = fit_common(report, probes_of_run(path))
        print(f"   common-walk model: step of the common part q {c['q']:.3f} logit (of the rest {c['q_d']:.3f}), "
              f"variogram at lags {LAGS}: " + " ".join(f"{v:.3f}" for v in c["variogram"])
              + f", one probe's σ {c['sigma']:.2f}")
        print(f"   k_p   EMA   k_i   k_c   probes   all within {args.delta} at the end   median max |use − b|")
        for kp, ema, ki, kc in GRID_COMMON:
            for n in probes:
                rng = np.random.default_rng(0)
                ends = np.array([simulate_common(c, kp, ema, ki, kc, n, rng) for _ in range(args.sims)])
                ok = (ends <= args.delta).all(1).mean()
                print(f"   {kp:<5} {ema:<5} {ki:<5} {kc:<5} {n:>6}   {ok:>26.2f}   {np.median(ends.max(1)):>20.3f}")


if __name__ == "__main__":
    main()
