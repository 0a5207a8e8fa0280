"""How much of a validation's teacher-use deviation is the call draws, per call rule.

    python benchmarks/call_rule_noise.py --student runs/default-ff-seed0/student [--seeds 5]

Decodes the validation split at every nonzero budget with the trained student, as validation
does (tokens greedy, calls by the rule), once per draw seed for ``sample`` (independent draws
from π(<τ>|s)) and ``systematic`` (the same marginal draws, stratified along each sequence).
Per budget and rule it prints, over the seeds: the task's primary metric (mean and spread), the
mean and standard deviation of the validation use (DESIGN.md §1: the mean of per-sequence Σc/T) minus the target, the largest
|use − target| over the seeds, and the expected use along the decoded paths (the mean of
per-sequence Σπ(<τ>)/T) with its token-weighted counterpart (Σπ/ΣT, what a token-pooled λ
estimate steers). The ratio line compares the two rules' draw noise side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kdtw.config import load_config  # noqa: E402
from kdtw.decoding import generate  # noqa: E402
from kdtw.examples import spread  # noqa: E402
from kdtw.factory import budget_table, load_splits, load_teacher, prompts_for  # noqa: E402
from kdtw.metrics import primary_metric, task_metrics  # noqa: E402
from kdtw.models import Student  # noqa: E402

RULES = ("sample", "systematic")


def measure(cfg, student, teacher, examples, *, seeds: int) -> dict:
    table = budget_table(cfg)
    key = primary_metric(cfg.task.metric)
    refs = [ex.target for ex in examples]
    out: dict = {}
    for b in table:
        if b.target <= 0:
            continue
        prompts = prompts_for(cfg, examples, b.phrase)
        for rule in RULES:
            rows = []
            for s in range(seeds):
                d = generate(student, teacher, prompts, budgets=b.target, max_new_tokens=cfg.decoding.max_new_tokens,
                             batch_size=cfg.decoding.batch_size, call_rule=rule,
                             generator=torch.Generator().manual_seed(1000 * s + 7))
                use = d.teacher_use()
                rows.append({
                    "use": sum(use) / len(use),
                    "pi_seq": sum(sum(p) / len(p) for p in d.tau_prob) / len(d.tau_prob),
                    "pi_tok": sum(sum(p) for p in d.tau_prob) / sum(len(p) for p in d.tau_prob),
                    "quality": task_metrics(cfg.task.metric, d.texts, refs)[key],
                })
            dev = [r["use"] - b.target for r in rows]
            out.setdefault(b.phrase, {})[rule] = {
                "target": b.target,
                "mean_dev": statistics.fmean(dev),
                "std_dev": statistics.stdev(dev) if len(dev) > 1 else 0.0,
                "max_abs_dev": max(abs(x) for x in dev),
                "pi_seq": statistics.fmean(r["pi_seq"] for r in rows),
                "pi_tok": statistics.fmean(r["pi_tok"] for r in rows),
                "quality": statistics.fmean(r["quality"] for r in rows),
                "quality_std": statistics.stdev(r["quality"] for r in rows) if len(rows) > 1 else 0.0,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="conf/default.yaml")
    ap.add_argument("--student", required=True, help="a kdtw student folder (e.g. a run's student/)")
    ap.add_argument("--seeds", type=int, default=5, help="draw seeds per rule (at least 2)")
    ap.add_argument("--n", type=int, default=None, help="validation examples (default: the whole split)")
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    if a.seeds < 2:
        ap.error("--seeds must be at least 2 (the spread over seeds is the point)")
    if not os.path.isdir(a.student):
        ap.error(f"--student {a.student!r} is not a folder: give a kdtw student folder (a run's student/)")
    cfg = load_config(a.config, a.overrides)
    torch.manual_seed(0)
    teacher = load_teacher(cfg)
    student = Student.load(a.student)
    examples = load_splits(cfg)["validation"]
    examples = spread(examples, a.n or None)
    print(f"[call_rule_noise] {len(examples)} validation examples, {a.seeds} draw seeds per rule", flush=True)
    res = measure(cfg, student, teacher, examples, seeds=a.seeds)
    print(f"{'budget':10s} {'rule':11s} {'mean dev':>9s} {'std dev':>8s} {'max|dev|':>9s} {'π seq':>7s} {'π tok':>7s} "
          f"{'quality':>8s} {'± std':>6s}")
    for phrase, by_rule in res.items():
        for rule, r in by_rule.items():
            print(f"{phrase:10s} {rule:11s} {r['mean_dev']:+9.4f} {r['std_dev']:8.4f} {r['max_abs_dev']:9.4f} "
                  f"{r['pi_seq']:7.4f} {r['pi_tok']:7.4f} {r['quality']:8.2f} {r['quality_std']:6.2f}")
    ratio = [by["sample"]["std_dev"] / max(by["systematic"]["std_dev"], 1e-6) for by in res.values()]
    print("std of the validation use over draw seeds, sample / systematic, per budget: "
          + " ".join(f"{p}={x:.1f}" for p, x in zip(res, ratio)))
    if a.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
