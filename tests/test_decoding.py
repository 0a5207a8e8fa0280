"""Budgeted and speculative decoding: parity with `transformers`, teacher accounting, strict."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import PROMPTS
from kdtw.decoding import forward_time_ratio, generate, speculative_generate
from kdtw.models import LM, encode_outputs, init_model, make_student
from kdtw.config import ModelConfig
from kdtw.tokenizer import build_word_tokenizer


def _hf_greedy(lm: LM, prompts, max_new, suppress=()):
    ids, mask = lm.encode_prompts(prompts)
    rows = lm.model.get_output_embeddings().weight.shape[0]
    out = lm.model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
        pad_token_id=lm.pad_id, eos_token_id=lm.eos_id,
        suppress_tokens=list(range(lm.vocab_size, rows)) + list(suppress),
    )
    new = out[:, 1:] if lm.is_encoder_decoder else out[:, ids.shape[1]:]
    res = []
    for row in new.tolist():
        res.append(row[: row.index(lm.eos_id) + 1] if lm.eos_id in row else row)
    return res


def _no_eos(lm: LM) -> LM:
    """A copy whose greedy decoding never ends early (EOS/pad logits pinned to 0)."""
    lm = copy.deepcopy(lm)
    with torch.no_grad():
        w = lm.model.get_output_embeddings().weight
        w[lm.eos_id] = 0
        w[lm.pad_id] = 0
        w[lm.vocab_size:] = 0
        w[: lm.vocab_size] *= 4  # peaked: the max over the other rows is well above 0
    return lm


def test_extend_matches_teacher_forced_forward(pair):
    teacher, student = pair
    for lm in (teacher, student.lm):
        p_ids, p_mask = lm.encode_prompts(PROMPTS)
        outs, _ = encode_outputs(lm, ["w3 w4 w5 w6", "w1", "w7 w8"])
        full = lm.forward(p_ids, p_mask, outs)  # [B, T, Vm]
        state = lm.start(p_ids, p_mask)
        rows = [lm.extend(state, outs[:, :2])]  # positions 0..2
        rows.append(lm.extend(state, outs[:, 2:3])[:, 1:])  # position 3
        rows.append(lm.extend(state, outs[:, 3:4])[:, 1:])  # position 4
        inc = torch.cat(rows, dim=1)
        assert torch.allclose(inc, full, atol=1e-4), (inc - full).abs().max()


def test_teacher_mode_equals_transformers_greedy(pair):
    teacher, _ = pair
    out = generate(None, teacher, PROMPTS, mode="teacher", max_new_tokens=12)
    assert out.tokens == _hf_greedy(teacher, PROMPTS, 12)
    assert out.student_steps == [0, 0, 0]
    assert out.teacher_forwards == [len(t) for t in out.tokens]
    assert all(all(m) for m in out.call_mask)


def test_student_mode_equals_transformers_greedy_with_tau_masked(pair):
    _, student = pair
    out = generate(student, None, PROMPTS, mode="student", max_new_tokens=12)
    ref = _hf_greedy(student.lm, PROMPTS, 12, suppress=[student.tau_id])
    assert out.tokens == ref
    assert out.teacher_forwards == [0, 0, 0] and out.teacher_tokens == [0, 0, 0]
    assert out.student_steps == [len(t) for t in out.tokens]


def test_batched_equals_one_at_a_time(pair):
    teacher, student = pair
    batched = generate(student, teacher, PROMPTS, max_new_tokens=10, tau_bias=2.0)
    single = [generate(student, teacher, [p], max_new_tokens=10, tau_bias=2.0) for p in PROMPTS]
    assert batched.tokens == [s.tokens[0] for s in single]
    assert batched.call_mask == [s.call_mask[0] for s in single]


def test_always_calling_reproduces_the_teacher(pair):
    teacher, student = pair
    ref = generate(None, teacher, PROMPTS, mode="teacher", max_new_tokens=12)
    out = generate(student, teacher, PROMPTS, mode="budgeted", max_new_tokens=12, tau_bias=1e4)
    assert out.tokens == ref.tokens
    assert all(all(m) for m in out.call_mask)
    assert out.teacher_tokens == [len(t) for t in out.tokens]


def test_64_token_output_each_token_once_in_the_teacher(llama_close):
    teacher, student = llama_close
    teacher = _no_eos(teacher)
    student = make_student(copy.deepcopy(_no_eos(student.lm).model), copy.deepcopy(teacher.tokenizer))
    fed = []

    def count(module, args, kwargs):
        fed.append(kwargs["input_ids"].shape[1])

    h = teacher.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        prompt = PROMPTS[:1]
        P = teacher.encode_prompts(prompt)[0].shape[1]
        # every position a call: the teacher computes each of the 64 positions exactly once
        out = generate(student, teacher, prompt, max_new_tokens=64, tau_bias=1e4)
        assert len(out.tokens[0]) == 64 and sum(out.call_mask[0]) == 64
        assert out.teacher_tokens == [64]
        assert sum(fed) == P + 63  # prompt once, then each output token once (the last is never needed)
        assert out.teacher_forwards == [64]
        # calls at some positions only: still each token fed at most once, one forward per call step
        fed.clear()
        out = generate(student, teacher, prompt, max_new_tokens=64, tau_bias=0.5, do_sample=True,
                       generator=torch.Generator().manual_seed(0))
        calls = [i for i, c in enumerate(out.call_mask[0]) if c]
        assert len(out.tokens[0]) == 64 and 0 < len(calls) < 64
        assert sum(fed) == P + calls[-1]
        assert out.teacher_tokens == [calls[-1] + 1]
        assert out.teacher_forwards == [len(calls)] == [len(fed)]
    finally:
        h.remove()



@pytest.mark.parametrize("mode,bias", [("budgeted", 3.0), ("student", 0.0), ("teacher", 0.0)])
def test_score_teacher_is_score_paths_with_each_position_computed_once(pair, mode, bias):
    """A rollout's teacher log-probs come from the teacher's decode state (calls scored as fed,
    the tail in one forward at the end): equal to a separate teacher-forced scoring pass, with the
    prompt and each output position computed once (the last token only scored, never fed)."""
    from kdtw.rollout import score_paths

    teacher, student = pair
    fed = []

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", kwargs.get("decoder_input_ids"))
        fed.append(ids.shape[1])

    h = teacher.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        out = generate(student if mode != "teacher" else None, teacher, PROMPTS, mode=mode, max_new_tokens=12,
                       tau_bias=bias, do_sample=True, teacher_do_sample=True, score_teacher=True,
                       generator=torch.Generator().manual_seed(1))
    finally:
        h.remove()
    ref = score_paths(teacher, PROMPTS, out.tokens)
    assert [len(x) for x in out.teacher_logp] == out.lengths
    for a, b in zip(out.teacher_logp, ref):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    T = max(out.lengths)
    # decoder positions: the (padded) prompt, or T5's decoder start token, then T - 1 outputs
    P = 1 if teacher.is_encoder_decoder else teacher.encode_prompts(PROMPTS)[0].shape[1]
    assert sum(fed) == P + T - 1, (fed, T)
    if mode == "budgeted":
        assert any(map(any, out.call_mask))
    assert generate(student, teacher, PROMPTS, max_new_tokens=4).teacher_logp == []

def test_strict_never_exceeds_the_budget(pair):
    teacher, student = pair
    budgets = [0.0, 0.25, 0.5]
    out = generate(student, teacher, PROMPTS, budgets=budgets, strict=True, tau_bias=1e4, max_new_tokens=12)
    for b, mask in zip(budgets, out.call_mask):
        run = 0
        for t, c in enumerate(mask):
            run += c
            assert run <= b * (t + 1) + 1e-9
    loose = generate(student, teacher, PROMPTS, budgets=budgets, strict=False, tau_bias=1e4, max_new_tokens=12)
    assert any(u > b for u, b in zip(loose.teacher_use(), budgets))


def test_bad_inputs(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match="empty input"):
        generate(student, teacher, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="mode"):
        generate(student, teacher, PROMPTS, mode="nope")
    with pytest.raises(ValueError, match="budget"):
        generate(student, teacher, PROMPTS, strict=True)
    with pytest.raises(ValueError, match="empty input"):
        speculative_generate(student, teacher, [], k=2)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_speculative_greedy_equals_teacher_greedy(pair, llama_close, t5_close, k):
    for teacher, student in (pair, llama_close, t5_close):
        ref = generate(None, teacher, PROMPTS, mode="teacher", max_new_tokens=16)
        spec = speculative_generate(student, teacher, PROMPTS, k=k, max_new_tokens=16)
        assert spec.tokens == ref.tokens
        for f, toks in zip(spec.teacher_forwards, spec.tokens):
            assert f >= len(toks) / (k + 1)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_speculative_matches_transformers_assisted_generation(llama_close, k):
    teacher, student = llama_close
    drafter = copy.deepcopy(student.lm.model)
    rows = teacher.model.get_output_embeddings().weight.shape[0]
    gc = drafter.generation_config
    gc.num_assistant_tokens = k
    gc.num_assistant_tokens_schedule = "constant"
    gc.assistant_confidence_threshold = 0.0  # None would be filled with the 0.4 default: ends drafts early
    gc.suppress_tokens = list(range(teacher.vocab_size, rows))  # the drafter's <τ> and spare rows
    calls = {"n": 0}
    h = teacher.model.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    accepted = 0.0
    try:
        for prompt in PROMPTS:
            calls["n"] = 0
            ours = speculative_generate(student, teacher, [prompt], k=k, max_new_tokens=20)
            assert calls["n"] == ours.teacher_forwards[0]
            ids, mask = teacher.encode_prompts([prompt])
            calls["n"] = 0
            hf = teacher.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                assistant_model=drafter, pad_token_id=teacher.pad_id, eos_token_id=teacher.eos_id,
                suppress_tokens=list(range(teacher.vocab_size, rows)),
            )
            ref = hf[0, ids.shape[1]:].tolist()
            assert ours.tokens[0] == ref
            assert ours.teacher_forwards[0] == calls["n"]
            accepted += ours.extra["acceptance_rate"]
    finally:
        h.remove()
    assert accepted > 0  # the drafter agrees sometimes: the parity covers acceptance and rollback


def _tiny_vocab_pair():
    tok = build_word_tokenizer(["a", "b", "c", "d"])
    spec = ModelConfig(arch="llama", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, tie_embeddings=False)
    tm, dm = init_model(spec, tok, seed=3), init_model(spec, tok, seed=4)
    with torch.no_grad():
        for m in (tm, dm):
            m.lm_head.weight.mul_(6.0)
    return LM(tm, tok), LM(dm, copy.deepcopy(tok))


def _exact_marginals(teacher: LM, prompt: str, T: int) -> torch.Tensor:
    """Exact per-position marginals [T, V] of the teacher's sampled output (EOS absorbing)."""
    V = teacher.vocab_size
    ids, mask = teacher.encode_prompts([prompt])
    probs = {(): 1.0}
    marg = torch.zeros(T, V + 1)  # last column: already ended
    for t in range(T):
        nxt = {}
        for prefix, pr in probs.items():
            if prefix and prefix[-1] == teacher.eos_id:
                marg[t, V] += pr
                nxt[prefix] = pr
                continue
            outs = torch.tensor([list(prefix) + [teacher.eos_id]], dtype=torch.long)
            logits = teacher.forward(ids, mask, outs)[0, -1, :V] if prefix else teacher.forward(ids, mask, outs[:, :1])[0, 0, :V]
            p = torch.softmax(logits.float(), -1)
            for x in range(V):
                if p[x] > 1e-6:
                    marg[t, x] += pr * p[x]
                    nxt[prefix + (x,)] = pr * float(p[x])
        probs = nxt
    return marg


