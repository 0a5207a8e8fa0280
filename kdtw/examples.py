"""The record every task is made of: `Example` (a source/target pair), the split names, `Splits`
(split name -> examples), and `DataError`, which every data problem raises with a message that
says what to change."""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    source: str
    target: str


class DataError(ValueError):
    """A data problem; the message says what to change."""


Splits = dict[str, list[Example]]  # split name -> examples


def spread(examples: list, n: int | None) -> list:
    """``n`` examples spread evenly over a split (indices ⌊i·len/n⌋, in split order), or the whole
    split when ``n`` is None or at least its length. Every "N examples of a split" in kdtw
    (validation, `kdtw eval --n`, `kdtw report --n`, pretraining's evaluation) takes them so:
    a split stored in a canonical order (data/bible_en_es: book by book) is then measured on
    every part of it, where its first N would all come from its first book."""
    return [examples[i] for i in spread_indices(len(examples), n)]


def spread_indices(length: int, n: int | None) -> list[int]:
    """The indices `spread` takes from a split of ``length`` examples."""
    if n is None or n >= length:
        return list(range(length))
    if n < 0:
        raise ValueError(f"n={n}: give a number of examples >= 0, or None for the whole split")
    return [i * length // n for i in range(n)]
