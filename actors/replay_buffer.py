"""ReplayBuffer actor around `kdtw.buffer.ReplayBuffer` (compact columns, Parquet save).

Workers push trajectories; the learner takes a batch together with the teacher-use
observations of the student paths that arrived since its last step (what
`Learner.observe_use` reads). Save/restore move Parquet bytes, so the checkpoint is written by the
driver wherever the buffer runs.
"""

from __future__ import annotations

import io
from dataclasses import asdict

import pyarrow.parquet as pq
import ray

from kdtw.buffer import SCHEMA, ReplayBuffer, from_table, to_table
from kdtw.teacher_service import UseObservation


@ray.remote(num_cpus=0)
class ReplayBufferActor:
    def __init__(self, cfg) -> None:
        tc = cfg.train
        self.buf = ReplayBuffer(capacity_tokens=tc.buffer_tokens, demo_ratio=tc.demo_ratio,
                                max_staleness=tc.max_staleness, batch_size=tc.batch_size, seed=cfg.seed)
        self.uses: list[UseObservation] = []
        self.added = 0
        # tokens that arrived and no learner step has matched yet: the driver's backpressure
        # (more would make the buffer evict paths the learner never saw)
        self.unseen = 0

    def add(self, trajs: list) -> dict:
        evicted = self.buf.add(trajs)
        self.uses.extend(UseObservation.of(t) for t in trajs if t.origin == "student")
        kept = [t for t in trajs if not t.decoded]  # λ probes: observed above, never stored
        self.added += len(kept)
        self.unseen += sum(len(t) for t in kept)
        return {"evicted": evicted, "fill": self.buf.fill, "unseen_tokens": self.unseen}

    def sample_step(self, n: int, version: int, take_newest: bool):
        """(batch, use observations, unseen tokens after it) for a learner at ``version``, or
        None when the buffer cannot fill a batch of fresh enough paths yet (what arrived is then
        stale or too little: the unseen count starts again from zero)."""
        self.buf.drop_stale(version)
        if not self.buf.ready(n):
            self.unseen = 0
            return None
        batch = self.buf.sample(n, current_version=version, take_newest=take_newest)
        uses, self.uses = self.uses, []
        self.unseen = max(0, self.unseen - sum(len(t) for t in batch))
        return batch, uses, self.unseen

    def stats(self) -> dict:
        c = self.buf.counts()
        return {"fill": self.buf.fill, "tokens": self.buf.tokens, "student": c["student"],
                "teacher_demo": c["teacher_demo"], "bytes": self.buf.nbytes(), "added": self.added}

    def save(self) -> tuple[bytes, dict]:
        """The contents as Parquet bytes, and the sampler state and pending observations."""
        trajs = self.buf.all()
        sink = io.BytesIO()
        pq.write_table(to_table(trajs) if trajs else SCHEMA.empty_table(), sink, compression="zstd")
        # plain data only: the driver writes it to a checkpoint that is read without pickle code
        return sink.getvalue(), {"rng": self.buf.rng.getstate(), "uses": [asdict(u) for u in self.uses],
                                 "added": self.added}

    def load(self, data: bytes, state: dict) -> None:
        trajs = from_table(pq.read_table(io.BytesIO(data)))  # parsed first: a bad file keeps the buffer
        uses = [UseObservation(**u) for u in state["uses"]]
        self.buf._clear()
        self.buf.add(trajs)
        self.buf.rng.setstate(state["rng"])
        self.uses, self.added = uses, state["added"]

    def contents(self) -> list:
        return self.buf.all()
