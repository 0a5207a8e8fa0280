"""Replay buffer: on-policy student paths and teacher demonstrations, mixed by ratio.

Records are held in memory per origin; capacity counts stored output tokens, eviction is
oldest-first, a staleness limit drops student paths too many policy versions old, and the whole
buffer saves to / restores from one Parquet file (Arrow schema `SCHEMA`). No Ray here.
"""

from __future__ import annotations

import os
import random
from collections import deque

import pyarrow as pa
import pyarrow.parquet as pq

from .trajectory import Trajectory

SCHEMA = pa.schema(
    [
        ("source_ids", pa.list_(pa.int32())),
        ("budget_id", pa.int16()),
        ("tokens", pa.list_(pa.int32())),
        ("actions_tau", pa.list_(pa.bool_())),
        ("behaviour_logp", pa.list_(pa.float32())),
        ("teacher_logp", pa.list_(pa.float32())),
        ("origin", pa.dictionary(pa.int8(), pa.string())),
        ("policy_version", pa.int32()),
        ("worker_id", pa.int16()),
        ("greedy_tau", pa.list_(pa.bool_())),
    ]
)


class BufferError(ValueError):
    """A replay-buffer misuse; the message says what to change."""


def to_table(trajs: list[Trajectory]) -> pa.Table:
    cols = {name: [getattr(t, name) for t in trajs] for name in SCHEMA.names}
    arrays = []
    for f in SCHEMA:
        if pa.types.is_dictionary(f.type):
            arrays.append(pa.array(cols[f.name], pa.string()).dictionary_encode().cast(f.type))
        else:
            arrays.append(pa.array(cols[f.name], f.type))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def from_table(table: pa.Table) -> list[Trajectory]:
    d = table.to_pydict()
    return [Trajectory(**{k: d[k][i] for k in SCHEMA.names}) for i in range(table.num_rows)]


class ReplayBuffer:
    """Holds up to ``capacity_tokens`` output tokens. ``sample(n)`` draws ``round(n·demo_ratio)``
    teacher demonstrations and the rest on-policy student paths no older than ``max_staleness``
    versions behind ``current_version``."""

    def __init__(self, *, capacity_tokens: int, demo_ratio: float, max_staleness: int, batch_size: int, seed: int = 0):
        if capacity_tokens <= 0:
            raise BufferError("buffer capacity_tokens must be > 0")
        if not 0.0 <= demo_ratio <= 1.0:
            raise BufferError(f"demo_ratio={demo_ratio}: use a value in [0, 1]")
        self.capacity_tokens = capacity_tokens
        self.demo_ratio = demo_ratio
        self.max_staleness = max_staleness
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self._items: dict[str, deque[Trajectory]] = {"student": deque(), "teacher_demo": deque()}
        self._tokens = 0

    # -- filling

    def add(self, trajs: list[Trajectory]) -> int:
        """Add trajectories, evicting the oldest when over capacity; returns how many were evicted."""
        for t in trajs:
            if len(t) > self.capacity_tokens:
                raise BufferError(
                    f"a {len(t)}-token trajectory does not fit a buffer of {self.capacity_tokens} tokens"
                )
            self._items[t.origin].append(t)
            self._tokens += len(t)
        evicted = 0
        while self._tokens > self.capacity_tokens:
            # evict from the larger side to keep both kinds available
            side = max(self._items, key=lambda k: len(self._items[k]))
            old = self._items[side].popleft()
            self._tokens -= len(old)
            evicted += 1
        return evicted

    def drop_stale(self, current_version: int) -> int:
        q = self._items["student"]
        keep = deque(t for t in q if current_version - t.policy_version <= self.max_staleness)
        dropped = len(q) - len(keep)
        self._tokens -= sum(len(t) for t in q) - sum(len(t) for t in keep)
        self._items["student"] = keep
        return dropped

    # -- sampling

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self._items.items()}

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def fill(self) -> float:
        return self._tokens / self.capacity_tokens

    def ready(self, n: int | None = None) -> bool:
        n = n or self.batch_size
        n_demo = round(n * self.demo_ratio)
        c = self.counts()
        return c["student"] >= n - n_demo and c["teacher_demo"] >= n_demo

    def sample(self, n: int | None = None, *, current_version: int | None = None, take_newest: bool = False) -> list[Trajectory]:
        """A batch of ``n`` trajectories mixed by ``demo_ratio``. ``take_newest`` returns the
        most recent student paths (synchronous on-policy training) instead of a random draw."""
        n = n or self.batch_size
        if current_version is not None:
            self.drop_stale(current_version)
        n_demo = round(n * self.demo_ratio)
        n_student = n - n_demo
        c = self.counts()
        if c["student"] < n_student or c["teacher_demo"] < n_demo:
            raise BufferError(
                f"buffer holds {c['student']} student paths and {c['teacher_demo']} demonstrations; "
                f"a batch of {n} needs {n_student} and {n_demo}"
            )
        students = list(self._items["student"])
        demos = list(self._items["teacher_demo"])
        if take_newest:
            pick_s = students[len(students) - n_student :]
            pick_d = demos[len(demos) - n_demo :] if n_demo else []
        else:
            pick_s = self.rng.sample(students, n_student)
            pick_d = self.rng.sample(demos, n_demo)
        return pick_s + pick_d

    # -- persistence

    def save(self, path: str) -> None:
        """Write all stored trajectories to one Parquet file (atomic rename)."""
        trajs = list(self._items["student"]) + list(self._items["teacher_demo"])
        table = to_table(trajs) if trajs else SCHEMA.empty_table()
        tmp = path + ".tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        if not os.path.exists(path):
            raise BufferError(f"no buffer file at {path}")
        self._items = {"student": deque(), "teacher_demo": deque()}
        self._tokens = 0
        self.add(from_table(pq.read_table(path)))

    def nbytes(self) -> int:
        """Bytes of the Arrow representation of the current contents."""
        trajs = list(self._items["student"]) + list(self._items["teacher_demo"])
        return to_table(trajs).nbytes if trajs else 0
