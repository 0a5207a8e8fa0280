"""The single-process training loop: Phase 1 (behaviour cloning with the KL oracle), then
Phase 2 (PCL with a Lagrangian per budget), validation at every budget, checkpoint selection,
export of the selected student, and a JSON report. Synchronous: collect → score → learn → λ.

This is both the debugger and the reference the Ray loop is compared with (same objects, same
math): `run_local(cfg)` or `kdtw train --local --config conf/default.yaml`.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .budgets import BudgetTable
from .atomic import replace_dir, write_json_atomic
from .buffer import ReplayBuffer
from .config import Config, check_writable_dir
from .decoding import generate
from .examples import Example
from .factory import budget_table, load_pair, load_splits
from .learner import Learner
from .metrics import primary_metric, task_metrics
from .models import LM, Student
from .rollout import collect, demo_generator, prompt_ids, sample_tasks, teacher_demos
from .trajectory import Trajectory

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(cfg: Config, student: Student, teacher: LM, examples: list[Example], *, strict: bool = False) -> dict:
    """Budgeted decoding of ``examples`` at every budget with the configured call rule
    (``decoding.call_rule``; tokens greedy, call draws seeded by ``decoding.seed``): teacher
    use (mean of per-sequence Σc/T) and quality, plus the mean π(<τ>) along the paths."""
    table = budget_table(cfg)
    refs = [ex.target for ex in examples]
    key = primary_metric(cfg.task.metric)
    per = {}
    # Without <τ> (the DistillSpec drafter) every budget decodes the same way: the zero budget's
    # prompt once, and every checkpoint is eligible (there is no budget to hold).
    budgets = list(table) if cfg.train.use_tau else [min(table, key=lambda b: b.target)]
    rule = cfg.decoding.call_rule
    thresholds = None
    if rule == "threshold" and cfg.train.use_tau:
        from .calibration import calibrate_thresholds

        thresholds = calibrate_thresholds(
            student, teacher, [[table.prompt(b.phrase, cfg.task.instruction, ex.source) for ex in examples]
                               for b in budgets], [b.target for b in budgets], rule="threshold",
            max_new_tokens=cfg.decoding.max_new_tokens, batch_size=cfg.decoding.batch_size)
    for i, b in enumerate(budgets):
        prompts = [table.prompt(b.phrase, cfg.task.instruction, ex.source) for ex in examples]
        gen = torch.Generator().manual_seed(cfg.decoding.seed + i)
        out = generate(student, teacher, prompts, mode="budgeted" if cfg.train.use_tau else "student",
                       budgets=b.target, strict=strict, max_new_tokens=cfg.decoding.max_new_tokens,
                       batch_size=cfg.decoding.batch_size, call_rule=rule, generator=gen,
                       call_threshold=None if thresholds is None else thresholds[i])
        use = sum(out.teacher_use()) / len(out)
        n_tok = sum(len(p) for p in out.tau_prob)
        p_tau = sum(sum(p) for p in out.tau_prob) / n_tok if n_tok else 0.0
        per[b.phrase] = {"target": b.target, "use": use, "tau_prob": p_tau,
                         **task_metrics(cfg.task.metric, out.texts, refs)}
        if thresholds is not None:
            per[b.phrase]["threshold"] = thresholds[i]
    devs = [abs(v["use"] - v["target"]) for v in per.values()]
    quality = [v[key] for v in per.values()]
    return {
        "budgets": per,
        "max_deviation": max(devs),
        "eligible": max(devs) <= cfg.train.eligibility_delta,
        "mean_quality": sum(quality) / len(quality),
        "monotone": all(quality[i] <= quality[i + 1] + 1e-9 for i in range(len(quality) - 1)),
    }


def format_validation(v: dict, key: str) -> str:
    lines = [f"  {'budget':<10}{'target':>8}{'use':>8}{'E[π]':>8}{key:>9}"]
    for phrase, r in v["budgets"].items():
        lines.append(f"  {phrase:<10}{r['target']:>8.2f}{r['use']:>8.3f}{r.get('tau_prob', float('nan')):>8.3f}"
                     f"{r[key]:>9.2f}")
    lines.append(f"  max |use-target| {v['max_deviation']:.3f}  eligible {v['eligible']}  mean {key} {v['mean_quality']:.2f}")
    return "\n".join(lines)


def trace_entry(step: int, m: dict[str, float], lam: list[float], use_hat: list[float]) -> dict:
    """One λ-trace record of the report: λ, the controlled estimate's EMA, and per budget this
    step's expected (mean π(<τ>)), sampled and greedy use and the controller error."""
    K = len(lam)

    def col(name: str) -> list[float | None]:
        vals = [m.get(f"{name}/{k}") for k in range(K)]
        return [None if v is None or math.isnan(v) else v for v in vals]

    return {"step": step, "lam": lam, "use_hat": [None if math.isnan(u) else u for u in use_hat],
            "expected": col("use_expected"), "sampled": col("use_sampled"), "greedy": col("use_greedy"),
            "err": col("lambda_err"), "residual_abs_mean": m.get("pcl/residual_abs_mean"),
            "warmup": bool(m.get("pcl/value_warmup", 0.0))}


