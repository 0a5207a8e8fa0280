"""Examples from any `datasets` source (hub name, local folder, local JSON/JSONL/CSV/Parquet
files): `load_dataset_source`. Every problem raises `DataError` with a message that says what to
change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .examples import SPLITS, DataError, Example, Splits, spread_indices


_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _builder_for(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _BUILDERS:
        raise DataError(
            f"{path}: unknown file type {suffix!r}; use one of {sorted(_BUILDERS)} "
            "(JSON, JSON lines, CSV, Parquet)"
        )
    return _BUILDERS[suffix]


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise DataError(f"data file {str(path)!r} is empty; give a file with examples")


def _looks_like_hub_name(name: str) -> bool:
    return bool(_HUB_NAME.match(name)) and Path(name).suffix.lower() not in _BUILDERS


def _load_raw(path_or_name: str, config_name: str | None, data_files: Any) -> Mapping[str, Any]:
    """A mapping split name -> `datasets.Dataset`."""
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" bars on stderr: noise in a job's log
    path = Path(path_or_name).expanduser()
    if data_files is not None:
        files = {data_files} if isinstance(data_files, str) else data_files
        if not isinstance(files, (Mapping, list, tuple, set)):
            raise DataError(f"data_files={data_files!r}: use a file or a map split -> file")
        base = path if path.is_dir() else Path(".")
        if not path.is_dir() and path_or_name not in set(_BUILDERS.values()):
            raise DataError(
                f"{path_or_name!r}: with task.data_files, task.dataset must be the folder the "
                f"files are in, or one of {sorted(set(_BUILDERS.values()))}"
            )

        def resolve(f: str) -> str:
            p = Path(f).expanduser()
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise DataError(f"data file {str(p)!r} does not exist; fix task.data_files")
            _check_not_empty(p)
            return str(p)

        if isinstance(files, Mapping):
            resolved: Any = {
                split: [resolve(f) for f in ([fs] if isinstance(fs, str) else fs)]
                for split, fs in files.items()
            }
            flat = [f for fs in resolved.values() for f in fs]
        else:
            resolved = flat = [resolve(f) for f in files]
        builders = {_builder_for(f) for f in flat}
        if len(builders) != 1:
            raise DataError(f"task.data_files mixes file types {sorted(builders)}; use one type")
        args: tuple[Any, ...] = (builders.pop(),)
        kwargs: dict[str, Any] = {"data_files": resolved}
    elif path.is_file():
        _check_not_empty(path)
        args, kwargs = (_builder_for(str(path)),), {"data_files": str(path)}  # split "train"
    elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:  # a folder written by Dataset(Dict).save_to_disk
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"could not load {path_or_name!r}: {type(e).__name__}: {e}") from e
        return loaded if isinstance(loaded, Mapping) else {"train": loaded}
    elif path.is_dir():
        args, kwargs = (str(path), config_name), {}
    elif _looks_like_hub_name(path_or_name):
        args, kwargs = (path_or_name, config_name), {}
    else:
        raise DataError(
            f"{path_or_name!r} does not exist; set task.dataset to an existing local file "
            f"({', '.join(sorted(_BUILDERS))}) or folder, or to a hub name like 'owner/name'"
        )

    try:
        loaded = datasets.load_dataset(*args, **kwargs)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; say which source failed and why
        hint = ""
        if "corresponds to no data" in str(e):  # how `datasets` reports a header-only file
            hint = " (a split is empty: point task.splits / task.data_files at files with rows)"
        # `datasets` wraps a file's own error (a JSON parse error, columns that differ between
        # split files) in a generic one: the first cause is what to fix
        inner = e.__cause__ or e.__context__
        why = f"{type(e).__name__}: {e}" if inner is None else f"{type(inner).__name__}: {inner}"
        if inner is not None and "column names don't match" in str(inner):
            hint += " (every split's file must have the same columns)"
        raise DataError(f"could not load {path_or_name!r}: {why}{hint}") from e
    if not isinstance(loaded, Mapping):  # a single Dataset
        loaded = {"train": loaded}
    return loaded


def _column(ds: Any, column: str) -> list[Any]:
    """A column's values; a dotted path selects a field of a mapping column."""
    head, *rest = column.split(".")
    values = list(ds[head])
    for i, v in enumerate(values):
        for field_name in rest:
            if not isinstance(v, Mapping) or field_name not in v:
                raise DataError(
                    f"row {i}: column {head!r} has no field {field_name!r} (path {column!r}); "
                    f"fields there: {sorted(v) if isinstance(v, Mapping) else type(v).__name__}"
                )
            v = v[field_name]
        values[i] = v
    return values


def load_dataset_source(
    path_or_name: str,
    *,
    source_column: str,
    target_column: str,
    splits: Mapping[str, str],
    config_name: str | None = None,
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
    max_examples: int | None = None,
) -> Splits:
    """Examples from any `datasets` source: a hub name (`load_dataset(name, config_name)`), a
    local folder (data files, or the output of `save_to_disk`), or local JSON/JSONL/CSV/Parquet
    files (type from the extension).

    `splits` maps our split name ("train", "validation", "test") to the source's split name.
    `data_files` may map a split name to a file (or list of files); relative paths are taken
    from `path_or_name` when it is a folder. A single file loads as the source split "train".
    `max_examples` keeps N examples of each split, spread evenly over it (`kdtw.examples.spread`).
    """
    if not splits:
        raise DataError("task.splits is empty; map at least 'train' to a source split")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"task.splits has keys {unknown}; use keys among {list(SPLITS)}")
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise DataError(f"max_examples={max_examples!r}: use an integer >= 1 or None")

    raw = _load_raw(str(path_or_name), config_name, data_files)
    out: Splits = {}
    for ours, theirs in splits.items():
        if theirs not in raw:
            raise DataError(
                f"split {theirs!r} (for {ours!r}) not found in {path_or_name!r}; available "
                f"splits: {sorted(raw)}; set task.splits to map {ours!r} to one of them"
            )
        ds = raw[theirs]
        for key, column in (("task.source_column", source_column),
                            ("task.target_column", target_column)):
            # "translation.en": field "en" of the mapping column "translation" (WMT's layout)
            if column.split(".")[0] not in ds.column_names:
                raise DataError(
                    f"column {column!r} not found in split {theirs!r} of {path_or_name!r}; "
                    f"available columns: {ds.column_names}; set {key} to one of them"
                )
        if len(ds) == 0:
            raise DataError(
                f"split {theirs!r} (for {ours!r}) of {path_or_name!r} is empty; point "
                "task.splits at a split with examples"
            )
        if max_examples is not None:
            ds = ds.select(spread_indices(len(ds), max_examples))
        sources, targets = _column(ds, source_column), _column(ds, target_column)
        for i, (s, t) in enumerate(zip(sources, targets)):
            for column, value in ((source_column, s), (target_column, t)):
                if not isinstance(value, str):
                    raise DataError(
                        f"row {i} of split {theirs!r} in {path_or_name!r}: column {column!r} "
                        f"holds {value!r} ({type(value).__name__}), not text; fix or drop "
                        "that row"
                    )
        out[ours] = [Example(s, t) for s, t in zip(sources, targets)]
    return out
