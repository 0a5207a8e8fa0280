"""Decoding wall-clock against the cost model, side by side in one run.

    python benchmarks/decode.py --config conf/default.yaml [--n 40] [key=value ...]

For each budget, budgeted decoding at batch size 1 with calls forced at exactly the budget's rate
(`strict` decoding with a large <τ> bias: a call wherever the running fraction allows one), and
speculative decoding with K = 1, 3, 5, 7. The cost-model ideal of a run is
``student_steps · t_s + teacher_forwards · t_t`` with t_s, t_t the measured times of one cached
single-token forward of each model (DESIGN.md §6); the ratio measured / ideal shows the
decoding loop's own overhead (goal ≤ 1.2 for budgeted decoding). Uses the pretrained default
models when they exist (`kdtw pretrain`), else random-init models of the same sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdtw.config import load_config  # noqa: E402
from kdtw.decoding import generate, speculative_generate  # noqa: E402
from kdtw.examples import spread  # noqa: E402
from kdtw.factory import budget_table, load_pair, load_splits, model_folder, prompts_for  # noqa: E402


def step_time(lm, prompt: str, steps: int = 30, repeats: int = 5) -> float:
    """Seconds of one cached single-token forward at batch size 1 (best of ``repeats``)."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            state = lm.start(*lm.encode_prompts([prompt]))
            x = torch.tensor([[lm.eos_id]], device=lm.device)
            lm.extend(state, x)
            t0 = time.perf_counter()
            for _ in range(steps):
                lm.extend(state, x)
            best = min(best, (time.perf_counter() - t0) / steps)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="conf/default.yaml")
    p.add_argument("--n", type=int, default=40, help="validation examples per setting")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    for role in ("teacher", "student"):
        spec = getattr(cfg, role)
        if spec.source == "pretrain" and not os.path.exists(os.path.join(model_folder(cfg, role), "config.json")):
            print(f"[bench] no pretrained {role}: using a random-init model of the same size")
            cfg = dataclasses.replace(cfg, **{role: dataclasses.replace(spec, source="init")})
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher, student = load_pair(cfg)
    table = budget_table(cfg)
    examples = spread(load_splits(cfg)["validation"], args.n)
    prompts = prompts_for(cfg, examples, table.phrases[0])
    t_s = step_time(student.lm, prompts[0])
    t_t = step_time(teacher, prompts[0])
    print(f"[bench] {len(prompts)} sequences, batch size 1; one cached forward: student {t_s * 1e3:.2f} ms, "
          f"teacher {t_t * 1e3:.2f} ms (c = {t_s / t_t:.3f})")
    max_new = cfg.decoding.max_new_tokens
    rows = []

    def record(method, setting, outs, wall):
        tokens = sum(len(t) for o in outs for t in o.tokens)
        s_steps = sum(sum(o.student_steps) for o in outs)
        t_fwd = sum(sum(o.teacher_forwards) for o in outs)
        use = sum(sum(sum(m) for m in o.call_mask) for o in outs) / max(tokens, 1)
        ideal = s_steps * t_s + t_fwd * t_t
        rows.append((method, setting, use, t_fwd / max(tokens, 1), wall, ideal, wall / ideal if ideal else float("nan")))

    # warm-up (allocator, first-call overheads)
    generate(student, teacher, prompts[:2], max_new_tokens=max_new, batch_size=1)
    for b in table:
        ps = prompts_for(cfg, examples, b.phrase)
        t0 = time.perf_counter()
        outs = [generate(student, teacher, [q], budgets=b.target, strict=True, tau_bias=1e4,
                         max_new_tokens=max_new, batch_size=1) for q in ps]
        record("budgeted", b.phrase, outs, time.perf_counter() - t0)
    for method, mode in (("student alone", "student"), ("teacher alone", "teacher")):
        t0 = time.perf_counter()
        outs = [generate(student, teacher, [q], mode=mode, max_new_tokens=max_new, batch_size=1) for q in prompts]
        record(method, "", outs, time.perf_counter() - t0)
    for k in (1, 3, 5, 7):
        t0 = time.perf_counter()
        outs = [speculative_generate(student, teacher, [q], k=k, max_new_tokens=max_new) for q in prompts]
        record("speculative", f"K={k}", outs, time.perf_counter() - t0)

    print(f"{'method':<15}{'setting':<10}{'use':>7}{'t.fwd/tok':>11}{'wall s':>9}{'ideal s':>9}{'wall/ideal':>12}")
    for m, s, use, fpt, wall, ideal, ratio in rows:
        print(f"{m:<15}{s:<10}{use:>7.3f}{fpt:>11.3f}{wall:>9.2f}{ideal:>9.2f}{ratio:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
