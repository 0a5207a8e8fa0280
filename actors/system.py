"""The actors of one Phase-2 job (DESIGN.md §7) and their checkpoint: placement (a placement
group when a role wants GPUs), construction of the teacher replicas, the teacher pool, the replay
buffer, the learner and the rollout workers, a worker's replacement after a crash, and the
state they hold (learner, buffer, random generators) written to and read from a checkpoint
folder (kdtw/checkpoint.py: atomic, checksummed, tensors and plain data only). The driver loop
(jobs/train_pcl.py) moves messages between them; everything about where they run and what
they hold is here."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict

import ray

from actors.common import await_started, options, pack_weights
from kdtw.atomic import make_tmp_dir, remove_dir, replace_dir
from kdtw.checkpoint import load_state, save_state, write_checkpoint
from kdtw.models import Student

STATE_FILES = ("learner.pt", "driver.pt")  # checkpoint files read with `load_state` (no pickle code)


class Actors:
    """Teacher replicas behind a pool, a replay buffer, and (after `start` or `restore`) a
    learner and ``ray.num_rollout_workers`` rollout workers."""

    def __init__(self, cfg, *, log=print) -> None:
        from actors.replay_buffer import ReplayBufferActor
        from actors.teacher import TeacherActor
        from actors.teacher_pool import TeacherPool

        self.cfg, self.log = cfg, log
        r = cfg.ray
        self.pg = _placement(cfg)
        self.replicas = [
            TeacherActor.options(**options(cfg, "teacher", restarts=True, placement=self._bundle(i))).remote(cfg, i)
            for i in range(r.num_teacher_replicas)
        ]
        self.pool = TeacherPool.remote(self.replicas, max_batch=r.teacher_max_batch, max_wait_ms=r.teacher_max_wait_ms)
        self.buffer = ReplayBufferActor.remote(cfg)
        self.learner = None
        self.workers: list = []
        self.incarnations = [0] * r.num_rollout_workers
        self._turn = -1  # the replica that validated last (`validate_remote`)

    def _bundle(self, i: int):
        return None if self.pg is None else (self.pg, i)

    def remote_teacher(self, tokenizer, name: str = "driver"):
        """A teacher client of the pool (validation from the driver)."""
        from actors.teacher_pool import PoolClient
        from kdtw.teacher_service import RemoteTeacher

        spec = ray.get(self.pool.spec.remote())
        return RemoteTeacher(PoolClient(self.pool, name, socket=self.cfg.ray.teacher_socket), tokenizer, spec,
                             tag="validation")

    def validate(self, student, examples: list) -> dict | None:
        """`kdtw.reporting.validate` of ``student`` on a teacher replica, next to its teacher (no
        round trip a decode step); None if no replica answers."""
        return self._on_a_replica("validate", student, examples, doing="[validate] decoding")

    def calibrate(self, student, prompts: list, targets: list) -> list | None:
        """`kdtw.reporting.calibrate_export` of ``student`` on a teacher replica, next to its teacher
        (the end of the job); None if no replica answers."""
        return self._on_a_replica("calibrate", student, prompts, targets,
                                  doing="[kdtw] calibrating call thresholds")

    def _on_a_replica(self, method: str, student, *args, doing: str):
        """``TeacherActor.<method>(cfg, weights of student, *args)`` on the replicas in turn until one
        answers; None if none does. While it waits, a line ``doing on teacher replica i (N s)``
        every `kdtw.reporting.STATUS_EVERY_S`."""
        from actors.common import RETRY_ERRORS, get_with_lines

        weights = ray.put(pack_weights(student))
        for _ in self.replicas:
            try:
                ref = self._next_replica(method, weights, *args)
                return get_with_lines(ref, f"{doing} on teacher replica {self._turn}", log=self.log)
            except RETRY_ERRORS:
                continue
        return None

    def _next_replica(self, method: str, weights, *args):
        self._turn = (self._turn + 1) % len(self.replicas)
        return getattr(self.replicas[self._turn], method).remote(self.cfg, weights, *args)

    def validate_remote(self, weights, examples: list):
        """Start `kdtw.reporting.validate` of the published weights ``weights`` (a ref) on the next
        teacher replica in turn, in its validation thread; returns the result's ref (training goes
        on meanwhile: the driver lands it later, jobs/train_pcl.py)."""
        return self._next_replica("validate", weights, examples)

    def make_worker(self, wid: int):
        from actors.rollout_worker import RolloutWorker

        return RolloutWorker.options(**options(self.cfg, "rollout_worker")).remote(
            self.cfg, wid, self.pool, self.buffer, self.incarnations[wid])

    def make_learner(self, phase1_dir: str | None):
        from actors.learner import LearnerActor

        place = self._bundle(self.cfg.ray.num_teacher_replicas)
        return LearnerActor.options(**options(self.cfg, "learner", placement=place)).remote(self.cfg, self.buffer, phase1_dir)

    def start(self, phase1_dir: str | None) -> tuple[int, list]:
        """Learner (from the Phase-1 folder, if any) and workers; returns the published weights."""
        self.learner = self.make_learner(phase1_dir)
        self.workers = [self.make_worker(i) for i in range(self.cfg.ray.num_rollout_workers)]
        self.await_started()  # every worker is up: timings start now
        return ray.get(self.learner.publish.remote())

    def await_started(self) -> None:
        """Block until every actor made so far has run its constructor (a line every 30 s while
        some pend, `actors.common.await_started`)."""
        groups = {"teacher replica": self.replicas, "teacher pool": [self.pool], "replay buffer": [self.buffer],
                  "learner": [self.learner] if self.learner is not None else [], "rollout worker": self.workers}
        await_started({k: v for k, v in groups.items() if v}, log=self.log)

    def replace_worker(self, wid: int) -> None:
        try:
            ray.kill(self.workers[wid], no_restart=True)
        except Exception:  # already gone
            pass
        self.incarnations[wid] += 1
        self.workers[wid] = self.make_worker(wid)

    def stats(self, *, reset: bool = True) -> tuple[dict, dict]:
        """The buffer's and the pool's own figures (the pool's batch counts since the last reset)."""
        return tuple(ray.get([self.buffer.stats.remote(), self.pool.stats.remote(reset=reset)]))

    # -- checkpoints

    def save(self) -> dict:
        """What the actors hold, gathered for a checkpoint: learner (weights, optimiser, λ, RNG),
        buffer contents, every worker's and replica's random generator (None for an actor being
        replaced: it starts from a fresh seed on resume)."""
        lstate, (bdata, bstate) = ray.get([self.learner.state.remote(), self.buffer.save.remote()])
        wstates, tstates = [], []
        for actors, states in ((self.workers, wstates), (self.replicas, tstates)):
            for a in actors:
                try:
                    states.append(ray.get(a.rng_state.remote(), timeout=60))
                except Exception:
                    states.append(None)
        return {"learner": lstate, "buffer": (bdata, bstate), "workers": wstates, "teachers": tstates}

    def restore(self, ckpt: str) -> tuple[dict, tuple[int, list]]:
        """Learner, buffer, workers and replica generators from checkpoint ``ckpt``; returns its
        driver state (``driver.pt``) and the published weights."""
        # tensors and plain data only: a crafted file is refused before anything is built
        d = load_state(os.path.join(ckpt, "driver.pt"))
        learner_state = load_state(os.path.join(ckpt, "learner.pt"))
        s = self.cfg.student
        saved = Student.load(os.path.join(ckpt, "student"), dtype=s.dtype, device=s.device)
        self.learner = self.make_learner(None)
        self.workers = [self.make_worker(i) for i in range(self.cfg.ray.num_rollout_workers)]
        self.await_started()
        with open(os.path.join(ckpt, "buffer.parquet"), "rb") as f:
            data = f.read()
        ray.get([self.learner.load_state.remote({"student": pack_weights(saved), "learner": learner_state,
                                                 "torch_rng": d["torch_rng"], "cuda_rng": d.get("cuda_rng")}),
                 self.buffer.load.remote(data, d["buffer"])])
        ray.get([w.set_rng_state.remote(st) for w, st in zip(self.workers, d["workers"]) if st is not None])
        ray.get([t.set_rng_state.remote(st) for t, st in zip(self.replicas, d.get("teachers") or []) if st is not None])
        return d, ray.get(self.learner.publish.remote())

    def snapshot(self) -> dict:
        """Learner state and buffer contents as they are now (tests compare them with a checkpoint)."""
        lstate, contents = ray.get([self.learner.state.remote(), self.buffer.contents.remote()])
        return {"learner": lstate["learner"], "student": lstate["student"], "buffer": contents}

    def close(self) -> None:
        """Stop every actor (an in-process caller keeps its Ray session)."""
        for a in [self.learner, self.pool, self.buffer, *self.workers, *self.replicas]:
            if a is not None:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:
                    pass
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)


