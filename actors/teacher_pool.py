"""TeacherPool: M teacher replicas behind one asyncio actor.

Teacher sessions (kdtw/teacher_service.py) are pinned: a session's first request picks its
replica and every later one goes there, where its KV cache is. A client (rollout worker, the
driver) has a home replica, the one with the fewest clients when it first came, so its sessions
share one replica's batches. Each replica has its own `kdtw.teacher_service.DynamicBatcher`:
requests of every client homed there (session steps, scoring, next tokens) are merged into
batches of at most ``ray.teacher_max_batch`` sequences; a batch leaves once the replica's
clients (or those of its previous batch) have a request in, or ``ray.teacher_max_wait_ms`` after
its first request, and only when the replica is free (one batch in flight per replica).

When a replica fails, its sessions' requests answer `kdtw.teacher_service.MISS` and the client
sends the whole prefix again, which lands on a live replica (its clients are re-homed); requests
without a session are retried on another replica by a `kdtw.teacher_service.Router`. The pool
adds up the teacher positions the replicas report with each answer, by tag. `PoolClient` is the
blocking client `kdtw.teacher_service.RemoteTeacher` talks to: on the pool's node through the pool's
Unix socket (actors/pool_socket.py: no Ray actor task per request), elsewhere by actor calls.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from functools import partial

import ray

from actors.common import RETRY_ERRORS
from actors.pool_socket import SocketClient, WireError, new_address, serve
from kdtw.teacher_service import MISS, BatchStats, DynamicBatcher, Router

ACTIVE_S = 2.0  # a client that sent nothing for this long is not waited for


@ray.remote(num_cpus=0, max_concurrency=1000)
class TeacherPool:
    def __init__(self, replicas: list, *, max_batch: int, max_wait_ms: float) -> None:
        self.replicas = list(replicas)
        self.router = Router(len(self.replicas))
        self.batchers = [DynamicBatcher(partial(self._run, i), max_batch=max_batch, max_wait_s=max_wait_ms / 1000.0,
                                        slots=1) for i in range(len(self.replicas))]
        self.pinned: dict[str, int] = {}  # session id -> replica
        self.home: dict = {}  # client -> replica
        self.seen: dict = {}  # client -> when it last sent a request
        self.positions: Counter = Counter()
        self.misses = 0
        self._server, self._address, self._token = None, None, secrets.token_hex(16)
        self._server_lock = asyncio.Lock()

    # -- placement

    def _home(self, client) -> int:
        i = self.home.get(client)
        now = time.monotonic()
        if i is None or self.router.down_until[i] > now:
            up = [j for j in range(len(self.replicas)) if self.router.down_until[j] <= now] or range(len(self.replicas))
            clients = Counter(self.home.values())
            i = min(up, key=lambda j: (clients[j], j))
            self.home[client] = i
        # a batch leaves once every active client homed on its replica has a request in (the
        # driver's validation client, idle during rollouts, is not waited for)
        self.seen[client] = now
        active = Counter(j for c, j in self.home.items() if now - self.seen.get(c, 0.0) < ACTIVE_S)
        for j, b in enumerate(self.batchers):
            b.expected = active[j]
        return i

    def _down(self, i: int) -> None:
        now = time.monotonic()
        if self.router.down_until[i] <= now:  # once per failure, not once per request it held
            self.router.failures += 1
        self.router.down_until[i] = now + self.router.cooldown_s
        for sid in [s for s, j in self.pinned.items() if j == i]:
            del self.pinned[sid]
        for c in [c for c, j in self.home.items() if j == i]:
            del self.home[c]

    async def _run(self, i: int, items: list) -> list:
        results, positions = await self.replicas[i].run.remote(items)
        self.positions.update(positions)
        return results

    @staticmethod
    def _rows(kind: str, payload: tuple) -> int:
        return len(payload[3]) if kind == "step" else len(payload[0])

    # -- requests

    async def step(self, payload: tuple, client=None):
        """A teacher-session step (`kdtw.teacher_service.TeacherService.step`'s arguments)."""
        sid, rows, start = payload[0], payload[1], payload[2]
        home = self._home(client)
        if start == 0 and rows is not None:
            self.pinned[sid] = home
        i = self.pinned.get(sid)
        if i is None:  # a session this pool no longer places: the client sends it all again
            self.misses += 1
            return MISS
        self.router.load[i] += len(payload[3])
        try:
            # a client's next request after a session's middle, its last step or a one-step
            # session comes at different gaps: the batcher learns each apart
            kind = ("only" if start == 0 else "last") if payload[5] else None
            res = await self.batchers[i].submit(("step", payload), len(payload[3]), client, kind=kind)
        except RETRY_ERRORS:
            self._down(i)
            self.misses += 1
            return MISS
        finally:
            self.router.load[i] -= len(payload[3])
        if isinstance(res, str) and res == MISS:
            self.misses += 1
            self.pinned.pop(sid, None)
        elif payload[5]:  # closed with this step
            self.pinned.pop(sid, None)
        return res

    async def close(self, sid: str, client=None) -> None:
        i = self.pinned.pop(sid, None)
        if i is not None:
            self.batchers[i].end(client)  # its next request comes after it finished its batch
            try:
                await self.replicas[i].run.remote([("close", (sid,))])
            except RETRY_ERRORS:
                pass

    async def _submit(self, kind: str, payload: tuple, client):
        """A request without a session: the client's home replica, another if it fails."""
        rows = self._rows(kind, payload)
        first = self._home(client)

        async def on(i: int):
            return await self.batchers[i].submit((kind, payload), rows, client)

        return await self.router.call(on, rows, RETRY_ERRORS, first=first)

    async def score(self, prompt_rows, paths, client=None):
        return await self._submit("score", (prompt_rows, paths), client)

    async def score_topk(self, prompt_rows, paths, k: int, client=None):
        return await self._submit("topk", (prompt_rows, paths, k), client)

    async def demos(self, prompts, budget_ids, **kw):
        trajs, state, positions = await self.router.call(
            lambda i: self.replicas[i].demos.remote(prompts, budget_ids, **kw), len(prompts), RETRY_ERRORS)
        self.positions.update(positions)
        return trajs, state

    async def spec(self) -> dict:
        return await self.router.call(lambda i: self.replicas[i].spec.remote(), 0, RETRY_ERRORS)

    async def endpoint(self) -> dict:
        """Where clients on this node reach the pool's socket: ``{"node", "address", "token"}``
        (the server starts on the first ask)."""
        async with self._server_lock:
            if self._server is None:
                self._address = new_address()
                self._server = await serve(self._address, self._token, self._socket_request)
        return {"node": ray.get_runtime_context().get_node_id(), "address": self._address, "token": self._token}

    async def _socket_request(self, op: str, args: list, client):
        """A request from the socket: the same methods the actor calls reach."""
        if op == "step":
            return await self.step(tuple(args), client)
        if op == "close":
            return await self.close(args[0], client)
        if op == "score":
            return await self.score(args[0], args[1], client)
        raise ValueError(f"unknown request {op!r} on the teacher pool's socket")

    def where(self, sid: str) -> int | None:
        """The replica session ``sid`` is pinned to (None: not placed)."""
        return self.pinned.get(sid)

    def stats(self, reset: bool = True) -> dict:
        """Batches, requests and sequences per batch, waits and answer times (since the last reset);
        router counters; teacher positions computed, by tag (since the start); sessions; the
        clients it placed (a worker's id, its demonstrations' ``<id>/demos``, the driver's)."""
        total = BatchStats()
        for b in self.batchers:
            for k in BatchStats.KEYS:
                setattr(total, k, getattr(total, k) + getattr(b.stats, k))
            if reset:
                b.stats = BatchStats()
        return {"batch": total.as_dict(), "positions": dict(self.positions),
                "router": {"failures": self.router.failures, "retries": self.router.retries,
                           "load": list(self.router.load)},
                "sessions": {"open": len(self.pinned), "misses": self.misses},
                "clients": sorted(str(c) for c in self.home)}


class PoolClient:
    """Blocking calls into the pool (what `RemoteTeacher` needs), tagged with a client id: over
    the pool's socket when this process is on the pool's node and ``socket`` is on
    (``ray.teacher_socket``), else (and after the socket broke) as Ray actor calls. A request cut
    off with its socket goes again by actor call: a session step the pool had already taken
    answers a miss there, and `RemoteTeacher` resends the whole prefix, as after a replica's loss."""

    def __init__(self, pool, client_id, *, socket: bool = True) -> None:
        self.pool, self.client_id = pool, client_id
        self.try_socket = socket
        self.lane: SocketClient | None = None
        self.via_socket = self.via_ray = 0  # requests sent each way

    def _lane(self) -> SocketClient | None:
        if self.lane is None and self.try_socket:
            self.try_socket = False  # one try: a client that cannot connect stays on actor calls
            ep = ray.get(self.pool.endpoint.remote())
            if ep["node"] == ray.get_runtime_context().get_node_id():
                try:
                    self.lane = SocketClient(ep["address"], ep["token"], self.client_id)
                except OSError:
                    self.lane = None
        return self.lane

    def _call(self, op: str, *args):
        lane = self._lane()
        if lane is not None:
            try:
                out = lane.call(op, *args)
                self.via_socket += 1
                return out
            except (OSError, WireError):  # the socket broke (or the pool went): actor calls from now on
                lane.shut()
                self.lane = None
        self.via_ray += 1
        if op == "step":
            return ray.get(self.pool.step.remote(tuple(args), self.client_id))
        return ray.get(self.pool.score.remote(*args, self.client_id))

    def step(self, *payload):
        return self._call("step", *payload)

    def close(self, sid):
        lane = self._lane()
        if lane is not None:
            try:
                return lane.send("close", sid)
            except OSError:
                lane.shut()
                self.lane = None
        self.pool.close.remote(sid, self.client_id)  # nothing to wait for

    def score(self, prompt_rows, paths):
        return self._call("score", prompt_rows, paths)
