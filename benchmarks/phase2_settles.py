"""Recompute issue 11's settling criteria from training reports (report.json of `kdtw train`).

    python benchmarks/phase2_settles.py docs/runs/default-seed*/report.json [--from-step 500] [--delta 0.03]

Per run: the share of Phase-2 validations from ``--from-step`` on with every budget within
``--delta`` of its target; over the last 60% of Phase 2, the standard deviation of λ of each
nonzero budget and whether it touched a bound (train.lambda_min / lambda_max of the run's own
config), and the peak-to-peak validation use of the largest budget; the selected checkpoint's
mean quality against the end of Phase 1's, and the zero budget's quality against the student
before training; where the late deviations come from (controller tracking, greedy-token
validation states, call draws). Prints one block per run and a JSON line per run (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import yaml


def summarise(report: dict, *, from_step: int, delta: float, lam_bounds: tuple[float, float]) -> dict:
    phrases, targets = report["phrases"], report["targets"]
    key = _primary(report)
    vals2 = [v for v in report["validations"] if v["phase"] == 2]
    late = [v for v in vals2 if v["step"] >= from_step]
    within = [all(abs(b["use"] - b["target"]) <= delta for b in v["budgets"].values()) for v in late]
    trace = report["lambda_trace"]
    n2 = max((r["step"] for r in trace), default=0)
    tail_start = 0.4 * n2
    tail = [r for r in trace if r["step"] > tail_start]
    lam_std, at_bound = {}, {}
    lo, hi = lam_bounds
    for k, p in enumerate(phrases):
        if targets[k] == 0 or not tail:
            continue
        lam = [r["lam"][k] for r in tail]
        lam_std[p] = statistics.pstdev(lam)
        at_bound[p] = any(x <= lo + 1e-6 or x >= hi - 1e-6 for x in lam)
    top = phrases[max(range(len(targets)), key=lambda k: targets[k])]
    tail_vals = [v for v in vals2 if v["step"] > tail_start]
    top_use = [v["budgets"][top]["use"] for v in tail_vals]
    phase1 = [v for v in report["validations"] if v["phase"] == 1]
    sel = report.get("selected") or {}
    selv = sel.get("validation") or {}
    zero = phrases[min(range(len(targets)), key=lambda k: targets[k])]
    out = {
        "validations_from_step": from_step,
        "n_validations": len(late),
        "share_within_delta": sum(within) / len(within) if within else None,
        "max_deviation_late": max((v["max_deviation"] for v in late), default=None),
        "lambda_std_last60": lam_std,
        "lambda_at_bound_last60": at_bound,
        f"peak_to_peak_use_{top}_last60": (max(top_use) - min(top_use)) if top_use else None,
        "selected_step": sel.get("step"),
        "selected_phase": sel.get("phase"),
        "selected_eligible": sel.get("eligible"),
        f"selected_mean_{key}": selv.get("mean_quality"),
        f"phase1_end_mean_{key}": phase1[-1]["mean_quality"] if phase1 else None,
        f"selected_{zero}_{key}": selv.get("budgets", {}).get(zero, {}).get(key),
        f"before_training_{zero}_{key}": (report.get("initial") or {}).get("budgets", {}).get(zero, {}).get(key),
    }
    out |= _decompose(late, trace, phrases, targets)
    # the real-model criteria (conf/smollm2_bible_en_es.yaml): Phase 2 keeps calling
    after_first = vals2[1:]
    kept = [all(b["use"] >= 0.5 * b["target"] for b in v["budgets"].values()) for v in after_first]
    out["validations_after_first_with_every_use_ge_half_target"] = f"{sum(kept)} of {len(kept)}"
    out["last_phase2_max_deviation"] = vals2[-1]["max_deviation"] if vals2 else None
    res = [r["residual_abs_mean"] for r in trace if not r.get("warmup") and r.get("residual_abs_mean") is not None]
    out["mean_abs_residual_after_warmup"] = sum(res) / len(res) if res else None
    settled = report.get("settled")  # train.settle_probes (kdtw/settle.py): the last validation is after it
    if settled:
        first = settled["use"][0]  # the student as Phase 2 left it, on training prompts
        out["before_settling_max_deviation_on_training_prompts"] = max(
            abs(u - targets[k]) for k, u in enumerate(first) if u is not None)
        out["settling_shift"] = {phrases[k]: x for k, x in enumerate(settled["shift"]) if targets[k] > 0}
    second = "chrf" if key == "bleu" else None
    if second and vals2:
        order = sorted(range(len(targets)), key=lambda k: targets[k])
        last = vals2[-1]["budgets"]
        out[f"last_{second}_by_budget"] = {phrases[k]: last[phrases[k]].get(second) for k in order}
    return out


def _decompose(late: list[dict], trace: list[dict], phrases: list[str], targets: list[float],
               window: int = 20) -> dict:
    """Where a late validation's deviation use − b comes from, per nonzero budget (means over the
    late validations): ``train_minus_target`` = ē of the ``window`` training steps before it − b
    (how well the controller holds what it measures); ``val_pi_minus_train`` = the validation
    paths' mean π(<τ>) − that ē (greedy-token states against sampled ones); ``use_minus_val_pi``
    = the validation use (mean of per-sequence Σc/T, calls drawn) − its mean π(<τ>) (the draws
    and the per-sequence weighting)."""
    by_step = {r["step"]: r for r in trace}
    parts: dict[str, dict[str, list[float]]] = {n: {p: [] for p in phrases} for n in
                                                 ("train_minus_target", "val_pi_minus_train", "use_minus_val_pi")}
    for v in late:
        for k, p in enumerate(phrases):
            b = v["budgets"][p]
            if targets[k] == 0 or "tau_prob" not in b:
                continue
            e = [by_step[t]["expected"][k] for t in range(v["step"] - window + 1, v["step"] + 1)
                 if t in by_step and by_step[t]["expected"][k] is not None]
            parts["use_minus_val_pi"][p].append(b["use"] - b["tau_prob"])
            if e:
                parts["train_minus_target"][p].append(sum(e) / len(e) - targets[k])
                parts["val_pi_minus_train"][p].append(b["tau_prob"] - sum(e) / len(e))
    return {f"late_mean_{n}": {p: sum(x) / len(x) for p, x in d.items() if x} for n, d in parts.items()}


def _primary(report: dict) -> str:
    v = (report.get("initial") or report["validations"][0])["budgets"]
    first = next(iter(v.values()))
    for k in ("bleu", "rouge2"):
        if k in first:
            return k
    raise ValueError("no bleu or rouge2 column in the report")


def _bounds(report_path: str) -> tuple[float, float]:
    cfg_path = os.path.join(os.path.dirname(report_path), "config.yaml")
    lo, hi = -10.0, 20.0
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            train = (yaml.safe_load(f) or {}).get("train", {})
        lo, hi = float(train.get("lambda_min", lo)), float(train.get("lambda_max", hi))
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--from-step", type=int, default=500)
    ap.add_argument("--delta", type=float, default=0.03)
    ap.add_argument("--json", action="store_true", help="one JSON line per run only")
    a = ap.parse_args(argv)
    for path in a.reports:
        with open(path) as f:
            report = json.load(f)
        s = summarise(report, from_step=a.from_step, delta=a.delta, lam_bounds=_bounds(path))
        if a.json:
            print(json.dumps({"report": path, **s}))
            continue
        print(path)
        for k, v in s.items():
            if isinstance(v, dict):
                v = " ".join(f"{p}={x:.3f}" if isinstance(x, float) else f"{p}={x}" for p, x in v.items())
            elif isinstance(v, float):
                v = f"{v:.3f}"
            print(f"  {k:<34} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
