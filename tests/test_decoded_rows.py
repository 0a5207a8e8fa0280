"""train.decoded_per_budget (issue 11): λ probes, training prompts of every nonzero budget decoded
as validation decodes them (argmax tokens, the teacher's argmax at calls, decoding.call_rule),
read by the λ estimate and never trained on."""

from __future__ import annotations

import random

import pytest
import torch

from conftest_ray import tiny
from kdtw.config import ConfigError
from kdtw.decoding import generate
from kdtw.local import LocalLoop
from kdtw.rollout import collect, demo_generator, score_batch
from kdtw.teacher_service import UseObservation


@pytest.mark.parametrize("rule", ["argmax", "systematic"])
def test_collect_adds_probes_decoded_as_validation_decodes(tmp_path, rule):
    cfg = tiny(tmp_path, "train.phase1_steps=0", "train.decoded_per_budget=2", f"decoding.call_rule={rule}")
    loop = LocalLoop(cfg, log=lambda _: None)
    n_on = cfg.train.batch_size - round(cfg.train.batch_size * cfg.train.demo_ratio)
    nonzero = [k for k in range(len(loop.table)) if loop.table.targets[k] > 0]
    batches = []
    for seed in (1, 2):  # the same tasks, two rollout streams
        trajs, demos = collect(cfg, loop.student, loop.teacher, loop.train_set, loop.table, rng=random.Random(0),
                               gen=torch.Generator().manual_seed(seed), demo_gen=demo_generator(0), version=0)
        assert len(trajs) == n_on + 2 * len(nonzero) and all(t.origin == "student" for t in trajs)
        assert [t.decoded for t in trajs] == [False] * n_on + [True] * (2 * len(nonzero))
        assert sorted(t.budget_id for t in trajs if t.decoded) == sorted(nonzero * 2)
        assert len(demos) + n_on == cfg.train.batch_size and not any(t.decoded for t in demos)
        batches.append(trajs)
    dec = [t for t in batches[0] if t.decoded]
    if rule == "argmax":  # the argmax rule draws nothing: the probes ignore the stream
        assert [t.tokens for t in dec] == [t.tokens for t in batches[1] if t.decoded]
        assert [t.actions_tau for t in dec] == [t.actions_tau for t in batches[1] if t.decoded]
    assert [t.tokens for t in batches[0] if not t.decoded] != [t.tokens for t in batches[1] if not t.decoded]
    # every token the student wrote itself is its argmax over V at that state, and the teacher's
    # log-probs are its own teacher-forced scoring of the path
    for t in dec:
        p_ids, p_mask = torch.tensor([t.source_ids]), torch.ones(1, len(t.source_ids), dtype=torch.long)
        assert t.teacher_logp == pytest.approx(score_batch(loop.teacher, p_ids, p_mask, [t.tokens])[0], abs=1e-4)
        lm = loop.student.lm
        top = lm.forward(p_ids, p_mask, torch.tensor([t.tokens]))[0, :, : lm.vocab_size].argmax(-1).tolist()
        own = [i for i, c in enumerate(t.actions_tau) if not c]
        assert own and all(t.tokens[i] == top[i] for i in own)
    assert UseObservation.of(dec[0]).decoded and not UseObservation.of(batches[0][0]).decoded


def test_probes_steer_lambda_and_are_never_trained_on(tmp_path):
    """A local-loop step with probes: the buffer (so the PCL batch) holds none of them, and λ's
    estimate is the probes' mean per-path π(<τ>)."""
    cfg = tiny(tmp_path, "train.phase1_steps=0", "train.decoded_per_budget=1", "decoding.call_rule=systematic",
               "train.value_warmup_steps=0", "train.use_weighting=sequence")
    loop = LocalLoop(cfg, log=lambda _: None)
    loop.learner.start_phase2()
    trajs, demos = loop.collect()
    st = loop.learn(trajs, demos)
    stored = [t.tokens for t in loop.buffer._items["student"]]
    assert sorted(stored) == sorted(t.tokens for t in trajs if not t.decoded)
    assert loop.buffer.counts()["teacher_demo"] == len(demos)
    for k in range(len(loop.table)):
        probes = [t for t in trajs if t.decoded and t.budget_id == k]
        if loop.table.targets[k] == 0:
            assert not probes
            continue
        want = sum(sum(t.tau_prob) / len(t) for t in probes) / len(probes)
        assert st.use_expected[k] == pytest.approx(want, rel=1e-5)


def test_decoded_per_budget_refuses_the_threshold_rule(tmp_path):
    with pytest.raises(ConfigError, match="train.decoded_per_budget"):
        tiny(tmp_path, "train.decoded_per_budget=1", "decoding.call_rule=threshold")
    with pytest.raises(ConfigError, match="train.decoded_per_budget"):
        tiny(tmp_path, "train.decoded_per_budget=-1")


def test_rollout_state_gap_benchmark_measures_both_ways(tmp_path):
    """benchmarks/rollout_state_gap.py (its figures are in the README): each column is the
    decode it names, redone here."""
    import importlib.util
    import os

    from conftest import ROOT
    from kdtw.factory import budget_table, load_splits, load_student, load_teacher

    spec = importlib.util.spec_from_file_location("gap", os.path.join(ROOT, "benchmarks", "rollout_state_gap.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = tiny(tmp_path, f"models_dir={tmp_path}/models", "decoding.call_rule=systematic")
    teacher = load_teacher(cfg)
    student = load_student(cfg, teacher)
    with torch.no_grad():
        student.tau_offset.fill_(1.0)
    examples = load_splits(cfg)["train"][:5]
    res = mod.measure(cfg, student, teacher, examples, seed=3)
    table = budget_table(cfg)
    assert set(res) == {b.phrase for b in table if b.target > 0}
    b = next(b for b in table if b.target > 0)
    prompts = [table.prompt(b.phrase, cfg.task.instruction, ex.source) for ex in examples]
    d = cfg.decoding
    for way, kw in (("sampled", dict(do_sample=True, teacher_do_sample=True)),
                    ("decoded", dict(call_rule="systematic"))):
        out = generate(student, teacher, prompts, budgets=b.target, max_new_tokens=d.max_new_tokens,
                       batch_size=d.batch_size, generator=torch.Generator().manual_seed(4), **kw)
        want = sum(sum(p) / len(p) for p in out.tau_prob) / len(out)
        assert res[b.phrase][way]["tau_prob"] == pytest.approx(want)
        assert res[b.phrase][way]["use"] == pytest.approx(sum(out.teacher_use()) / len(out))
    assert res[b.phrase]["sampled"]["tau_prob"] != res[b.phrase]["decoded"]["tau_prob"]


def test_the_loops_validate_on_examples_spread_over_the_split(tmp_path):
    """train.val_examples picks its examples over the whole validation split (kdtw.examples.spread),
    in the local loop and in the Ray job alike (both call kdtw.reporting.validation_examples)."""
    import inspect

    import jobs.train_pcl as job
    from kdtw import reporting
    from kdtw.examples import spread
    from kdtw.factory import load_splits

    cfg = tiny(tmp_path, "train.phase1_steps=0", "train.val_examples=5")
    loop = LocalLoop(cfg, log=lambda _: None)
    val = load_splits(cfg)["validation"]
    assert len(val) > 5 and loop.val_set == spread(val, 5) and loop.val_set != val[:5]
    assert reporting.validation_examples(cfg, load_splits(cfg)) == loop.val_set
    assert job.validation_examples is reporting.validation_examples
    assert "validation_examples(cfg, splits)" in inspect.getsource(job.Phase2.__init__)