def write_job_checkpoint(cfg, step: int, parts: dict, *, student: Student, state, initial: dict | None,
                         counters: dict, meta: dict) -> str:
    """``<run_dir>/checkpoints/step_<step>`` from `Actors.save`'s ``parts`` (the learner's weights
    go into the driver's ``student`` copy first), the driver's loop ``state`` (`LoopState`), the
    validation before training, its counters and the selected candidate folder."""
    from actors.common import unpack_weights

    lstate = parts["learner"]
    bdata, bstate = parts["buffer"]
    unpack_weights(student, lstate["student"])
    driver = {"loop": asdict(state), "initial": initial, "counters": counters}

    def write(tmp: str) -> dict:
        student.save(os.path.join(tmp, "student"))
        save_state(lstate["learner"], os.path.join(tmp, "learner.pt"))
        with open(os.path.join(tmp, "buffer.parquet"), "wb") as f:
            f.write(bdata)
        save_state({"torch_rng": lstate["torch_rng"], "cuda_rng": lstate.get("cuda_rng"), "buffer": bstate,
                    "workers": parts["workers"], "teachers": parts["teachers"], **driver},
                   os.path.join(tmp, "driver.pt"))
        cfg.save(os.path.join(tmp, "config.yaml"))
        if state.best is not None and os.path.exists(state.best["dir"]):
            shutil.copytree(state.best["dir"], os.path.join(tmp, "candidate"))
        return {**meta, "policy_version": lstate["learner"]["version"], "learner_step": lstate["learner"]["step"]}

    return write_checkpoint(cfg.run_dir, step, write, keep=cfg.ray.keep_checkpoints)


