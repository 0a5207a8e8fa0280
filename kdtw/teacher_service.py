"""The teacher as a service: what the Ray teacher pool and replicas run, without Ray.

- :class:`TeacherService` answers merged batches of requests on one teacher `LM`: steps of
  teacher **sessions** (the <τ> calls and the scoring of a rollout), per-position log p of finished
  paths (sessionless scoring), greedy/sampled next tokens, and teacher demonstrations.
- :class:`SessionStore`: the KV caches of open sessions on a replica, least recently used evicted
  beyond a byte budget (``ray.teacher_cache_mb``).
- :class:`DynamicBatcher` (asyncio) merges requests from many callers into one batch: at most
  ``max_batch`` sequences, leaving when full, when every expected caller has a request in, or
  ``max_wait`` after its first request; while every replica is busy, requests keep collecting.
- :class:`Router`: least-loaded choice among replicas, and a failed replica's batch retried on
  another.
- :class:`RemoteTeacher`: an `LM` stand-in for `kdtw.decoding.generate` whose forwards run
  elsewhere (any client with ``step``/``close``/``score``, e.g. the Ray pool).

A rollout batch through a remote teacher is `kdtw.rollout.collect` with a :class:`RemoteTeacher`:
the same collector as the single-process loop's.

Teacher sessions. A decode batch (one `generate` chunk) is one session: the replica that serves
its first request keeps the teacher's decode state (KV cache) under the session id, and each
later request carries only the output tokens since the previous one. The replica computes each
position once and returns the log p of the tokens it was fed (what scoring needs), so a rollout
costs the teacher its prompt once plus one position per output token, calls and scoring together
(`generate(score_teacher=True)`). A replica that does not hold the session (restarted, evicted,
or a different one after a failure) answers :data:`MISS`; the client then sends the whole prefix
again, which any replica can serve: a retry anywhere stays correct.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable, Protocol

import numpy as np
import torch

from .models import LM, DecodeState, fed_tokens
from .rollout import prompt_ids, score_batch, teacher_demos
from .trajectory import Trajectory

KINDS = ("next", "score", "topk", "token", "step", "close")
MISS = "session-miss"  # the answer to a session step the replica cannot continue


# ----------------------------------------------------------------------------- the service


@torch.no_grad()
def next_logits(teacher: LM, prompt_rows: list[list[int]], prefixes: list[list[int]]) -> torch.Tensor:
    """Logits [B, V] predicting output position len(prefix_i) of each row, from one
    teacher-forced forward over prompt + prefix (rows may have different prefix lengths)."""
    p_ids, p_mask = teacher.pad_left(prompt_rows)
    lens = torch.tensor([len(p) for p in prefixes], dtype=torch.long)
    T = int(lens.max()) + 1
    ids = torch.full((len(prefixes), T), teacher.pad_id, dtype=torch.long)
    for i, p in enumerate(prefixes):
        if p:
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    logits = teacher.forward(p_ids, p_mask, ids.to(teacher.device))[..., : teacher.vocab_size]  # [B, T, V]
    return logits[torch.arange(len(prefixes)), lens.to(logits.device)].float().cpu()


def score_rows(teacher: LM, prompt_rows: list[list[int]], paths: list[list[int]], *, batch_size: int,
               top_k: int = 0) -> list:
    """`kdtw.rollout.score_paths` with prompts given as token ids (``pad_left(rows)`` is what
    ``encode_prompts`` builds); ``top_k`` as in `kdtw.rollout.score_batch`."""
    out: list = []
    for s in range(0, len(paths), batch_size):
        p_ids, p_mask = teacher.pad_left(prompt_rows[s : s + batch_size])
        out.extend(score_batch(teacher, p_ids, p_mask, paths[s : s + batch_size], top_k=top_k))
    return out


def _nbytes(obj: Any, seen: set | None = None, depth: int = 0) -> int:
    """Bytes of the tensors reachable from ``obj`` (a decode state: caches, masks, logits)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(_nbytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


@dataclass
class Session:
    """One decode batch's teacher state on a replica."""

    state: DecodeState
    ended: torch.Tensor  # [B] bool: the row has been fed its EOS (later positions are padding)
    tag: str = "rollout"
    nbytes: int = 0

    @property
    def fed(self) -> int:
        return self.state.n_fed


class SessionStore:
    """Open sessions by id, least recently used first; beyond ``max_bytes`` the oldest are
    evicted (their next request is a :data:`MISS`), never the one just used."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._s: OrderedDict[str, Session] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._s)

    def get(self, sid: str) -> Session | None:
        sess = self._s.get(sid)
        if sess is not None:
            self._s.move_to_end(sid)
        return sess

    def put(self, sid: str, sess: Session) -> None:
        old = self._s.pop(sid, None)
        self.bytes -= old.nbytes if old is not None else 0
        sess.nbytes = _nbytes(sess.state)
        self._s[sid] = sess
        self.bytes += sess.nbytes
        while self.bytes > self.max_bytes and len(self._s) > 1:
            _, gone = self._s.popitem(last=False)
            self.bytes -= gone.nbytes
            self.evictions += 1

    def pop(self, sid: str) -> None:
        old = self._s.pop(sid, None)
        if old is not None:
            self.bytes -= old.nbytes


class TeacherService:
    """One teacher answering merged request batches. ``latency_s`` (a benchmark knob) is slept
    before each batch is answered, as a remote teacher's network and queueing would add; with
    ``latency_floor`` it is the whole answer's time instead: the forward runs within it and the
    rest is slept (a teacher on an accelerator, whose batched forward takes about as long for 2
    sequences as for 20, where the forward here runs on the machine's cores and grows with the batch).
    ``cache_mb`` bounds the KV caches of open sessions. ``positions`` counts, per request tag
    (``rollout``, ``validation``, ...), the teacher positions computed: prompt tokens when a
    session starts, then every output token fed up to its row's EOS (batch padding not counted)."""

    def __init__(self, teacher: LM, *, max_batch: int = 256, latency_s: float = 0.0, seed: int = 0,
                 cache_mb: float = 1024.0, latency_floor: bool = False):
        self.teacher = teacher
        self.max_batch = max_batch
        self.latency_s, self.latency_floor = latency_s, latency_floor
        self.gen = torch.Generator().manual_seed(seed)
        self.forwards = 0
        self.sessions = SessionStore(int(cache_mb * 2**20))
        self.positions: Counter = Counter()
        self.misses = 0
        # demonstrations may be decoded in a thread of their own beside the session steps
        # (actors/teacher.py): the counters both touch are updated under this lock
        self.lock = threading.Lock()

    def _count(self, tag: str | None, positions: int, forwards: int = 0) -> None:
        with self.lock:
            if tag is not None:
                self.positions[tag] += positions
            self.forwards += forwards

    def counted(self) -> tuple[Counter, int]:
        """A copy of the teacher positions computed so far (by tag) and the forwards count."""
        with self.lock:
            return self.positions.copy(), self.forwards

    def spec(self) -> dict:
        t = self.teacher
        return {"vocab_size": t.vocab_size, "eos_id": t.eos_id, "pad_id": t.pad_id, "bos_id": t.bos_id,
                "is_encoder_decoder": t.is_encoder_decoder}

    def run_batch(self, kind: str, requests: list[tuple]) -> list[Any]:
        """Answer ``requests`` (payloads of one kind) with one merged computation; returns one
        result per request, in order.

        - ``next``: (prompt_rows, prefixes) -> float32 array [b, V] of next-token logits
        - ``score``: (prompt_rows, paths) -> list of per-token log p lists
        - ``topk``: (prompt_rows, paths, k) -> list of (log p, top-k ids, top-k log p) per path
        - ``token``: (prompt_rows, prefixes, do_sample) -> list of token ids (greedy or sampled)
        """
        with self._latency():
            self._count(None, 0, forwards=1)
            return self._compute(kind, requests)

    @contextmanager
    def _latency(self, wait: bool = True):
        """``latency_s`` around one answer (when ``wait``): slept before it, or with
        ``latency_floor`` the answer's time made up to it."""
        wait = bool(self.latency_s) and wait
        t0 = time.perf_counter()
        if wait and not self.latency_floor:
            time.sleep(self.latency_s)
        yield
        if wait and self.latency_floor:
            time.sleep(max(0.0, self.latency_s - (time.perf_counter() - t0)))

    def run_mixed(self, items: list[tuple[str, tuple]]) -> list[Any]:
        """Answer ``(kind, payload)`` requests of several kinds as one batch (one latency
        wait; one merged computation per kind); results in request order."""
        unknown = [k for k, _ in items if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown teacher request kind {unknown[0]!r}: use one of {KINDS}")
        out: list[Any] = [None] * len(items)
        with self._latency(any(k != "close" for k, _ in items)):  # freeing a session is not a round trip to wait on
            self._count(None, 0, forwards=1)
            for kind in KINDS:
                idx = [i for i, (k, _) in enumerate(items) if k == kind]
                if idx:
                    for i, r in zip(idx, self._compute(kind, [items[i][1] for i in idx])):
                        out[i] = r
        return out

    def _compute(self, kind: str, requests: list[tuple]) -> list[Any]:
        if kind not in KINDS:
            raise ValueError(f"unknown teacher request kind {kind!r}: use one of {KINDS}")
        if kind == "step":
            return self._steps(requests)
        if kind == "close":
            for (sid,) in requests:
                self.sessions.pop(sid)
            return [None] * len(requests)
        sizes = [len(r[0]) for r in requests]
        rows = [row for r in requests for row in r[0]]
        if kind == "score":
            flat = score_rows(self.teacher, rows, [p for r in requests for p in r[1]], batch_size=self.max_batch)
            return _split(flat, sizes)
        if kind == "topk":
            k = max(r[2] for r in requests)
            flat = score_rows(self.teacher, rows, [p for r in requests for p in r[1]], batch_size=self.max_batch, top_k=k)
            # one forward for all at the largest k; each request gets its own k back
            return [[(lp, [row[: r[2]] for row in ids], [row[: r[2]] for row in tl]) for lp, ids, tl in part]
                    for part, r in zip(_split(flat, sizes), requests)]
        prefixes = [p for r in requests for p in r[1]]
        logits = torch.cat([next_logits(self.teacher, rows[s : s + self.max_batch], prefixes[s : s + self.max_batch])
                            for s in range(0, len(rows), self.max_batch)])  # [B, V]
        if kind == "next":
            arr = logits.numpy()
            return [arr[a:b] for a, b in _bounds(sizes)]
        out = []
        for (a, b), r in zip(_bounds(sizes), requests):
            part = logits[a:b]
            if r[2]:
                out.append(torch.multinomial(torch.softmax(part, -1), 1, generator=self.gen).squeeze(-1).tolist())
            else:
                out.append(part.argmax(-1).tolist())
        return out

    def step(self, sid: str, rows: list[list[int]] | None, start: int, tokens: list[list[int]], feed_last: bool = True,
             close: bool = False, tag: str = "rollout", logp: bool = True,
             need: list[int] | None = None) -> tuple[np.ndarray | None, Any] | str:
        """Continue session ``sid`` from output position ``start`` with ``tokens`` [B][n]: returns
        (next-token logits [B, V] or None when ``feed_last`` is false, log p of the n tokens
        [B, n] or None without ``logp``), see `LM.extend_logp`. ``rows`` (unpadded prompt ids)
        open the session when ``start`` is 0 (and restart it if it exists); a session this
        replica does not hold at ``start`` answers :data:`MISS`. ``close`` frees it after this step.
        ``need``: the indices of the rows whose logits to send ([len(need), V]), not all B (a
        decode step reads only its calling rows' logits: less to serialise and move)."""
        return self._steps([(sid, rows, start, tokens, feed_last, close, tag, logp, need)])[0]

    @torch.no_grad()
    def _steps(self, requests: list[tuple]) -> list[Any]:
        """`step` for a batch of requests; the sessions that can share a forward share one
        (`LM.extend_many`)."""
        out: list[Any] = [None] * len(requests)
        todo = []
        for j, (sid, rows, start, tokens, feed_last, close, tag, want, need) in enumerate(requests):
            sess = self.sessions.get(sid)
            if start == 0 and rows is not None:
                ids, mask = self.teacher.pad_left(rows)
                sess = Session(self.teacher.start(ids, mask), torch.zeros(len(rows), dtype=torch.bool), tag)
                self._count(tag, int(mask.sum()))
            elif sess is None or sess.fed != start:
                self.sessions.pop(sid)
                self.misses += 1
                out[j] = MISS
                continue
            t = torch.tensor(tokens, dtype=torch.long).reshape(len(sess.ended), -1)
            fed = fed_tokens(t, feed_last)
            self._count(tag, _real_positions(fed, sess.ended, self.teacher.eos_id))
            todo.append((j, sid, sess, t, fed, feed_last, close, want, need))
        fulls = self.teacher.extend_many([x[2].state for x in todo], [x[4].to(self.teacher.device) for x in todo])
        for (j, sid, sess, t, _, feed_last, close, want, need), full in zip(todo, fulls):
            if want:
                last, logp = self.teacher.scored(full, t, feed_last)
            else:  # a call that only needs the next token's logits (decoding, validation)
                last, logp = full[:, -1, : self.teacher.vocab_size].float(), None
            if last is not None and need is not None:
                last = last[need]
            if close:
                self.sessions.pop(sid)
            else:
                self.sessions.put(sid, sess)
            out[j] = (None if last is None else last.cpu().numpy()), (None if logp is None else logp.cpu().numpy())
        return out

    def demos(self, prompts: list[str], budget_ids: list[int], *, max_new_tokens: int, batch_size: int,
              gen_state: torch.Tensor, version: int = 0, worker_id: int = 0) -> tuple[list[Trajectory], torch.Tensor]:
        """Teacher demonstrations (`kdtw.rollout.teacher_demos`) decoded here with KV caches: one
        call instead of one round trip per token. Sampling uses a generator in the caller's state
        ``gen_state`` and the state it ends in is returned, so the caller's random stream goes on
        exactly as if it had decoded them itself (and a retry elsewhere gives the same paths)."""
        self._count(None, 0, forwards=1)
        g = torch.Generator()
        g.set_state(gen_state)
        with self._latency():
            trajs = teacher_demos(self.teacher, prompts, budget_ids, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, generator=g, version=version, worker_id=worker_id)
        # decoded with score_teacher: prompt once, each output position once (the last only scored)
        for s in range(0, len(trajs), batch_size):
            chunk = trajs[s : s + batch_size]
            T = max(len(t.tokens) for t in chunk)
            self._count("rollout", sum(len(t.source_ids) + min(len(t.tokens), T - 1) for t in chunk))
        return trajs, g.get_state()


def _real_positions(fed: torch.Tensor, ended: torch.Tensor, eos: int) -> int:
    """Tokens of ``fed`` [B, n] up to and including each row's EOS (rows that already fed theirs
    count nothing); updates ``ended`` in place."""
    if fed.shape[1] == 0:
        return 0
    is_eos = (fed == eos).long()
    before = is_eos.cumsum(1) - is_eos  # EOS tokens strictly before each position
    live = (~ended)[:, None] & (before == 0)
    ended |= is_eos.bool().any(1)
    return int(live.sum())


def _bounds(sizes: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for n in sizes:
        out.append((a, a + n))
        a += n
    return out


def _split(flat: list, sizes: list[int]) -> list[list]:
    return [flat[a:b] for a, b in _bounds(sizes)]


# ----------------------------------------------------------------------------- batching


@dataclass
class _Pending:
    payload: Any
    rows: int
    client: Any
    future: asyncio.Future
    t: float


@dataclass
class BatchStats:
    """Batches sent and the requests and sequences in them; the seconds batches waited for more
    requests once a replica was free (``wait_s``), how many left at ``max_wait_s`` (``timeouts``),
    and the seconds the replicas took to answer them (``serve_s``). Per request, summed: the
    seconds from its arrival to its batch leaving (``queued_s``), and the part of them it spent
    behind a busy replica, before a slot was free (``behind_s``): a request that arrives while
    its replica answers others waits out the rest of that answer, what one client alone never
    does."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    wait_s: float = 0.0
    timeouts: int = 0
    serve_s: float = 0.0
    queued_s: float = 0.0
    behind_s: float = 0.0

    KEYS = ("batches", "requests", "rows", "wait_s", "timeouts", "serve_s", "queued_s", "behind_s")

    def as_dict(self) -> dict[str, float]:
        n = max(self.batches, 1)
        return {**{k: getattr(self, k) for k in self.KEYS},
                "requests_per_batch": self.requests / n, "rows_per_batch": self.rows / n}


class DynamicBatcher:
    """Merges requests into batches for ``run(payloads) -> results`` (a coroutine).

    A batch leaves when it holds ``max_batch`` sequences; when it holds a request from
    ``expected`` distinct clients; when no client of the previous batch that is missing from it
    is due back before the deadline (each client's usual gap between an answer and its next
    request is tracked: callers in a run of teacher calls come back within milliseconds and are
    waited for, a caller busy decoding its own tokens is not; the gap is tracked apart for each
    ``kind`` of request the answer was to, as a caller may come back at once after one kind and
    only after work of its own after another: a session's middle, its last step, a close sent
    apart (`end`)); or ``max_wait_s`` after its first
    request or of a replica becoming free, whichever is later. It leaves only once a slot of
    ``slots`` (one per replica) is free: requests that arrive meanwhile join it. A request is
    never split; one larger than ``max_batch`` goes alone.
    """

    def __init__(self, run: Callable[[list[Any]], Awaitable[list[Any]]], *, max_batch: int, max_wait_s: float,
                 slots: asyncio.Semaphore | int = 1, expected: int = 0) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.expected = expected
        self._slots = slots
        self._queue: deque[_Pending] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._prev: set = set()  # clients of the last batch sent
        self._answered: dict = {}  # client -> when its last answer was delivered
        self._kind: dict = {}  # client -> the kind of request that answer was to
        self._gap: dict = {}  # (client, kind) -> moving average of answer-to-next-request gaps (s)
        self.stats = BatchStats()

    async def submit(self, payload: Any, rows: int, client: Any = None, kind: Hashable = None) -> Any:
        """The answer to ``payload`` (``rows`` sequences) for ``client``; ``kind`` names what the
        request is to the client (the gap until its next request is learnt per kind)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            if isinstance(self._slots, int):
                self._slots = asyncio.Semaphore(self._slots)
            self._task = loop.create_task(self._loop())
        fut = loop.create_future()
        now = time.monotonic()
        if client in self._answered:
            gap, key = now - self._answered[client], (client, self._kind.get(client))
            self._gap[key] = gap if key not in self._gap else 0.5 * self._gap[key] + 0.5 * gap
        self._queue.append(_Pending(payload, rows, client, fut, now))
        self._wake.set()
        try:
            return await fut
        finally:
            self._answered[client] = time.monotonic()
            self._kind[client] = kind

    def end(self, client: Any, kind: Hashable = "closed") -> None:
        """``client`` said after its last answer that it is done (a session closed apart from its
        last step): its next gap is counted as one after ``kind``."""
        if client in self._answered:
            self._kind[client] = kind
            if self._wake is not None:
                self._wake.set()  # a batch waiting on it may leave now

    def _take(self, deadline: float) -> tuple[int, int, bool]:
        """(requests, rows) of the queue prefix that fits one batch, and whether to send it now."""
        n = rows = 0
        clients = set()
        for p in self._queue:
            if n and rows + p.rows > self.max_batch:
                return n, rows, True
            n, rows = n + 1, rows + p.rows
            clients.add(p.client)
            if rows >= self.max_batch:
                return n, rows, True
        if self.expected and len(clients) >= self.expected:
            return n, rows, True
        due = []  # a client without a gap of its kind yet counts as due
        for c in self._prev - clients:
            key = (c, self._kind.get(c))
            if key not in self._gap or self._answered.get(c, 0.0) + self._gap[key] <= deadline:
                due.append(c)
        return n, rows, not due

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await self._slots.acquire()
            free = time.monotonic()  # a slot is free from here
            # max_wait counts from when a replica is free (requests queued behind a busy replica
            # have waited anyway; the ones about to come back may still join)
            ready = max(self._queue[0].t, free)
            deadline = ready + self.max_wait_s
            while True:
                n, rows, full = self._take(deadline)
                left = deadline - time.monotonic()
                if full or left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    pass
            items = [self._queue.popleft() for _ in range(n)]
            self._prev = {p.client for p in items}
            now = time.monotonic()
            self.stats.batches += 1
            self.stats.requests += len(items)
            self.stats.rows += rows
            self.stats.wait_s += now - ready
            self.stats.queued_s += sum(now - p.t for p in items)
            self.stats.behind_s += sum(max(0.0, free - p.t) for p in items)
            self.stats.timeouts += not full
            asyncio.get_running_loop().create_task(self._serve(items))

    async def _serve(self, items: list[_Pending]) -> None:
        t0 = time.monotonic()
        try:
            results = await self.run([p.payload for p in items])
            for p, r in zip(items, results):
                if not p.future.done():
                    p.future.set_result(r)
        except BaseException as e:  # every waiting caller hears about the failure
            for p in items:
                if not p.future.done():
                    p.future.set_exception(e)
        finally:
            self.stats.serve_s += time.monotonic() - t0
            self._slots.release()


class Router:
    """Least-loaded routing over ``n`` replicas; a failed call is retried on another replica
    (all of them in turn, then again after ``backoff_s`` while a replica restarts)."""

    def __init__(self, n: int, *, attempts: int = 8, backoff_s: float = 0.5, cooldown_s: float = 5.0) -> None:
        self.load = [0] * n
        self.down_until = [0.0] * n  # a replica that failed is avoided for a while (restarting)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.retries = 0

    def pick(self, exclude: set[int]) -> int:
        now = time.monotonic()
        free = [i for i in range(len(self.load)) if i not in exclude] or list(range(len(self.load)))
        up = [i for i in free if self.down_until[i] <= now] or free
        return min(up, key=lambda i: (self.load[i], self.down_until[i]))

    async def call(self, fn: Callable[[int], Awaitable[Any]], rows: int, retry_on: tuple[type[BaseException], ...],
                   first: int | None = None) -> Any:
        """``fn(i)`` on a replica: ``first`` if given, else the least loaded; on a failure the
        next least loaded."""
        tried: set[int] = set()
        for attempt in range(self.attempts):
            if len(tried) == len(self.load):
                tried.clear()
                await asyncio.sleep(self.backoff_s)
            i = first if (attempt == 0 and first is not None) else self.pick(tried)
            self.load[i] += rows
            try:
                return await fn(i)
            except retry_on:
                self.failures += 1
                self.down_until[i] = time.monotonic() + self.cooldown_s
                if attempt + 1 == self.attempts:
                    raise
                self.retries += 1
                tried.add(i)
            finally:
                self.load[i] -= rows
        raise RuntimeError("unreachable")


# ----------------------------------------------------------------------------- remote teacher


class TeacherClient(Protocol):
    def step(self, sid: str, rows: list[list[int]] | None, start: int, tokens: list[list[int]], feed_last: bool,
             close: bool, tag: str, logp: bool) -> Any: ...

    def close(self, sid: str) -> None: ...

    def score(self, prompt_rows: list[list[int]], paths: list[list[int]]) -> list[list[float]]: ...


class LocalClient:
    """A :class:`TeacherService` in this process, as a client (tests, the single-machine path)."""

    def __init__(self, service: TeacherService) -> None:
        self.service = service

    def step(self, *payload):
        return self.service.run_batch("step", [payload])[0]

    def close(self, sid):
        self.service.run_batch("close", [(sid,)])

    def score(self, prompt_rows, paths):
        return self.service.run_batch("score", [(prompt_rows, paths)])[0]


@dataclass
class RemoteState(DecodeState):
    rows: list[list[int]] = field(default_factory=list)  # unpadded prompt ids per sequence
    fed: torch.Tensor | None = None  # [B, n_fed] output tokens the session has been fed
    sid: str = ""
    opened: bool = False  # a replica has been sent the prompt


class RemoteTeacher(LM):
    """An `LM` whose forwards run behind ``client``: tokenizer work (prompts, decoding) happens
    here; each decode batch is a teacher session (module docstring) whose requests carry only the
    tokens since the last one, and get the next-token logits and the fed tokens' log p back.
    ``extend`` returns only the last logit row ([B, 1, V]: what `generate` reads). No speculative
    decoding through it. ``tag`` labels the replicas' position counts (``rollout``,
    ``validation``)."""

    attempts = 8  # full-prefix resends after a miss, while replicas restart

    def __init__(self, client: TeacherClient, tokenizer: Any, spec: dict, *, tag: str = "rollout") -> None:
        # no model here: set what LM.__init__ would derive from one
        self.client = client
        self.model = None
        self.tokenizer = tokenizer
        self.tag = tag
        self.is_encoder_decoder = bool(spec["is_encoder_decoder"])
        self.vocab_size = int(spec["vocab_size"])
        self.eos_id, self.pad_id, self.bos_id = spec["eos_id"], spec["pad_id"], spec["bos_id"]
        self.misses = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def num_parameters(self) -> int:
        return 0

    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> RemoteState:
        rows = [r[m.bool()].tolist() for r, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        fed = torch.zeros((len(rows), 0), dtype=torch.long)
        return RemoteState(prompt_ids=prompt_ids, prompt_mask=prompt_mask, rows=rows, fed=fed, sid=uuid.uuid4().hex)

    def extend_logp(self, state: RemoteState, tokens: torch.Tensor, *, feed_last: bool = True,
                    close: bool = False, need: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self._step(state, tokens, feed_last=feed_last, close=close, logp=True, need=need)

    def _step(self, state: RemoteState, tokens: torch.Tensor, *, feed_last: bool, close: bool,
              logp: bool, need: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One session request (the whole prefix again after a miss); ``logp``: also the fed
        tokens' log p (scoring), not only the next-token logits; ``need``: the rows whose logits
        come back (the others are zeros here), not all B."""
        tokens = tokens.cpu().long()
        n = tokens.shape[1]
        rows_needed = None if need is None or not feed_last else need.cpu().nonzero().flatten().tolist()
        res = self.client.step(state.sid, None if state.opened else state.rows, state.n_fed, tokens.tolist(),
                               feed_last, close, self.tag, logp, rows_needed)
        state.opened = True
        for attempt in range(self.attempts):
            if not (isinstance(res, str) and res == MISS):
                break
            # the replica lost the session (restarted, evicted, another replica): send it all again
            self.misses += 1
            if attempt:
                time.sleep(0.5)
            full = torch.cat([state.fed, tokens], dim=1)
            res = self.client.step(state.sid, state.rows, 0, full.tolist(), feed_last, close, self.tag, logp,
                                   rows_needed)
        else:
            raise RuntimeError(f"teacher session {state.sid} could not be served after {self.attempts} resends")
        last, logp = res
        if logp is not None:
            logp = torch.from_numpy(np.array(logp, dtype=np.float32)).reshape(tokens.shape[0], -1)
            logp = logp[:, logp.shape[1] - n :]  # after a resend: the log p of these n tokens
        state.fed = torch.cat([state.fed, fed_tokens(tokens, feed_last)], dim=1)
        state.n_fed = state.fed.shape[1]
        if last is not None:
            last = torch.from_numpy(np.array(last, dtype=np.float32))
            if rows_needed is not None:  # only these rows came back: the rest are zeros
                full_last = torch.zeros((tokens.shape[0], last.shape[-1]), dtype=torch.float32)
                full_last[rows_needed] = last
                last = full_last
            state.last_logits = last  # [B, V]
        return state.last_logits if last is not None else None, logp

    def extend(self, state: RemoteState, tokens: torch.Tensor, *, hidden: bool = False):
        if hidden:
            raise NotImplementedError("a remote teacher returns no hidden states")
        if tokens.shape[1] or not state.started:
            self._step(state, tokens, feed_last=True, close=False, logp=False)
        return state.last_logits[:, None]

    def close(self, state: RemoteState) -> None:
        self.client.close(state.sid)

    def rollback(self, state, n_keep, last_logits):
        raise NotImplementedError("speculative decoding needs a local teacher")

    def forward(self, prompt_ids, prompt_mask, outputs, *, hidden=False):
        raise NotImplementedError("teacher-forced logits stay on the replica: use RemoteTeacher.score_paths")

    def score_paths(self, prompts: list[str], paths: list[list[int]]) -> list[list[float]]:
        return self.client.score(prompt_ids(self, prompts), paths)


# ----------------------------------------------------------------------------- rollout figures


def use_by_budget(trajs: list[Trajectory], n_budgets: int) -> dict[str, list[float]]:
    """Per-budget sums and counts of the sampled teacher-use fraction of student paths."""
    sums, counts = [0.0] * n_budgets, [0] * n_budgets
    for t in trajs:
        if t.origin == "student":
            sums[t.budget_id] += t.teacher_use
            counts[t.budget_id] += 1
    return {"sum": sums, "count": counts}


@dataclass
class UseObservation:
    """What `Learner.observe_use` reads of a student path (sent instead of the whole record)."""

    budget_id: int
    teacher_use: float
    greedy_use: float
    origin: str = "student"
    length: int = 1
    expected_use: float = 0.0
    decoded: bool = False

    def __len__(self) -> int:
        return self.length

    @classmethod
    def of(cls, t: Trajectory) -> "UseObservation":
        return cls(t.budget_id, t.teacher_use, t.greedy_use, t.origin, len(t), t.expected_use, t.decoded)
