"""The quality-latency frontier: budgeted decoding against its baselines (DESIGN.md §6).

``evaluate_frontier`` decodes one split, in one process and one sitting, with

- the student alone (``<τ>`` masked) and the teacher alone,
- budgeted decoding at every budget of the config's table, plain and ``strict``, with the
  configured call rule (``decoding.call_rule``; family ``budgeted`` / ``budgeted_strict``),
- budgeted decoding with each other learned call rule (DESIGN.md §5 revision; families
  ``budgeted_argmax``, ``budgeted_sample``, ``budgeted_systematic``, ``budgeted_threshold``):
  ``argmax`` <τ>, a draw from π(<τ>|s) (``sample``, seeded), the same draws stratified along each
  sequence (``systematic``, seeded), or π(<τ>|s) ≥ θ_k (``threshold``),
- the oracle caller (family ``oracle``, issue 11): the same student and teacher, calls placed
  where KL(π̃(·|s) ‖ p(·|s)) ≥ θ_k (DESIGN.md §4's score on the decoder's own state): the
  quality a caller can reach at that call rate,
- speculative decoding (SD) with each block size K, greedy and sampled,

and returns one row per method × setting with the task metrics, teacher forwards per output
token, the teacher-use fraction (DESIGN.md §1; for SD the share of tokens the teacher's own
correction or bonus token produced), the cost-model latency per output token
``(Σ student_steps · c + Σ teacher_forwards) / Σ tokens`` in teacher-forward units, and the
measured wall-clock seconds per sequence. Budgeted and oracle rows carry ``call_rule`` (and
``call_threshold`` for the threshold and oracle rules; empty for "never call").

Thresholds. θ_k of the ``threshold`` and ``oracle`` rules come from the student's
``call_thresholds.json`` when it has one for every budget (``thresholds=``, kdtw/calibration.py),
otherwise they are calibrated here on the VALIDATION split (``calib_n`` of its examples, `kdtw.examples.spread`), never
on the split being evaluated unless that is validation, so that each budget's use is b_k there
(kdtw/calibration.py). ``info["call_thresholds"]`` records them, where they came from and the use
they gave on validation. Calibration decodes greedily (``decoding.do_sample`` does not apply to
it) and costs up to 9 decodes of those examples per budget and rule (fewer where it converges):
on a large model, bound it with ``calib_n`` (`kdtw eval --calib-n`) or save the thresholds.

The oracle runs the teacher at every step, so its real cost is the teacher's; its
``caller_latency_per_token`` (``(Σ student_steps · c + Σ calls) / Σ tokens``: what a caller
placing those calls would cost) is where the plot puts it. It is left out of the batch-1 timing.

Prompts. Budgeted rows use their own budget phrase. The student, the teacher and SD all read the
phrase of the smallest budget (by default the zero budget, "With no teacher use, ..."), so SD
greedy and the teacher alone see the same input and must give the same output (column
``same_as_teacher``: the share of outputs identical to the teacher's).

Timing. ``c`` (the student/teacher time of one cached decoding step) is measured at the start of
the run on one prompt (batch 1): the cost model charges each sequence as if decoded alone, which
is how SD runs. Budgeted, student and teacher rows decode in batches of
``cfg.decoding.batch_size``, so their ``wall_s_per_seq`` is batch wall time / sequences; SD runs
one sequence at a time. For a like-for-like wall-clock comparison the batch decoders are decoded
again at batch size 1 on the first ``B1_EXAMPLES`` (20) examples only (to bound the time), giving
``wall_s_per_seq_b1``; for SD rows ``wall_s_per_seq_b1`` is its own ``wall_s_per_seq`` (already
batch 1, over all examples). The batch-1 runs are for timing only; their outputs are not scored.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .calibration import Calibration, calibrate_budgets, thresholds_for
from .config import Config
from .decoding import DRAWN_RULES, DecodeOutput, forward_time_ratio, generate, speculative_generate
from .examples import spread
from .factory import budget_table, load_splits, prompts_for
from .metrics import cost_model_latency, primary_metric, task_metrics, teacher_use_fraction
from .models import LM, TAU_TOKEN, ModelError, Student, check_tokenizers

# Call rules a trained student decodes with (kdtw/decoding.py); the oracle is evaluation only.
LEARNED_RULES = ("argmax", "sample", "systematic", "threshold")
# Method families, in plotting order. `budgeted` / `budgeted_strict` use the configured call rule;
# `budgeted_<rule>` the other learned rules; `oracle` the KL oracle caller.
FAMILIES = ("student", "teacher", "budgeted", "budgeted_strict", *(f"budgeted_{r}" for r in LEARNED_RULES),
            "oracle", "sd_greedy", "sd_sampling")
BUDGETED = ("budgeted", "budgeted_strict")
LEARNED = (*BUDGETED, *(f"budgeted_{r}" for r in LEARNED_RULES))
ORACLE = "oracle"
# Task-metric columns (kdtw.metrics.task_metrics gives bleu/chrf or rouge1/rouge2/rougeL).
QUALITY = ("bleu", "chrf", "rouge1", "rouge2", "rougeL")
# Examples decoded again at batch size 1 for the wall-clock column `wall_s_per_seq_b1`.
B1_EXAMPLES = 20
# Teacher-use level under which the verdict reports the closed student→teacher gap.
LOW_USE = 0.10
# Quality differences below this count as equal in the verdict (metrics are on a 0-100 scale).
EQUAL_TOL = 0.005

_STYLE = {  # family -> (marker, colour, label)
    "student": ("s", "tab:gray", "student alone"),
    "teacher": ("*", "black", "teacher alone"),
    "budgeted": ("o", "tab:blue", "budgeted"),
    "budgeted_strict": ("D", "tab:cyan", "budgeted strict"),
    "budgeted_argmax": ("o", "tab:purple", "budgeted, argmax rule"),
    "budgeted_sample": ("P", "tab:olive", "budgeted, sample rule"),
    "budgeted_systematic": ("*", "tab:pink", "budgeted, systematic rule"),
    "budgeted_threshold": ("X", "tab:brown", "budgeted, threshold rule"),
    "oracle": ("p", "tab:green", "oracle caller (x: cost of its calls)"),
    "sd_greedy": ("^", "tab:red", "SD greedy"),
    "sd_sampling": ("v", "tab:orange", "SD sampling"),
}


@dataclass
class EvalResult:
    """Rows (one per method × setting), the measured cost ratio ``c`` and the verdict."""

    rows: list[dict]
    c: float
    verdict: str
    info: dict = field(default_factory=dict)  # split, n, primary metric, ks, ...

    @property
    def columns(self) -> list[str]:
        cols: list[str] = []
        for row in self.rows:
            cols.extend(k for k in row if k not in cols)
        return cols

    def row(self, method: str, setting: str = "") -> dict:
        for r in self.rows:
            if r["method"] == method and r["setting"] == setting:
                return r
        raise KeyError(f"no row {method}/{setting}")

    def metrics(self) -> dict[str, float]:
        """Flat ``method/setting/column -> value`` (``method/column`` where the setting is
        empty) for every finite numeric measurement, plus ``c``."""
        skip = {"method", "setting", "phrase", "k", "do_sample", "target", "n"}
        out: dict[str, float] = {"c": float(self.c)}
        for r in self.rows:
            prefix = f"{r['method']}/{r['setting']}" if r["setting"] else r["method"]
            for key, value in r.items():
                if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    out[f"{prefix}/{key}"] = float(value)
        return out

    def to_csv(self, path: str | os.PathLike) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: "" if v is None else v for k, v in r.items()})

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump({"c": self.c, "verdict": self.verdict, "info": self.info, "rows": self.rows}, f, indent=2)

    def plot(self, path: str | os.PathLike) -> None:
        """Quality (the primary metric) against cost-model latency per token (left) and measured
        wall-clock per sequence at batch size 1 (right); each family's Pareto frontier as steps."""
        plot_frontier(self.rows, path, primary=self.info.get("primary", _guess_primary(self.rows)),
                      title=self._title())

    def _title(self) -> str:
        i = self.info
        return f"{i.get('split', '?')} split, n={i.get('n', '?')}, c={self.c:.3f}"