def format_step(m: dict[str, float], lam: list[float]) -> str:
    """The Phase-2 log line's body: loss, |residual|, and per budget λ and expected use."""
    K = len(lam)

    def row(name: str) -> str:
        vals = [m.get(f"{name}/{k}", float("nan")) for k in range(K)]
        return " ".join("  -  " if math.isnan(v) else f"{v:.2f}" for v in vals)

    warm = " (value warm-up)" if m.get("pcl/value_warmup") else ""
    return (f"pcl loss {m['pcl/loss']:.3f} |C| {m.get('pcl/residual_abs_mean', float('nan')):.3f}{warm} "
            f"λ [{' '.join(f'{x:.2f}' for x in lam)}] E[use] [{row('use_expected')}] "
            f"greedy [{row('use_greedy')}]")


# ----------------------------------------------------------------------------- batches


def reference_paths(student: Student, prompts: list[str], budget_ids: list[int], targets: list[str]) -> list[Trajectory]:
    """Reference targets as Phase-1 paths (train.bc_targets=reference)."""
    lm = student.lm
    src = prompt_ids(lm, prompts)
    out = []
    for i, t in enumerate(targets):
        toks = list(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) + [lm.eos_id]
        out.append(Trajectory(source_ids=src[i], budget_id=budget_ids[i], tokens=toks,
                              actions_tau=[False] * len(toks), behaviour_logp=[0.0] * len(toks),
                              teacher_logp=[0.0] * len(toks), origin="teacher_demo"))
    return out


@dataclass
class LoopState:
    """What the loop tracks besides the learner (traces for the report and the plot)."""

    lam_trace: list[dict] = field(default_factory=list)
    validations: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    best: dict | None = None


