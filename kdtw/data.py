"""A task by kind, as the config's ``task`` section names it.

`load_task` dispatches on a kind string to a generated task (kdtw/toy_tasks.py) or to any
`datasets` source (kdtw/dataset_sources.py); `generator_problems` checks a generated task's knobs
for `Config.validate` without generating anything. The record type (`Example`) and `DataError`
are in kdtw/examples.py, the word-level tokenizer in kdtw/tokenizer.py.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

from .dataset_sources import load_dataset_source
from .examples import DataError, Splits
from .toy_tasks import GENERATORS, bind_knobs


# ----------------------------------------------------------------------------- knob checks

# Smallest value of each numeric generator knob (the generators refuse less, but only once they
# run); max_len is also checked against min_len.
_KNOB_MIN = {"lexicon_size": 3, "n_entities": 2, "zipf_exponent": 0, "min_len": 1, "max_len": 1}
# Knobs set by task.* keys, not by task.generator (factory passes them from task.seed, ...).
_TASK_KEYS = ("seed", "n_train", "n_validation", "n_test")


def generator_problems(kind: str, knobs: Mapping[str, Any], *, prefix: str = "task.generator") -> list[str]:
    """What is wrong with a generated task's knobs, without generating anything: unknown knobs,
    knobs that task.* keys set, wrong types, values out of range. Each message names the dotted
    key and a valid value (the knob's default)."""
    if kind not in GENERATORS:
        return []
    params = inspect.signature(GENERATORS[kind]).parameters
    own = [n for n in params if n not in _TASK_KEYS]
    problems = []
    for name, value in knobs.items():
        key = f"{prefix}.{name}"
        if name in _TASK_KEYS:
            problems.append(f"{key}: set task.{name} instead (task.generator holds only {', '.join(own)})")
            continue
        if name not in params:
            problems.append(f"{key}: unknown knob of {kind}; use one of {', '.join(own)}")
            continue
        default = params[name].default
        lo = _KNOB_MIN.get(name)
        if isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            what = "an integer"
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            what = "a finite number"
        if not ok or (lo is not None and value < lo):
            bound = "" if lo is None else f" >= {lo}"
            problems.append(f"{key}={value!r} must be {what}{bound}, e.g. {default}")
    if not problems and kind == "toy_translation":
        lo = knobs.get("min_len", params["min_len"].default)
        hi = knobs.get("max_len", params["max_len"].default)
        if lo > hi:
            problems.append(f"{prefix}.min_len={lo} is above {prefix}.max_len={hi}: need min_len <= max_len, "
                            f"e.g. min_len={params['min_len'].default}, max_len={params['max_len'].default}")
    return problems


# ----------------------------------------------------------------------------- dispatch

TASK_KINDS = ("toy_translation", "toy_summarisation", "datasets")


def load_task(kind: str, **kwargs: Any) -> Splits:
    """Dispatch to `toy_translation`, `toy_summarisation` or `load_dataset_source` ("datasets",
    with the source as `path_or_name`); kwargs are forwarded."""
    if kind == "datasets":
        kwargs = dict(kwargs)
        if "path_or_name" not in kwargs:
            raise DataError("task.kind=datasets needs path_or_name (task.dataset)")
        return load_dataset_source(kwargs.pop("path_or_name"), **kwargs)
    if kind in GENERATORS:
        return GENERATORS[kind](**bind_knobs(GENERATORS[kind], kind, kwargs))
    raise DataError(f"task kind {kind!r} is unknown; use one of {list(TASK_KINDS)}")
