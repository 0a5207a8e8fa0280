"""RolloutWorker: a student copy at a known weight version that decodes rollout batches with
teacher calls through the pool (teacher sessions), or against a teacher copy of its own with
``ray.teacher_in_workers`` (the local loop's collector in this process), and pushes the
trajectories to the replay buffer. Its teacher demonstrations are decoded on a replica
(``ray.teacher_side_demos``), by its own teacher copy after the rollouts, or, through the pool
without a copy, token by token in a thread of their own beside the rollouts (their own pool
client and sessions; the same paths: they draw from their own stream).

Weights arrive as ``(version, [ref])`` from the learner's publication (one ``ray.put`` per
version); the worker fetches them only when the version is new. Worker ``i`` seeds its task
sampler and decoding generator with ``seed + 1000·i`` (worker 0: exactly `LocalLoop`'s streams);
the driver replaces a worker that dies (``incarnation`` > 0 reseeds it, so that it does not replay
its predecessor's draws).
"""

from __future__ import annotations

import copy
import random
import time
from concurrent.futures import ThreadPoolExecutor, wait

import ray
import torch

from actors.common import on_device, setup_threads, unpack_weights
from actors.teacher_pool import PoolClient
from kdtw.factory import budget_table, load_pair, load_splits, load_student
from kdtw.rollout import DemoQueue, collect, demo_batch_size, demo_generator, start_demos
from kdtw.teacher_service import RemoteTeacher, use_by_budget


