"""Task metrics (BLEU, chrF, ROUGE), the teacher-use fraction and the latency cost model.

Task metrics are corpus scores on a 0-100 scale with one reference per hypothesis. The
teacher-use fraction follows DESIGN.md §1: Σ_t c_t / T per sequence, EOS counted in T, then the
mean over sequences; every report, λ update and checkpoint choice uses this one definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Task kind or metric-set name -> metric set.
_METRIC_SETS = {
    "toy_translation": "translation",
    "translation": "translation",
    "toy_summarisation": "summarisation",
    "summarisation": "summarisation",
    "summarization": "summarisation",
}
_PRIMARY = {"translation": "bleu", "summarisation": "rouge2"}


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(
            f"{len(hyps)} hypotheses but {len(refs)} references; pass one reference per "
            "hypothesis"
        )
    if len(hyps) == 0:
        raise ValueError("no hypotheses: a metric over an empty set is undefined")
    for name, texts in (("hypothesis", hyps), ("reference", refs)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"{name} {i} is {type(text).__name__}, not str: decode first")


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 4-grams), 0-100."""
    import sacrebleu

    _check_pairs(hyps, refs)
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, β = 2), 0-100."""
    import sacrebleu

    _check_pairs(hyps, refs)
    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)


def rouge(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 × 100 (rouge_score, no stemming; its tokenizer lowercases and drops
    non-alphanumerics)."""
    from rouge_score import rouge_scorer

    _check_pairs(hyps, refs)
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=False)
    totals = dict.fromkeys(keys, 0.0)
    for hyp, ref in zip(hyps, refs):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for key in keys:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(hyps) for key, total in totals.items()}


def _metric_set(kind: str) -> str:
    if kind not in _METRIC_SETS:
        raise ValueError(
            f"unknown task kind or metric set {kind!r}; use one of {sorted(_METRIC_SETS)} "
            "(for task.kind=datasets, set task.metric)"
        )
    return _METRIC_SETS[kind]


def task_metrics(kind: str, hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """{"bleu", "chrf"} for translation-like kinds, {"rouge1", "rouge2", "rougeL"} for
    summarisation-like ones."""
    if _metric_set(kind) == "translation":
        return {"bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs)}
    return rouge(hyps, refs)


def primary_metric(kind: str) -> str:
    """The metric that selects checkpoints: "bleu" or "rouge2"."""
    return _PRIMARY[_metric_set(kind)]


# ----------------------------------------------------------------------------- teacher use


def _rows(call_mask: Any, lengths: Any) -> list[list[bool]]:
    """The valid part of each sequence's call mask ([B, T] list, array or tensor)."""
    if hasattr(call_mask, "tolist"):  # torch.Tensor or np.ndarray, without importing torch
        if getattr(call_mask, "ndim", 2) != 2:
            raise ValueError(f"call_mask must be [B, T]; got shape {tuple(call_mask.shape)}")
        call_mask = call_mask.tolist()
    rows = [list(row) for row in call_mask]
    if not rows:
        raise ValueError("call_mask is empty: no sequences to average over")
    if lengths is not None:
        lengths = lengths.tolist() if hasattr(lengths, "tolist") else list(lengths)
        if len(lengths) != len(rows):
            raise ValueError(f"{len(rows)} call-mask rows but {len(lengths)} lengths")
        for i, (row, n) in enumerate(zip(rows, lengths)):
            if not 0 <= int(n) <= len(row):
                raise ValueError(f"lengths[{i}]={n} is outside 0..{len(row)} (the mask width)")
        rows = [row[: int(n)] for row, n in zip(rows, lengths)]
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(
                f"sequence {i} has length 0; T counts the EOS token, so every sequence has T >= 1"
            )
    return rows


def per_sequence_teacher_use(call_mask: Any, lengths: Any = None) -> list[float]:
    """Σ_t c_t / T for each sequence; `call_mask` [B, T] of bools (lists, array or tensor),
    `lengths` [B] the valid lengths T (EOS included) when the mask is padded."""
    return [sum(bool(c) for c in row) / len(row) for row in _rows(call_mask, lengths)]


def teacher_use_fraction(call_mask: Any, lengths: Any = None) -> float:
    """Mean over sequences of Σ_t c_t / T (DESIGN.md §1)."""
    per_seq = per_sequence_teacher_use(call_mask, lengths)
    return sum(per_seq) / len(per_seq)


# ----------------------------------------------------------------------------- latency


def cost_model_latency(student_steps: Any, teacher_forwards: Any, c: Any) -> Any:
    """Latency in teacher-forward units: student_steps · c + teacher_forwards, with c the
    measured student/teacher forward-time ratio (DESIGN.md §6). Scalars give a float; arrays
    (or lists) broadcast elementwise and give an np.ndarray."""
    values = [np.asarray(v, dtype=float) for v in (student_steps, teacher_forwards, c)]
    for name, v in zip(("student_steps", "teacher_forwards", "c"), values):
        if np.any(v < 0) or np.any(~np.isfinite(v)):
            raise ValueError(f"{name} must be finite and >= 0; got {v.tolist()}")
    steps, forwards, ratio = values
    out = steps * ratio + forwards
    return float(out) if out.ndim == 0 else out