# ----------------------------------------------------------------------------- evaluation


def check_inputs(teacher: LM, student: Any, drafter: Any) -> None:
    """Raise ModelError (a ValueError) when the student has no usable <τ> or a tokenizer
    differs from the teacher's."""
    if not isinstance(student, Student):
        raise ModelError(
            f"the student is a {type(student).__name__}, not a kdtw Student: it has no {TAU_TOKEN} "
            "action, so budgeted decoding cannot call the teacher; pass a student folder "
            "(Student.load) or wrap the model with kdtw.models.make_student"
        )
    tau = getattr(student, "tau_id", None)
    rows = student.lm.model.get_output_embeddings().weight.shape[0]
    if not isinstance(tau, int) or not student.vocab_size <= tau < rows:
        raise ModelError(
            f"the student's {TAU_TOKEN} id is {tau!r}: it must be an output row past the "
            f"vocabulary ({student.vocab_size} <= tau_id < {rows}); load the student with "
            "Student.load or build it with kdtw.models.make_student"
        )
    vocab = student.lm.tokenizer.get_vocab()
    if TAU_TOKEN in vocab and vocab[TAU_TOKEN] != tau:
        raise ModelError(
            f"the student's tokenizer maps {TAU_TOKEN} to {vocab[TAU_TOKEN]} but tau_id is {tau}"
        )
    check_tokenizers(teacher.tokenizer, student.lm.tokenizer)
    if drafter is not None:
        d_lm = drafter.lm if isinstance(drafter, Student) else drafter
        if not isinstance(d_lm, LM):
            raise ModelError(f"the drafter is a {type(drafter).__name__}; pass a kdtw LM or Student")
        try:
            check_tokenizers(teacher.tokenizer, d_lm.tokenizer)
        except ModelError as e:
            raise ModelError(
                "the drafter's tokenizer differs from the teacher's, so speculative decoding "
                f"cannot verify its tokens: {e}"
            ) from None