def restore_driver(d: dict, ckpt: str, run_dir: str, state, counters: dict) -> None:
    """The driver's loop state and counters from checkpoint ``ckpt``'s ``driver.pt`` (``d``); its
    selected candidate goes back to ``<run_dir>/candidate``."""
    state.__dict__.update(d["loop"])
    counters.update(d["counters"])
    if state.best is not None:
        cand = os.path.join(run_dir, "candidate")
        if os.path.exists(os.path.join(ckpt, "candidate")):
            copy_dir(os.path.join(ckpt, "candidate"), cand)
        state.best["dir"] = cand


def copy_dir(src: str, dst: str) -> None:
    """Copy a folder over ``dst`` with no moment where ``dst`` is missing (kdtw/atomic.py)."""
    tmp = make_tmp_dir(dst)
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        replace_dir(tmp, dst)
    except BaseException:
        remove_dir(tmp)
        raise


def _placement(cfg, *, wait_s: int = 600, every_s: int = 30):
    """A placement group (one bundle per replica, one for the learner) when a role wants GPUs; a
    line every ``every_s`` while the cluster has no room for it, a ClusterError after ``wait_s``."""
    r = cfg.ray
    if not (r.teacher_gpus or r.learner_gpus):
        return None
    from ray.util.placement_group import placement_group

    def bundle(cpu: float, gpu: float) -> dict:
        return {k: v for k, v in (("CPU", cpu), ("GPU", gpu)) if v}

    bundles = [bundle(r.teacher_cpus, r.teacher_gpus)] * r.num_teacher_replicas + [bundle(r.learner_cpus, r.learner_gpus)]
    pg = placement_group(bundles, strategy="PACK")
    start = time.monotonic()
    while (left := start + wait_s - time.monotonic()) > 0:
        if ray.wait([pg.ready()], timeout=min(every_s, left))[0]:
            return pg
        print(f"[ray] waiting {time.monotonic() - start:.0f} s for room for the placement group {bundles} (the "
              f"cluster has {ray.available_resources()} free; `ray status`)", flush=True)
    from ray.util.placement_group import remove_placement_group

    from actors.cluster import ClusterError

    remove_placement_group(pg)
    raise ClusterError(f"no room for the placement group {bundles} after {wait_s} s: free those resources or lower "
                       "ray.teacher_gpus / ray.learner_gpus / their CPUs")


