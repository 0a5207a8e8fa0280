"""Replay buffer: on-policy student paths and teacher demonstrations, mixed by ratio.

Records are held per origin in compact columns (numpy arrays, the layout of an Arrow table with
one shared offsets array): token ids as uint16 where the vocabulary allows, log-probabilities as
float32, the two per-token flags bit-packed, and each prompt as a shared head (budget phrase +
instruction, stored once) and its own rest (the source). About 13-15 bytes per stored output
token all told, instead of the ~100 bytes of Python lists per token. ``sample`` rebuilds
`Trajectory` records on the way out (float32 values come back exactly as they went in).

Capacity counts stored output tokens, eviction is oldest-first, a staleness limit drops student
paths too many policy versions old, and the whole buffer saves to / restores from one Parquet
file (Arrow schema `SCHEMA`). No Ray here.
"""

from __future__ import annotations

import os
import random
from bisect import bisect_right

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .trajectory import ORIGINS, Trajectory

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
        ("tau_prob", pa.list_(pa.float32())),
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
    names = [k for k in SCHEMA.names if k in d]  # files written before tau_prob lack it
    return [Trajectory(**{k: d[k][i] for k in names}) for i in range(table.num_rows)]


# ----------------------------------------------------------------------------- compact storage


def _ids(values: list[int]) -> np.ndarray:
    """Token ids in the narrowest type that holds them (uint16 covers vocabularies < 65536)."""
    a = np.asarray(values, dtype=np.int64)
    if a.size == 0 or (a.min() >= 0 and a.max() < 1 << 16):
        return a.astype(np.uint16)
    return a.astype(np.int32)


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _Heads:
    """Shared prompt heads. Prompts are budget phrase + instruction + source, so most of each
    prompt repeats across records; a record stores a head id and only the rest of its prompt.
    A head is made from the common prefix of two consecutive new prompts (at least
    ``MIN_LEN`` tokens); at most ``MAX`` heads (then prompts are stored whole)."""

    MAX = 1024
    MIN_LEN = 4

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self._index: dict[tuple, int] = {}
        self._lengths: list[int] = []  # distinct head lengths, longest first
        self._last: list[int] | None = None

    def split(self, ids: list[int]) -> tuple[int, list[int]]:
        """(head id or -1, the rest of the prompt)."""
        for n in self._lengths:
            h = self._index.get(tuple(ids[:n])) if n <= len(ids) else None
            if h is not None:
                return h, ids[n:]
        last, self._last = self._last, ids
        if last is not None and len(self.rows) < self.MAX:
            n = _lcp(last, ids)
            if n >= self.MIN_LEN:
                h = len(self.rows)
                self.rows.append(list(ids[:n]))
                self._index[tuple(ids[:n])] = h
                if n not in self._lengths:
                    self._lengths = sorted([*self._lengths, n], reverse=True)
                return h, ids[n:]
        return -1, ids

    def join(self, h: int, rest: list[int]) -> list[int]:
        return self.rows[h] + rest if h >= 0 else rest

    def nbytes(self) -> int:
        return sum(8 * len(r) + 120 for r in self.rows)  # Python lists and their index entries