def test_speculative_sampling_matches_the_teacher_distribution():
    torch.manual_seed(0)
    teacher, drafter = _tiny_vocab_pair()
    T, N = 3, 1500
    with torch.no_grad():
        exact = _exact_marginals(teacher, "a b", T)
    g = torch.Generator().manual_seed(1234)
    V = teacher.vocab_size

    def empirical(fn):
        counts = torch.zeros(T, V + 1)
        for _ in range(N):
            toks = fn()
            for t in range(T):
                counts[t, toks[t] if t < len(toks) else V] += 1
        return counts / N

    spec = empirical(lambda: speculative_generate(drafter, teacher, ["a b"], k=2, max_new_tokens=T, do_sample=True, generator=g).tokens[0])
    draft = empirical(lambda: generate(None, drafter, ["a b"], mode="teacher", max_new_tokens=T, teacher_do_sample=True, generator=g).tokens[0])
    tv_spec = 0.5 * (spec - exact).abs().sum(-1)  # [T]
    tv_draft = 0.5 * (draft - exact).abs().sum(-1)
    # sampling noise at N=1500 over <= 9 cells is ~0.03; the drafter's own law is far off
    assert tv_spec.max() < 0.06, tv_spec
    assert tv_draft.max() > 0.15, tv_draft


def test_forward_time_ratio_is_positive(pair):
    teacher, student = pair
    c = forward_time_ratio(student, teacher, PROMPTS, steps=2, repeats=1)
    assert c > 0


