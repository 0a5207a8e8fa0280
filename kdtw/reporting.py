"""What both training loops (kdtw/local.py and jobs/train_pcl.py) do around the learner, once:
validation at every budget, the checkpoint-selection rule, the log lines, the per-step metrics
for MLflow, the λ-trace record, the export of the selected student (with its call thresholds),
report.json and the λ plot. The loops differ only in how they collect, learn and reach the teacher.
No Ray, no MLflow here."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .atomic import replace_dir, write_json_atomic
from .budgets import BudgetTable
from .config import Config
from .decoding import generate
from .examples import Example, spread
from .factory import budget_table
from .learner import StepStats
from .metrics import primary_metric, task_metrics
from .models import LM, Student

Log = Callable[[str], None]
# (student, prompts by budget, targets) -> calibrations per budget, or None to calibrate here
Calibrate = Callable[[Student, list, list], "list | None"]


# ----------------------------------------------------------------------------- validation


def validation_examples(cfg: Config, splits: dict[str, list[Example]]) -> list[Example]:
    """The examples both loops validate on: ``train.val_examples`` spread over the validation
    split (`kdtw.examples.spread`), all of it when null."""
    return spread(splits["validation"], cfg.train.val_examples)


def budget_prompts(cfg: Config, table: BudgetTable, examples: list[Example], budgets=None) -> list[list[str]]:
    """The prompts of ``examples`` at each budget of ``table`` (or of ``budgets``, rows of it)."""
    return [[table.prompt(b.phrase, cfg.task.instruction, ex.source) for ex in examples]
            for b in (table if budgets is None else budgets)]


@torch.no_grad()
def validate(cfg: Config, student: Student, teacher: LM, examples: list[Example], *, strict: bool = False,
             progress: Log | None = None) -> dict:
    """Budgeted decoding of ``examples`` at every budget with the configured call rule
    (``decoding.call_rule``; tokens greedy, call draws seeded by ``decoding.seed``): teacher
    use (mean of per-sequence Σc/T) and quality, plus the mean π(<τ>) along the paths.
    ``progress`` gets a line when a batch of prompts (``decoding.batch_size``) or a budget is
    decoded ``STATUS_EVERY_S`` or more after the start or the line before (a validation on SmolLM2
    takes 30-110 s on 2 cores, a budget up to 18 s; its table follows)."""
    t0 = time.perf_counter()
    pace = StatusPacer()
    table = budget_table(cfg)
    refs = [ex.target for ex in examples]
    key = primary_metric(cfg.task.metric)
    per = {}
    # Without <τ> (the DistillSpec drafter) every budget decodes the same way: the zero budget's
    # prompt once, and every checkpoint is eligible (there is no budget to hold).
    budgets = list(table) if cfg.train.use_tau else [min(table, key=lambda b: b.target)]
    rule = cfg.decoding.call_rule
    thresholds = None
    by_budget = budget_prompts(cfg, table, examples, budgets)
    if rule == "threshold" and cfg.train.use_tau:
        from .calibration import calibrate_thresholds

        thresholds = calibrate_thresholds(
            student, teacher, by_budget, [b.target for b in budgets], rule="threshold",
            max_new_tokens=cfg.decoding.max_new_tokens, batch_size=cfg.decoding.batch_size)
    for i, (b, prompts) in enumerate(zip(budgets, by_budget)):
        gen = torch.Generator().manual_seed(cfg.decoding.seed + i)

        def batch_done(done: int, total: int, i=i, b=b) -> None:
            if progress is not None and done < total and pace.due(0):
                progress(f"[validate] {b.phrase}: {done}/{total} prompts decoded, {i}/{len(budgets)} budgets "
                         f"done ({time.perf_counter() - t0:.0f}s)")

        out = generate(student, teacher, prompts, mode="budgeted" if cfg.train.use_tau else "student",
                       budgets=b.target, strict=strict, max_new_tokens=cfg.decoding.max_new_tokens,
                       batch_size=cfg.decoding.batch_size, call_rule=rule, generator=gen,
                       call_threshold=None if thresholds is None else thresholds[i], on_batch=batch_done)
        use = sum(out.teacher_use()) / len(out)
        n_tok = sum(len(p) for p in out.tau_prob)
        p_tau = sum(sum(p) for p in out.tau_prob) / n_tok if n_tok else 0.0
        per[b.phrase] = {"target": b.target, "use": use, "tau_prob": p_tau,
                         **task_metrics(cfg.task.metric, out.texts, refs)}
        if thresholds is not None:
            per[b.phrase]["threshold"] = thresholds[i]
        if progress is not None and i + 1 < len(budgets) and pace.due(i + 1):
            progress(f"[validate] {i + 1}/{len(budgets)} budgets decoded ({b.phrase}: use {use:.3f}, "
                     f"{key} {per[b.phrase][key]:.2f}; {time.perf_counter() - t0:.0f}s)")
    devs = [abs(v["use"] - v["target"]) for v in per.values()]
    quality = [v[key] for v in per.values()]
    return {
        "budgets": per,
        "max_deviation": max(devs),
        "eligible": max(devs) <= cfg.train.eligibility_delta,
        "mean_quality": sum(quality) / len(quality),
        "monotone": all(quality[i] <= quality[i + 1] + 1e-9 for i in range(len(quality) - 1)),
        "seconds": time.perf_counter() - t0,
    }


def format_validation(v: dict, key: str) -> str:
    lines = [f"  {'budget':<10}{'target':>8}{'use':>8}{'E[π]':>8}{key:>9}"]
    for phrase, r in v["budgets"].items():
        lines.append(f"  {phrase:<10}{r['target']:>8.2f}{r['use']:>8.3f}{r.get('tau_prob', float('nan')):>8.3f}"
                     f"{r[key]:>9.2f}")
    took = f"  ({v['seconds']:.1f} s)" if "seconds" in v else ""
    lines.append(f"  max |use-target| {v['max_deviation']:.3f}  eligible {v['eligible']}  mean {key} {v['mean_quality']:.2f}"
                 + took)
    return "\n".join(lines)


def _none(v: float) -> float | None:
    return None if v is None or math.isnan(v) else v


def trace_entry(step: int, st: StepStats) -> dict:
    """One λ-trace record of the report: λ, the controlled estimate's EMA, and per budget this
    step's expected (mean π(<τ>)), sampled and greedy use and the controller error."""
    return {"step": step, "lam": st.lam, "use_hat": [_none(u) for u in st.use_hat],
            "expected": [_none(v) for v in st.use_expected], "sampled": [_none(v) for v in st.use_sampled],
            "greedy": [_none(v) for v in st.use_greedy], "err": [_none(v) for v in st.lambda_err],
            "residual_abs_mean": _none(st.residual_abs_mean), "warmup": st.value_warmup}


