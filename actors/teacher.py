"""TeacherActor: one teacher replica (a `kdtw.teacher_service.TeacherService`).

A replica given more than one GPU loads the teacher across them (accelerate ``device_map``,
bfloat16); one GPU puts it on ``cuda``; none keeps the config's device. ``ray.teacher_latency_ms``
makes it sleep before answering each batch (the remote-latency benchmark knob; with
``ray.teacher_latency_floor``, take that long in all, its forward within it). It keeps the KV
caches of open teacher sessions within ``ray.teacher_cache_mb``. Demonstrations and the driver's
validations run in threads of their own (Ray concurrency groups) beside the requests of the pool.
Each answer carries the teacher positions computed since the previous answer, by tag (the pool
adds them up: a replica that dies loses none it has answered; validations are not counted).
"""

from __future__ import annotations

import copy
import threading
from collections import Counter

import ray

from actors.common import on_device, setup_threads, unpack_weights
from kdtw.factory import load_teacher
from kdtw.teacher_service import TeacherService


@ray.remote(concurrency_groups={"demos": 1, "validation": 1})
class TeacherActor:
    def __init__(self, cfg, replica_id: int) -> None:
        setup_threads(cfg)
        gpus = cfg.ray.teacher_gpus
        if gpus > 0:
            cfg = copy.deepcopy(cfg)
            cfg.teacher.device = "auto" if gpus > 1 else "cuda"
            if gpus > 1:
                cfg.teacher.dtype = "bfloat16"
        self.replica_id = replica_id
        self.service = TeacherService(load_teacher(cfg), max_batch=cfg.ray.teacher_max_batch,
                                      latency_s=cfg.ray.teacher_latency_ms / 1000.0, seed=cfg.seed + 101 * (replica_id + 1),
                                      cache_mb=cfg.ray.teacher_cache_mb, latency_floor=cfg.ray.teacher_latency_floor)
        self._reported: Counter = Counter()
        self._report_lock = threading.Lock()
        self._student = None  # the student copy `validate` and `calibrate` load the first time they are asked

    def spec(self) -> dict:
        return self.service.spec()

    def _positions(self) -> dict:
        with self._report_lock:  # answers of two threads (requests, demonstrations) never share a count
            now, _ = self.service.counted()
            new, self._reported = now - self._reported, now
        return dict(new)

    def run(self, items: list) -> tuple[list, dict]:
        """Answers to ``items`` and the teacher positions computed since the last answer."""
        return self.service.run_mixed(items), self._positions()

    @ray.method(concurrency_group="demos")
    def demos(self, prompts, budget_ids, **kw):
        """Demonstrations, decoded in a thread of their own: the session steps of the rollouts
        they were started beside (`kdtw.rollout.collect`) are answered meanwhile, not after."""
        trajs, state = self.service.demos(prompts, budget_ids, **kw)
        return trajs, state, self._positions()

    @ray.method(concurrency_group="validation")
    def validate(self, cfg, weights: dict, examples: list) -> dict:
        """`kdtw.reporting.validate` of the student at ``weights`` (`pack_weights`) against this
        replica's own teacher, in a thread of its own: no round trip a decode step (the driver's
        validation through the pool took about 3x as long as the local loop's)."""
        from kdtw.reporting import validate

        return validate(cfg, self._student_at(cfg, weights), self.service.teacher, examples)

    @ray.method(concurrency_group="validation")
    def calibrate(self, cfg, weights: dict, prompts: list, targets: list) -> list:
        """`kdtw.reporting.calibrate_export` of the student at ``weights`` against this replica's
        teacher (the export's call thresholds, at the end of a job: no round trip a decode step),
        with the node's cores (up to 8 torch threads: the job's other actors are idle by then)."""
        import os

        import torch

        from kdtw.reporting import calibrate_export

        student = self._student_at(cfg, weights)
        before = torch.get_num_threads()
        torch.set_num_threads(max(before, min(os.cpu_count() or 1, 8)))
        try:
            return calibrate_export(cfg, student, self.service.teacher, prompts, targets)
        finally:
            torch.set_num_threads(before)

    def _student_at(self, cfg, weights: dict):
        """This replica's student copy (loaded the first time) at ``weights`` (`pack_weights`)."""
        from kdtw.factory import load_student

        if self._student is None:
            self._student = load_student(on_device(cfg, "teacher", "student"))
        unpack_weights(self._student, weights)
        return self._student

    def forwards(self) -> int:
        return self.service.counted()[1]

    def rng_state(self):
        """The generator of sampled teacher tokens (``teacher_do_sample``), for checkpoints."""
        return self.service.gen.get_state()

    def set_rng_state(self, state) -> None:
        self.service.gen.set_state(state)
