"""Config tree: YAML profiles, dotted overrides, unknown keys, validation messages; budgets."""

from __future__ import annotations

import glob
import os

import pytest

from conftest import ROOT
from kdtw.budgets import BudgetError, BudgetTable
from kdtw.config import Config, ConfigError, load_config


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "conf", "*.yaml"))))
def test_every_profile_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.budgets and all(0 <= b <= 1 for b in cfg.budgets.values())


def test_paper_profiles_name_the_flan_t5_pair():
    for name in ("flan_t5_wmt_en_de", "flan_t5_xsum"):
        cfg = load_config(os.path.join(ROOT, "conf", f"{name}.yaml"))
        assert cfg.teacher.name_or_path == "google/flan-t5-xl"
        assert cfg.student.name_or_path == "google/flan-t5-small"
        assert cfg.task.kind == "datasets" and cfg.task.dataset


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["seed=3", "decoding.max_new_tokens=9", "train.pcl_window=null",
                             "budgets.tiny=0.02", "teacher.arch=t5", "task.generator.lexicon_size=50"])
    assert cfg.seed == 3 and cfg.decoding.max_new_tokens == 9 and cfg.train.pcl_window is None
    assert cfg.budgets["tiny"] == 0.02 and cfg.teacher.arch == "t5"
    assert cfg.task.generator == {"lexicon_size": 50}


def test_unknown_keys_are_rejected_with_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'decoding.max_new_token'.*did you mean 'max_new_tokens'"):
        load_config(None, ["decoding.max_new_token=3"])
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*known keys under 'train'"):
        load_config(p)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["seed"])


def test_type_errors_and_validation_say_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["seed=abc"])
    with pytest.raises(ConfigError, match=r"budgets.light=1.5.*\[0, 1\]"):
        load_config(None, ["budgets.light=1.5"])
    with pytest.raises(ConfigError, match="teacher.hidden_size=30 must be divisible"):
        load_config(None, ["teacher.hidden_size=30"])
    with pytest.raises(ConfigError, match="name_or_path is required"):
        load_config(None, ["student.source=pretrained"])
    with pytest.raises(ConfigError, match="tau_reward"):
        load_config(None, ["train.tau_reward=other"])
    p = tmp_path / "c.yaml"
    p.write_text("budgets: {no: 0.0}\n")
    with pytest.raises(ConfigError, match="quote it"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_flat_view_and_roundtrip(tmp_path):
    cfg = load_config(None, ["seed=5"])
    flat = cfg.flat()
    assert flat["seed"] == 5 and flat["budgets.light"] == 0.1 and "train.lr" in flat
    cfg.save(tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_budget_table_prompts_and_errors():
    table = BudgetTable()
    assert table.prompt("light", "translate x to y", "a b") == "With light teacher use, translate x to y: a b"
    assert table.get("none").phrase == "no" and table.get("Light").target == 0.1
    with pytest.raises(BudgetError, match=r"unknown budget phrase 'lots'.*no \(0\).*full \(0.5\)"):
        table.get("lots")
    custom = BudgetTable({"tiny": 0.01}, template="[{phrase}] {instruction}:")
    assert custom.prompt("tiny", "do", "x") == "[tiny] do: x"
    with pytest.raises(BudgetError):
        BudgetTable({})
    with pytest.raises(BudgetError):
        BudgetTable({"x": 2.0})


def test_with_absolute_paths_resolves_local_paths_only(tmp_path, monkeypatch):
    from kdtw.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    cfg = load_config(None, ["models_dir=models/x", "run_dir=runs/y", "teacher.tokenizer=tok",
                             "student.source=pretrained", "student.name_or_path=org/model"])
    abs_cfg = cfg.with_absolute_paths()
    assert abs_cfg.models_dir == str(tmp_path / "models" / "x") and abs_cfg.run_dir == str(tmp_path / "runs" / "y")
    assert abs_cfg.teacher.tokenizer == str(tmp_path / "tok")
    assert abs_cfg.student.name_or_path == "org/model"  # a hub name stays a hub name
    assert cfg.models_dir == "models/x"  # the original is untouched
