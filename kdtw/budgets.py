"""Budgets: the table instruction phrase -> target teacher-use fraction, and prompts.

"With light teacher use, translate toy English to toy Xish: the dog sleeps"

DESIGN.md §5 names the zero budget "none"; its phrase here is "no" so that the prompt reads
"With no teacher use, ...". "none" is accepted as an alias of "no" on lookup.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

DEFAULT_BUDGETS: dict[str, float] = {
    "no": 0.0,
    "minimal": 0.05,
    "light": 0.1,
    "moderate": 0.2,
    "heavy": 0.3,
    "full": 0.5,
}

DEFAULT_TEMPLATE = "With {phrase} teacher use, {instruction}:"

_ALIASES = {"none": "no"}

# The placeholders a prompt template may hold; {phrase} is required (it is what the student reads).
TEMPLATE_FIELDS = ("phrase", "instruction")


def template_problem(template: object, *, need_instruction: bool = False) -> str | None:
    """What is wrong with a prompt template (None: nothing): not a string, not a valid format
    string, a placeholder other than {phrase} and {instruction}, no {phrase} (or, with
    ``need_instruction``, no {instruction})."""
    example = f"e.g. {DEFAULT_TEMPLATE!r}"
    if not isinstance(template, str):
        return f"must be a string with {{phrase}} and {{instruction}}, {example}"
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # an unmatched brace; a literal brace is written {{ or }}
        return f"is not a valid template ({e}; write a literal brace as {{{{ or }}}}), {example}"
    unknown = sorted({n for n in names if n not in TEMPLATE_FIELDS})
    if unknown:
        shown = ", ".join("{" + n + "}" for n in unknown)
        return f"has unknown placeholder(s) {shown}: use only {{phrase}} and {{instruction}}, {example}"
    if "phrase" not in names:
        return f"has no {{phrase}}: the budget phrase must appear in every prompt, {example}"
    if need_instruction and "instruction" not in names:
        return f"has no {{instruction}}: the task instruction must appear in every prompt, {example}"
    return None


def target_problem(target: object) -> str | None:
    """What is wrong with a budget target (None: nothing): a bool, not a number, not finite, or
    outside [0, 1]."""
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        return "must be a number in [0, 1] (a teacher-use fraction)"
    if not (math.isfinite(target) and 0.0 <= target <= 1.0):
        return "must be in [0, 1] (a teacher-use fraction)"
    return None


class BudgetError(ValueError):
    """An unknown budget phrase; the message lists the known ones."""


@dataclass(frozen=True)
class Budget:
    id: int
    phrase: str
    target: float


class BudgetTable:
    """Ordered phrase -> fraction table; budget ids are positions in the table."""

    def __init__(self, table: dict[str, float] | None = None, *, template: str = DEFAULT_TEMPLATE):
        table = dict(DEFAULT_BUDGETS if table is None else table)
        if not table:
            raise BudgetError("the budget table is empty: configure at least one phrase")
        for phrase, b in table.items():
            problem = target_problem(b)
            if problem is not None:
                raise BudgetError(f"budget {phrase!r}={b!r}: a target {problem}, e.g. 0.1")
            if not isinstance(phrase, str) or not phrase.strip():
                raise BudgetError(f"budget phrase {phrase!r}: a phrase is a non-empty string, e.g. 'light'")
        problem = template_problem(template)
        if problem is not None:
            raise BudgetError(f"prompt template {template!r} {problem}")
        self.template = template
        self.budgets = [Budget(i, p, float(b)) for i, (p, b) in enumerate(table.items())]
        self._by_phrase = {b.phrase: b for b in self.budgets}

    def __len__(self) -> int:
        return len(self.budgets)

    def __iter__(self):
        return iter(self.budgets)

    @property
    def phrases(self) -> list[str]:
        return [b.phrase for b in self.budgets]

    @property
    def targets(self) -> list[float]:
        return [b.target for b in self.budgets]

    def get(self, phrase: str) -> Budget:
        key = phrase.strip().lower()
        key = key if key in self._by_phrase else _ALIASES.get(key, key)
        if key not in self._by_phrase:
            raise BudgetError(
                f"unknown budget phrase {phrase!r}; known phrases: "
                + ", ".join(f"{b.phrase} ({b.target:g})" for b in self.budgets)
                + " (add one under `budgets:` in the config)"
            )
        return self._by_phrase[key]

    def __getitem__(self, budget_id: int) -> Budget:
        return self.budgets[budget_id]

    def prompt(self, phrase: str, instruction: str, source: str) -> str:
        """The full input text Y = budget instruction + source."""
        b = self.get(phrase)
        head = self.template.format(phrase=b.phrase, instruction=instruction)
        return f"{head} {source}"

    def all_words(self, instruction: str) -> list[str]:
        """Every word the prompts can contain apart from the source (for word tokenizers)."""
        words: list[str] = []
        for b in self.budgets:
            words.extend(self.template.format(phrase=b.phrase, instruction=instruction).split())
        return words
