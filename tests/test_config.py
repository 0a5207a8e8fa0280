"""Config tree: YAML profiles, dotted overrides, unknown keys, validation messages; budgets."""

from __future__ import annotations

import copy
import dataclasses
import glob
import math
import os
import pickle
import re
import typing

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT
from kdtw.budgets import BudgetError, BudgetTable
from kdtw.config import Config, ConfigError, ModelConfig, TrainConfig, _leaf, load_config


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "conf", "*.yaml"))))
def test_every_profile_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.budgets and all(0 <= b <= 1 for b in cfg.budgets.values())
    # The Ray job pickles the config to its actors; phase1 and the teacher actor deep-copy it.
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg
    assert Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}) == cfg


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
    with pytest.raises(ConfigError, match="seed='abc' must be an integer >= 0, e.g. seed=0"):
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


# ----------------------------------------------------------------------------- the typed layer


def _leaves(cls=Config, prefix=""):
    """(dotted key, section class, field name) of every leaf of the tree."""
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _leaves(hint, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, cls, f.name


LEAVES = list(_leaves())
NUMBERS = [key for key, cls, name in LEAVES if _leaf(cls, name)[0] in (int, float)]
FLOATS = [key for key, cls, name in LEAVES if _leaf(cls, name)[0] is float]
INTS = [key for key, cls, name in LEAVES if _leaf(cls, name)[0] is int]


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_the_tree_has_its_leaves():
    assert len(LEAVES) > 100 and len(FLOATS) > 20 and len(INTS) > 30
    assert "teacher.device" in [k for k, _, _ in LEAVES] and "ray.torch_threads" in INTS


@pytest.mark.parametrize("key", NUMBERS)
def test_every_number_rejects_nan_and_infinity(key):
    for text in (".nan", ".inf", "-.inf", "nan", "-inf"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={text}"])
        msg = str(err.value)
        assert f"\n  - {key}=" in msg and f"e.g. {key}=" in msg, msg
        assert msg.count("\n  - ") == 1, msg


def _valid_value(key: str, msg: str) -> str:
    """The valid value a message names: the example after "e.g. key=", else the first choice."""
    if f"e.g. {key}=" in msg:
        return msg.split(f"e.g. {key}=", 1)[1].split("\n")[0].split(" (")[0]
    return msg.split(": use ", 1)[1].split(" ")[0]


@pytest.mark.parametrize("key", [k for k, _, _ in LEAVES])
def test_a_wrong_type_in_yaml_names_the_key_and_a_value_that_loads(key, tmp_path):
    """Every leaf refuses a list (the wrong type for each of them) read from a profile with a
    message naming the key, and the value the message suggests is accepted."""
    tree: dict = {}
    *sections, leaf = key.split(".")
    node = tree
    for s in sections:
        node = node.setdefault(s, {})
    node[leaf] = [1, 2]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"\n  - {key}=[1, 2]" in msg and msg.count("\n  - ") == 1, msg
    assert re.search(r"must be .*, e\.g\. |: use ", msg), msg
    good = _valid_value(key, msg)
    cfg = load_config(None, [f"{key}={good}"])
    assert _get(cfg, key) == yaml.safe_load(good) or str(_get(cfg, key)) == good


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(FLOATS), x=st.floats(allow_nan=False, allow_infinity=False, width=32),
       spelling=st.sampled_from(["{x!r}", "{x:e}", "{x:g}", "'{x!r}'"]))
def test_number_text_in_an_override_becomes_a_float_or_a_message_naming_the_key(key, x, spelling):
    """YAML 1.1 reads 1e-4 (no dot) as text and 3 as an int: a float leaf takes both as floats;
    a value out of range (or one breaking a rule between keys) is a message naming the key."""
    text = spelling.format(x=x)
    try:
        cfg = load_config(None, [f"{key}={text}"])
    except ConfigError as e:
        assert f"{key}=" in str(e) or key.split(".")[-1] in str(e), str(e)
        return
    value = _get(cfg, key)
    assert type(value) is float and value == float(text.strip("'"))


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(INTS), n=st.integers(-5, 10**6),
       wrong=st.sampled_from([None, "1.5", "true", "'7'", "{a: 1}"]))
def test_integers_stay_integers(key, n, wrong):
    try:
        cfg = load_config(None, [f"{key}={n}"])
        assert type(_get(cfg, key)) is int and _get(cfg, key) == n
    except ConfigError as e:
        assert key in str(e), str(e)
    if wrong is not None:  # 1.5, a bool, quoted text and a mapping are never integers
        with pytest.raises(ConfigError, match=re.escape(f"{key}=") + r".* must be an integer"):
            load_config(None, [f"{key}={wrong}"])


def test_overrides_are_coerced_to_the_field_type():
    cfg = load_config(None, ["train.lr=1e-4", "train.gamma=1", "ray.teacher_gpus=2", "seed=7",
                             "train.use_tau=false", "teacher.device=cuda:1", "train.phase2_lr=2E-5"])
    assert (cfg.train.lr, cfg.train.gamma, cfg.ray.teacher_gpus, cfg.train.phase2_lr) == (1e-4, 1.0, 2.0, 2e-5)
    assert all(type(v) is float for v in (cfg.train.lr, cfg.train.gamma, cfg.ray.teacher_gpus))
    assert cfg.seed == 7 and cfg.train.use_tau is False and cfg.teacher.device == "cuda:1"
    for bad, message in [("train.use_tau=1", "train.use_tau=1 must be true or false, e.g. train.use_tau=true"),
                         ("name=3", "name=3 must be a non-empty string"),
                         ("task.instruction={a: b}", "quote it"),
                         ("teacher.source=cut", "teacher.source='cut': use init | pretrained | pretrain | gguf_wheel"),
                         ("train.lambda_min=.inf", "train.lambda_min=inf must be a finite number, e.g."),
                         ("train.lr=.nan", "train.lr=nan must be a finite number > 0, e.g. train.lr=0.0001")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [bad])


