"""The single-process training loop: Phase 1 (behaviour cloning with the KL oracle), then
Phase 2 (PCL with a Lagrangian per budget), validation at every budget, checkpoint selection,
export of the selected student, and a JSON report. Synchronous: collect → score → learn → λ.

This is both the debugger and the reference the Ray loop is compared with (same objects, same
math): `run_local(cfg)` or `kdtw train --local --config conf/default.yaml`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .budgets import BudgetTable
from .buffer import ReplayBuffer
from .config import Config
from .data import Example
from .decoding import generate
from .factory import budget_table, load_pair, load_splits
from .learner import Learner
from .metrics import primary_metric, task_metrics
from .models import LM, Student
from .rollout import prompt_ids, sample_tasks, student_rollouts, teacher_demos
from .trajectory import Trajectory

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(cfg: Config, student: Student, teacher: LM, examples: list[Example], *, strict: bool = False) -> dict:
    """Greedy budgeted decoding of ``examples`` at every budget: teacher use and quality."""
    table = budget_table(cfg)
    refs = [ex.target for ex in examples]
    key = primary_metric(cfg.task.metric)
    per = {}
    # Without <τ> (the DistillSpec drafter) every budget decodes the same way: the zero budget's
    # prompt once, and every checkpoint is eligible (there is no budget to hold).
    budgets = list(table) if cfg.train.use_tau else [min(table, key=lambda b: b.target)]
    for b in budgets:
        prompts = [table.prompt(b.phrase, cfg.task.instruction, ex.source) for ex in examples]
        out = generate(student, teacher, prompts, mode="budgeted" if cfg.train.use_tau else "student",
                       budgets=b.target, strict=strict, max_new_tokens=cfg.decoding.max_new_tokens,
                       batch_size=cfg.decoding.batch_size)
        use = sum(out.teacher_use()) / len(out)
        per[b.phrase] = {"target": b.target, "use": use, **task_metrics(cfg.task.metric, out.texts, refs)}
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
    lines = [f"  {'budget':<10}{'target':>8}{'use':>8}{key:>9}"]
    for phrase, r in v["budgets"].items():
        lines.append(f"  {phrase:<10}{r['target']:>8.2f}{r['use']:>8.3f}{r[key]:>9.2f}")
    lines.append(f"  max |use-target| {v['max_deviation']:.3f}  eligible {v['eligible']}  mean {key} {v['mean_quality']:.2f}")
    return "\n".join(lines)


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
        """On-policy student paths and teacher demonstrations for one learner step."""
        c, tc = self.cfg, self.cfg.train
        n_demo = round(tc.batch_size * tc.demo_ratio)
        n_on = tc.batch_size - n_demo
        prompts, bids, _ = sample_tasks(self.train_set, self.table, n_on, self.rng, c.task.instruction)
        trajs, _ = student_rollouts(
            self.student, self.teacher, prompts, bids, max_new_tokens=c.decoding.max_new_tokens,
            use_tau=tc.use_tau, temperature=tc.rollout_temperature, batch_size=c.decoding.batch_size,
            generator=self.gen, version=self.learner.version,
        )
        demos: list[Trajectory] = []
        if n_demo:
            d_prompts, d_bids, _ = sample_tasks(self.train_set, self.table, n_demo, self.rng, c.task.instruction)
            demos = teacher_demos(self.teacher, d_prompts, d_bids, max_new_tokens=c.decoding.max_new_tokens,
                                  batch_size=c.decoding.batch_size, generator=self.gen, version=self.learner.version)
        return trajs, demos

    def learn(self, trajs: list[Trajectory], demos: list[Trajectory]) -> dict[str, float]:
        self.buffer.add(trajs + demos)
        batch = self.buffer.sample(self.cfg.train.batch_size, current_version=self.learner.version,
                                   take_newest=self.cfg.train.max_staleness == 0)
        m = self.learner.pcl_step(batch)
        self.learner.version += 1
        m.update(self.learner.observe_use(trajs))
        m["rollout/teacher_use"] = sum(t.teacher_use for t in trajs) / max(len(trajs), 1)
        return m

    # -- the run

    def run(self) -> dict:
        c, tc, log = self.cfg, self.cfg.train, self.log
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
        if tc.phase2_lr is not None:
            self.learner.set_lr(tc.phase2_lr)
        for step in range(tc.phase2_steps):
            trajs, demos = self.collect()
            m = self.learn(trajs, demos)
            self.state.losses.append(m["pcl/loss"])
            self.state.lam_trace.append({"step": step + 1, "lam": self.learner.lam.tolist(),
                                         "use_hat": self.learner.use_hat.tolist()})
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.phase2_steps:
                el = time.perf_counter() - t2
                lam = " ".join(f"{x:.2f}" for x in self.learner.lam.tolist())
                use = " ".join(f"{x:.2f}" for x in self.learner.use_hat.tolist())
                log(f"[phase 2] step {step + 1}/{tc.phase2_steps} pcl loss {m['pcl/loss']:.3f} "
                    f"λ [{lam}] ĉ [{use}] ({el:.0f}s, eta {el / (step + 1) * (tc.phase2_steps - step - 1):.0f}s)")
            if (step + 1) % tc.validate_every == 0 or step + 1 == tc.phase2_steps:
                v = validate(c, self.student, self.teacher, self.val_set)
                log(f"[validate] phase-2 step {step + 1}:\n" + format_validation(v, key))
                self._consider(v, step=step + 1, phase=2)
        phase2_seconds = time.perf_counter() - t2

        best = self.state.best
        selected_dir = os.path.join(c.run_dir, "student")
        if best is not None:
            shutil.rmtree(selected_dir, ignore_errors=True)
            os.replace(best["dir"], selected_dir)
        report = run_report(c, initial, self.state, self.table, selected_dir, seconds={
            "phase1": phase1_seconds, "phase2": phase2_seconds, "total": time.perf_counter() - t_start})
        with open(os.path.join(c.run_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
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
    """λ_k and the rollout estimate ĉ_k over Phase-2 steps, with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = report["lambda_trace"]
    if not tr:
        return
    steps = [r["step"] for r in tr]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    vals = [v for v in report["validations"] if v["phase"] == 2]
    for k, phrase in enumerate(report["phrases"]):
        a1.plot(steps, [r["lam"][k] for r in tr], label=phrase)
        color = a2.plot(steps, [r["use_hat"][k] for r in tr], label=phrase)[0].get_color()
        a2.axhline(report["targets"][k], color=color, ls=":", lw=1)
        a2.plot([v["step"] for v in vals], [v["budgets"][phrase]["use"] for v in vals], "o", ms=4, color=color)
    a1.set(title="λ per budget", xlabel="phase-2 step", ylabel="λ")
    a2.set(title="teacher use: ĉ (lines), validation (dots), target (dotted)",
           xlabel="phase-2 step", ylabel="fraction")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_local(cfg: Config, *, log: Log = print) -> dict:
    return LocalLoop(cfg, log=log).run()
