"""The trajectory record: the one type that travels between rollout, buffer and learner
(DESIGN.md §8). Validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .metrics import per_sequence_teacher_use

ORIGINS = ("student", "teacher_demo")


class TrajectoryError(ValueError):
    """A malformed trajectory record."""


@dataclass
class Trajectory:
    source_ids: list[int]  # prompt token ids Y (budget instruction + source), unpadded
    budget_id: int
    tokens: list[int]  # resolved output x_1..x_T
    actions_tau: list[bool]  # a_t = <τ>
    behaviour_logp: list[float]  # log-prob of a_t under the behaviour policy, over V ∪ {<τ>}
    teacher_logp: list[float]  # log p(x_t | s_t)
    origin: str = "student"
    policy_version: int = 0
    worker_id: int = 0
    greedy_tau: list[bool] = field(default_factory=list)  # argmax of the policy was <τ> (student paths)
    tau_prob: list[float] = field(default_factory=list)  # π(<τ> | s_t) of the behaviour policy (student paths)
    # a λ probe, decoded as validation decodes (argmax tokens, the call rule;
    # train.decoded_per_budget): the λ estimate reads it, the replay buffer never stores it.
    decoded: bool = False

    def __post_init__(self) -> None:
        T = len(self.tokens)
        if T == 0:
            raise TrajectoryError("a trajectory needs at least one output token")
        if not self.source_ids:
            raise TrajectoryError("a trajectory needs its prompt token ids (source_ids)")
        for name in ("actions_tau", "behaviour_logp", "teacher_logp"):
            if len(getattr(self, name)) != T:
                raise TrajectoryError(f"{name} has {len(getattr(self, name))} entries for {T} tokens")
        if self.greedy_tau and len(self.greedy_tau) != T:
            raise TrajectoryError(f"greedy_tau has {len(self.greedy_tau)} entries for {T} tokens")
        if self.tau_prob and len(self.tau_prob) != T:
            raise TrajectoryError(f"tau_prob has {len(self.tau_prob)} entries for {T} tokens")
        if any(not (0.0 <= v <= 1.0) for v in self.tau_prob):
            raise TrajectoryError("tau_prob must hold probabilities in [0, 1]")
        if self.origin not in ORIGINS:
            raise TrajectoryError(f"origin={self.origin!r}: use one of {ORIGINS}")
        if self.decoded and self.origin != "student":
            raise TrajectoryError("only a student path can be decoded (decoded=True)")
        if self.origin == "teacher_demo" and any(self.actions_tau):
            raise TrajectoryError("a teacher demonstration has no <τ> actions")
        if self.budget_id < 0:
            raise TrajectoryError(f"budget_id={self.budget_id} must be >= 0")
        for name in ("behaviour_logp", "teacher_logp"):
            if any(not math.isfinite(v) or v > 1e-4 for v in getattr(self, name)):
                raise TrajectoryError(f"{name} must hold finite log-probabilities (<= 0)")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def teacher_use(self) -> float:
        """Σ c_t / T (DESIGN.md §1; `kdtw.metrics.per_sequence_teacher_use`, the one definition)."""
        return per_sequence_teacher_use([self.actions_tau])[0]

    @property
    def expected_use(self) -> float:
        """Σ π(<τ>|s_t) / T: the expected teacher use of the policy along this path."""
        return sum(self.tau_prob) / len(self.tokens) if self.tau_prob else self.teacher_use

    @property
    def greedy_use(self) -> float:
        return sum(self.greedy_tau) / len(self.tokens) if self.greedy_tau else self.teacher_use
