"""Per-budget call thresholds θ_k for the ``threshold`` and ``oracle`` call rules.

DESIGN.md §5 (revision) lets decoding call "when π(<τ>|s) ≥ θ_k, with θ_k calibrated per budget
on validation"; issue 11 adds an oracle caller, "call where KL(π̃ ‖ p) at the current state
exceeds a threshold calibrated to each budget" (the ceiling a learned caller can reach at that
call rate; kdtw/decoding.py runs both rules). This module finds θ_k so that decoding budget k's
prompts with the rule spends teacher use b_k, and saves the thresholds with the student.

How. Teacher use is measured on the real decode, because a call changes the states that follow
(the teacher's token enters the prefix), so no score computed once fixes the rate exactly:

1. decode without calls (θ = +inf: the student's own path) and take the per-step scores along
   it: π(<τ>|s_t) (``DecodeOutput.tau_prob``) for ``threshold``; for ``oracle`` the KL(π̃ ‖ p)
   recomputed by one teacher-forced forward of each model over the decoded tokens (the same
   score the decoder computes with its caches, DESIGN.md §4's oracle score);
2. set θ at the (weighted) quantile of those scores that would call on a fraction b_k of steps;
3. decode at θ, measure the use, keep a bracket [lo, hi] with use(lo) > b_k > use(hi), and take
   the next θ as the quantile of the new decode's scores, or the geometric midpoint of the
   bracket where that quantile falls outside it (a bisection on log θ). At most ``iters``
   decodes per budget; the θ whose use came closest to b_k is returned (ties: the lower use).

Budget 0 gives θ = +inf (never call) without decoding; budget 1 gives θ = 0 (every score is
≥ 0). Decoding is greedy (student tokens argmax over V, teacher tokens argmax), so the result
is deterministic.

Teacher use is DESIGN.md §1's definition as kdtw reports it: the mean over sequences of
Σ_t c_t / T (``DecodeOutput.teacher_use()``, the ``teacher_use`` column of `kdtw eval`). Pass
``use="token"`` for the token-weighted Σ c / Σ T that Phase 2's controller steers.

No Ray, no MLflow (STYLE.md): this runs inside `kdtw eval`, validation and tests alike.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .decoding import DRAWN_RULES, DecodeOutput, generate
from .models import LM, Student
from .oracle import oracle_kl

THRESHOLDS_FILE = "call_thresholds.json"
# Call rules that need a per-budget threshold (kdtw/decoding.py CALL_RULES).
SCORED_RULES = ("threshold", "oracle")
USE_KINDS = ("sequence", "token")


@dataclass(frozen=True)
class Calibration:
    """One budget's result: ``theta`` (inf: never call), the teacher use it gave on the
    calibration prompts (``use``) and the number of decodes spent (``decodes``)."""

    theta: float
    use: float
    decodes: int


def calibrate_thresholds(
    student: Student,
    teacher: LM,
    prompts_by_budget: Sequence[Sequence[str]],
    targets: Sequence[float],
    *,
    rule: str,
    max_new_tokens: int,
    batch_size: int,
    iters: int = 8,
    tol: float = 0.005,
    use: str = "sequence",
) -> list[float]:
    """θ_k per budget: decoding ``prompts_by_budget[k]`` with ``rule`` ("threshold" or
    "oracle") at θ_k gives teacher use as close as the search finds to ``targets[k]``.

    ``iters`` bounds the decodes per budget after the first (no-call) one; the search stops
    early once the use is within ``tol``. ``use``: "sequence" (mean of Σc_t/T, what kdtw
    reports) or "token" (Σc / ΣT). See the module docstring for the scheme.
    """
    return [c.theta for c in calibrate_budgets(
        student, teacher, prompts_by_budget, targets, rule=rule, max_new_tokens=max_new_tokens,
        batch_size=batch_size, iters=iters, tol=tol, use=use)]


def calibrate_budgets(
    student: Student,
    teacher: LM,
    prompts_by_budget: Sequence[Sequence[str]],
    targets: Sequence[float],
    *,
    rule: str,
    max_new_tokens: int,
    batch_size: int,
    iters: int = 8,
    tol: float = 0.005,
    use: str = "sequence",
) -> list[Calibration]:
    """As :func:`calibrate_thresholds`, with the use reached and the decodes spent per budget."""
    if rule not in SCORED_RULES:
        raise ValueError(f"rule={rule!r}: thresholds are calibrated for {' | '.join(SCORED_RULES)} "
                         "(argmax and sample need none)")
    if use not in USE_KINDS:
        raise ValueError(f"use={use!r}: use sequence (mean of per-sequence fractions) or token")
    if len(prompts_by_budget) != len(targets):
        raise ValueError(f"{len(prompts_by_budget)} prompt lists for {len(targets)} budget targets")
    if iters < 1:
        raise ValueError(f"iters={iters}: give at least one refining decode per budget")
    for b in targets:
        if not 0.0 <= float(b) <= 1.0:
            raise ValueError(f"budget target {b} is outside [0, 1]")
    return [
        _calibrate_one(student, teacher, list(prompts), float(b), rule=rule,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, iters=iters, tol=tol,
                       use=use)
        for prompts, b in zip(prompts_by_budget, targets)
    ]


def _calibrate_one(student, teacher, prompts, target, *, rule, max_new_tokens, batch_size, iters,
                   tol, use) -> Calibration:
    if target <= 0.0:
        return Calibration(math.inf, 0.0, 0)
    if target >= 1.0:
        return Calibration(0.0, 1.0, 0)
    if not prompts:
        raise ValueError("no prompts to calibrate on (empty list for a budget)")

    def decode(theta: float) -> DecodeOutput:
        # budgets: as evaluation passes them (a student may condition its <τ> on the target)
        return generate(student, teacher, prompts, mode="budgeted", budgets=target,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=False,
                        teacher_do_sample=False, call_rule=rule, call_threshold=theta)

    out = decode(math.inf)  # the student's own path: scores where nothing was called yet
    decodes = 1
    best_key, best = (target, 0.0), Calibration(math.inf, 0.0, decodes)
    lo, hi = 0.0, math.inf  # use(lo) > target > use(hi); θ = 0 calls everywhere, inf nowhere
    tried = {math.inf}
    for _ in range(iters):
        scores = _scores(out, rule, student, teacher, prompts, batch_size)
        theta = quantile_threshold(scores, target, use=use)
        if not lo < theta < hi or theta in tried:
            theta = _between(lo, hi)
        if theta in tried:  # the bracket has collapsed to float resolution
            break
        tried.add(theta)
        out = decode(theta)
        decodes += 1
        u = measure_use(out, use)
        key = (abs(u - target), u)
        if key < best_key:
            best_key, best = key, Calibration(theta, u, decodes)
        if abs(u - target) <= tol:
            break
        if u > target:
            lo = theta
        else:
            hi = theta
    return Calibration(best.theta, best.use, decodes)


def measure_use(out: DecodeOutput, use: str = "sequence") -> float:
    """Teacher use of a decode: mean of Σc_t/T over sequences ("sequence", DESIGN.md §1 as
    `kdtw eval` reports it) or Σc / ΣT ("token")."""
    if use == "token":
        return sum(sum(m) for m in out.call_mask) / max(sum(out.lengths), 1)
    per_seq = out.teacher_use()
    return sum(per_seq) / max(len(per_seq), 1)


def quantile_threshold(scores: Sequence[Sequence[float]], target: float, *, use: str = "sequence") -> float:
    """The θ for which calling at steps with score ≥ θ, on these paths, gives the use closest to
    ``target`` (ties: the lower use). Steps weigh 1/(n·T_i) ("sequence") or 1/ΣT ("token").
    θ lies strictly between two distinct scores (the geometric midpoint), so float noise in a
    recomputed score does not flip a call; above the largest score when calling none is best."""
    flat, weights = [], []
    n = sum(1 for s in scores if s)
    total = sum(len(s) for s in scores)
    for s in scores:
        if not s:
            continue
        w = 1.0 / (n * len(s)) if use == "sequence" else 1.0 / total
        flat.extend(float(x) for x in s)
        weights.extend([w] * len(s))
    if not flat:
        return math.inf
    s = torch.tensor(flat, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    order = torch.argsort(s, descending=True, stable=True)
    s, w = s[order], w[order]
    cum = torch.cumsum(w, 0)  # cum[j]: use when the j+1 largest scores are called
    # a cut can only fall between distinct scores (ties are called together)
    cut = torch.ones_like(s, dtype=torch.bool)
    cut[:-1] = s[:-1] > s[1:]
    idx = torch.nonzero(cut).squeeze(-1)
    uses = torch.cat([torch.zeros(1, dtype=torch.float64), cum[idx]])  # [none, cut_0, cut_1, ...]
    err = (uses - target).abs()
    k = int(torch.nonzero(err <= err.min() + 1e-12)[0])  # first = lowest use among the best
    if k == 0:
        top = float(s[0])
        return 2.0 * top if top > 0 else 1e-12
    j = int(idx[k - 1])
    upper = float(s[j])
    lower = float(s[j + 1]) if j + 1 < len(s) else 0.0
    return _mid(lower, upper)


def _mid(lower: float, upper: float) -> float:
    """A point strictly between lower < upper: geometric where both are > 0 (scores are
    probabilities or KLs, spread over decades), else halfway."""
    if lower > 0:
        m = math.sqrt(lower * upper)
        if lower < m < upper:
            return m
    m = (lower + upper) / 2 if lower > 0 else upper / 2
    return m if m < upper else upper


def _between(lo: float, hi: float) -> float:
    """Bisection on log θ inside the bracket (lo, hi); either end may be 0 or inf."""
    if math.isinf(hi):
        return lo * 4.0 if lo > 0 else 1.0
    if lo <= 0:
        return hi / 4.0
    return _mid(lo, hi)


def _scores(out: DecodeOutput, rule: str, student: Student, teacher: LM, prompts: list[str],
            batch_size: int) -> list[list[float]]:
    """The rule's per-step score along each decoded path."""
    if rule == "threshold":
        return out.tau_prob
    return oracle_scores(student, teacher, prompts, out.tokens, batch_size=batch_size)


