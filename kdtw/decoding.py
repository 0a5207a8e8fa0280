"""Budgeted decoding (DESIGN.md §6) and speculative decoding, on one code path.

``generate`` decodes a batch with KV caches for both models. The student writes a token or emits
``<τ>``; at a ``<τ>`` the teacher is advanced over the output tokens it has not yet seen (one
teacher forward for the batch, each output token fed to the teacher at most once) and gives the
token. Modes on the same loop: ``budgeted``, ``student`` (``<τ>`` masked) and ``teacher`` (every
token from the teacher, no student forward).

``strict``: a call is allowed at step t (0-based) only if, after it, the sequence's teacher-use
fraction so far stays within its budget: ``calls + 1 <= budget * (t + 1)``. Since this holds at
every prefix, the final fraction (DESIGN.md §1, EOS counted) never exceeds the budget, whatever
length the output ends up with.

``speculative_generate`` is speculative decoding (Leviathan et al. 2023, Chen et al. 2023) with a
drafter (a student with ``<τ>`` masked, or any LM sharing the tokenizer) and block size K. It
decodes one sequence at a time (as `transformers` assisted generation does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .metrics import per_sequence_teacher_use
from .models import LM, Student


@dataclass
class DecodeOutput:
    """Per-sequence results of a decoding run (lists are indexed by input order)."""

    texts: list[str]
    tokens: list[list[int]]  # resolved output tokens, EOS included when emitted
    call_mask: list[list[bool]]  # True where the teacher gave the token (<τ>, or SD's teacher token)
    behaviour_logp: list[list[float]]  # log-prob of the action taken under the sampling policy
    greedy_tau: list[list[bool]]  # the policy's argmax was <τ> at that state (student modes)
    student_steps: list[int]  # student (or drafter) forwards spent on the sequence
    teacher_forwards: list[int]  # teacher forwards that served the sequence
    teacher_tokens: list[int]  # output positions the teacher computed (logit rows), recomputes counted
    wall_time: float  # seconds for the whole call
    batch_teacher_forwards: int = 0  # teacher forward passes over whole batches
    mode: str = "budgeted"
    extra: dict = field(default_factory=dict)
    # π(<τ> | s_t) of the decoding policy at each output step (budgeted mode; empty otherwise)
    tau_prob: list[list[float]] = field(default_factory=list)
    # teacher log p(x_t | s_t) of every output token (``score_teacher``; empty otherwise)
    teacher_logp: list[list[float]] = field(default_factory=list)
    # the teacher's logits [L_i, V] at every output position, the distributions the tokens were
    # drawn from (teacher mode with ``keep_teacher_logits``; empty otherwise)
    teacher_logits: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def teacher_use(self) -> list[float]:
        """Per-sequence teacher-use fraction Σc_t / T (DESIGN.md §1, EOS counted;
        `kdtw.metrics.per_sequence_teacher_use`, the one definition)."""
        return per_sequence_teacher_use(self.call_mask) if self.call_mask else []

    def rows(self) -> list[dict]:
        return [
            {
                "text": self.texts[i],
                "tokens": self.tokens[i],
                "teacher_calls": int(sum(self.call_mask[i])),
                "call_mask": [int(c) for c in self.call_mask[i]],
                "student_steps": self.student_steps[i],
                "teacher_forwards": self.teacher_forwards[i],
                "teacher_tokens": self.teacher_tokens[i],
            }
            for i in range(len(self))
        ]


MODES = ("budgeted", "student", "teacher")
# How budgeted decoding decides a call (DESIGN.md §5 revision, kdtw/decoding.py docstring):
# argmax: <τ> when it is the policy's argmax (or drawn with the token, do_sample);
# sample: a draw from π(<τ>|s), what training controls; systematic: the same marginal draws,
# stratified along each sequence (calls = ⌊u + Σπ(<τ>|s_t)⌋); threshold: π(<τ>|s) ≥ θ;
# oracle: KL(π̃ ‖ p) ≥ θ with both models run at every step (an evaluation ceiling).
CALL_RULES = ("argmax", "sample", "systematic", "threshold", "oracle")
# The rules that draw their calls from a generator (seeded by decoding.seed where configured).
DRAWN_RULES = ("sample", "systematic")


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Action and its log-prob under the sampling distribution. logits [B, A] -> [B], [B]."""
    if do_sample:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        a = _multinomial(logp.exp(), generator).squeeze(-1)
    else:
        logp = torch.log_softmax(logits, dim=-1)
        a = logits.argmax(-1)
    return a, logp.gather(-1, a[:, None]).squeeze(-1)


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw from each row of ``probs`` (``[B, V]`` -> ``[B, 1]``, ``[V]`` -> ``[1]``; nonnegative
    weights, rows need not sum to 1), as ``torch.multinomial(probs, 1)`` returns it: the inverse
    CDF at one uniform a row (cumulative sums in float64), drawn on the generator's device (a CPU
    generator can seed decoding on an accelerator); the result is on ``probs``' device.
    ``torch.multinomial`` draws an exponential for every entry: 3.9 ms for 29 rows of the default
    profile's 3,713 actions on one CPU thread against 0.2 ms here, a third of a rollout worker's
    time (py-spy, benchmarks/throughput.py)."""
    dev = generator.device if generator is not None else probs.device
    cdf = probs.to(dev, torch.float64).cumsum(-1)
    total = cdf[..., -1:]
    if not bool(torch.isfinite(total).all()) or bool((total <= 0).any()):
        raise FloatingPointError("invalid distribution to sample from: a row's total is not finite and positive "
                                 "(the model's logits were not finite: in training, a student whose weights "
                                 "diverged; lower train.phase2_lr or train.lr)")
    u = torch.rand(total.shape, generator=generator, device=dev, dtype=torch.float64) * total
    # below the total even where u·total rounded up to it: the first entry that reaches the
    # total has mass, so an entry of zero weight is never drawn
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).to(probs.device)


def _rand(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """``n`` uniforms drawn on the generator's device (a CPU generator can seed decoding on an
    accelerator), returned on ``device``."""
    return torch.rand(n, generator=generator, device=generator.device if generator is not None else "cpu").to(device)


def _uniform(generator: torch.Generator | None) -> float:
    dev = generator.device if generator is not None else "cpu"
    return float(torch.rand((), generator=generator, device=dev))


@torch.no_grad()
def generate(
    student: Student | None,
    teacher: LM | None,
    prompts: list[str],
    *,
    mode: str = "budgeted",
    budgets: float | list[float] | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    teacher_do_sample: bool = False,
    strict: bool = False,
    batch_size: int = 32,
    tau_bias: float = 0.0,
    generator: torch.Generator | None = None,
    call_rule: str = "argmax",
    call_threshold: float | list[float] | None = None,
    score_teacher: bool = False,
    keep_teacher_logits: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> DecodeOutput:
    """Decode ``prompts`` (full input texts, budget instruction included), ``batch_size`` at a
    time (``on_batch(decoded, len(prompts))`` after each batch: a caller's progress line).

    ``score_teacher``: also return the teacher's log p of every output token
    (``teacher_logp``), computed on the teacher's decode state: the positions fed for calls are
    scored as they are fed, and the rest of each path (the tail after the last call) in one more
    forward at the end, so each output position costs the teacher one position in all (what a
    rollout needs: its calls and its scoring, DESIGN.md §3).

    ``keep_teacher_logits`` (teacher mode): also return the teacher's logits over V at every
    output position (``teacher_logits``, [L_i, V] per sequence), the ones each token was drawn
    from: a Phase-1 step reads them instead of running the teacher over the paths again.

    ``budgets``: the target fraction per prompt (or one for all); needed for ``strict``. A prompt
    whose budget is 0 decodes with <τ> masked (DESIGN.md §5 revision: the zero budget is masked,
    not controlled).
    ``tau_bias`` is added to the <τ> logit (an inference-time knob; 0 = the trained policy).

    ``call_rule`` (budgeted mode) decides each call; the token written otherwise is the argmax
    over V (or a draw from π̃, the policy over V without <τ>, when ``do_sample``):

    - ``argmax``: the action is the argmax of π over V ∪ {<τ>} (a draw from π when ``do_sample``).
    - ``sample``: call with probability π(<τ>|s) (at ``temperature``): the expected call rate is
      the one Phase 2's λ controls. With ``do_sample`` this is exactly a draw from π.
    - ``systematic``: systematic sampling of the calls along each sequence (kdtw extension):
      an accumulator starts at u ~ U(0, 1) (one draw per sequence from ``generator``), adds
      π(<τ>|s_t) at each step and calls when it reaches 1 (then drops by 1). Each step still
      calls with marginal probability π(<τ>|s_t), so the expected rate is the sample rule's,
      but a sequence makes ⌊u + Σ_t π(<τ>|s_t)⌋ calls: its use is within 1/T of the expected
      one instead of carrying the binomial noise of independent draws.
    - ``threshold``: call when π(<τ>|s) ≥ ``call_threshold`` (per prompt or one for all).
    - ``oracle``: call when KL(π̃(·|s) ‖ p(·|s)) ≥ ``call_threshold`` (DESIGN.md §4's oracle score
      on the decoder's own state): the teacher runs at every step, so this is a quality ceiling
      for a caller at that rate, not a fast decoder.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES} (or speculative_generate)")
    if call_rule not in CALL_RULES:
        raise ValueError(f"call_rule={call_rule!r}: use one of {', '.join(CALL_RULES)}")
    if call_rule in ("threshold", "oracle") and mode == "budgeted" and call_threshold is None:
        raise ValueError(f"call_rule={call_rule} needs call_threshold (one per prompt or one for all)")
    if isinstance(call_threshold, (int, float)):
        call_threshold = [float(call_threshold)] * len(prompts)
    if call_threshold is not None and len(call_threshold) != len(prompts):
        raise ValueError(f"{len(call_threshold)} call thresholds for {len(prompts)} prompts")
    if not prompts:
        raise ValueError("no prompts to decode (empty input)")
    if keep_teacher_logits and mode != "teacher":
        raise ValueError(f"keep_teacher_logits needs mode='teacher' (got mode={mode!r})")
    if mode != "teacher" and student is None:
        raise ValueError(f"mode={mode} needs a student")
    if mode != "student" and teacher is None:
        raise ValueError(f"mode={mode} needs a teacher")
    if strict and budgets is None:
        raise ValueError("strict decoding needs the budget of each prompt")
    if isinstance(budgets, (int, float)):
        budgets = [float(budgets)] * len(prompts)
    if budgets is not None and len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} budgets for {len(prompts)} prompts")

    t0 = time.perf_counter()
    parts = []
    for s in range(0, len(prompts), batch_size):
        parts.append(
            _generate_batch(
                student,
                teacher,
                prompts[s : s + batch_size],
                mode=mode,
                budgets=None if budgets is None else budgets[s : s + batch_size],
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                teacher_do_sample=teacher_do_sample,
                strict=strict,
                tau_bias=tau_bias,
                generator=generator,
                call_rule=call_rule,
                thresholds=None if call_threshold is None else call_threshold[s : s + batch_size],
                score_teacher=score_teacher,
                keep_teacher_logits=keep_teacher_logits,
            )
        )
        if on_batch is not None:
            on_batch(min(s + batch_size, len(prompts)), len(prompts))
    out = DecodeOutput(
        texts=[t for p in parts for t in p.texts],
        tokens=[t for p in parts for t in p.tokens],
        call_mask=[t for p in parts for t in p.call_mask],
        behaviour_logp=[t for p in parts for t in p.behaviour_logp],
        greedy_tau=[t for p in parts for t in p.greedy_tau],
        student_steps=[t for p in parts for t in p.student_steps],
        teacher_forwards=[t for p in parts for t in p.teacher_forwards],
        teacher_tokens=[t for p in parts for t in p.teacher_tokens],
        wall_time=time.perf_counter() - t0,
        batch_teacher_forwards=sum(p.batch_teacher_forwards for p in parts),
        mode=mode,
        tau_prob=[t for p in parts for t in p.tau_prob],
        teacher_logp=[t for p in parts for t in p.teacher_logp],
        teacher_logits=[t for p in parts for t in p.teacher_logits],
    )
    return out


