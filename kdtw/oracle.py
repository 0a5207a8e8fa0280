"""The KL oracle of Phase 1 (DESIGN.md §4): where should the student call the teacher?

On a teacher path, the oracle scores each position by ``D_t = KL(π̃(·|s_t) ‖ p(·|s_t))``, the
student's disagreement with the teacher (``<τ>`` removed), and marks the ``⌈b·T⌉`` positions of
largest ``D_t`` as call targets ``M``. Pure functions of tensors; no gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def oracle_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-position ``D_t = KL(π̃(·|s_t) ‖ p(·|s_t))`` (DESIGN.md §4).

    ``π̃`` is the softmax of ``student_logits[..., :V]``: the student's distribution with ``<τ>``
    removed and renormalised, so the ``<τ>`` logit has no effect. ``p`` is the softmax of
    ``teacher_logits``; teacher log-probs work too (log-softmax leaves them unchanged).

    Args:
        student_logits: ``[B, T, V+1]``, ``<τ>`` last.
        teacher_logits: ``[B, T, V]``.

    Returns:
        ``[B, T]`` KL in nats, ≥ 0 (float rounding below 0 is clipped), no grad. Padding
        positions are not masked: the caller's ``mask`` decides which positions count.
    """
    V = teacher_logits.shape[-1]
    if student_logits.shape[-1] != V + 1:
        raise ValueError(
            f"student_logits must be [B, T, V+1] with V={V} from teacher_logits, "
            f"got last dim {student_logits.shape[-1]}; slice padded vocabularies first"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_student = torch.log_softmax(student_logits[..., :V].to(dtype), dim=-1)  # [B, T, V]
    log_teacher = torch.log_softmax(teacher_logits.to(dtype), dim=-1)  # [B, T, V]
    q = log_student.exp()
    # q log q at q = 0 is 0; where keeps 0 · (-inf) from making nan.
    terms = torch.where(q > 0, q * (log_student - log_teacher), torch.zeros_like(q))
    return terms.sum(-1).clamp(min=0.0)


def _call_counts(budget: Tensor | float, n_valid: Tensor) -> Tensor:
    """``⌈b · T_row⌉`` per row, ``[B]`` long, with a guard against float error in the ceil.

    The guard is ``1e-9`` plus the rounding error of the budget's dtype: a float32 budget of 0.1
    is 0.10000000149..., and ``ceil(0.10000000149 · 10 − 1e-9)`` would be 2, not 1.
    """
    if isinstance(budget, Tensor):
        eps = torch.finfo(budget.dtype).eps if budget.is_floating_point() else 0.0
        b = budget.to(device=n_valid.device, dtype=torch.float64)
    else:
        eps = torch.finfo(torch.float64).eps
        b = torch.tensor(float(budget), dtype=torch.float64, device=n_valid.device)
    if bool(((b < 0) | (b > 1)).any()):
        raise ValueError(f"budget must lie in [0, 1], got {budget}")
    b = b.reshape(-1)  # [B] or [1]
    exact = b * n_valid.to(torch.float64)  # [B]
    k = torch.ceil(exact - 1e-9 - eps * exact).to(torch.long)
    return torch.minimum(k.clamp(min=0), n_valid)


@torch.no_grad()
def teacher_call_targets(kl: Tensor, mask: Tensor, budget: Tensor | float) -> Tensor:
    """The oracle's call targets ``M`` (DESIGN.md §4).

    Per row, marks the ``⌈b_row · T_row⌉`` valid positions with the largest ``kl``, where
    ``T_row`` is the row's number of valid positions. Ties go to the earliest position; padding
    positions are never marked.

    Args:
        kl: ``[B, T]`` per-position scores (``oracle_kl``); must not be nan at valid positions.
        mask: ``[B, T]`` float or bool, valid positions a prefix of each row.
        budget: a float, or ``[B]`` per-row budgets, in ``[0, 1]``.

    Returns:
        ``[B, T]`` bool.
    """
    valid = mask if mask.dtype == torch.bool else mask != 0
    if bool(torch.isnan(kl[valid]).any()):
        raise ValueError("kl is nan at a valid position")
    n_valid = valid.sum(dim=1)  # [B]
    k = _call_counts(budget, n_valid)  # [B]

    # Padding sorts last; a stable sort keeps equal scores in position order, so ties go to the
    # earliest position (and valid -inf scores, being a prefix, still precede padding).
    scores = torch.where(valid, kl, torch.full_like(kl, float("-inf")))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [B, T]
    rank = torch.empty_like(order)
    positions = torch.arange(kl.shape[1], device=kl.device).expand_as(order)
    rank.scatter_(1, order, positions)  # rank[b, t]: place of position t in the order
    return (rank < k[:, None]) & valid


__all__ = ["oracle_kl", "teacher_call_targets"]