@torch.no_grad()
def oracle_scores(student: Student, teacher: LM, prompts: Sequence[str], tokens: Sequence[Sequence[int]],
                  *, batch_size: int = 32) -> list[list[float]]:
    """KL(π̃(·|s_t) ‖ p(·|s_t)) at every step of the given output paths (DESIGN.md §4's oracle
    score, kdtw.oracle.oracle_kl), by one teacher-forced forward of each model per batch."""
    V = student.vocab_size
    res: list[list[float]] = []
    for s in range(0, len(prompts), batch_size):
        p, toks = list(prompts[s : s + batch_size]), tokens[s : s + batch_size]
        width = max(len(t) for t in toks)
        outs = torch.full((len(toks), width), teacher.pad_id, dtype=torch.long)
        for i, t in enumerate(toks):
            outs[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        s_logits = student.lm.forward(*student.lm.encode_prompts(p), outs.to(student.lm.device))
        t_logits = teacher.forward(*teacher.encode_prompts(p), outs.to(teacher.device))
        pol = student.policy_logits(s_logits.float())  # [B, T, V+1]; <τ> plays no part in π̃
        kl = oracle_kl(pol, t_logits[..., :V].float().to(pol.device))  # [B, T]
        res.extend(kl[i, : len(t)].tolist() for i, t in enumerate(toks))
    return res


# ----------------------------------------------------------------------------- files


def save_thresholds(folder: str | os.PathLike, thresholds: Mapping) -> str:
    """Write ``<folder>/call_thresholds.json`` atomically (a temporary file, then os.replace).

    ``thresholds``: ``{"threshold": {phrase: θ}, "oracle": {phrase: θ}, "split": ..., "n": ...}``
    (either rule may be absent; other keys are kept as they are). JSON has no infinity, so a θ of
    +inf ("never call", the zero budget) is stored as null. Returns the file's path.

    Student.save replaces the whole folder, so re-saving a student drops its thresholds: they
    belong to those weights and must be calibrated again.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save call thresholds: {folder!r} is not a folder (save the student first)")
    payload = dict(thresholds)
    for rule in SCORED_RULES:
        if rule in payload and payload[rule] is not None:
            payload[rule] = {str(k): _encode_theta(v, rule, k) for k, v in payload[rule].items()}
    path = os.path.join(folder, THRESHOLDS_FILE)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-thresholds-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; it is a plain result file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_thresholds(folder: str | os.PathLike) -> dict | None:
    """``<folder>/call_thresholds.json`` as written by :func:`save_thresholds` (null read back
    as +inf), or None when the folder has no such file. ``folder`` may also be the path of a
    thresholds file itself."""
    path = os.fspath(folder)
    if os.path.isdir(path):
        path = os.path.join(path, THRESHOLDS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and calibrate again "
                         "(kdtw eval calibrates on validation when it is absent)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object with 'threshold' / 'oracle' tables; "
                         "delete it and calibrate again")
    for rule in SCORED_RULES:
        table = data.get(rule)
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ValueError(f"{path}: '{rule}' must map budget phrases to thresholds; delete the "
                             "file and calibrate again")
        data[rule] = {k: _decode_theta(v, path, rule, k) for k, v in table.items()}
    return data


def thresholds_for(saved: Mapping | None, rule: str, phrases: Sequence[str]) -> list[float] | None:
    """The saved θ of ``rule`` for each phrase, or None unless every phrase has one."""
    table = (saved or {}).get(rule) or {}
    if not all(p in table for p in phrases):
        return None
    return [float(table[p]) for p in phrases]


def _encode_theta(v, rule: str, phrase) -> float | None:
    if v is None:
        return None
    v = float(v)
    if math.isnan(v) or v < 0:
        raise ValueError(f"{rule} threshold for {phrase!r} is {v}: give a number >= 0, or inf for never calling")
    return None if math.isinf(v) else v


def _decode_theta(v, path: str, rule: str, phrase: str) -> float:
    if v is None:
        return math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"{path}: {rule} threshold for {phrase!r} is {v!r}; expected a number >= 0 "
                         "or null (never call); delete the file and calibrate again")
    return float(v)


def call_kwargs(cfg, student: Student | None, student_folder: str | None, phrase: str, target: float,
                *, index: int = 0) -> dict:
    """``generate`` keyword arguments for ``decoding.call_rule`` at one budget: a seeded
    generator for ``sample`` and ``systematic``, the student's saved θ for ``threshold`` (``call_thresholds.json``,
    written when `kdtw train` exports a student)."""
    rule = cfg.decoding.call_rule
    kw: dict = {"call_rule": rule}
    if rule in DRAWN_RULES:
        kw["generator"] = torch.Generator().manual_seed(cfg.decoding.seed + index)
    elif rule == "threshold" and student is not None:
        saved = load_thresholds(student_folder) if student_folder else None
        theta = (saved or {}).get("threshold", {}).get(phrase) if saved else None
        if theta is None and target > 0:
            raise ValueError(
                f"decoding.call_rule=threshold needs the student's θ for {phrase!r} in "
                f"{os.path.join(student_folder or '<student folder>', THRESHOLDS_FILE)} (written by `kdtw train` "
                "when it exports a student, or by `kdtw eval`); or use decoding.call_rule=sample")
        kw["call_threshold"] = math.inf if theta is None else theta
    return kw