def _generate_batch(student, teacher, prompts, *, mode, budgets, max_new_tokens, do_sample,
                    temperature, teacher_do_sample, strict, tau_bias, generator, call_rule="argmax",
                    thresholds=None, score_teacher=False, keep_teacher_logits=False) -> DecodeOutput:
    lm = student.lm if student is not None else teacher
    ref = teacher if teacher is not None else lm
    B = len(prompts)
    dev = lm.device
    eos, pad = ref.eos_id, ref.pad_id

    s_state = t_state = None
    if mode != "teacher":
        s_state = student.lm.start(*student.lm.encode_prompts(prompts))
        s_logits = student.lm.extend(s_state, torch.empty((B, 0), dtype=torch.long, device=dev))[:, -1]
        V = student.vocab_size
    if score_teacher and teacher is None:
        raise ValueError("score_teacher needs a teacher")
    if mode != "student" or score_teacher:
        t_ids, t_mask = teacher.encode_prompts(prompts)
        t_state = teacher.start(t_ids.to(teacher.device), t_mask.to(teacher.device))
        if mode != "student":
            V = teacher.vocab_size
    budget_t = torch.tensor(budgets, dtype=torch.float32, device=dev) if budgets is not None else None
    b_index = student.budget_index(budgets) if (student is not None and budgets is not None) else None
    theta = torch.tensor(thresholds, dtype=torch.float32, device=dev) if thresholds is not None else None
    rule = call_rule if mode == "budgeted" else "argmax"
    acc = None  # systematic rule: one offset u ~ U(0, 1) per sequence
    if rule == "systematic":
        acc = _rand(B, generator, dev)

    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
    calls = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=dev)
    blogp = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
    gtau = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=dev)
    ptau = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
    t_logp = torch.zeros((B, max_new_tokens), dtype=torch.float32) if score_teacher else None  # filled as fed
    kept: list[torch.Tensor] = []  # keep_teacher_logits: the teacher's [B, V] logits at each step

    def advance(new: torch.Tensor, start: int, need: torch.Tensor | None = None) -> torch.Tensor:
        """Feed the teacher output positions ``start..`` (``new``); its next-token logits [B, V]
        (only the rows in ``need`` are read: a remote teacher sends those alone). Their log p is
        kept only when the paths are scored (``score_teacher``)."""
        if not score_teacher:
            return teacher.extend(t_state, new)[:, -1]
        last, lp = teacher.extend_logp(t_state, new, need=need)
        t_logp[:, start : start + new.shape[1]] = lp.cpu()
        return last
    length = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)  # final length
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    n_calls = torch.zeros(B, dtype=torch.long, device=dev)
    t_forwards = torch.zeros(B, dtype=torch.long, device=dev)
    s_steps = torch.zeros(B, dtype=torch.long, device=dev)
    batch_fwd = 0
    teacher_seen = 0  # output positions already fed to the teacher (same for every row)

    T = 0
    for t in range(max_new_tokens):
        T = t + 1
        oracle_logits = None  # the teacher's logits at this step, where the oracle rule ran it
        if mode == "teacher":
            want = ~done
            act_logp = torch.zeros(B, device=dev)
        else:
            pol = student.policy_logits(s_logits, b_index).float()  # [B, V+1]
            if mode == "student":
                pol[:, V] = float("-inf")
            else:
                if tau_bias:
                    pol[:, V] += tau_bias
                if budget_t is not None:  # the zero budget masks <τ> (DESIGN.md §5 revision)
                    pol[:, V] = torch.where(budget_t > 0, pol[:, V], torch.full_like(pol[:, V], float("-inf")))
                if strict:
                    allowed = (n_calls + 1).float() <= budget_t * (t + 1) + 1e-6
                    pol[:, V] = torch.where(allowed, pol[:, V], torch.full_like(pol[:, V], float("-inf")))
            gtau[:, t] = (pol.argmax(-1) == V) & ~done
            s_steps += (~done).long()
            if rule == "argmax":
                a, act_logp = _pick(pol, do_sample, temperature, generator)
                want = (a == V) & ~done
            else:
                logpol = torch.log_softmax(pol / temperature if do_sample else pol, dim=-1)  # [B, V+1]
                a, _ = _pick(pol[:, :V], do_sample, temperature, generator)
                if rule == "sample":
                    call = _rand(B, generator, dev) < logpol[:, V].exp()
                elif rule == "systematic":
                    # π(<τ>) is 0 where <τ> is masked (zero budget, strict), so no call there
                    acc = acc + torch.where(done, torch.zeros_like(acc), logpol[:, V].exp())
                    call = acc >= 1.0
                    acc = torch.where(call, acc - 1.0, acc)
                elif rule == "threshold":
                    # a strict mask makes π(<τ>) = 0, which a threshold of 0 would still meet
                    call = (logpol[:, V].exp() >= theta) & torch.isfinite(pol[:, V])
                else:  # oracle: the teacher sees every step
                    new = out[:, teacher_seen:t].to(teacher.device)
                    oracle_logits = advance(new, teacher_seen)[:, :V].float().to(dev)  # [B, V]
                    teacher_seen = t
                    batch_fwd += 1
                    t_forwards += (~done).long()
                    kl = torch.nn.functional.kl_div(torch.log_softmax(oracle_logits, -1),
                                                    torch.log_softmax(pol[:, :V], -1),
                                                    reduction="none", log_target=True).sum(-1)  # [B]
                    call = (kl >= theta) & torch.isfinite(pol[:, V])  # masked: zero budget, strict
                # log π(a) of the joint action: <τ>, or "write" then the token under π̃
                tok_lp = logpol[:, :V].gather(-1, a[:, None]).squeeze(-1)
                act_logp = torch.where(call, logpol[:, V], tok_lp)
                want = call & ~done
            ptau[:, t] = torch.where(done, torch.zeros(B, device=dev), torch.softmax(pol, -1)[:, V])
        tok = a if mode != "teacher" else torch.full((B,), pad, dtype=torch.long, device=dev)
        if want.any() and oracle_logits is not None:
            x, _ = _pick(oracle_logits, teacher_do_sample, 1.0, generator)
            tok = torch.where(want, x, tok)
        elif want.any():
            new = out[:, teacher_seen:t].to(teacher.device)
            # [B, V] predicts x_t; rows not in `want` may be zeros (a remote teacher sends only
            # the calling rows): their draw is discarded below, and _pick draws one uniform a row
            # whatever the logits, so the random stream is the same
            t_logits = advance(new, teacher_seen, want.to(teacher.device))[:, :V].float()
            if keep_teacher_logits:  # teacher mode: every step up to the last runs the teacher
                kept.append(t_logits.detach().clone())  # on the teacher's device: no sync
            teacher_seen = t
            batch_fwd += 1
            t_forwards += want.long()
            x, _ = _pick(t_logits.to(dev), teacher_do_sample, 1.0, generator)
            tok = torch.where(want, x, tok)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out[:, t] = tok
        calls[:, t] = want
        blogp[:, t] = torch.where(done, torch.zeros_like(act_logp), act_logp)
        n_calls += want.long()
        ended = (tok == eos) & ~done
        length = torch.where(ended, torch.full_like(length, t + 1), length)
        done |= ended
        if done.all():
            break
        if mode != "teacher":
            s_logits = student.lm.extend(s_state, tok[:, None])[:, -1]

    # the teacher computed output positions 0..teacher_seen once each (if it ran at all)
    computed = teacher_seen + 1 if batch_fwd else 0
    if score_teacher:  # the tail: scored, the last token not fed (nothing comes after it)
        _, lp = teacher.extend_logp(t_state, out[:, teacher_seen:T].to(teacher.device), feed_last=False, close=True)
        t_logp[:, teacher_seen:T] = lp.cpu()
    elif t_state is not None:
        teacher.close(t_state)
    t_tokens = torch.minimum(length, torch.full_like(length, computed))
    lengths = torch.minimum(length, torch.tensor(T, device=dev)).tolist()
    toks, masks, lps, gts, pts, tlp, tlg = [], [], [], [], [], [], []
    all_logits = torch.stack(kept, 1) if keep_teacher_logits else None  # [B, T, V]
    for i in range(B):
        L = lengths[i]
        if score_teacher:
            tlp.append(t_logp[i, :L].tolist())
        if all_logits is not None:
            tlg.append(all_logits[i, :L])  # views of one [B, T, V] tensor
        toks.append(out[i, :L].tolist())
        masks.append(calls[i, :L].tolist())
        lps.append(blogp[i, :L].tolist())
        gts.append(gtau[i, :L].tolist())
        pts.append(ptau[i, :L].tolist() if mode == "budgeted" else [])
    return DecodeOutput(
        texts=[ref.decode(x) for x in toks],
        tokens=toks,
        call_mask=masks,
        behaviour_logp=lps,
        greedy_tau=gts,
        student_steps=s_steps.tolist(),
        teacher_forwards=t_forwards.tolist(),
        teacher_tokens=t_tokens.tolist(),
        wall_time=0.0,
        batch_teacher_forwards=batch_fwd,
        mode=mode,
        tau_prob=pts,
        teacher_logp=tlp,
        teacher_logits=tlg,
    )