def test_every_problem_is_listed_once_with_unknown_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lr=-1", "seed=-1", "teacher.dtype=x", "trian.lr=1", "ray.bogus=2"])
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 5, lines
    assert any("unknown config key 'trian' (did you mean 'train'?)" in ln for ln in lines)
    assert any("unknown config key 'ray.bogus'; known keys under 'ray'" in ln for ln in lines)


def test_sections_built_in_code_are_typed_and_keep_dataclass_behaviour():
    tc = TrainConfig(lr=1e-3)
    assert tc.lr == 1e-3 and dataclasses.replace(tc, gamma=1).gamma == 1.0
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError):
        ModelConfig(hiden_size=3)
    cfg = Config()
    cfg.teacher.device = "cuda"  # as actors/teacher.py does; assignment is checked by validate()
    assert cfg.validate() is cfg and dataclasses.asdict(cfg)["teacher"]["device"] == "cuda"
    cfg.train.gamma = math.nan
    with pytest.raises(ConfigError, match=r"train.gamma=nan must be a finite number in \(0, 1\]"):
        cfg.validate()


@pytest.mark.parametrize("profile", ["default", "toy_summarisation"])
def test_the_readme_drafter_command_loads_on_a_feedforward_profile(profile):
    """The README trains each frontier's drafter with ``train.use_tau=false`` on the profile
    itself; the profile turns on train.lambda_feedforward, which without <τ> has no λ to move, so
    the drafter's config loads, and the refusal stays for a τ-student without budget offsets."""
    path = os.path.join(ROOT, "conf", f"{profile}.yaml")
    assert load_config(path).train.lambda_feedforward
    assert not load_config(path, ["train.use_tau=false"]).train.use_tau
    with pytest.raises(ConfigError, match="train.budget_offsets=true, or train.lambda_feedforward=false"):
        load_config(path, ["train.budget_offsets=false"])


def test_bc_call_weight_needs_the_token_fit_at_calls():
    path = os.path.join(ROOT, "conf", "default.yaml")
    assert load_config(path, ["train.bc_call_weight=0.3"]).train.bc_call_weight == 0.3
    with pytest.raises(ConfigError, match="train.bc_call_weight=0.3 .*train.bc_token_kl_at_calls=true"):
        load_config(path, ["train.bc_call_weight=0.3", "train.bc_token_kl_at_calls=false"])
    with pytest.raises(ConfigError, match="train.bc_call_weight"):
        load_config(path, ["train.bc_call_weight=-1"])
    assert load_config(path, ["train.bc_call_detach=true"]).train.bc_call_detach
    with pytest.raises(ConfigError, match="train.bc_call_detach=true .*train.bc_token_kl_at_calls=true"):
        load_config(path, ["train.bc_call_detach=true", "train.bc_token_kl_at_calls=false"])


def test_teacher_side_demos_null_is_decided_by_where_the_teacher_is_and_the_jobs_staleness():
    """ray.teacher_side_demos null: demonstrations on a replica, except in an asynchronous job whose
    workers hold the teacher (conf/default.yaml: in the workers; its synchronous run: the replica);
    for_ray_job writes the decision into the job's config; a value given is kept."""
    path = os.path.join(ROOT, "conf", "default.yaml")
    cfg = load_config(path, [])
    assert cfg.ray.teacher_side_demos is None and cfg.ray.teacher_in_workers
    assert cfg.for_ray_job().ray.teacher_side_demos is False and cfg.ray.teacher_side_demos is None
    assert load_config(path, ["ray.max_staleness=0"]).for_ray_job().ray.teacher_side_demos is True
    assert load_config(path, ["ray.teacher_in_workers=false"]).for_ray_job().ray.teacher_side_demos is True
    assert load_config(path, ["ray.max_staleness=0", "ray.teacher_side_demos=false"]).demos_on_replica() is False
    assert load_config(path, ["ray.teacher_side_demos=true"]).for_ray_job().ray.teacher_side_demos is True
    job = load_config(None, [])  # the built-in defaults: the pool, synchronous
    assert job.demos_on_replica() and job.for_ray_job().for_ray_job().ray.teacher_side_demos is True
    with pytest.raises(ConfigError, match="ray.teacher_side_demos"):
        load_config(path, ["ray.teacher_side_demos=sometimes"])


def test_ray_max_staleness_is_the_ray_jobs_and_leaves_the_local_loop_alone():
    """conf/default.yaml runs the Ray job asynchronously (ray.max_staleness 8) while the local
    loop, where staleness only means replay, keeps train.max_staleness 0; null means
    train.max_staleness; the publish rule checks the bound the job will run with."""
    cfg = load_config(os.path.join(ROOT, "conf", "default.yaml"), [])
    assert cfg.train.max_staleness == 0 and cfg.ray.max_staleness == 8
    job = cfg.for_ray_job()
    assert job.train.max_staleness == 8 and cfg.train.max_staleness == 0  # a copy
    assert job.for_ray_job() is job
    plain = load_config(None, ["train.max_staleness=3", "ray.teacher_side_demos=true"])
    assert plain.ray.max_staleness is None and plain.for_ray_job() is plain
    with pytest.raises(ConfigError, match=r"ray.max_staleness=0.*set ray.max_staleness >= 3"):
        load_config(None, ["train.max_staleness=5", "ray.max_staleness=0", "ray.publish_every=4"])
    load_config(None, ["train.max_staleness=0", "ray.max_staleness=3", "ray.publish_every=4"])  # accepted
