"""Tests for the KL oracle (DESIGN.md §4): call counts, ordering, ties, padding, the KL itself."""

from __future__ import annotations

import math

import pytest
import torch

from kdtw.oracle import oracle_kl, teacher_call_targets


def _prefix_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # [B, T]


# --- teacher_call_targets ---------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
def test_counts_are_ceil_budget_times_row_length(budget):
    torch.manual_seed(0)
    lengths = [10, 7, 3, 1, 20]
    T = 20
    mask = _prefix_mask(lengths, T)
    kl = torch.rand(len(lengths), T)
    calls = teacher_call_targets(kl, mask, budget)
    assert calls.dtype == torch.bool
    for row, n in enumerate(lengths):
        assert int(calls[row].sum()) == math.ceil(round(budget * n, 9))
    assert not calls[~mask].any()


def test_float32_budget_tensor_has_no_ceil_error():
    """float32(0.1) · 10 = 1.0000000149 must give 1 call, not 2; float32(0.3) · 10 gives 3."""
    mask = torch.ones(2, 10, dtype=torch.bool)
    kl = torch.rand(2, 10)
    calls = teacher_call_targets(kl, mask, torch.tensor([0.1, 0.3], dtype=torch.float32))
    assert calls.sum(1).tolist() == [1, 3]


def test_picks_the_largest_kl():
    kl = torch.tensor([[0.1, 5.0, 0.3, 2.0, 0.0, 1.0]])
    mask = torch.ones_like(kl, dtype=torch.bool)
    calls = teacher_call_targets(kl, mask, 0.5)  # ⌈3⌉ = 3
    assert calls.tolist() == [[False, True, False, True, False, True]]


def test_random_rows_match_sort_reference():
    torch.manual_seed(1)
    lengths = [9, 4, 12, 6]
    T = 12
    mask = _prefix_mask(lengths, T)
    kl = torch.rand(len(lengths), T)
    budget = torch.tensor([0.25, 0.5, 0.1, 0.9])
    calls = teacher_call_targets(kl, mask, budget)
    for row, n in enumerate(lengths):
        k = math.ceil(round(float(budget[row]) * n, 6))
        top = sorted(range(n), key=lambda t: -float(kl[row, t]))[:k]
        assert calls[row].nonzero().flatten().tolist() == sorted(top)


def test_ties_go_to_the_earliest_position():
    kl = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5], [3.0, 3.0, 3.0, 3.0, 3.0]])
    mask = torch.ones_like(kl, dtype=torch.bool)
    calls = teacher_call_targets(kl, mask, 0.4)  # ⌈2⌉ = 2 per row
    assert calls.tolist() == [
        [False, True, True, False, False],
        [True, True, False, False, False],
    ]


def test_never_marks_padding_even_with_large_padding_scores():
    kl = torch.tensor([[0.1, 0.2, 0.3, 100.0, float("nan")], [float("-inf"), 0.0, 7.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    calls = teacher_call_targets(kl, mask, 1.0)
    assert calls.tolist() == [
        [True, True, True, False, False],
        [True, True, False, False, False],
    ]
    calls = teacher_call_targets(kl, mask, 0.5)  # ⌈1.5⌉ = 2 and ⌈1⌉ = 1
    assert calls.tolist() == [
        [False, True, True, False, False],
        [False, True, False, False, False],
    ]


def test_budget_zero_none_and_one_all_valid():
    torch.manual_seed(2)
    mask = _prefix_mask([5, 2, 8], 8)
    kl = torch.rand(3, 8)
    assert not teacher_call_targets(kl, mask, 0.0).any()
    assert torch.equal(teacher_call_targets(kl, mask, 1.0), mask)
    assert torch.equal(teacher_call_targets(kl, mask, torch.ones(3)), mask)


def test_bad_budget_and_nan_raise():
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="budget"):
        teacher_call_targets(torch.rand(1, 4), mask, 1.5)
    with pytest.raises(ValueError, match="nan"):
        teacher_call_targets(torch.tensor([[0.1, float("nan"), 0.2, 0.3]]), mask, 0.5)


# --- oracle_kl --------------------------------------------------------------------------------


def test_oracle_kl_nonnegative_and_matches_closed_form():
    torch.manual_seed(3)
    B, T, V = 3, 4, 6
    student = torch.randn(B, T, V + 1, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, dtype=torch.float64) * 2
    kl = oracle_kl(student, teacher)
    assert kl.shape == (B, T)
    assert torch.all(kl >= 0)
    q = torch.softmax(student[..., :V], -1)
    p = torch.softmax(teacher, -1)
    torch.testing.assert_close(kl, (q * (q.log() - p.log())).sum(-1))


def test_oracle_kl_zero_when_student_without_tau_equals_teacher():
    torch.manual_seed(4)
    B, T, V = 2, 5, 7
    teacher = torch.randn(B, T, V)
    tau_logit = torch.full((B, T, 1), 50.0)  # π(<τ>) ≈ 1, irrelevant after renormalising
    student = torch.cat([teacher + 3.0, tau_logit], -1)  # a shift of logits changes nothing
    kl = oracle_kl(student, teacher)
    assert torch.all(kl >= 0)
    assert kl.abs().max() < 1e-5


def test_oracle_kl_has_no_grad_and_checks_vocab():
    student = torch.randn(1, 2, 4, requires_grad=True)
    assert not oracle_kl(student, torch.randn(1, 2, 3)).requires_grad
    with pytest.raises(ValueError, match="V\\+1"):
        oracle_kl(student, torch.randn(1, 2, 4))