def format_step(st: StepStats) -> str:
    """The Phase-2 log line's body: loss, |residual|, and per budget λ and expected use."""

    def row(vals: list[float]) -> str:
        return " ".join("  -  " if math.isnan(v) else f"{v:.2f}" for v in vals)

    warm = " (value warm-up)" if st.value_warmup else ""
    return (f"pcl loss {st.loss:.3f} |C| {st.residual_abs_mean:.3f}{warm} "
            f"λ [{' '.join(f'{x:.2f}' for x in st.lam)}] E[use] [{row(st.use_expected)}] "
            f"greedy [{row(st.use_greedy)}]")


# A long loop's status line is due every ``log_every`` steps and at most this long after the last
# line, whichever comes first: both loops and `kdtw pretrain` promise a line at least every 30 s.
# 20, not 30: the step that crosses the mark, and on Ray the log's way to the terminal (Phase 1's
# lines come through a queue), take the rest (at 30.0 the job's gaps were 30-31 s on a slower
# machine: run 13, docs/runs/default-async-2342c3c-seed0/).
STATUS_EVERY_S = 20.0


class StatusPacer:
    """When a loop's status line is due: at a multiple of ``every`` steps, at step ``last``, or
    ``seconds`` after the line before (``clock``'s seconds; the first is measured from the
    pacer's making); the time counts from the last step it said yes to. With ``every`` 0 and no
    ``last``, by time only (work whose end prints its own line: a validation's table)."""

    def __init__(self, every: int = 0, last: int | None = None, *, seconds: float | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.every, self.last, self.clock = every, last, clock
        self.seconds = STATUS_EVERY_S if seconds is None else seconds
        self._at = clock()

    def printed(self) -> None:
        """A line went out by other means (a settling round's own): the next is due ``seconds`` after now."""
        self._at = self.clock()

    def due(self, step: int) -> bool:
        now = self.clock()
        if (self.every and step % self.every == 0) or step == self.last or now - self._at >= self.seconds:
            self._at = now
            return True
        return False


# ----------------------------------------------------------------------------- selection


@dataclass
class LoopState:
    """What the loop tracks besides the learner (traces for the report and the plot)."""

    lam_trace: list[dict] = field(default_factory=list)
    validations: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    best: dict | None = None


def better(best: dict | None, v: dict) -> bool:
    """Checkpoint selection (DESIGN.md §5), the pure rule: the eligible checkpoint with the best
    mean task metric; until one is eligible, the one closest to eligibility."""
    return (
        best is None
        or (v["eligible"] and not best["eligible"])
        or (v["eligible"] and best["eligible"] and v["mean_quality"] > best["validation"]["mean_quality"])
        or (not v["eligible"] and not best["eligible"] and v["max_deviation"] < best["validation"]["max_deviation"])
    )


def record_validation(cfg: Config, state: LoopState, v: dict, title: str, *, step: int, phase: int, lam: list[float],
                      student: Student, log: Callable[[str], None], metrics: Callable | None = None) -> bool:
    """Both loops' handling of a validation: its table logged under ``title``, its figures handed
    to ``metrics`` (the job's MLflow tracker: ``metrics(dict, step=)``), and `consider`."""
    log(f"{title}:\n" + format_validation(v, primary_metric(cfg.task.metric)))
    if metrics is not None:
        metrics(validation_metrics(v), step=step)
    return consider(state, v, step=step, phase=phase, lam=lam, student=student, run_dir=cfg.run_dir)


def consider(state: LoopState, v: dict, *, step: int, phase: int, lam: list[float], student: Student,
             run_dir: str) -> bool:
    """Record validation ``v``; if `better`, save ``student`` as ``<run_dir>/candidate`` and make it
    the selection. True when it was selected."""
    state.validations.append({"phase": phase, "step": step, **v, "lam": list(lam)})
    if not better(state.best, v):
        return False
    d = os.path.join(run_dir, "candidate")
    student.save(d)
    state.best = {"phase": phase, "step": step, "eligible": v["eligible"], "validation": v, "dir": d}
    return True


# ----------------------------------------------------------------------------- per step


def step_metrics(st: StepStats, phrases: list[str]) -> dict[str, float]:
    """A learner step's figures under the names MLflow shows: per budget named by its phrase
    (``lambda/moderate``), nan (a budget with no row this step) left out."""
    out = {"loss": st.loss, "pcl/loss": st.loss, "pcl/residual_abs_mean": st.residual_abs_mean,
           "pcl/value_warmup": float(st.value_warmup), **st.extra}
    if st.rollout_use is not None:
        out["rollout/teacher_use"] = st.rollout_use
    for name in StepStats.PER_BUDGET:
        out |= {f"{name}/{p}": v for p, v in zip(phrases, st.per_budget(name)) if not math.isnan(v)}
    return out


def validation_metrics(v: dict) -> dict[str, float]:
    """A validation's figures under the names MLflow shows (``val/<budget>/use`` ...)."""
    out = {"val/max_deviation": v["max_deviation"], "val/mean_quality": v["mean_quality"],
           "val/eligible": float(v["eligible"])}
    for phrase, row in v["budgets"].items():
        for k, x in row.items():
            if k != "target":
                out[f"val/{phrase}/{k}"] = x
    return out


# ----------------------------------------------------------------------------- the end


def finish_run(cfg: Config, state: LoopState, table: BudgetTable, initial: dict | None, *, teacher: LM,
               val_set: list[Example], seconds: dict, log: Log = print, extra: dict | None = None,
               calibrate: Calibrate | None = None) -> dict:
    """The end of a run: the selected candidate becomes ``<run_dir>/student`` (with its call
    thresholds when ``train.export_thresholds``, calibrated by ``calibrate`` if given, else here
    against ``teacher``), ``report.json`` (plus ``extra``) and ``lambda_trace.png`` are written,
    and the selection is logged. Returns the report."""
    tc = cfg.train
    key = primary_metric(cfg.task.metric)
    best = state.best
    selected_dir = os.path.join(cfg.run_dir, "student")
    thresholds = None
    if best is not None:
        replace_dir(best["dir"], selected_dir)  # the candidate folder becomes the student, whole
        if tc.use_tau and tc.export_thresholds:
            thresholds = export_thresholds(cfg, table, teacher, selected_dir, val_set, log=log, calibrate=calibrate)
    report = run_report(cfg, initial, state, table, selected_dir, seconds=seconds)
    report["call_thresholds"] = thresholds
    report.update(extra or {})
    write_json_atomic(os.path.join(cfg.run_dir, "report.json"), report)
    try:
        plot_trace(report, os.path.join(cfg.run_dir, "lambda_trace.png"))
    except Exception as e:  # a plot must never lose the run
        log(f"[kdtw] could not draw the λ plot: {e}")
    if best is None:
        log("[kdtw] no checkpoint was validated: nothing selected")
    else:
        tag = "eligible" if best["eligible"] else f"NOT eligible (no checkpoint within δ={tc.eligibility_delta})"
        log(f"[kdtw] selected phase-{best['phase']} step {best['step']} ({tag}) -> {selected_dir}\n"
            + format_validation(best["validation"], key))
        log(f"[kdtw] to use it: kdtw report --student {selected_dir}, or kdtw decode --student {selected_dir} "
            f"--budget {table.phrases[min(2, len(table) - 1)]} (with this run's --config and overrides)")
    return report


def calibrate_export(cfg: Config, student: Student, teacher: LM, prompts: list[list[str]],
                     targets: list[float]) -> list:
    """`kdtw.calibration.calibrate_budgets` as the export runs it (``call_rule: threshold``)."""
    from .calibration import calibrate_budgets

    return calibrate_budgets(student, teacher, prompts, targets, rule="threshold",
                             max_new_tokens=cfg.decoding.max_new_tokens, batch_size=cfg.decoding.batch_size)


def export_thresholds(cfg: Config, table: BudgetTable, teacher: LM, folder: str, val_set: list[Example], *,
                      log: Log = print, calibrate: Calibrate | None = None) -> dict:
    """θ_k of ``call_rule: threshold`` for the exported student, calibrated on the validation
    examples (by ``calibrate(student, prompts, targets)`` if given: the Ray job runs
    `calibrate_export` on a teacher replica) and saved beside it (``call_thresholds.json``)."""
    from .calibration import save_thresholds

    t0 = time.perf_counter()
    student = Student.load(folder, dtype=cfg.student.dtype, device=cfg.student.device)
    prompts = budget_prompts(cfg, table, val_set)
    targets = list(table.targets)
    cal = calibrate(student, prompts, targets) if calibrate is not None else None
    if cal is None:
        cal = calibrate_export(cfg, student, teacher, prompts, targets)
    theta = {b.phrase: x.theta for b, x in zip(table, cal)}
    save_thresholds(folder, {"threshold": theta, "split": "validation", "n": len(val_set),
                             "use": {b.phrase: x.use for b, x in zip(table, cal)}})
    log(f"[kdtw] call thresholds θ_k (call_rule=threshold) calibrated on {len(val_set)} validation "
        f"examples in {time.perf_counter() - t0:.0f}s: " + " ".join(f"{p}={t:.3g}" for p, t in theta.items()))
    return {p: (None if math.isinf(t) else t) for p, t in theta.items()}


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