def _seeded(device: torch.device, seed: int) -> torch.Generator:
    """A seeded CPU generator; kdtw.decoding draws samples on the generator's device, so it
    seeds decoding on an accelerator too."""
    return torch.Generator().manual_seed(seed)


def _base_row(method: str, setting: str, *, phrase: str, target=None, k=None, do_sample=False,
              call_rule: str | None = None, call_threshold: float | None = None) -> dict:
    # an infinite threshold ("never call") is stored as None: CSV and JSON hold no infinity
    theta = None if call_threshold is None or math.isinf(call_threshold) else float(call_threshold)
    return {"method": method, "setting": setting, "phrase": phrase, "target": target, "k": k,
            "do_sample": do_sample, "call_rule": call_rule, "call_threshold": theta}


def _measure(row: dict, out: DecodeOutput, refs: list[str], *, kind: str, c: float,
             teacher_texts: list[str] | None) -> dict:
    tokens = sum(out.lengths)
    steps, fwd = sum(out.student_steps), sum(out.teacher_forwards)
    use = teacher_use_fraction(out.call_mask)
    scores = task_metrics(kind, out.texts, refs)
    row.update({"n": len(out), **scores})
    row.update({
        "teacher_forwards_per_token": fwd / tokens,
        "teacher_use": use,
        "adherence": abs(use - row["target"]) if row["target"] is not None else None,
        "cost_latency_per_token": float(cost_model_latency(steps, fwd, c)) / tokens,
        # what a caller placing these calls would cost (the oracle's own teacher runs every step)
        "caller_latency_per_token": (
            float(cost_model_latency(steps, sum(sum(m) for m in out.call_mask), c)) / tokens
            if row.get("call_rule") else None
        ),
        "student_steps_per_token": steps / tokens,
        "tokens_per_seq": tokens / len(out),
        "wall_s_per_seq": out.wall_time / len(out),
        "wall_s_per_seq_b1": None,
        "acceptance_rate": out.extra.get("acceptance_rate"),
        "same_as_teacher": (
            sum(a == b for a, b in zip(out.texts, teacher_texts)) / len(out) if teacher_texts else None
        ),
    })
    return row


def _fmt(row: dict) -> str:
    q = " ".join(f"{m}={row[m]:.2f}" for m in QUALITY if m in row)
    head = f"{row['method']:<20}{row['setting']:<10}"
    tgt = f" (target {row['target']:.2f}, |Δ|={row['adherence']:.3f})" if row["target"] is not None else ""
    b1 = row["wall_s_per_seq_b1"]
    return (f"{head}{q}  use={row['teacher_use']:.3f}{tgt}  fwd/tok={row['teacher_forwards_per_token']:.3f}"
            f"  lat/tok={row['cost_latency_per_token']:.3f}  wall/seq={row['wall_s_per_seq']:.4f}s"
            + (f" (b1 {b1:.4f}s)" if b1 is not None else ""))


