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