@ray.remote
class RolloutWorker:
    def __init__(self, cfg, worker_id: int, pool, buffer, incarnation: int = 0) -> None:
        setup_threads(cfg)
        own_teacher = cfg.ray.teacher_in_workers
        cfg = on_device(cfg, "rollout_worker", "student", *(["teacher"] if own_teacher else []))
        self.cfg, self.worker_id, self.pool, self.buffer = cfg, worker_id, pool, buffer
        self.version = -1
        self.client = None  # the pool client of this worker's remote teacher
        self.demo_client = self.demo_future = None  # demonstrations through the pool: their client, their last decode
        if own_teacher:  # its own teacher copy, in process (as the local loop), tokenizers checked
            self.teacher, self.student = load_pair(cfg)
        else:
            self.student = load_student(cfg)
            spec = ray.get(pool.spec.remote())
            self.client = PoolClient(pool, worker_id, socket=cfg.ray.teacher_socket)
            self.teacher = RemoteTeacher(self.client, self.student.lm.tokenizer, spec)
        self._sent = (0, 0)  # the client's requests over the socket and by actor call, as last reported
        seed = cfg.seed + 1000 * worker_id + 7919 * incarnation
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.demo_gen = demo_generator(seed)
        self.demo_queue = DemoQueue(cfg.train.phase2_demo_steps)
        self.train_set = load_splits(cfg)["train"]
        self.table = budget_table(cfg)
        # where this worker's demonstrations are decoded: on a replica, through the pool in a
        # thread beside the rollouts, or by its own teacher copy after them
        self.demos_elsewhere = None
        if cfg.demos_on_replica():
            self.demos_elsewhere = self._demos_on_teacher
        elif not own_teacher:
            self.demo_client = PoolClient(pool, f"{worker_id}/demos", socket=cfg.ray.teacher_socket)
            # a tokenizer of its own: a fast tokenizer is not to be used by two threads at once
            self.demo_teacher = RemoteTeacher(self.demo_client, copy.deepcopy(self.student.lm.tokenizer), spec)
            self.demo_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"demos-{worker_id}")
            self.demos_elsewhere = self._demos_in_thread

    def _demos_on_teacher(self, prompts, budget_ids, gen):
        """Start the demonstrations on a replica (decoded there while this worker runs its
        student rollouts); the returned function waits for them."""
        d = self.cfg.decoding
        ref = self.pool.demos.remote(prompts, budget_ids, max_new_tokens=d.max_new_tokens,
                                     batch_size=demo_batch_size(self.cfg, self.demo_queue.steps),
                                     gen_state=gen.get_state(), version=self.version, worker_id=self.worker_id)

        def wait():
            trajs, state = ray.get(ref)
            gen.set_state(state)
            return trajs

        return wait

    def _demos_in_thread(self, prompts, budget_ids, gen):
        """Start the demonstrations token by token through the pool in a thread (this worker's
        second pool client, its own teacher sessions) while the student rollouts run here: a
        worker without a teacher copy or teacher-side demonstrations keeps a request in the pool's
        batches while it decodes its own tokens. They draw only from ``gen`` (the demonstrations'
        stream), so they are the paths `collect` would decode after the rollouts. The returned
        function waits for them (and raises what the thread raised). One thread: demonstrations
        left running by a collect that failed before waiting end before these start."""
        decode = start_demos(self.cfg, self.demo_teacher, prompts, budget_ids, gen, steps=self.demo_queue.steps,
                             version=self.version, worker_id=self.worker_id)
        self.demo_future = self.demo_thread.submit(decode)
        return self.demo_future.result

    def collect(self, version: int, weights: list) -> dict:
        """One rollout batch at weight ``version`` (fetched from ``weights[0]`` if new), pushed
        to the buffer; returns counts, timing and teacher use per budget."""
        t0 = time.perf_counter()
        if version != self.version:
            unpack_weights(self.student, ray.get(weights[0]))
            self.version = version
        t1 = time.perf_counter()
        trajs, demos = collect(
            self.cfg, self.student, self.teacher, self.train_set, self.table, rng=self.rng, gen=self.gen,
            demo_gen=self.demo_gen, version=self.version, worker_id=self.worker_id,
            demos_elsewhere=self.demos_elsewhere,
            demo_queue=self.demo_queue,
        )
        t2 = time.perf_counter()
        added = ray.get(self.buffer.add.remote(trajs + demos))
        paths = trajs + demos
        # this batch's session steps and scoring through the pool, by transport
        clients = [c for c in (self.client, self.demo_client) if c is not None]
        sent = (sum(c.via_socket for c in clients), sum(c.via_ray for c in clients))
        socket, actor_call = sent[0] - self._sent[0], sent[1] - self._sent[1]
        self._sent = sent
        return {"worker_id": self.worker_id, "version": self.version, "paths": len(paths),
                "buffer_unseen": added["unseen_tokens"],
                "tokens": sum(len(t) for t in paths), "prompt_tokens": sum(len(t.source_ids) for t in paths),
                "use": use_by_budget([t for t in trajs if not t.decoded], len(self.table)),  # rollouts, not λ probes
                "pool_requests": {"socket": socket, "actor_call": actor_call},
                "seconds": {"sync": t1 - t0, "rollout": t2 - t1, "push": time.perf_counter() - t2}}

    def rng_state(self) -> dict:
        """Random streams, and the demonstrations decoded ahead (train.phase2_demo_steps) as
        their prompts and stream state: what resumes this worker's draws exactly."""
        if self.demo_future is not None:  # one left by a failed collect may still draw from demo_gen
            wait([self.demo_future])
        return {"rng": self.rng.getstate(), "gen": self.gen.get_state(), "demo_gen": self.demo_gen.get_state(),
                "demos_ahead": self.demo_queue.state()}

    def set_rng_state(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.gen.set_state(state["gen"])
        if state.get("demos_ahead") is not None:  # decoded again from their saved stream state
            self.demo_queue.restore(state["demos_ahead"], self._decode_demos, self.demo_gen)
        if "demo_gen" in state:  # checkpoints written before demonstrations had their own stream
            self.demo_gen.set_state(state["demo_gen"])

    def _decode_demos(self, prompts, budget_ids, gen):
        """Demonstrations the way `collect` decodes them on this worker, for `DemoQueue.restore`."""
        return start_demos(self.cfg, self.teacher, prompts, budget_ids, gen, steps=self.demo_queue.steps,
                           version=self.version, worker_id=self.worker_id, elsewhere=self.demos_elsewhere)()