class LocalLoop:
    """Synchronous reference loop. ``collect`` and ``learn`` are separate so the Ray loop can be
    compared with it step by step (the same rollout, scoring and learner objects)."""

    def __init__(self, cfg: Config, *, teacher: LM | None = None, student: Student | None = None, log: Log = print):
        self.cfg = cfg
        self.log = log
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.demo_gen = demo_generator(cfg.seed)
        if teacher is None or student is None:
            teacher, student = load_pair(cfg)
        self.teacher, self.student = teacher, student
        self.table: BudgetTable = budget_table(cfg)
        splits = load_splits(cfg)
        self.train_set = splits["train"]
        self.val_set = splits["validation"][: cfg.train.val_examples or None]
        self.learner = Learner(student, targets=self.table.targets, train_cfg=cfg.train)
        tc = cfg.train
        self.buffer = ReplayBuffer(capacity_tokens=tc.buffer_tokens, demo_ratio=tc.demo_ratio,
                                   max_staleness=tc.max_staleness, batch_size=tc.batch_size, seed=cfg.seed)
        self.state = LoopState()

    # -- phases

    def phase1_batch(self) -> list[Trajectory]:
        c = self.cfg
        prompts, bids, picks = sample_tasks(self.train_set, self.table, c.train.batch_size, self.rng,
                                            c.task.instruction)
        if c.train.bc_targets == "reference":
            return reference_paths(self.student, prompts, bids, [ex.target for ex in picks])
        return teacher_demos(self.teacher, prompts, bids, max_new_tokens=c.decoding.max_new_tokens,
                             batch_size=c.decoding.batch_size, generator=self.gen)

    def collect(self) -> tuple[list[Trajectory], list[Trajectory]]:
        """On-policy student paths and teacher demonstrations for one learner step
        (`kdtw.rollout.collect`, the collector a Ray rollout worker runs too)."""
        return collect(self.cfg, self.student, self.teacher, self.train_set, self.table, rng=self.rng, gen=self.gen,
                       demo_gen=self.demo_gen, version=self.learner.version)

    def learn(self, trajs: list[Trajectory], demos: list[Trajectory]) -> dict[str, float]:
        self.buffer.add(trajs + demos)
        batch = self.buffer.sample(self.cfg.train.batch_size, current_version=self.learner.version,
                                   take_newest=self.cfg.train.max_staleness == 0)
        m = self.learner.learn(batch, trajs)
        m["rollout/teacher_use"] = sum(t.teacher_use for t in trajs) / max(len(trajs), 1)
        return m

    # -- the run

    def run(self) -> dict:
        c, tc, log = self.cfg, self.cfg.train, self.log
        check_writable_dir(c.run_dir, "run_dir")  # `kdtw train --local` checks before loading models
        os.makedirs(c.run_dir, exist_ok=True)
        c.save(os.path.join(c.run_dir, "config.yaml"))
        key = primary_metric(c.task.metric)
        t_start = time.perf_counter()

        log(f"[kdtw] teacher {self.teacher.num_parameters() / 1e6:.2f}M, student "
            f"{self.student.lm.num_parameters() / 1e6:.2f}M parameters; {len(self.table)} budgets; "
            f"{len(self.val_set)} validation examples")
        initial = validate(c, self.student, self.teacher, self.val_set)
        log("[kdtw] before training (greedy, validation):\n" + format_validation(initial, key))

        t1 = time.perf_counter()
        for step in range(tc.phase1_steps):
            m = self.learner.bc_step(self.teacher, self.phase1_batch())
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.phase1_steps:
                el = time.perf_counter() - t1
                log(f"[phase 1] step {step + 1}/{tc.phase1_steps} bc loss {m['bc/loss']:.3f} "
                    f"call-nll {m['bc/call_nll']:.3f} kl {m['bc/kl']:.3f} "
                    f"({el:.0f}s, eta {el / (step + 1) * (tc.phase1_steps - step - 1):.0f}s)")
        phase1_seconds = time.perf_counter() - t1
        if tc.phase1_steps:
            v = validate(c, self.student, self.teacher, self.val_set)
            log("[phase 1] done:\n" + format_validation(v, key))
            self._consider(v, step=0, phase=1)

        t2 = time.perf_counter()
        self.learner.start_phase2()
        for step in range(tc.phase2_steps):
            trajs, demos = self.collect()
            m = self.learn(trajs, demos)
            self.state.losses.append(m["pcl/loss"])
            self.state.lam_trace.append(trace_entry(step + 1, m, self.learner.lam.tolist(),
                                                    self.learner.use_hat.tolist()))
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.phase2_steps:
                el = time.perf_counter() - t2
                log(f"[phase 2] step {step + 1}/{tc.phase2_steps} " + format_step(m, self.learner.lam.tolist())
                    + f" ({el:.0f}s, eta {el / (step + 1) * (tc.phase2_steps - step - 1):.0f}s)")
            if (step + 1) % tc.validate_every == 0 or step + 1 == tc.phase2_steps:
                v = validate(c, self.student, self.teacher, self.val_set)
                log(f"[validate] phase-2 step {step + 1}:\n" + format_validation(v, key))
                self._consider(v, step=step + 1, phase=2)
        phase2_seconds = time.perf_counter() - t2

        best = self.state.best
        selected_dir = os.path.join(c.run_dir, "student")
        thresholds = None
        if best is not None:
            replace_dir(best["dir"], selected_dir)
            if tc.use_tau and tc.export_thresholds:
                thresholds = self._export_thresholds(selected_dir)
        report = run_report(c, initial, self.state, self.table, selected_dir, seconds={
            "phase1": phase1_seconds, "phase2": phase2_seconds, "total": time.perf_counter() - t_start})
        report["call_thresholds"] = thresholds
        write_json_atomic(os.path.join(c.run_dir, "report.json"), report)
        try:
            plot_trace(report, os.path.join(c.run_dir, "lambda_trace.png"))
        except Exception as e:  # a plot must never lose the run
            log(f"[kdtw] could not draw the λ plot: {e}")
        if best is None:
            log("[kdtw] no checkpoint was validated: nothing selected")
        else:
            tag = "eligible" if best["eligible"] else f"NOT eligible (no checkpoint within δ={tc.eligibility_delta})"
            log(f"[kdtw] selected phase-{best['phase']} step {best['step']} ({tag}) -> {selected_dir}\n"
                + format_validation(best["validation"], key))
        return report

    def _export_thresholds(self, folder: str) -> dict:
        """θ_k of ``call_rule: threshold`` for the exported student, calibrated on the
        validation examples and saved beside it (``call_thresholds.json``)."""
        from .calibration import calibrate_budgets, save_thresholds

        c = self.cfg
        t0 = time.perf_counter()
        student = Student.load(folder, dtype=c.student.dtype, device=c.student.device)
        prompts = [[self.table.prompt(b.phrase, c.task.instruction, ex.source) for ex in self.val_set]
                   for b in self.table]
        cal = calibrate_budgets(student, self.teacher, prompts, self.table.targets, rule="threshold",
                                max_new_tokens=c.decoding.max_new_tokens, batch_size=c.decoding.batch_size)
        theta = {b.phrase: x.theta for b, x in zip(self.table, cal)}
        save_thresholds(folder, {"threshold": theta, "split": "validation", "n": len(self.val_set),
                                 "use": {b.phrase: x.use for b, x in zip(self.table, cal)}})
        self.log(f"[kdtw] call thresholds θ_k (call_rule=threshold) calibrated on {len(self.val_set)} validation "
                 f"examples in {time.perf_counter() - t0:.0f}s: "
                 + " ".join(f"{p}={t:.3g}" for p, t in theta.items()))
        return {p: (None if math.isinf(t) else t) for p, t in theta.items()}

    def _consider(self, v: dict, *, step: int, phase: int) -> None:
        """Checkpoint selection (DESIGN.md §5): the eligible checkpoint with the best mean task
        metric; until one is eligible, the one closest to eligibility."""
        self.state.validations.append({"phase": phase, "step": step, **v,
                                       "lam": self.learner.lam.tolist()})
        best = self.state.best
        better = (
            best is None
            or (v["eligible"] and not best["eligible"])
            or (v["eligible"] and best["eligible"] and v["mean_quality"] > best["validation"]["mean_quality"])
            or (not v["eligible"] and not best["eligible"] and v["max_deviation"] < best["validation"]["max_deviation"])
        )
        if not better:
            return
        d = os.path.join(self.cfg.run_dir, "candidate")
        self.student.save(d)
        self.state.best = {"phase": phase, "step": step, "eligible": v["eligible"], "validation": v, "dir": d}