# ----------------------------------------------------------------------------- speculative


def _draft_logits(drafter: Student | LM, logits: torch.Tensor) -> torch.Tensor:
    """Drafter logits over V (the student's <τ> masked by dropping it)."""
    V = drafter.vocab_size
    return logits[..., :V].float()


@torch.no_grad()
def speculative_generate(
    drafter: Student | LM,
    teacher: LM,
    prompts: list[str],
    *,
    k: int = 3,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
) -> DecodeOutput:
    """Speculative decoding with block size ``k``: the drafter proposes up to k tokens, the
    teacher scores them in one forward and accepts a prefix (greedy: while they equal its argmax;
    sampling: with prob min(1, p/q), resampling from norm(max(0, p − q)) at the first reject),
    then adds one token of its own. The output is distributed as the teacher's (token-for-token
    equal to its greedy output in greedy mode). ``call_mask`` marks the teacher's own tokens."""
    if k < 1:
        raise ValueError("speculative decoding needs k >= 1")
    if not prompts:
        raise ValueError("no prompts to decode (empty input)")
    d_lm = drafter.lm if isinstance(drafter, Student) else drafter
    t0 = time.perf_counter()
    res = DecodeOutput([], [], [], [], [], [], [], [], 0.0, 0, mode=f"speculative_k{k}")
    accepted_total = drafted_total = 0
    for prompt in prompts:
        d_state = d_lm.start(*d_lm.encode_prompts([prompt]))
        t_state = teacher.start(*teacher.encode_prompts([prompt]))
        V = teacher.vocab_size
        out: list[int] = []
        mask: list[bool] = []
        steps = fwd = t_rows = 0
        while len(out) < max_new_tokens and (not out or out[-1] != teacher.eos_id):
            # draft: feed the accepted tokens the drafter has not seen, then propose
            kk = min(k, max_new_tokens - len(out) - 1)
            base = len(out)
            drafts: list[int] = []
            q_rows: list[torch.Tensor | None] = []
            d_rows: list[torch.Tensor] = []
            if kk > 0:
                feed = torch.tensor([out[d_state.n_fed :]], dtype=torch.long, device=d_lm.device)
                logits = d_lm.extend(d_state, feed)[:, -1]
                d_rows.append(logits)
            for i in range(kk):
                q_logits = _draft_logits(d_lm, logits)[0]
                if do_sample:
                    q = torch.softmax(q_logits, -1)
                    x = int(_multinomial(q, generator))
                else:
                    q = None
                    x = int(q_logits.argmax())
                steps += 1
                drafts.append(x)
                q_rows.append(q)
                if x == teacher.eos_id or i == kk - 1:
                    break
                logits = d_lm.extend(d_state, torch.tensor([[x]], device=d_lm.device))[:, -1]
                d_rows.append(logits)
            # verify: one teacher forward over the unseen accepted tokens and the drafts
            feed = torch.tensor([out[t_state.n_fed :] + drafts], dtype=torch.long, device=teacher.device)
            full = teacher.extend(t_state, feed)[0, -(len(drafts) + 1) :]  # [n+1, Vm]
            t_logits = full[:, :V].float()
            fwd += 1
            t_rows += feed.shape[1] + (1 if fwd == 1 else 0)
            n_acc = 0
            new: list[int] = []
            for i, x in enumerate(drafts):
                if do_sample:
                    p = torch.softmax(t_logits[i], -1)
                    q = q_rows[i]
                    if _uniform(generator) < min(1.0, float(p[x] / q[x])):
                        n_acc += 1
                        new.append(x)
                        continue
                    resid = (p - q).clamp(min=0)
                    resid = resid / resid.sum() if float(resid.sum()) > 0 else p
                    new.append(int(_multinomial(resid, generator)))
                    break
                if int(t_logits[i].argmax()) == x:
                    n_acc += 1
                    new.append(x)
                    continue
                new.append(int(t_logits[i].argmax()))
                break
            else:
                row = t_logits[len(drafts)]
                if do_sample:
                    new.append(int(_multinomial(torch.softmax(row, -1), generator)))
                else:
                    new.append(int(row.argmax()))
            accepted_total += n_acc
            drafted_total += len(drafts)
            new_mask = [False] * n_acc + [True]
            # stop at EOS and at the length limit
            for j, x in enumerate(new):
                if x == teacher.eos_id:
                    new, new_mask = new[: j + 1], new_mask[: j + 1]
                    break
            room = max_new_tokens - len(out)
            out.extend(new[:room])
            mask.extend(new_mask[:room])
            # caches keep only accepted tokens; last_logits predicts the next unfed position
            keep_t = base + n_acc
            if keep_t < t_state.n_fed:
                teacher.rollback(t_state, keep_t, full[n_acc][None])
            keep_d = base + min(n_acc, len(d_rows) - 1)
            if d_rows and keep_d < d_state.n_fed:
                d_lm.rollback(d_state, keep_d, d_rows[keep_d - base])
        res.texts.append(teacher.decode(out))
        res.tokens.append(out)
        res.call_mask.append(mask)
        res.behaviour_logp.append([0.0] * len(out))
        res.greedy_tau.append([False] * len(out))
        res.student_steps.append(steps)
        res.teacher_forwards.append(fwd)
        res.teacher_tokens.append(t_rows)
        res.batch_teacher_forwards += fwd
    res.wall_time = time.perf_counter() - t0
    res.extra = {"acceptance_rate": accepted_total / max(drafted_total, 1)}
    return res


@torch.no_grad()
def forward_time_ratio(student: Student | LM, teacher: LM, prompts: list[str], *, steps: int = 16, repeats: int = 3) -> float:
    """Measured student/teacher time of one cached decoding step (batch of ``prompts``): the
    ``c`` of the cost model ``student_steps·c + teacher_forwards`` (DESIGN.md §6)."""
    s_lm = student.lm if isinstance(student, Student) else student

    def step_time(lm: LM) -> float:
        best = float("inf")
        for _ in range(repeats):
            state = lm.start(*lm.encode_prompts(prompts))
            x = torch.full((len(prompts), 1), lm.eos_id, dtype=torch.long, device=lm.device)
            lm.extend(state, x)
            t0 = time.perf_counter()
            for _ in range(steps):
                lm.extend(state, x)
            best = min(best, (time.perf_counter() - t0) / steps)
        return best

    return step_time(s_lm) / step_time(teacher)
