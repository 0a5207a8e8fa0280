"""TeacherPool: M teacher replicas behind one asyncio actor.

Requests from every rollout worker (and the driver's validation) go to the pool; one
`kdtw.teacher_service.DynamicBatcher` merges them, whatever their kind (next-token logits,
scoring, next tokens), into batches of at most ``ray.teacher_max_batch`` sequences: a batch
leaves once the clients of the previous batch (or every worker) have a request in, or
``ray.teacher_max_wait_ms`` after its first request, and only when a replica is free (one batch in flight per replica; requests keep
joining while all are busy). A `kdtw.teacher_service.Router` sends each batch to the
least-loaded replica and retries it on another when one fails. `PoolClient` is the blocking
client `kdtw.teacher_service.RemoteTeacher` talks to.
"""

from __future__ import annotations

import ray

from actors.common import RETRY_ERRORS
from kdtw.teacher_service import BatchStats, DynamicBatcher, Router


@ray.remote(num_cpus=0, max_concurrency=1000)
class TeacherPool:
    def __init__(self, replicas: list, *, max_batch: int, max_wait_ms: float, expected: int) -> None:
        self.replicas = list(replicas)
        self.router = Router(len(self.replicas))
        self.batcher = DynamicBatcher(self._run, max_batch=max_batch, max_wait_s=max_wait_ms / 1000.0,
                                      slots=len(self.replicas), expected=expected)

    async def _run(self, items: list) -> list:
        rows = sum(len(payload[0]) for _, payload in items)
        return await self.router.call(lambda i: self.replicas[i].run.remote(items), rows, RETRY_ERRORS)

    async def _submit(self, kind: str, payload: tuple, client):
        return await self.batcher.submit((kind, payload), len(payload[0]), client)

    async def next_logits(self, prompt_rows, prefixes, client=None):
        return await self._submit("next", (prompt_rows, prefixes), client)

    async def score(self, prompt_rows, paths, client=None):
        return await self._submit("score", (prompt_rows, paths), client)

    async def score_topk(self, prompt_rows, paths, k: int, client=None):
        return await self._submit("topk", (prompt_rows, paths, k), client)

    async def next_token(self, prompt_rows, prefixes, do_sample: bool = False, client=None):
        return await self._submit("token", (prompt_rows, prefixes, do_sample), client)

    async def demos(self, prompts, budget_ids, **kw):
        return await self.router.call(lambda i: self.replicas[i].demos.remote(prompts, budget_ids, **kw),
                                      len(prompts), RETRY_ERRORS)

    async def spec(self) -> dict:
        return await self.router.call(lambda i: self.replicas[i].spec.remote(), 0, RETRY_ERRORS)

    def stats(self, reset: bool = True) -> dict:
        """Batches, requests and sequences per batch (since the last reset); router counters."""
        out = {"batch": self.batcher.stats.as_dict(),
               "router": {"failures": self.router.failures, "retries": self.router.retries,
                          "load": list(self.router.load)}}
        if reset:
            self.batcher.stats = BatchStats()
        return out


class PoolClient:
    """Blocking calls into the pool (what `RemoteTeacher` needs), tagged with a client id."""

    def __init__(self, pool, client_id) -> None:
        self.pool, self.client_id = pool, client_id

    def next_logits(self, prompt_rows, prefixes):
        return ray.get(self.pool.next_logits.remote(prompt_rows, prefixes, self.client_id))

    def score(self, prompt_rows, paths):
        return ray.get(self.pool.score.remote(prompt_rows, paths, self.client_id))