def _ragged_take(values: np.ndarray, off: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ragged rows ``rows`` of (values, off) as a new (values, off) pair."""
    lengths = (off[rows + 1] - off[rows]).astype(np.int64)
    new_off = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=new_off[1:])
    idx = np.arange(int(new_off[-1]), dtype=np.int64) + np.repeat(off[rows].astype(np.int64) - new_off[:-1], lengths)
    return values[idx], new_off


class _Chunk:
    """Rows of one origin in flat columns; rows ``start..n-1`` are live (earlier ones evicted).
    Per token: ids (``tok``), log-probs, bit-packed flags; per row: offsets, prompt head and
    the rest of the prompt (``rest``, ``roff``), budget, version, worker."""

    __slots__ = ("tok", "tau", "blogp", "tlogp", "gtau", "ptau", "off", "rest", "roff", "head", "budget", "version",
                 "worker", "has_greedy", "has_ptau", "start")

    def __init__(self, *, tok, tau, blogp, tlogp, gtau, ptau, off, rest, roff, head, budget, version, worker,
                 has_greedy, has_ptau):
        self.tok, self.tau, self.blogp, self.tlogp, self.gtau, self.ptau = tok, tau, blogp, tlogp, gtau, ptau
        self.has_ptau = has_ptau
        self.off, self.rest, self.roff, self.head = off, rest, roff, head
        self.budget, self.version, self.worker, self.has_greedy = budget, version, worker, has_greedy
        self.start = 0

    @classmethod
    def build(cls, trajs: list[Trajectory], heads: _Heads) -> "_Chunk":
        off = np.zeros(len(trajs) + 1, dtype=np.int32)
        np.cumsum([len(t) for t in trajs], out=off[1:])
        split = [heads.split(list(t.source_ids)) for t in trajs]
        roff = np.zeros(len(trajs) + 1, dtype=np.int32)
        np.cumsum([len(r) for _, r in split], out=roff[1:])
        flat = lambda name: [v for t in trajs for v in getattr(t, name)]  # noqa: E731
        gtau = [v for t in trajs for v in (t.greedy_tau or [False] * len(t))]
        ptau = [v for t in trajs for v in (t.tau_prob or [0.0] * len(t))]
        return cls(
            tok=_ids(flat("tokens")),
            tau=np.packbits(np.asarray(flat("actions_tau"), dtype=bool)),
            blogp=np.asarray(flat("behaviour_logp"), dtype=np.float32),
            tlogp=np.asarray(flat("teacher_logp"), dtype=np.float32),
            gtau=np.packbits(np.asarray(gtau, dtype=bool)),
            # π(<τ>) to 1/255 (one byte a token): the λ controller reads the exact values of
            # fresh rows before they are stored; replayed rows only carry them along
            ptau=np.rint(np.clip(np.asarray(ptau, dtype=np.float32), 0.0, 1.0) * 255).astype(np.uint8),
            off=off,
            rest=_ids([v for _, r in split for v in r]),
            roff=roff,
            head=np.asarray([h for h, _ in split], dtype=np.int16),
            budget=np.asarray([t.budget_id for t in trajs], dtype=np.int16),
            version=np.asarray([t.policy_version for t in trajs], dtype=np.int32),
            worker=np.asarray([t.worker_id for t in trajs], dtype=np.int16),
            has_greedy=np.asarray([bool(t.greedy_tau) for t in trajs], dtype=bool),
            has_ptau=np.asarray([bool(t.tau_prob) for t in trajs], dtype=bool),
        )

    @property
    def live(self) -> int:
        return len(self.budget) - self.start

    def length(self, i: int) -> int:
        return int(self.off[i + 1] - self.off[i])

    def live_tokens(self) -> int:
        return int(self.off[-1] - self.off[self.start])

    @staticmethod
    def _bits(packed: np.ndarray, a: int, b: int) -> list[bool]:
        if a == b:
            return []
        chunk = np.unpackbits(packed[a // 8 : (b + 7) // 8])
        return chunk[a % 8 : a % 8 + (b - a)].astype(bool).tolist()

    def row(self, i: int, origin: str, heads: _Heads) -> Trajectory:
        a, b = int(self.off[i]), int(self.off[i + 1])
        return Trajectory(
            source_ids=heads.join(int(self.head[i]), self.rest[self.roff[i] : self.roff[i + 1]].tolist()),
            budget_id=int(self.budget[i]),
            tokens=self.tok[a:b].tolist(),
            actions_tau=self._bits(self.tau, a, b),
            behaviour_logp=self.blogp[a:b].tolist(),
            teacher_logp=self.tlogp[a:b].tolist(),
            origin=origin,
            policy_version=int(self.version[i]),
            worker_id=int(self.worker[i]),
            greedy_tau=self._bits(self.gtau, a, b) if self.has_greedy[i] else [],
            tau_prob=(self.ptau[a:b].astype(np.float32) / 255).tolist() if self.has_ptau[i] else [],
        )

    def nbytes(self) -> int:
        return sum(getattr(self, k).nbytes for k in self.__slots__ if k != "start")


class _Store:
    """The rows of one origin, oldest first, as a list of chunks (merged now and then)."""

    MAX_CHUNKS = 32

    def __init__(self, origin: str, heads: _Heads) -> None:
        self.origin = origin
        self.heads = heads
        self.chunks: list[_Chunk] = []
        self.count = 0
        self.tokens = 0

    def append(self, trajs: list[Trajectory]) -> None:
        c = _Chunk.build(trajs, self.heads)
        self.chunks.append(c)
        self.count += c.live
        self.tokens += c.live_tokens()
        if len(self.chunks) > self.MAX_CHUNKS:
            self._merge()

    def pop_oldest(self) -> int:
        """Evict the oldest row; returns its token count."""
        c = self.chunks[0]
        n = c.length(c.start)
        c.start += 1
        self.count -= 1
        self.tokens -= n
        if c.live == 0:
            self.chunks.pop(0)
        elif c.start > c.live:  # more dead rows than live ones: reclaim their memory
            self._merge()
        return n

    def keep_versions(self, min_version: int) -> int:
        """Drop rows with policy_version < min_version; returns how many were dropped."""
        before = self.count
        kept: list[_Chunk] = []
        for c in self.chunks:
            v = c.version[c.start :]
            if (v >= min_version).all():
                kept.append(c)
            elif (v >= min_version).any():
                kept.append(_select(c, np.nonzero(v >= min_version)[0] + c.start))
        self.chunks = kept
        self._recount()
        return before - self.count

    def rows(self, indices: list[int]) -> list[Trajectory]:
        """Trajectories at live positions ``indices`` (0 = oldest)."""
        starts = []
        total = 0
        for c in self.chunks:
            starts.append(total)
            total += c.live
        out = []
        for idx in indices:
            k = bisect_right(starts, idx) - 1
            c = self.chunks[k]
            out.append(c.row(c.start + idx - starts[k], self.origin, self.heads))
        return out

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.chunks)

    def _recount(self) -> None:
        self.count = sum(c.live for c in self.chunks)
        self.tokens = sum(c.live_tokens() for c in self.chunks)

    def _merge(self) -> None:
        if not self.chunks:
            return
        self.chunks = [_concat([_select(c, np.arange(c.start, len(c.budget))) for c in self.chunks])]
        self._recount()


def _select(c: _Chunk, rows: np.ndarray) -> _Chunk:
    """A new chunk holding rows ``rows`` of ``c``."""
    tok_idx = np.arange(int(c.off[-1]), dtype=np.int64)
    tok_idx, off = _ragged_take(tok_idx, c.off, rows)
    rest, roff = _ragged_take(c.rest, c.roff, rows)
    n_bits = int(c.off[-1])
    unpack = lambda p: np.unpackbits(p, count=n_bits).astype(bool)  # noqa: E731
    return _Chunk(
        tok=c.tok[tok_idx], tau=np.packbits(unpack(c.tau)[tok_idx]), blogp=c.blogp[tok_idx],
        tlogp=c.tlogp[tok_idx], gtau=np.packbits(unpack(c.gtau)[tok_idx]), ptau=c.ptau[tok_idx], off=off,
        rest=rest, roff=roff, head=c.head[rows], budget=c.budget[rows], version=c.version[rows],
        worker=c.worker[rows], has_greedy=c.has_greedy[rows], has_ptau=c.has_ptau[rows],
    )


def _concat(chunks: list[_Chunk]) -> _Chunk:
    if len(chunks) == 1:
        return chunks[0]

    def ids(name: str) -> np.ndarray:
        dtype = np.int32 if any(getattr(c, name).dtype == np.int32 for c in chunks) else np.uint16
        return np.concatenate([getattr(c, name).astype(dtype) for c in chunks])

    def offsets(name: str) -> np.ndarray:
        parts, base = [np.zeros(1, np.int32)], 0
        for c in chunks:
            o = getattr(c, name)
            parts.append(o[1:] + base)
            base += int(o[-1])
        return np.concatenate(parts).astype(np.int32)

    bits = lambda name: np.packbits(np.concatenate(  # noqa: E731
        [np.unpackbits(getattr(c, name), count=int(c.off[-1])) for c in chunks]).astype(bool))
    cat = lambda name: np.concatenate([getattr(c, name) for c in chunks])  # noqa: E731
    return _Chunk(
        tok=ids("tok"), tau=bits("tau"), blogp=cat("blogp"), tlogp=cat("tlogp"), gtau=bits("gtau"),
        ptau=cat("ptau"), off=offsets("off"), rest=ids("rest"), roff=offsets("roff"), head=cat("head"),
        budget=cat("budget"), version=cat("version"), worker=cat("worker"), has_greedy=cat("has_greedy"),
        has_ptau=cat("has_ptau"),
    )


# ----------------------------------------------------------------------------- the buffer


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
        self._clear()

    def _clear(self) -> None:
        self._heads = _Heads()
        self._stores = {o: _Store(o, self._heads) for o in ORIGINS}

    # -- filling

    def add(self, trajs: list[Trajectory]) -> int:
        """Add trajectories, evicting the oldest when over capacity; returns how many were evicted.
        λ probes (``Trajectory.decoded``, train.decoded_per_budget) are not kept: they are not
        trained on."""
        trajs = [t for t in trajs if not t.decoded]
        for t in trajs:
            if len(t) > self.capacity_tokens:
                raise BufferError(
                    f"a {len(t)}-token trajectory does not fit a buffer of {self.capacity_tokens} tokens"
                )
        for origin in ORIGINS:
            mine = [t for t in trajs if t.origin == origin]
            if mine:
                self._stores[origin].append(mine)
        evicted = 0
        while self.tokens > self.capacity_tokens:
            # evict from the larger side to keep both kinds available
            side = max(ORIGINS, key=lambda k: self._stores[k].count)
            self._stores[side].pop_oldest()
            evicted += 1
        return evicted

    def drop_stale(self, current_version: int) -> int:
        return self._stores["student"].keep_versions(current_version - self.max_staleness)

    # -- sampling

    def counts(self) -> dict[str, int]:
        return {k: s.count for k, s in self._stores.items()}

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self._stores.values())

    @property
    def fill(self) -> float:
        return self.tokens / self.capacity_tokens

    @property
    def _items(self) -> dict[str, list[Trajectory]]:
        """Every stored record per origin, oldest first (a materialised copy: tests, debugging)."""
        return {k: s.rows(list(range(s.count))) for k, s in self._stores.items()}

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
        ns, nd = c["student"], c["teacher_demo"]
        if take_newest:
            pick_s = list(range(ns - n_student, ns))
            pick_d = list(range(nd - n_demo, nd)) if n_demo else []
        else:
            # index draws equal rng.sample(list_of_records, k): sample() only looks at the length
            pick_s = self.rng.sample(range(ns), n_student)
            pick_d = self.rng.sample(range(nd), n_demo)
        return self._stores["student"].rows(pick_s) + self._stores["teacher_demo"].rows(pick_d)

    # -- persistence

    def all(self) -> list[Trajectory]:
        """Every stored record: student paths, then demonstrations, oldest first."""
        items = self._items
        return items["student"] + items["teacher_demo"]

    def save(self, path: str) -> None:
        """Write all stored trajectories to one Parquet file (atomic rename)."""
        trajs = self.all()
        table = to_table(trajs) if trajs else SCHEMA.empty_table()
        tmp = path + ".tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        if not os.path.exists(path):
            raise BufferError(f"no buffer file at {path}")
        self._clear()
        self.add(from_table(pq.read_table(path)))

    def nbytes(self) -> int:
        """Bytes held by the stored columns and the prompt heads."""
        return sum(s.nbytes() for s in self._stores.values()) + self._heads.nbytes()