# ----------------------------------------------------------------------------- call rules


def _teacher_forced_policy(student, prompts, tokens) -> torch.Tensor:
    """Policy logits [B, T, V+1] of the student teacher-forced on the decoded ``tokens``."""
    width = max(len(t) for t in tokens)
    outs = torch.full((len(tokens), width), student.lm.pad_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        outs[i, : len(t)] = torch.tensor(t)
    logits = student.lm.forward(*student.lm.encode_prompts(prompts), outs)
    return student.policy_logits(logits.float())


def _with_offset(student, offset: float):
    s = copy.deepcopy(student)
    with torch.no_grad():
        s.tau_offset.fill_(offset)
    return s


@pytest.mark.parametrize("rule", ["argmax", "sample", "systematic", "threshold", "oracle"])
def test_tau_prob_and_behaviour_logp_match_a_teacher_forced_forward(pair, rule):
    from kdtw.calibration import oracle_scores

    teacher, student = pair
    student = _with_offset(student, 2.5)  # π(<τ>) around 0.2: the sample rule makes both actions
    theta = None
    if rule in ("threshold", "oracle"):  # a median score along the student's own path
        own = generate(student, teacher, PROMPTS, max_new_tokens=10, call_rule="threshold",
                       call_threshold=float("inf"))
        scores = own.tau_prob if rule == "threshold" else oracle_scores(student, teacher, PROMPTS, own.tokens)
        flat = sorted(x for row in scores for x in row)
        theta = flat[len(flat) // 2]
    # argmax: <τ> is rarely the argmax over ~50 actions, so draw from π (do_sample) to see both
    out = generate(student, teacher, PROMPTS, max_new_tokens=10, call_rule=rule, call_threshold=theta,
                   do_sample=rule == "argmax", generator=torch.Generator().manual_seed(0))
    V = student.vocab_size
    with torch.no_grad():
        logpi = torch.log_softmax(_teacher_forced_policy(student, PROMPTS, out.tokens), -1)  # [B, T, V+1]
    calls = 0
    for i, toks in enumerate(out.tokens):
        L = len(toks)
        assert len(out.tau_prob[i]) == L
        assert torch.allclose(torch.tensor(out.tau_prob[i]), logpi[i, :L, V].exp(), atol=1e-4)
        # the action taken: <τ> at a call, else the written token (log π over V ∪ {<τ>})
        action = torch.tensor([V if c else x for c, x in zip(out.call_mask[i], toks)])
        want = logpi[i, :L].gather(-1, action[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(out.behaviour_logp[i]), want, atol=1e-4)
        calls += sum(out.call_mask[i])
    assert calls > 0
    if rule != "oracle":  # (the oracle's path can drift to states that all call; same code path)
        assert calls < sum(out.lengths)  # both branches of behaviour_logp were checked


def test_threshold_rule_zero_calls_everywhere_above_one_never(pair):
    teacher, student = pair
    every = generate(student, teacher, PROMPTS, max_new_tokens=10, call_rule="threshold", call_threshold=0.0)
    assert all(all(m) for m in every.call_mask)
    assert every.tokens == generate(None, teacher, PROMPTS, mode="teacher", max_new_tokens=10).tokens
    never = generate(student, teacher, PROMPTS, max_new_tokens=10, call_rule="threshold", call_threshold=1.5,
                     tau_bias=1e4)
    assert not any(any(m) for m in never.call_mask)
    # no call: the student's own argmax over V, as in student mode
    assert never.tokens == generate(student, None, PROMPTS, mode="student", max_new_tokens=10).tokens
    # per-prompt thresholds
    mixed = generate(student, teacher, PROMPTS, max_new_tokens=10, call_rule="threshold",
                     call_threshold=[0.0, 1.5, 0.0])
    assert [any(m) for m in mixed.call_mask] == [True, False, True]


def test_threshold_rule_respects_strict(pair):
    # regression: a strict mask sets π(<τ>) = 0, which a threshold of 0 met, calling past the budget
    teacher, student = pair
    budgets = [0.0, 0.25, 0.5]
    out = generate(student, teacher, PROMPTS, budgets=budgets, strict=True, max_new_tokens=12,
                   call_rule="threshold", call_threshold=0.0)
    for b, mask in zip(budgets, out.call_mask):
        assert all(sum(mask[: t + 1]) <= b * (t + 1) + 1e-9 for t in range(len(mask)))
    assert any(any(m) for m in out.call_mask)


def test_oracle_rule_zero_calls_everywhere_inf_never(pair):
    teacher, student = pair
    every = generate(student, teacher, PROMPTS, max_new_tokens=10, call_rule="oracle", call_threshold=0.0)
    assert all(all(m) for m in every.call_mask)
    assert every.tokens == generate(None, teacher, PROMPTS, mode="teacher", max_new_tokens=10).tokens
    never = generate(student, teacher, PROMPTS, max_new_tokens=10, call_rule="oracle",
                     call_threshold=float("inf"), tau_bias=1e4)
    assert not any(any(m) for m in never.call_mask)
    assert never.tokens == generate(student, None, PROMPTS, mode="student", max_new_tokens=10).tokens
    # the oracle's teacher runs at every step (a quality ceiling, not a fast decoder)
    assert never.teacher_forwards == never.lengths


def test_oracle_rule_calls_where_the_kl_reaches_the_threshold(pair):
    from kdtw.calibration import calibrate_thresholds, oracle_scores

    teacher, student = pair
    # a threshold at which about half the steps call (a fixed KL can send a path to all or none)
    [theta] = calibrate_thresholds(student, teacher, [PROMPTS], [0.5], rule="oracle", max_new_tokens=10,
                                   batch_size=8)
    out = generate(student, teacher, PROMPTS, max_new_tokens=10, call_rule="oracle", call_threshold=theta)
    kl = oracle_scores(student, teacher, PROMPTS, out.tokens)  # on the oracle's own path
    checked = 0
    for mask, ks in zip(out.call_mask, kl):
        for c, k in zip(mask, ks):
            if abs(k - theta) > 1e-4:  # cached and teacher-forced KL differ by float noise
                assert c == (k >= theta)
                checked += 1
    assert checked > 0 and any(any(m) for m in out.call_mask) and not all(all(m) for m in out.call_mask)


def _tiny_student_and_teacher(tau_offset: float):
    tok = build_word_tokenizer(["a", "b", "c", "d"])
    spec = ModelConfig(arch="llama", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, tie_embeddings=False)
    tm, sm = init_model(spec, tok, seed=3), init_model(spec, tok, seed=5)
    with torch.no_grad():
        sm.lm_head.weight.mul_(3.0)  # a few tokens with visible mass
    student = make_student(sm, copy.deepcopy(tok))
    with torch.no_grad():
        student.tau_offset.fill_(tau_offset)
    return LM(tm, tok), student


def test_sample_rule_with_do_sample_is_a_draw_from_pi():
    teacher, student = _tiny_student_and_teacher(0.0)
    V, N = student.vocab_size, 4000
    prompt = "a b c"
    with torch.no_grad():
        logits = student.lm.extend(student.lm.start(*student.lm.encode_prompts([prompt])),
                                   torch.empty((1, 0), dtype=torch.long))[:, -1]
        pi = torch.softmax(student.policy_logits(logits.float())[0], -1)  # [V+1]
        # put π(<τ>) near 0.3 so both actions carry mass
        off = float(torch.log(torch.tensor(0.3 / 0.7)) - torch.log(pi[V] / (1 - pi[V])))
        student.tau_offset.fill_(off)
        pi = torch.softmax(student.policy_logits(logits.float())[0], -1)
    assert 0.25 < float(pi[V]) < 0.35

    def counts(**kw):
        out = generate(student, teacher, [prompt] * N, max_new_tokens=1, batch_size=N, call_rule="sample",
                       generator=torch.Generator().manual_seed(11), **kw)
        c = torch.zeros(V + 1)
        for m, t in zip(out.call_mask, out.tokens):
            c[V if m[0] else t[0]] += 1
        return c / N

    emp = counts(do_sample=True)
    tv = 0.5 * float((emp - pi).abs().sum())
    assert tv < 0.04, (tv, emp, pi)  # sampling noise at N=4000 over <= 10 cells is ~0.02
    # greedy tokens: calls still drawn with probability π(<τ>), the written token is the argmax over V
    emp = counts(do_sample=False)
    assert abs(float(emp[V]) - float(pi[V])) < 0.03
    assert float(emp[int(pi[:V].argmax())]) == pytest.approx(1 - float(emp[V]))


def test_systematic_rule_calls_within_one_of_the_expected_count_per_sequence(pair):
    """call_rule=systematic: each sequence makes ⌊u + Σ_t π(<τ>|s_t)⌋ calls, so its count is
    within 1 of the expected one, Σ π(<τ>) along its own path (the sample rule's independent
    draws stray by several calls on some sequence); the zero budget and strict still hold."""
    teacher, student = pair
    student, prompts = _with_offset(student, 2.5), PROMPTS * 8  # π(<τ>) about 0.2 on 30-token paths
    gaps = {}
    for rule in ("systematic", "sample"):
        out = generate(student, teacher, prompts, max_new_tokens=30, call_rule=rule,
                       generator=torch.Generator().manual_seed(1))
        gaps[rule] = [sum(m) - sum(p) for m, p in zip(out.call_mask, out.tau_prob)]
        assert sum(sum(m) for m in out.call_mask) > 0
    assert all(-1 < g < 1 for g in gaps["systematic"]), gaps["systematic"]
    assert max(abs(g) for g in gaps["sample"]) >= 1, gaps["sample"]
    # masked <τ>: the zero budget never calls; strict holds the budget at every prefix
    budgets = [0.0, 0.25, 0.5]
    out = generate(student, teacher, PROMPTS, budgets=budgets, strict=True, max_new_tokens=12,
                   call_rule="systematic", generator=torch.Generator().manual_seed(0))
    assert not any(out.call_mask[0])
    for b, mask in zip(budgets, out.call_mask):
        assert all(sum(mask[: t + 1]) <= b * (t + 1) + 1e-9 for t in range(len(mask)))


def test_systematic_rule_calls_with_the_marginal_probability_pi():
    """At one step, the systematic rule's call is 1[u + π(<τ>) ≥ 1] with u ~ U(0, 1): a call with
    probability π(<τ>) per sequence, as the sample rule; the written token is the argmax over V."""
    teacher, student = _tiny_student_and_teacher(0.0)
    V, N, prompt = student.vocab_size, 4000, "a b c"
    with torch.no_grad():
        logits = student.lm.extend(student.lm.start(*student.lm.encode_prompts([prompt])),
                                   torch.empty((1, 0), dtype=torch.long))[:, -1]
        pi = torch.softmax(student.policy_logits(logits.float())[0], -1)
        student.tau_offset.fill_(float(torch.log(torch.tensor(0.3 / 0.7)) - torch.log(pi[V] / (1 - pi[V]))))
        pi = torch.softmax(student.policy_logits(logits.float())[0], -1)
    out = generate(student, teacher, [prompt] * N, max_new_tokens=1, batch_size=N, call_rule="systematic",
                   generator=torch.Generator().manual_seed(11))
    rate = sum(m[0] for m in out.call_mask) / N
    assert abs(rate - float(pi[V])) < 0.03, (rate, float(pi[V]))
    written = [t[0] for m, t in zip(out.call_mask, out.tokens) if not m[0]]
    assert written and set(written) == {int(pi[:V].argmax())}


def test_bad_call_rules(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match="call_rule='nope'"):
        generate(student, teacher, PROMPTS, call_rule="nope")
    for rule in ("threshold", "oracle"):
        with pytest.raises(ValueError, match="needs call_threshold"):
            generate(student, teacher, PROMPTS, call_rule=rule)
    with pytest.raises(ValueError, match="2 call thresholds for 3 prompts"):
        generate(student, teacher, PROMPTS, call_rule="threshold", call_threshold=[0.1, 0.2])


def test_extend_many_merges_sessions_into_one_forward_with_the_answers_of_each_alone(pair):
    """A teacher replica answers the calls of several rollouts in one forward: decode states of
    different prompt lengths and prefix lengths, fed different numbers of tokens, give the logits
    they give alone, and each state goes on alone afterwards as if never merged."""
    teacher, _ = pair
    prompts = [PROMPTS[:2], PROMPTS[1:], PROMPTS[2:]]
    feeds = [torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([[11], [12]]), torch.tensor([[13, 14]])]
    nxt = [torch.tensor([[3], [4]]), torch.tensor([[5], [6]]), torch.tensor([[7]])]

    def started(i):
        st = teacher.start(*teacher.encode_prompts(prompts[i]))
        teacher.extend(st, torch.tensor([[9] * (i + 1)] * len(prompts[i])))  # prefixes of 1, 2, 3 tokens
        return st

    alone = [started(i) for i in range(3)]
    ref = [teacher.extend(st, f) for st, f in zip(alone, feeds)]
    ref2 = [teacher.extend(st, x) for st, x in zip(alone, nxt)]
    merged = [started(i) for i in range(3)]
    calls = []
    h = teacher.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        got = teacher.extend_many(merged, feeds)
    finally:
        h.remove()
    assert len(calls) == (3 if teacher.is_encoder_decoder else 1)  # decoder-only: one forward for all
    got2 = [teacher.extend(st, x) for st, x in zip(merged, nxt)]
    for a, b, c, d in zip(got, ref, got2, ref2):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        assert torch.allclose(c, d, atol=1e-4), (c - d).abs().max()
    assert [st.n_fed for st in merged] == [st.n_fed for st in alone]
    # states that have not started (their prompt goes in with their tokens) join the forward too
    fresh = [teacher.start(*teacher.encode_prompts(p)) for p in prompts]
    ref3 = [teacher.extend(teacher.start(*teacher.encode_prompts(p)), f) for p, f in zip(prompts, feeds)]
    mixed = [merged[0], fresh[1], fresh[2]]
    got3 = teacher.extend_many(mixed, [nxt[0], feeds[1], torch.empty((1, 0), dtype=torch.long)])
    assert torch.allclose(got3[0], teacher.extend(alone[0], nxt[0]), atol=1e-4)
    assert torch.allclose(got3[1], ref3[1], atol=1e-4)
    assert torch.allclose(got3[2], teacher.extend(teacher.start(*teacher.encode_prompts(prompts[2])),
                                                  torch.empty((1, 0), dtype=torch.long)), atol=1e-4)
    after = [teacher.extend(st, x) for st, x in zip(mixed[1:], nxt[1:])]
    ref4 = [teacher.extend(teacher.start(*teacher.encode_prompts(p)), torch.cat([f, x], 1))[:, -1]
            for p, f, x in zip(prompts[1:], [feeds[1], torch.empty((1, 0), dtype=torch.long)], nxt[1:])]
    for a, b in zip(after, ref4):
        assert torch.allclose(a[:, -1], b, atol=1e-4)


def test_categorical_draw_is_the_distribution_and_never_a_zero_weight_entry():
    """`_multinomial` (inverse CDF, one uniform a row) draws what torch.multinomial draws: the
    frequencies of 200k draws match the weights (unnormalised rows too), an entry of weight zero
    is never drawn (first, middle or last: the last is <τ> when it is masked), shapes are
    torch.multinomial's, and a row with no mass is refused."""
    from kdtw.decoding import _multinomial

    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.0, 0.2, 0.0, 1.2, 0.6, 0.0])
    a = _multinomial(w.repeat(200_000, 1), g)
    assert a.shape == (200_000, 1) and a.dtype == torch.long
    freq = torch.bincount(a.squeeze(-1), minlength=6).double() / 200_000
    assert torch.allclose(freq, (w / w.sum()).double(), atol=0.005)
    assert freq[0] == 0 and freq[2] == 0 and freq[5] == 0
    assert _multinomial(torch.tensor([0.0, 0.0, 3.0, 0.0]), g).tolist() == [2]
    # a row whose mass is all on one entry, every draw: the uniform at the top of [0, total) included
    assert set(_multinomial(torch.tensor([[0.0, 1.0, 0.0]] * 1000), g).squeeze(-1).tolist()) == {1}
    with pytest.raises(FloatingPointError, match="total"):
        _multinomial(torch.zeros(2, 4), g)
    with pytest.raises(FloatingPointError, match="total .* diverged; lower train.phase2_lr"):
        _multinomial(torch.tensor([[0.5, float("nan")]]), g)
