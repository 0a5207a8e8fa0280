"""Models: <τ> on a spare row or a resized vocabulary, value head, save/load, tokenizer checks."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from conftest import PROMPTS, ROOT
from kdtw.config import ModelConfig
from kdtw.models import (
    TAU_TOKEN,
    ModelError,
    Student,
    check_tokenizers,
    check_weights,
    encode_outputs,
    init_model,
    load_lm,
    make_student,
)
from kdtw.tokenizer import build_word_tokenizer


def test_tau_reuses_a_spare_row_when_there_is_one(tok):
    model = init_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows > len(tok)  # rounded up to a multiple of 64
    student = make_student(model, copy.deepcopy(tok))
    assert student.tau_id == len(tok) and student.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape[0] == rows  # not resized


def test_tau_resizes_when_the_vocabulary_is_full(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32)
    student = make_student(LlamaForCausalLM(cfg), copy.deepcopy(tok))
    assert student.lm.model.get_input_embeddings().weight.shape[0] == len(tok) + 1
    assert student.tau_id == len(tok)
    with pytest.raises(ModelError, match="already contains"):
        make_student(student.lm.model, student.lm.tokenizer)


def test_policy_logits_and_zero_value_head(pair):
    _, student = pair
    p_ids, p_mask = student.lm.encode_prompts(PROMPTS)
    outs, mask = encode_outputs(student.lm, ["w1 w2", "w3", "w4 w5 w6"])
    logits, hidden = student.lm.forward(p_ids, p_mask, outs, hidden=True)
    pol = student.policy_logits(logits)
    assert pol.shape[-1] == student.vocab_size + 1
    assert torch.equal(pol[..., -1], logits[..., student.tau_id] + student.tau_offset)
    assert torch.count_nonzero(student.values(hidden)) == 0  # zero-initialised V_φ


def test_calibrate_tau_hits_the_target(pair):
    _, student = pair
    student = copy.deepcopy(student)
    p_ids, p_mask = student.lm.encode_prompts(PROMPTS)
    outs, mask = encode_outputs(student.lm, ["w1 w2", "w3", "w4 w5 w6"])
    logits = student.lm.forward(p_ids, p_mask, outs)
    student.calibrate_tau(logits, mask, 0.2)
    p = torch.softmax(student.policy_logits(logits), -1)[..., -1][mask.bool()].mean()
    assert abs(float(p.detach()) - 0.2) < 1e-3


def test_save_load_roundtrip_and_plain_transformers_loads_it(pair, tmp_path):
    _, student = pair
    student = copy.deepcopy(student)
    with torch.no_grad():
        student.value_head.weight.normal_()
        student.tau_offset.fill_(1.5)
    folder = tmp_path / "student"
    student.save(folder)
    again = Student.load(folder)
    assert again.tau_id == student.tau_id and float(again.tau_offset) == 1.5
    p_ids, p_mask = student.lm.encode_prompts(PROMPTS)
    outs, _ = encode_outputs(student.lm, ["w1", "w2", "w3"])
    a, ha = student.lm.forward(p_ids, p_mask, outs, hidden=True)
    b, hb = again.lm.forward(p_ids, p_mask, outs, hidden=True)
    assert torch.allclose(a, b) and torch.allclose(student.values(ha), again.values(hb))
    student.save(folder)  # overwriting an existing folder works (atomic replace)
    # plain transformers, in a fresh process, with no kdtw import
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer;"
        f"auto = {'AutoModelForSeq2SeqLM' if student.lm.is_encoder_decoder else 'AutoModelForCausalLM'};"
        f"m = auto.from_pretrained({str(folder)!r}); t = AutoTokenizer.from_pretrained({str(folder)!r});"
        f"assert t.convert_tokens_to_ids({TAU_TOKEN!r}) == {student.tau_id}; print('ok', 'kdtw' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok False", out.stderr[-2000:]


def test_hub_loading_path_on_a_local_folder(pair, tmp_path):
    teacher, _ = pair
    teacher.model.save_pretrained(tmp_path / "t")
    teacher.tokenizer.save_pretrained(tmp_path / "t")
    lm = load_lm(str(tmp_path / "t"))
    assert lm.is_encoder_decoder == teacher.is_encoder_decoder
    p_ids, p_mask = teacher.encode_prompts(PROMPTS)
    outs, _ = encode_outputs(teacher, ["w1", "w2", "w3"])
    assert torch.allclose(lm.forward(p_ids, p_mask, outs), teacher.forward(p_ids, p_mask, outs), atol=1e-5)
    with pytest.raises(ModelError, match="cannot load a model"):
        load_lm(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelError, match="not a kdtw student folder"):
        Student.load(tmp_path / "t")


def test_a_corrupt_student_folder_is_a_clear_error(pair, tmp_path):
    """Truncated weights, metadata that is not a kdtw student's, a missing tokenizer or value head:
    each a ModelError naming the folder or file and that it is corrupt, not the library's own error."""
    import shutil

    _, student = pair
    good = tmp_path / "good"
    student.save(good)
    breaks = {
        "weights": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
        "metadata": lambda d: (d / "kdtw_student.json").write_text('{"tau_token": "x"}'),
        "not json": lambda d: (d / "kdtw_student.json").write_text("{oops"),
        "tokenizer": lambda d: [os.remove(d / n) for n in os.listdir(d) if n.startswith(("tokenizer", "special_tokens"))],
        "value head": lambda d: os.remove(d / "value_head.safetensors"),
    }
    for name, spoil in breaks.items():
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(good, d)
        spoil(d)
        with pytest.raises(ModelError, match="corrupt") as e:
            Student.load(d)
        assert str(d) in str(e.value), (name, str(e.value))