def resolve_call_rules(call_rule: str, call_rules: Sequence[str] | None) -> list[str]:
    """The learned call rules to decode: ``call_rule`` (the configured one, family ``budgeted``)
    first, then the others of ``call_rules`` (default: all of LEARNED_RULES). Raises ValueError
    naming the known rules for an unknown one."""
    if call_rule not in LEARNED_RULES:
        hint = (" (the oracle is an evaluation ceiling, not a decoder: it is its own row)"
                if call_rule == ORACLE else "")
        raise ValueError(f"call rule {call_rule!r}: use one of {', '.join(LEARNED_RULES)}{hint}")
    wanted = list(LEARNED_RULES if call_rules is None else call_rules)
    for r in wanted:
        if r == ORACLE:
            raise ValueError("'oracle' is not a learned call rule: the oracle row is on by default "
                             "(evaluate_frontier(oracle=False) or kdtw eval --no-oracle turns it off)")
        if r not in LEARNED_RULES:
            raise ValueError(f"unknown call rule {r!r}: use a subset of {', '.join(LEARNED_RULES)}")
    return [call_rule] + [r for r in LEARNED_RULES if r in wanted and r != call_rule]


def evaluate_frontier(
    cfg: Config,
    teacher: LM,
    student: Student,
    drafter: Student | LM | None,
    *,
    split: str = "validation",
    n: int | None = None,
    ks: Sequence[int] = (1, 2, 3, 5, 7),
    call_rule: str | None = None,
    call_rules: Sequence[str] | None = None,
    oracle: bool = True,
    thresholds: dict | None = None,
    calib_n: int | None = None,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Decode ``split`` (``n`` examples spread over it, `kdtw.examples.spread`; all when None) with every method and setting
    and return the rows, ``c`` and the verdict. ``drafter`` None: the student with <τ> masked.

    ``call_rule``: the rule of the ``budgeted`` family (None: ``decoding.call_rule`` where the
    config has it, else "argmax"); ``call_rules``: the learned rules to report (default all
    three; each other than ``call_rule`` is a ``budgeted_<rule>`` family); ``oracle``: add the
    oracle caller's rows. ``thresholds``: a loaded call_thresholds.json (kdtw/calibration.py);
    a rule it does not cover for every budget is calibrated on the validation split's first
    ``calib_n`` examples (None: ``n``)."""
    check_inputs(teacher, student, drafter)
    if call_rule is None:
        call_rule = getattr(cfg.decoding, "call_rule", "argmax")
    rules = resolve_call_rules(call_rule, call_rules)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks={ks}: give at least one speculative block size K >= 1")
    if n is not None and n < 0:
        raise ValueError(f"n={n}: give the number of examples to evaluate (>= 1), or None for all")
    if calib_n is not None and calib_n < 1:
        raise ValueError(f"calib_n={calib_n}: give the number of validation examples to calibrate on (>= 1)")
    splits = load_splits(cfg)
    if split not in splits:
        raise ValueError(f"split {split!r} does not exist; the task has {sorted(splits)}")
    examples = spread(splits[split], n)
    if not examples:
        raise ValueError(
            f"split {split!r} is empty{'' if n is None else f' (n={n})'}: nothing to evaluate; "
            f"use a split with examples (for a generated task set task.n_{split} >= 1)"
        )
    drafter = student if drafter is None else drafter
    table = budget_table(cfg)
    d = cfg.decoding
    kind = cfg.task.metric
    primary = primary_metric(kind)
    refs = [ex.target for ex in examples]
    n_b1 = min(B1_EXAMPLES, len(examples))
    base_phrase = min(table, key=lambda b: b.target).phrase  # the zero budget by default
    sample_seed = getattr(d, "seed", cfg.seed)

    c = forward_time_ratio(student, teacher, prompts_for(cfg, examples[:1], base_phrase))
    log(f"[eval] {split}: {len(examples)} examples, {primary} primary; c = {c:.3f} "
        f"(student/teacher step time, batch 1); batch-1 timing on {n_b1} examples; call rules "
        f"{', '.join(rules)} (budgeted = {call_rule}){', oracle' if oracle else ''}")

    scored = [r for r in rules if r == "threshold"] + ([ORACLE] if oracle else [])
    theta, calib_info = _call_thresholds(
        cfg, student, teacher, splits, table, scored, thresholds,
        calib_n=calib_n if calib_n is not None else n, log=log)

    def decode(mode: str, prompts: list[str], *, target=None, strict=False, batch_size=d.batch_size,
               rule="argmax", threshold=None):
        sampled = d.do_sample or rule in DRAWN_RULES
        return generate(
            student if mode != "teacher" else None, teacher if mode != "student" else None, prompts,
            mode=mode, budgets=target, max_new_tokens=d.max_new_tokens, do_sample=d.do_sample,
            temperature=d.temperature, teacher_do_sample=d.teacher_do_sample, strict=strict,
            batch_size=batch_size, generator=_seeded(teacher.device, sample_seed) if sampled else None,
            call_rule=rule, call_threshold=threshold,
        )

    rows: list[dict] = []
    teacher_texts: list[str] | None = None

    def batch_row(row: dict, mode: str, prompts: list[str], *, strict: bool = False, b1: bool = True) -> None:
        nonlocal teacher_texts
        rule = row["call_rule"] or "argmax"
        th = theta[rule][row["phrase"]] if rule in theta else None
        out = decode(mode, prompts, target=row["target"], strict=strict, rule=rule, threshold=th)
        _measure(row, out, refs, kind=kind, c=c, teacher_texts=teacher_texts)
        if b1:
            b1_out = decode(mode, prompts[:n_b1], target=row["target"], strict=strict, batch_size=1,
                            rule=rule, threshold=th)
            row["wall_s_per_seq_b1"] = b1_out.wall_time / len(b1_out)
        if mode == "teacher":
            teacher_texts = out.texts
            row["same_as_teacher"] = 1.0
        rows.append(row)
        log(_fmt(row))

    def budget_rows(method: str, rule: str, *, strict: bool = False, b1: bool = True) -> None:
        for b in table:
            th = theta[rule][b.phrase] if rule in theta else None
            row = _base_row(method, b.phrase, phrase=b.phrase, target=b.target, call_rule=rule,
                            call_threshold=th)
            batch_row(row, "budgeted", prompts_for(cfg, examples, b.phrase), strict=strict, b1=b1)

    base_prompts = prompts_for(cfg, examples, base_phrase)
    batch_row(_base_row("teacher", "", phrase=base_phrase), "teacher", base_prompts)
    batch_row(_base_row("student", "", phrase=base_phrase), "student", base_prompts)
    budget_rows("budgeted", call_rule)
    budget_rows("budgeted_strict", call_rule, strict=True)
    for rule in rules[1:]:
        budget_rows(f"budgeted_{rule}", rule)
    if oracle:
        budget_rows(ORACLE, ORACLE, b1=False)  # its wall clock is the teacher's: not a caller's
    for do_sample in (False, True):
        for k in ks:
            row = _base_row("sd_sampling" if do_sample else "sd_greedy", f"k{k}", phrase=base_phrase, k=k,
                            do_sample=do_sample)
            out = speculative_generate(
                drafter, teacher, base_prompts, k=k, max_new_tokens=d.max_new_tokens, do_sample=do_sample,
                generator=_seeded(teacher.device, cfg.seed) if do_sample else None,
            )
            _measure(row, out, refs, kind=kind, c=c, teacher_texts=teacher_texts)
            row["wall_s_per_seq_b1"] = row["wall_s_per_seq"]
            rows.append(row)
            log(_fmt(row))

    info = {"split": split, "n": len(examples), "primary": primary,
            "quality": [m for m in QUALITY if m in rows[0]], "ks": ks, "b1_examples": n_b1,
            "prompt_phrase": base_phrase, "max_new_tokens": d.max_new_tokens, "batch_size": d.batch_size,
            "call_rule": call_rule, "call_rules": rules, "oracle": oracle, "call_thresholds": calib_info}
    verdict = frontier_verdict(rows, primary=primary, c=c)
    log("[eval] verdict: " + verdict)
    return EvalResult(rows=rows, c=c, verdict=verdict, info=info)


def _call_thresholds(cfg: Config, student: Student, teacher: LM, splits: dict, table, rules: Sequence[str],
                     saved: dict | None, *, calib_n: int | None,
                     log: Callable[[str], None]) -> tuple[dict[str, dict[str, float]], dict]:
    """θ per rule and budget phrase for the threshold/oracle ``rules``: from ``saved`` (a loaded
    call_thresholds.json) where it covers every budget, else calibrated on validation. Returns
    the thresholds and a JSON-safe record (``save_thresholds`` format plus where each came from
    and the validation use it gave)."""
    phrases = table.phrases
    theta: dict[str, dict[str, float]] = {}
    record: dict[str, Any] = {"source": {}, "validation_use": {}}
    todo = []
    for rule in rules:
        got = thresholds_for(saved, rule, phrases)
        if got is None:
            todo.append(rule)
        else:
            theta[rule] = dict(zip(phrases, got))
            record["source"][rule] = "call_thresholds.json"
    if todo:
        val = splits.get("validation") or []
        val = spread(val, calib_n)
        if not val:
            raise ValueError(
                f"the {' and '.join(todo)} call rule needs thresholds calibrated on the validation "
                "split, which is empty or missing: give the task a validation split, save "
                "call_thresholds.json with the student (kdtw.calibration.save_thresholds), or leave "
                "the rule out (kdtw eval --call-rules argmax,sample --no-oracle)"
            )
        d = cfg.decoding
        for rule in todo:
            cal: list[Calibration] = calibrate_budgets(
                student, teacher, [prompts_for(cfg, val, p) for p in phrases], table.targets, rule=rule,
                max_new_tokens=d.max_new_tokens, batch_size=d.batch_size)
            theta[rule] = {p: c.theta for p, c in zip(phrases, cal)}
            record["source"][rule] = f"calibrated on validation (first {len(val)} examples)"
            record["validation_use"][rule] = {p: c.use for p, c in zip(phrases, cal)}
            log(f"[eval] {rule} thresholds calibrated on {len(val)} validation examples: " + ", ".join(
                f"{p} θ={c.theta:.4g} (use {c.use:.3f}, {c.decodes} decodes)" for p, c in zip(phrases, cal)))
    for rule, tab in theta.items():
        record[rule] = {p: (None if math.isinf(v) else v) for p, v in tab.items()}
    record["split"] = "validation" if todo else (saved or {}).get("split", "validation")
    record["n"] = len(val) if todo else (saved or {}).get("n")
    return theta, record


# ----------------------------------------------------------------------------- frontier


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (latency, quality) not dominated by a point at lower-or-equal latency with higher
    or equal quality; sorted by latency, quality strictly increasing."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _label(row: dict) -> str:
    m = row["method"]
    if m in BUDGETED:
        return f"{'strict ' if m == 'budgeted_strict' else ''}budget '{row['setting']}'"
    if m in LEARNED:
        return f"budget '{row['setting']}' ({m[len('budgeted_'):]} rule)"
    if m == ORACLE:
        return f"oracle '{row['setting']}'"
    return f"{m} {row['setting']}".strip()


def frontier_verdict(rows: Sequence[dict], *, primary: str, c: float | None = None,
                     low_use: float = LOW_USE, tol: float = EQUAL_TOL) -> str:
    """A paragraph computed from the rows: budgeted frontier (the configured call rule, plain and
    strict together) against SD greedy on cost-model latency; the best budgeted quality below
    SD's cost floor (teacher forwards per token < 1/(max K + 1)); the student→teacher gap closed
    at teacher use < low_use by the configured rule, by each other learned call rule and by the
    oracle caller, and "learned caller / oracle caller", the ratio of the gaps they close."""
    lat, fwd = "cost_latency_per_token", "teacher_forwards_per_token"
    bud = [r for r in rows if r["method"] in BUDGETED]
    sd = sorted((r for r in rows if r["method"] == "sd_greedy"), key=lambda r: r["k"])
    out: list[str] = []
    unit = "teacher-forward units per output token" + (f", one student step = c = {c:.3f}" if c is not None else "")
    out.append(f"Quality is {primary}; latency is the cost model in {unit}; quality differences "
               f"under {tol} count as equal.")
    if not bud or not sd:
        out.append("There are no " + ("budgeted" if not bud else "greedy speculative") +
                   " rows, so the frontiers cannot be compared.")
    else:
        out.extend(_sd_sentences(bud, sd, primary=primary, tol=tol, lat=lat, fwd=fwd))
    out.extend(_gap_sentences(rows, primary=primary, low_use=low_use, tol=tol))
    return " ".join(out)


def _sd_sentences(bud: list[dict], sd: list[dict], *, primary: str, tol: float, lat: str, fwd: str) -> list[str]:
    out: list[str] = []
    wins = 0
    parts = []
    for s in sd:
        head = f"SD K={s['k']} ({s[lat]:.3f}, {s[primary]:.2f})"
        cand = [b for b in bud if b[lat] <= s[lat]]
        if not cand:
            parts.append(f"{head}: no budgeted point is as fast")
            continue
        best = max(cand, key=lambda b: b[primary])
        diff = best[primary] - s[primary]
        if diff >= -tol:
            wins += 1
        rel = "equal" if abs(diff) <= tol else f"{abs(diff):.2f} {'above' if diff > 0 else 'below'}"
        parts.append(f"{head}: best budgeted point at latency <= {s[lat]:.3f} is {_label(best)} "
                     f"({best[lat]:.3f}, {best[primary]:.2f}), {rel}")
    out.append("Budgeted (plain and strict) against greedy speculative decoding, as (latency, "
               f"{primary}): " + "; ".join(parts) + ".")
    out.append(f"A budgeted point with latency <= and {primary} >= the SD point exists for {wins} "
               f"of {len(sd)} SD block sizes.")

    k_max = max(s["k"] for s in sd)
    floor = 1.0 / (k_max + 1)
    below = [b for b in bud if b[fwd] < floor]
    floor_txt = (f"SD's cost floor (fewer than 1/({k_max}+1) = {floor:.3f} teacher forwards per output "
                 f"token, which SD with K <= {k_max} cannot reach)")
    if below:
        best = max(below, key=lambda b: b[primary])
        out.append(f"Below {floor_txt}, the best budgeted point is {_label(best)} with {primary} "
                   f"{best[primary]:.2f} at {best[fwd]:.3f} forwards per token.")
    else:
        out.append(f"No budgeted point is below {floor_txt}.")
    return out


def _best_below(rows: Sequence[dict], methods: Sequence[str], *, primary: str, low_use: float) -> dict | None:
    low = [r for r in rows if r["method"] in methods and r["teacher_use"] < low_use]
    return max(low, key=lambda r: r[primary]) if low else None


def _gap_sentences(rows: Sequence[dict], *, primary: str, low_use: float, tol: float) -> list[str]:
    """The student→teacher gap closed below ``low_use`` teacher use: share = (q − q_student) /
    (q_teacher − q_student) of the best point below it, per caller; learned / oracle ratio."""
    use = "teacher_use"
    stu = next((r for r in rows if r["method"] == "student"), None)
    tea = next((r for r in rows if r["method"] == "teacher"), None)
    no_ratio = (["The oracle caller's rows are reported, but without a gap there is no learned "
                 "caller / oracle caller ratio."] if any(r["method"] == ORACLE for r in rows) else [])
    if stu is None or tea is None:
        return ["Student-alone or teacher-alone rows are missing, so the closed gap is undefined.", *no_ratio]
    sq, tq = stu[primary], tea[primary]
    gap = tq - sq
    ends = f"student alone {sq:.2f}, teacher alone {tq:.2f}"
    if gap <= tol:
        return [f"The student alone is not below the teacher alone ({ends}), so there is no "
                "student-to-teacher gap to close.", *no_ratio]

    def closed(best: dict) -> float:
        return (best[primary] - sq) / gap

    def share(frac: float) -> str:
        return "none" if frac < 0 else f"{100 * frac:.0f}%"

    out: list[str] = []
    best = _best_below(rows, BUDGETED, primary=primary, low_use=low_use)
    rule = next((r.get("call_rule") for r in rows if r["method"] in BUDGETED and r.get("call_rule")), None)
    learned = closed(best) if best is not None else None
    if best is None and any(r["method"] in BUDGETED for r in rows):
        out.append(f"No budgeted point keeps teacher use below {low_use:.2f}, so no gap closure is "
                   f"reported ({ends}).")
    elif best is not None:
        what = (f"the best budgeted point with teacher use below {low_use:.2f} is {_label(best)} "
                f"(use {best[use]:.3f}, {primary} {best[primary]:.2f}; {ends})")
        if learned < 0:
            out.append(f"Closing the gap: {what}; it is below the student alone and closes none of "
                       "the student-to-teacher gap.")
        else:
            out.append(f"Closing the gap: {what}; it closes {100 * learned:.0f}% of the "
                       "student-to-teacher gap.")

    others: dict[str, float | None] = {}
    parts = []
    for fam in LEARNED[len(BUDGETED):]:
        if not any(r["method"] == fam for r in rows):
            continue
        name = fam[len("budgeted_"):]
        b = _best_below(rows, (fam,), primary=primary, low_use=low_use)
        others[name] = closed(b) if b is not None else None
        parts.append(f"{name} rule: no point below {low_use:.2f}" if b is None else
                     f"{name} rule closes {share(closed(b))} ({_label(b)}, use {b[use]:.3f}, "
                     f"{primary} {b[primary]:.2f})")
    if parts:
        out.append(f"Other learned call rules, best point below {low_use:.2f} teacher use: "
                   + "; ".join(parts) + ".")

    if not any(r["method"] == ORACLE for r in rows):
        out.append("No oracle caller rows (evaluated without the oracle), so there is no "
                   "learned caller / oracle caller ratio.")
        return out
    ob = _best_below(rows, (ORACLE,), primary=primary, low_use=low_use)
    head = ("The oracle caller (calls where KL(π̃ ‖ p) ≥ θ_k, θ_k calibrated per budget on validation; "
            "the quality a caller reaches at that call rate)")
    if ob is None:
        out.append(f"{head} has no point below {low_use:.2f} teacher use, so there is no learned "
                   "caller / oracle caller ratio.")
        return out
    oracle = closed(ob)
    out.append(f"{head}: its best point below {low_use:.2f} teacher use is {_label(ob)} (use "
               f"{ob[use]:.3f}, {primary} {ob[primary]:.2f}); it closes {share(oracle)} of the gap.")
    if oracle * gap <= tol:
        out.append("The oracle caller closes none of the gap there, so learned caller / oracle "
                   "caller is undefined.")
        return out
    ratios = []
    if learned is not None:
        ratios.append(f"{learned / oracle:.2f} ({'the configured ' + rule + ' rule' if rule else 'budgeted'}, "
                      f"{share(learned)} / {share(oracle)})")
    ratios.extend(f"{v / oracle:.2f} ({k} rule)" for k, v in others.items() if v is not None)
    if ratios:
        out.append(f"Learned caller / oracle caller below {low_use:.2f} teacher use (share of the gap "
                   "closed): " + "; ".join(ratios) + ".")
    else:
        out.append("No learned caller has a point below that use, so learned caller / oracle caller "
                   "is undefined.")
    return out


# ----------------------------------------------------------------------------- plot


def _guess_primary(rows: Sequence[dict]) -> str:
    return "bleu" if rows and "bleu" in rows[0] else "rouge2"


def plot_frontier(rows: Sequence[dict], path: str | os.PathLike, *, primary: str, title: str = "") -> None:
    """Write a two-panel PNG (see EvalResult.plot). Uses the Agg canvas, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    panels = (
        ("cost_latency_per_token", "cost-model latency per output token (teacher forwards)"),
        ("wall_s_per_seq_b1", "wall-clock seconds per sequence (batch size 1)"),
    )
    rule = next((r.get("call_rule") for r in rows if r["method"] in BUDGETED and r.get("call_rule")), None)
    for ax, (col, xlabel) in zip(axes, panels):
        for fam in FAMILIES:
            # the oracle's own cost is the teacher's at every step: plot the cost of its calls
            xcol = "caller_latency_per_token" if fam == ORACLE and col == "cost_latency_per_token" else col
            pts = [(r[xcol], r[primary], r) for r in rows if r["method"] == fam and r.get(xcol) is not None]
            if not pts:
                continue
            marker, colour, label = _STYLE[fam]
            if fam in BUDGETED and rule:
                label = f"{label} ({rule} rule)"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour,
                       label=label, zorder=3, s=60 if fam == "teacher" else 30)
            front = pareto_front([(x, y) for x, y, _ in pts])
            if len(front) > 1:
                ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=colour,
                        alpha=0.6, zorder=2)
            for x, y, r in pts:
                if r["setting"]:
                    ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=(3, 3),
                                fontsize=6, color=colour)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    sd_ks = [r["k"] for r in rows if r["method"] in ("sd_greedy", "sd_sampling")]
    if sd_ks:
        k_max = max(sd_ks)
        axes[0].axvline(1.0 / (k_max + 1), linestyle=":", color="tab:red",
                        label=f"SD floor 1/(K+1), K={k_max} (teacher forwards only)")
    axes[0].set_ylabel(primary)
    axes[0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(f"{primary} against latency ({title})")
    fig.savefig(os.fspath(path), dpi=120)