def run_report(cfg: Config, initial: dict | None, state: LoopState, table: BudgetTable, selected_dir: str,
               *, seconds: dict) -> dict:
    """The report.json of a training run (the local loop and jobs/train_pcl.py)."""
    best = state.best
    return {
        "config": cfg.name,
        "initial": initial,
        "selected": None if best is None else {k: v for k, v in best.items() if k != "dir"},
        "selected_dir": selected_dir if best is not None else None,
        "validations": state.validations,
        "lambda_trace": state.lam_trace,
        "phrases": table.phrases,
        "targets": table.targets,
        "seconds": seconds,
    }


def plot_trace(report: dict, path: str) -> None:
    """Over Phase-2 steps, per budget: λ_k (left); the controlled expected use E[π(<τ>)] (solid,
    a 20-step running mean), the greedy use (dashed), validation use (dots) and the target
    (dotted) (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tr = report["lambda_trace"]
    if not tr:
        return
    steps = np.array([r["step"] for r in tr])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    vals = [v for v in report["validations"] if v["phase"] == 2]

    def series(key: str, k: int) -> np.ndarray:
        x = np.array([np.nan if r.get(key) is None or r[key][k] is None else r[key][k] for r in tr], dtype=float)
        ok = ~np.isnan(x)
        out = np.full_like(x, np.nan)
        if ok.any():  # running mean over the last 20 observed steps
            xs, idx = x[ok], np.flatnonzero(ok)
            c = np.cumsum(np.insert(xs, 0, 0.0))
            n = np.minimum(np.arange(1, len(xs) + 1), 20)
            out[idx] = (c[1:] - c[np.arange(1, len(xs) + 1) - n]) / n
        return out

    for k, phrase in enumerate(report["phrases"]):
        if report["targets"][k] == 0:
            continue  # masked, not controlled
        a1.plot(steps, [r["lam"][k] for r in tr], label=phrase)
        key = "expected" if "expected" in tr[0] else "use_hat"
        color = a2.plot(steps, series(key, k), label=phrase)[0].get_color()
        if "greedy" in tr[0]:
            a2.plot(steps, series("greedy", k), ls="--", lw=0.8, color=color)
        a2.axhline(report["targets"][k], color=color, ls=":", lw=1)
        a2.plot([v["step"] for v in vals], [v["budgets"][phrase]["use"] for v in vals], "o", ms=4, color=color)
    a1.set(title="λ per budget", xlabel="phase-2 step", ylabel="λ")
    a2.set(title="teacher use: E[π(<τ>)] (solid), greedy (dashed), validation (dots), target (dotted)",
           xlabel="phase-2 step", ylabel="fraction")
    a2.title.set_fontsize(9)
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_local(cfg: Config, *, log: Log = print) -> dict:
    return LocalLoop(cfg, log=log).run()