def test_weights_cut_short_are_found_without_loading_the_model(pair, tmp_path):
    """`check_weights` (what the Ray jobs run before Ray starts) reads only the safetensors
    headers: a copy cut short at its start or its end, or a folder without a weights file, is a
    ModelError naming the folder; the saved folder passes."""
    import shutil

    _, student = pair
    good = tmp_path / "good"
    student.save(good)
    check_weights(str(good))
    size = (good / "model.safetensors").stat().st_size
    breaks = {
        "head": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
        "tail": lambda d: os.truncate(d / "model.safetensors", size - 1000),
        "value head": lambda d: os.truncate(d / "value_head.safetensors", 20),
        "none": lambda d: os.remove(d / "model.safetensors") or os.remove(d / "value_head.safetensors"),
    }
    for name, spoil in breaks.items():
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(good, d)
        spoil(d)
        with pytest.raises(ModelError, match="corrupt") as e:
            check_weights(str(d))
        assert str(d) in str(e.value), (name, str(e.value))


def test_tokenizer_mismatch_is_a_clear_error(tok):
    other = build_word_tokenizer(["x", "y", "z"])
    with pytest.raises(ModelError, match="tokenizers differ.*same tokenizer"):
        check_tokenizers(tok, other)
    student_tok = copy.deepcopy(tok)
    student_tok.add_tokens([TAU_TOKEN], special_tokens=True)
    check_tokenizers(tok, student_tok)  # <τ> is the only allowed difference


def test_kdtw_imports_neither_ray_nor_mlflow():
    code = (
        "import sys, kdtw, kdtw.config, kdtw.budgets, kdtw.models, kdtw.data, kdtw.examples, kdtw.toy_tasks,"
        " kdtw.tokenizer, kdtw.dataset_sources, kdtw.decoding, kdtw.losses,"
        " kdtw.oracle, kdtw.metrics, kdtw.local, kdtw.learner, kdtw.buffer, kdtw.rollout, kdtw.factory,"
        " kdtw.pretrain, kdtw.cli, kdtw.evaluation;"
        "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
