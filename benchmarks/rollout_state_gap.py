"""Mean π(<τ>) along sampled rollouts against decoded paths, on the same training prompts.

    python benchmarks/rollout_state_gap.py --config conf/smollm2_bible_en_es.yaml \
        --student runs/smollm2-sys-seed0/candidate [--n 12] [--seed 0]

Phase 2's λ controller steers the expected teacher use of the paths it reads. Training's
rollouts sample their tokens (temperature ``train.rollout_temperature``, teacher tokens sampled
at calls); validation and deployment decode (argmax tokens, the teacher's argmax at calls,
``decoding.call_rule``). For each nonzero budget this prints the mean over paths of each path's
Σπ(<τ>|s_t)/T (and the realised use Σc/T) both ways on the same ``--n`` training prompts: where
they differ, a controller holding the rollouts on target holds validation off it, which is what
``train.decoded_per_budget`` (λ probes) corrects (issue 11).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from kdtw.config import load_config  # noqa: E402
from kdtw.decoding import generate  # noqa: E402
from kdtw.factory import budget_table, load_splits, load_teacher  # noqa: E402
from kdtw.models import Student  # noqa: E402


def mean_path(fractions: list[list[float]]) -> float:
    rows = [sum(p) / len(p) for p in fractions if p]
    return sum(rows) / len(rows) if rows else float("nan")


def measure(cfg, student: Student, teacher, examples: list, *, seed: int = 0) -> dict:
    """Per nonzero budget: {way: {"tau_prob": mean over paths of Σπ/T, "use": mean Σc/T}} for
    ``sampled`` (as training's rollouts) and ``decoded`` (as validation), on ``examples``."""
    table = budget_table(cfg)
    d, tc = cfg.decoding, cfg.train
    ways = {"sampled": dict(do_sample=True, temperature=tc.rollout_temperature, teacher_do_sample=True),
            "decoded": dict(do_sample=False, call_rule=d.call_rule)}
    res = {}
    for b in table:
        if b.target == 0:
            continue
        prompts = [table.prompt(b.phrase, cfg.task.instruction, ex.source) for ex in examples]
        res[b.phrase] = {"target": b.target}
        for way, kw in ways.items():
            out = generate(student, teacher, prompts, budgets=b.target, max_new_tokens=d.max_new_tokens,
                           batch_size=d.batch_size, generator=torch.Generator().manual_seed(seed + 1), **kw)
            res[b.phrase][way] = {"tau_prob": mean_path(out.tau_prob), "use": sum(out.teacher_use()) / len(out)}
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "conf", "default.yaml"))
    ap.add_argument("--student", required=True, help="a kdtw student folder (e.g. a run's student/ or candidate/)")
    ap.add_argument("--n", type=int, default=12, help="training prompts per budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    if not os.path.isdir(a.student):
        sys.exit(f"--student {a.student}: no such folder; give a run's student/ (or candidate/) folder")
    teacher = load_teacher(cfg)
    student = Student.load(a.student, dtype=cfg.student.dtype, device=cfg.student.device)
    rng = random.Random(a.seed)
    picks = [rng.choice(load_splits(cfg)["train"]) for _ in range(a.n)]
    t0 = time.perf_counter()
    res = measure(cfg, student, teacher, picks, seed=a.seed)
    print(f"{a.config}, student {a.student}, {a.n} training prompts per budget "
          f"({time.perf_counter() - t0:.0f} s); mean over paths of Σπ(<τ>)/T, realised Σc/T in brackets")
    print(f"   {'budget':10s} {'target':>6s}   {'sampled rollout':>16s}   "
          f"{'decoded (' + cfg.decoding.call_rule + ')':>22s}   gap (sampled − decoded)")
    for phrase, r in res.items():
        sa, de = r["sampled"], r["decoded"]
        print(f"   {phrase:10s} {r['target']:6.2f}   {sa['tau_prob']:.3f} ({sa['use']:.3f})   "
              f"{de['tau_prob']:>13.3f} ({de['use']:.3f})   {sa['tau_prob'] - de['tau_prob']:+.3f}")


if __name__ == "__main__":
    main()