class Validations:
    """The job's validations (`kdtw.reporting.validate`) on a teacher replica, next to its teacher
    (no round trip a decode step): `now` of the driver's student copy; `start` of published
    weights while the job trains on, `land` once back (one in flight: results in step order).
    Each result goes to ``record(v, *args)``; a replica lost meanwhile: validated again by `now`."""

    def __init__(self, actors: Actors, examples: list, *, student, teacher, record, log) -> None:
        self.actors, self.examples, self.student, self.teacher = actors, examples, student, teacher
        self.record, self.log = record, log
        self.ref = self.weights = self.args = None

    def now(self) -> dict:
        """Of the driver's student copy, on a replica (through the pool if no replica answers)."""
        from kdtw.reporting import validate

        v = self.actors.validate(self.student, self.examples)
        if v is None:
            self.log("[validate] no teacher replica answered: validating through the pool")
            v = validate(self.actors.cfg, self.student, self.teacher, self.examples, progress=self.log)
        return v

    def start(self, published: tuple, args: tuple) -> None:
        """Validate ``published`` (version, [weights ref]) in the background; ``args`` go to `record`."""
        self.land()
        self.ref = self.actors.validate_remote(published[1][0], self.examples)
        self.weights, self.args = published[1], args

    def load(self, weights: list) -> None:
        """The driver's student copy at published ``weights`` ([ref])."""
        from actors.common import unpack_weights

        unpack_weights(self.student, ray.get(weights[0]))

    def refs(self) -> list:
        return [] if self.ref is None else [self.ref]

    def land(self) -> None:
        """Wait for the validation in flight, if any, and record it (with the student it validated)."""
        from actors.common import RETRY_ERRORS, get_with_lines

        if self.ref is None:
            return
        try:
            _, step, phase, _ = self.args
            v = get_with_lines(self.ref, f"[validate] waiting for phase-{phase} step {step}'s validation on a "
                               "teacher replica", log=self.log)
        except RETRY_ERRORS:
            v = None
        weights, args = self.weights, self.args
        self.ref = self.weights = self.args = None
        self.load(weights)
        self.record(v if v is not None else self.now(), *args)

    def manifest(self, step: int) -> dict | None:
        """For a checkpoint at ``step``: the validation in flight, which its resumed run starts again
        (a checkpoint holds only its own step's weights: one of earlier weights lands first)."""
        if self.ref is not None and self.args[1] != step:
            self.land()
        return None if self.ref is None else dict(zip(("title", "step", "phase", "lam"), self.args))

    def resume(self, published: tuple, manifest: dict) -> None:
        """After a restore from a checkpoint whose ``manifest`` names a validation in flight."""
        if manifest.get("validation_in_flight"):
            self.start(published, tuple(manifest["validation_in_flight"].values()))
