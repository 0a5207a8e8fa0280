"""Status lines of long work (kdtw.reporting.StatusPacer): every ``log_every`` steps, at the last
step, and at most ``STATUS_EVERY_S`` after the line before, in the local loop's two phases, in
`kdtw.phase1.run_phase1` (a Ray Train rank's loop), in `kdtw pretrain`'s supervised steps, and
while a validation decodes."""

from __future__ import annotations

import re

import pytest
from conftest_ray import tiny

import kdtw.reporting
from kdtw.factory import load_teacher
from kdtw.local import LocalLoop
from kdtw.phase1 import run_phase1
from kdtw.pretrain import supervised_train
from kdtw.reporting import StatusPacer, validate


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_line_is_due_every_n_steps_at_the_last_and_after_the_seconds_since_the_last_line():
    clock = Clock()
    pace = StatusPacer(5, 12, seconds=20.0, clock=clock)
    due = []
    for step in range(1, 13):
        clock.t += 8.0  # a step of 8 s: 24 s after the pacer's making at step 3
        if pace.due(step):
            due.append(step)
    # 3 and 8 by time (24 s after the line before), 5 and 10 by count, 12 the last step (11: 8 s
    # after 10's line)
    assert due == [3, 5, 8, 10, 12]
    fast = StatusPacer(5, 12, seconds=20.0, clock=clock)
    assert [s for s in range(1, 13) if fast.due(s)] == [5, 10, 12]  # no time passes: by count only
    clock.t += 19.0
    assert not fast.due(13)
    clock.t += 1.0
    assert fast.due(14)  # 20 s after step 12's line


def _steps(lines: list[str], tag: str) -> list[int]:
    return [int(m.group(1)) for x in lines if (m := re.match(rf"\[{re.escape(tag)}\] step (\d+)/", x))]


@pytest.mark.parametrize("every_s", [None, 0.0])
def test_the_local_loop_prints_a_step_line_when_the_seconds_since_the_last_have_passed(tmp_path, monkeypatch, every_s):
    """With ``train.log_every`` far above the run's steps, a step line comes only at each phase's
    last step, unless the time since the last line has passed (0 s here: every step)."""
    if every_s is not None:
        monkeypatch.setattr(kdtw.reporting, "STATUS_EVERY_S", every_s)
    cfg = tiny(tmp_path, "train.phase1_steps=3", "train.phase2_steps=3", "train.log_every=1000",
               "train.validate_every=1000", "train.val_examples=2", "train.value_warmup_steps=0")
    lines: list[str] = []
    LocalLoop(cfg, log=lines.append).run()
    want = [1, 2, 3] if every_s == 0.0 else [3]
    assert _steps(lines, "phase 1") == want and _steps(lines, "phase 2") == want, lines


def test_a_ray_train_ranks_phase1_loop_and_pretrain_are_paced_alike(tmp_path, monkeypatch):
    monkeypatch.setattr(kdtw.reporting, "STATUS_EVERY_S", 0.0)
    cfg = tiny(tmp_path, "train.phase1_steps=3", "train.log_every=1000", "pretrain.log_every=1000",
               "pretrain.batch_size=2")
    lines: list[str] = []
    run_phase1(cfg, log=lines.append)
    assert _steps(lines, "phase 1") == [1, 2, 3], lines
    lines.clear()
    supervised_train(cfg, load_teacher(cfg), steps=3, log=lines.append, name="teacher")
    assert _steps(lines, "pretrain teacher") == [1, 2, 3], lines


def test_a_pacer_by_time_only_counts_no_steps():
    clock = Clock()
    pace = StatusPacer(seconds=20.0, clock=clock)
    assert not any(pace.due(s) for s in range(1, 50))
    clock.t += 20.0
    assert pace.due(50) and not pace.due(51)
    clock.t += 15.0
    pace.printed()  # a line by other means, 15 s after the last: the next 20 s after it
    clock.t += 15.0
    assert not pace.due(52)
    clock.t += 5.0
    assert pace.due(53)


def test_a_validation_says_how_far_it_has_come_while_it_decodes(tmp_path, monkeypatch):
    """A line after a batch of prompts or a budget decoded `STATUS_EVERY_S` after the start or
    the line before (0 s: after each, but the last budget's end, whose table follows); the
    figures are those without the lines."""
    from kdtw.factory import budget_table, load_pair, load_splits
    from kdtw.reporting import validation_examples

    cfg = tiny(tmp_path, "train.val_examples=2", "decoding.batch_size=1")
    teacher, student = load_pair(cfg)
    examples = validation_examples(cfg, load_splits(cfg))
    phrases = budget_table(cfg).phrases
    monkeypatch.setattr(kdtw.reporting, "STATUS_EVERY_S", 1e9)
    lines: list[str] = []
    quiet = validate(cfg, student, teacher, examples, progress=lines.append)
    assert lines == []
    monkeypatch.setattr(kdtw.reporting, "STATUS_EVERY_S", 0.0)
    v = validate(cfg, student, teacher, examples, progress=lines.append)
    n = len(phrases)
    assert len(lines) == 2 * n - 1, lines  # per budget: its first prompt (of 2), then the budget
    for k, phrase in enumerate(phrases):
        assert re.fullmatch(rf"\[validate\] {phrase}: 1/2 prompts decoded, {k}/{n} budgets done \(\d+s\)",
                            lines[2 * k]), lines[2 * k]
        if k + 1 < n:
            assert re.fullmatch(rf"\[validate\] {k + 1}/{n} budgets decoded \({phrase}: use \d\.\d{{3}}, "
                                rf"bleu [\d.]+; \d+s\)", lines[2 * k + 1]), lines[2 * k + 1]
    assert v["budgets"] == quiet["budgets"]


def test_generate_reports_each_batch_and_settling_says_how_far_its_round_has_come(tmp_path, monkeypatch):
    from kdtw.decoding import generate
    from kdtw.factory import load_pair
    from kdtw.settle import settle_budgets

    cfg = tiny(tmp_path, "train.settle_probes=3", "train.settle_rounds=2", "decoding.batch_size=2",
               "decoding.call_rule=systematic")
    teacher, student = load_pair(cfg)
    seen: list[tuple[int, int]] = []
    generate(student, teacher, ["a b", "c d", "e f", "g h", "i j"], max_new_tokens=2, batch_size=2,
             on_batch=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]
    monkeypatch.setattr(kdtw.reporting, "STATUS_EVERY_S", 0.0)
    lines: list[str] = []
    from kdtw.factory import budget_table, load_splits

    table = budget_table(cfg)
    student.set_budgets(table.targets)
    assert settle_budgets(cfg, student, teacher, load_splits(cfg)["train"], table, log=lines.append) is not None
    total = 3 * sum(1 for t in table.targets if t > 0)  # settle_probes a nonzero budget
    batches = [f"{d}/{total} training prompts decoded" for d in range(2, total, 2)]
    for r in (1, 2):
        mine = [ln for ln in lines if ln.startswith(f"[settle] round {r}/2")]
        assert [ln.split(": ", 1)[1].split(" (")[0] for ln in mine[:-1]] == batches, lines
        assert mine[-1].startswith(f"[settle] round {r}/2, 3 training prompts a budget"), lines
