"""Train a τ-student on Ray: Phase 1 (BC, Ray Train), then asynchronous Phase 2 (PCL + λ).

    python jobs/train_pcl.py --config conf/default.yaml [key=value ...]
    python jobs/train_pcl.py --config conf/default.yaml --phase1 runs/default/phase1
    python jobs/train_pcl.py --resume runs/default [key=value ...]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_pcl.py --config conf/default.yaml [key=value ...]

As a plain script it starts a local Ray (``ray.num_cpus`` logical CPUs, dashboard on 127.0.0.1), or joins
``ray.address``; under ``ray job submit`` it joins the job's cluster. Phase 1 runs through
jobs/train_bc.py unless ``--phase1 DIR`` names its result (or ``train.phase1_steps=0``). Phase 2
(DESIGN.md §7) runs ``ray.num_rollout_workers`` rollout workers, a teacher pool of
``ray.num_teacher_replicas`` replicas, a replay buffer and a learner, all asynchronous; the driver
loop below dispatches and waits, and reads as its phases: collect (workers push rollouts to the
buffer) → learn (a PCL step and the λ update on the learner) → sync (published weights go to the
next collects) → validate (every budget) → checkpoint. With one worker, ``train.max_staleness=0``
and ``ray.publish_every=1`` it is step-for-step the single-process loop (kdtw/local.py).

Validation at every budget (`kdtw.local.validate`, teacher through the pool), checkpoint
selection (`LocalLoop._consider`'s rule), export of the selected student to ``<run_dir>/student``,
``report.json``, ``lambda_trace.png``; one MLflow run (actors/tracking.py) continued on resume.
Atomic checkpoints every ``ray.checkpoint_every`` steps and at the end (kdtw/checkpoint.py):
student, optimiser, λ, step, RNG states, buffer, MLflow run id; the ``.pt`` files hold tensors and
plain data only and are read without running pickle code, and ``--resume`` on a run folder falls
back to the newest intact checkpoint when ``checkpoints/latest`` is missing or corrupt. A resumed
run writes into the folder ``--resume`` names (a moved or copied run stays where it is now).

Ctrl-C or SIGTERM in Phase 1 or 2: the step in flight finishes, a checkpoint is written (Phase 1's
is ``<run_dir>/phase1/``, actors/phase1_rank.py), the MLflow run is marked KILLED, and the job exits
130 with one line saying how to resume (a second signal stops at once); a local Ray this job started is shut down on every exit. A ``run_dir`` that holds
another run is refused unless ``--overwrite``. Errors print one line (``kdtw: error: ...``) and
exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from actors.cluster import Interrupted, Stopper, connect, guarded, load  # noqa: E402
from kdtw.atomic import make_tmp_dir, remove_dir, replace_dir, write_json_atomic  # noqa: E402
from kdtw.checkpoint import (  # noqa: E402
    load_state,
    open_checkpoint,
    run_folder,
    save_state,
    write_checkpoint,
)
from kdtw.config import Config, load_config  # noqa: E402
from kdtw.factory import budget_table, load_splits, load_student  # noqa: E402
from kdtw.local import (  # noqa: E402
    LocalLoop,
    LoopState,
    format_step,
    format_validation,
    plot_trace,
    run_report,
    trace_entry,
    validate,
)
from kdtw.metrics import primary_metric  # noqa: E402
from kdtw.models import Student  # noqa: E402
from kdtw.phase1 import check_phase1, phase1_to_resume, read_phase1  # noqa: E402

PROG = "python jobs/train_pcl.py"
STATUS_EVERY_S = 30.0
STATE_FILES = ("learner.pt", "driver.pt")  # checkpoint files read with `load_state` (no pickle code)
Log = Callable[[str], None]


# ----------------------------------------------------------------------------- the system


class Selection:
    """`LocalLoop._consider` (the checkpoint-selection rule) over the driver's student copy."""

    _consider = LocalLoop._consider

    def __init__(self, cfg: Config, state: LoopState, student: Student) -> None:
        self.cfg, self.state, self.student = cfg, state, student
        self.learner = SimpleNamespace(lam=None)

    def consider(self, v: dict, *, step: int, phase: int, lam: list[float]) -> None:
        self.learner.lam = torch.tensor(lam)
        self._consider(v, step=step, phase=phase)


class Phase2:
    """The actors of DESIGN.md §7 and the driver loop over them."""

    def __init__(self, cfg: Config, *, tracker=None, log: Log = print) -> None:
        import ray

        from actors.common import options
        from actors.replay_buffer import ReplayBufferActor
        from actors.teacher import TeacherActor
        from actors.teacher_pool import PoolClient, TeacherPool
        from kdtw.teacher_service import RemoteTeacher

        self.cfg, self.tracker, self.log = cfg, tracker, log
        r = cfg.ray
        self.table = budget_table(cfg)
        self.phrases = self.table.phrases
        self.val_set = load_splits(cfg)["validation"][: cfg.train.val_examples or None]
        self.pg = self._placement()
        self.replicas = [
            TeacherActor.options(**options(cfg, "teacher", restarts=True, placement=self._bundle(i))).remote(cfg, i)
            for i in range(r.num_teacher_replicas)
        ]
        self.pool = TeacherPool.remote(self.replicas, max_batch=r.teacher_max_batch, max_wait_ms=r.teacher_max_wait_ms)
        self.buffer = ReplayBufferActor.remote(cfg)
        self.student = load_student(cfg)  # the driver's copy: validation, selection, checkpoints
        spec = ray.get(self.pool.spec.remote())
        self.teacher = RemoteTeacher(PoolClient(self.pool, "driver"), self.student.lm.tokenizer, spec, tag="validation")
        self.learner = None
        self.workers: list = []
        self.incarnations = [0] * r.num_rollout_workers
        self.state = LoopState()
        self.selection = Selection(cfg, self.state, self.student)
        self.step = 0  # Phase-2 learner steps done
        self.initial: dict | None = None
        self.published: tuple[int, list] | None = None
        self.counters = {"worker_failures": 0, "trajectories": 0, "rollout_batches": 0, "seconds": 0.0,
                         "teacher_batches": 0, "teacher_requests": 0, "teacher_rows": 0,
                         # teacher positions the replicas computed for Phase-2 rollouts (calls, scoring,
                         # demonstrations) and the prompt + output tokens of those paths
                         "rollout_teacher_positions": 0, "rollout_tokens": 0}
        self._positions_seen = 0  # the pool's running count of rollout positions at the last look
        self.hooks: list[Callable[["Phase2", int], None]] = []
        self.stopper: Stopper | None = None  # set by `train`: a signal ends the loop with a checkpoint
        self._stats_at = 0.0
        self._last_stats = {"buffer_fill": 0.0, "teacher_batch_requests": 0.0}
        self._logged_at = time.perf_counter()  # a status line at least every STATUS_EVERY_S

    # -- placement

    def _placement(self):
        r = self.cfg.ray
        if not (r.teacher_gpus or r.learner_gpus):
            return None
        from ray.util.placement_group import placement_group

        bundle = lambda cpu, gpu: {k: v for k, v in (("CPU", cpu), ("GPU", gpu)) if v}  # noqa: E731
        bundles = [bundle(r.teacher_cpus, r.teacher_gpus)] * r.num_teacher_replicas + [bundle(r.learner_cpus, r.learner_gpus)]
        pg = placement_group(bundles, strategy="PACK")
        import ray

        ray.get(pg.ready(), timeout=600)
        return pg

    def _bundle(self, i: int):
        return None if self.pg is None else (self.pg, i)

    # -- building

    def _make_worker(self, wid: int):
        from actors.common import options
        from actors.rollout_worker import RolloutWorker

        return RolloutWorker.options(**options(self.cfg, "rollout_worker")).remote(
            self.cfg, wid, self.pool, self.buffer, self.incarnations[wid])

    def _make_learner(self, phase1_dir: str | None):
        from actors.common import options
        from actors.learner import LearnerActor

        place = self._bundle(self.cfg.ray.num_teacher_replicas)
        return LearnerActor.options(**options(self.cfg, "learner", placement=place)).remote(self.cfg, self.buffer, phase1_dir)

    def validate(self) -> dict:
        return validate(self.cfg, self.student, self.teacher, self.val_set)

    def initial_validation(self) -> None:
        key = primary_metric(self.cfg.task.metric)
        self.initial = self.validate()
        self.log("[kdtw] before training (greedy, validation):\n" + format_validation(self.initial, key))

    def start(self, phase1_dir: str | None) -> None:
        """Learner (from the Phase-1 folder, if any) and workers; validates the Phase-1 student."""
        import ray

        from actors.common import unpack_weights

        self.learner = self._make_learner(phase1_dir)
        self.workers = [self._make_worker(i) for i in range(self.cfg.ray.num_rollout_workers)]
        self.published = ray.get(self.learner.publish.remote())
        ray.get([w.rng_state.remote() for w in self.workers])  # every worker is up: timings start now
        if phase1_dir:
            unpack_weights(self.student, ray.get(self.published[1][0]))
            v = self.validate()
            self.log("[phase 1] done:\n" + format_validation(v, primary_metric(self.cfg.task.metric)))
            self._log_validation(v, step=0)
            self.selection.consider(v, step=0, phase=1, lam=[0.0] * len(self.table))

    def restore(self, ckpt: str, manifest: dict) -> None:
        """Learner, buffer, worker RNGs and loop state from a checkpoint (kdtw/checkpoint.py)."""
        import ray

        from actors.common import pack_weights

        # tensors and plain data only: a crafted file is refused before anything is built
        d = load_state(os.path.join(ckpt, "driver.pt"))
        learner_state = load_state(os.path.join(ckpt, "learner.pt"))
        s = self.cfg.student
        saved = Student.load(os.path.join(ckpt, "student"), dtype=s.dtype, device=s.device)
        self.learner = self._make_learner(None)
        with open(os.path.join(ckpt, "buffer.parquet"), "rb") as f:
            data = f.read()
        ray.get([self.learner.load_state.remote({"student": pack_weights(saved), "learner": learner_state,
                                                 "torch_rng": d["torch_rng"], "cuda_rng": d.get("cuda_rng")}),
                 self.buffer.load.remote(data, d["buffer"])])
        self.workers = [self._make_worker(i) for i in range(self.cfg.ray.num_rollout_workers)]
        ray.get([w.set_rng_state.remote(st) for w, st in zip(self.workers, d["workers"]) if st is not None])
        ray.get([t.set_rng_state.remote(st) for t, st in zip(self.replicas, d.get("teachers") or []) if st is not None])
        self.step = int(manifest["step"])
        self.state.__dict__.update(d["loop"])
        self.initial = d["initial"]
        self.counters.update(d["counters"])
        if self.state.best is not None:
            cand = os.path.join(self.cfg.run_dir, "candidate")
            if os.path.exists(os.path.join(ckpt, "candidate")):
                _copy_dir(os.path.join(ckpt, "candidate"), cand)
            self.state.best["dir"] = cand
        self.published = ray.get(self.learner.publish.remote())
        self.log(f"[resume] {ckpt}: Phase-2 step {self.step}, policy version {self.published[0]}")

    # -- the loop

    def run(self) -> dict:
        """Phase-2 steps up to ``train.phase2_steps``, then selection, export and the report."""
        c, tc = self.cfg, self.cfg.train
        key = primary_metric(c.task.metric)
        est_tokens = tc.batch_size * c.decoding.max_new_tokens  # a rollout batch, at most
        version = self.published[0]
        t0 = time.perf_counter()
        t_prev = self.counters["seconds"]
        trajs0 = self.counters["trajectories"]
        if self.stopper is not None:
            self.stopper.deferring = True
        try:
            return self._loop(key, est_tokens, t0, t_prev, trajs0, version)
        finally:
            if self.stopper is not None:
                self.stopper.deferring = False

    def _loop(self, key: str, est_tokens: int, t0: float, t_prev: float, trajs0: int, version: int) -> dict:
        import ray

        from actors.common import RETRY_ERRORS

        tc, r = self.cfg.train, self.cfg.ray
        inflight: dict = {}  # ref -> ("collect", worker id) | ("learn", None)
        idle = set(range(len(self.workers)))
        learn_ref = None
        learner_waits = False  # the buffer could not fill a batch: wait for the next rollout batch
        batches = steps = 0  # this session's rollout batches and learner steps
        unconsumed = 0  # tokens collected and not yet matched by learner steps (backpressure)
        use_sum, use_cnt = [0.0] * len(self.table), [0] * len(self.table)
        while self.step < tc.phase2_steps:
            # learn: one step in flight at a time, at most steps_per_batch per rollout batch
            if learn_ref is None and not learner_waits and steps < batches * r.steps_per_batch:
                nxt = self.step + 1
                publish = nxt % tc.validate_every == 0 or nxt == tc.phase2_steps or (
                    r.checkpoint_every and nxt % r.checkpoint_every == 0)
                learn_ref = self.learner.step.remote(publish=publish)
                inflight[learn_ref] = ("learn", None)
            # collect: every idle worker whose paths would still be fresh when learned from,
            # unless the buffer would evict paths the learner has not seen (backpressure)
            pending = sum(1 for kind, _ in inflight.values() if kind == "collect")
            for wid in sorted(idle):
                future = version + (1 if learn_ref is not None else 0)
                if future - self.published[0] > tc.max_staleness:
                    break
                if unconsumed + (pending + 1) * est_tokens > tc.buffer_tokens:
                    break
                ref = self.workers[wid].collect.remote(*self.published)
                inflight[ref] = ("collect", wid)
                idle.discard(wid)
                pending += 1
            if not inflight:  # nothing can move: the backpressure count is out of date
                unconsumed, learner_waits = 0, False
                continue
            done, _ = ray.wait(list(inflight), num_returns=1)
            kind, wid = inflight.pop(done[0])
            if kind == "collect":
                idle.add(wid)
                try:
                    res = ray.get(done[0])
                except RETRY_ERRORS as e:
                    self._replace_worker(wid, e)
                    continue
                batches += 1
                learner_waits = False
                unconsumed += res["tokens"]
                self.counters["rollout_tokens"] += res["tokens"] + res["prompt_tokens"]
                self.counters["trajectories"] += res["paths"]
                self.counters["rollout_batches"] += 1
                for k, v in res["seconds"].items():
                    self.counters[f"worker_{k}_s"] = self.counters.get(f"worker_{k}_s", 0.0) + v
                for k, (s_, n_) in enumerate(zip(res["use"]["sum"], res["use"]["count"])):
                    use_sum[k] += s_
                    use_cnt[k] += n_
                continue
            learn_ref = None
            res = ray.get(done[0])
            if res is None:
                learner_waits, unconsumed = True, 0  # what was counted is stale or dropped
                continue
            steps += 1
            self.step += 1
            self.counters["learner_s"] = self.counters.get("learner_s", 0.0) + res["seconds"]
            if steps == max(2, len(self.workers)):  # every worker has delivered: steady state from here
                self.counters["warm_seconds"] = time.perf_counter() - t0
                self.counters["warm_trajectories"] = self.counters["trajectories"] - trajs0
            version = res["version"]
            unconsumed = max(0, unconsumed - res["batch_tokens"])
            if "weights" in res:
                self.published = res["weights"]
            self.counters["seconds"] = t_prev + time.perf_counter() - t0
            self._after_step(res, use_sum, use_cnt, trajs0, t0)
            use_sum, use_cnt = [0.0] * len(self.table), [0] * len(self.table)
            if self.step % tc.validate_every == 0 or self.step == tc.phase2_steps:
                self._validate_now(res["lam"], key)
            stopping = self.stopper is not None and self.stopper.requested is not None
            ckpt = None
            if stopping or self.step == tc.phase2_steps or (r.checkpoint_every and self.step % r.checkpoint_every == 0):
                if (stopping or self.step == tc.phase2_steps) and inflight:  # let the last rollouts land first
                    ray.wait(list(inflight), num_returns=len(inflight), timeout=120)
                    inflight.clear()
                ckpt = self.checkpoint()
            for hook in self.hooks:
                hook(self, self.step)
            if stopping and self.step < tc.phase2_steps:
                raise Interrupted(self.stopper.requested, self.step, ckpt, self.cfg.run_dir)
        return self.finish(key)

    def _replace_worker(self, wid: int, err: BaseException) -> None:
        import ray

        self.counters["worker_failures"] += 1
        self.log(f"[ray] rollout worker {wid} failed ({type(err).__name__}); starting a replacement")
        try:
            ray.kill(self.workers[wid], no_restart=True)
        except Exception:  # already gone
            pass
        self.incarnations[wid] += 1
        self.workers[wid] = self._make_worker(wid)

    def _after_step(self, res: dict, use_sum, use_cnt, trajs0: int, t0: float) -> None:
        import ray

        tc = self.cfg.train
        m = res["metrics"]
        self.state.losses.append(m["pcl/loss"])
        self.state.lam_trace.append(trace_entry(self.step, m, res["lam"], res["use_hat"]))
        elapsed = max(time.perf_counter() - t0, 1e-9)
        out = {"loss": m["pcl/loss"], "policy_lag": res["policy_lag"], "policy_version": res["version"],
               "trajectories_per_s": (self.counters["trajectories"] - trajs0) / elapsed,
               "worker_failures": self.counters["worker_failures"]}
        now = time.perf_counter()
        if self.step % tc.log_every == 0 or self.step == tc.phase2_steps or now - self._stats_at >= 1.0:
            # the buffer's and the pool's own figures: at most once a second (two round trips)
            self._stats_at = now
            buf, pool = ray.get([self.buffer.stats.remote(), self.pool.stats.remote()])
            nxt = pool["batch"]
            for k in ("batches", "requests", "rows"):
                self.counters[f"teacher_{k}"] += nxt[k]
            self._count_positions(pool)
            self._last_stats = {"buffer_fill": buf["fill"], "buffer_bytes_per_token": buf["bytes"] / max(buf["tokens"], 1),
                                "teacher_batch_requests": nxt["requests_per_batch"],
                                "teacher_batch_rows": nxt["rows_per_batch"], "teacher_failures": pool["router"]["failures"],
                                "teacher_positions_per_token": self.counters["rollout_teacher_positions"]
                                / max(self.counters["rollout_tokens"], 1)}
            out.update(self._last_stats)
        sys_stats = self._last_stats
        for k, v in m.items():
            head, _, idx = k.partition("/")
            if head in ("lambda", "use_hat", "use_expected", "use_sampled", "use_greedy", "lambda_err") and idx.isdigit():
                out[f"{head}/{self.phrases[int(idx)]}"] = v
            else:
                out[k] = v
        for k, phrase in enumerate(self.phrases):
            out[f"lambda/{phrase}"] = res["lam"][k]
            if use_cnt[k]:
                out[f"teacher_use/{phrase}"] = use_sum[k] / use_cnt[k]
        if self.tracker is not None:
            self.tracker.metrics(out, step=self.step)
        if self.step % tc.log_every == 0 or self.step == tc.phase2_steps or now - self._logged_at >= STATUS_EVERY_S:
            self._logged_at = now
            self.log(f"[phase 2] step {self.step}/{tc.phase2_steps} " + format_step(m, res["lam"])
                     + f" traj/s {out['trajectories_per_s']:.1f} lag {res['policy_lag']:.2f} "
                     f"buffer {sys_stats['buffer_fill']:.2f} teacher batch {sys_stats['teacher_batch_requests']:.2f}")

    def _count_positions(self, pool_stats: dict) -> None:
        """Add the rollout positions the pool counted since the last look (its count starts at
        zero with each pool; the run's total lives in the counters, which checkpoints keep)."""
        now = pool_stats["positions"].get("rollout", 0)
        self.counters["rollout_teacher_positions"] += now - self._positions_seen
        self._positions_seen = now

    def _validate_now(self, lam: list[float], key: str) -> None:
        import ray

        from actors.common import unpack_weights

        unpack_weights(self.student, ray.get(self.published[1][0]))
        v = self.validate()
        self.log(f"[validate] phase-2 step {self.step}:\n" + format_validation(v, key))
        self._log_validation(v, step=self.step)
        self.selection.consider(v, step=self.step, phase=2, lam=lam)

    def _log_validation(self, v: dict, *, step: int) -> None:
        if self.tracker is None:
            return
        out = {"val/max_deviation": v["max_deviation"], "val/mean_quality": v["mean_quality"],
               "val/eligible": float(v["eligible"])}
        for phrase, row in v["budgets"].items():
            for k, x in row.items():
                if k != "target":
                    out[f"val/{phrase}/{k}"] = x
        self.tracker.metrics(out, step=step)

    # -- checkpoints

    def checkpoint(self) -> str:
        import ray

        from actors.common import unpack_weights

        lstate, (bdata, bstate) = ray.get([self.learner.state.remote(), self.buffer.save.remote()])
        wstates, tstates = [], []
        for actors, states in ((self.workers, wstates), (self.replicas, tstates)):
            for a in actors:
                try:
                    states.append(ray.get(a.rng_state.remote(), timeout=60))
                except Exception:  # an actor being replaced: it starts from a fresh seed on resume
                    states.append(None)
        unpack_weights(self.student, lstate["student"])
        best = self.state.best

        def write(tmp: str) -> dict:
            self.student.save(os.path.join(tmp, "student"))
            save_state(lstate["learner"], os.path.join(tmp, "learner.pt"))
            with open(os.path.join(tmp, "buffer.parquet"), "wb") as f:
                f.write(bdata)
            loop = {k: v for k, v in asdict(self.state).items()}
            save_state({"torch_rng": lstate["torch_rng"], "cuda_rng": lstate.get("cuda_rng"), "buffer": bstate,
                        "workers": wstates, "teachers": tstates, "loop": loop, "initial": self.initial, "counters": self.counters},
                       os.path.join(tmp, "driver.pt"))
            self.cfg.save(os.path.join(tmp, "config.yaml"))
            if best is not None and os.path.exists(best["dir"]):
                shutil.copytree(best["dir"], os.path.join(tmp, "candidate"))
            return {"mlflow_run_id": getattr(self.tracker, "run_id", None), "policy_version": lstate["learner"]["version"],
                    "learner_step": lstate["learner"]["step"]}

        path = write_checkpoint(self.cfg.run_dir, self.step, write, keep=self.cfg.ray.keep_checkpoints)
        self.log(f"[checkpoint] {path}")
        return path

    # -- the end

    def finish(self, key: str) -> dict:
        import ray

        c = self.cfg
        best = self.state.best
        selected_dir = os.path.join(c.run_dir, "student")
        if best is not None and os.path.exists(best["dir"]):
            _copy_dir(best["dir"], selected_dir)
            remove_dir(best["dir"])
        pool, buf = ray.get([self.pool.stats.remote(reset=False), self.buffer.stats.remote()])
        self._count_positions(pool)
        report = run_report(c, self.initial, self.state, self.table, selected_dir,
                            seconds={"phase2": self.counters["seconds"]})
        report["ray"] = {**self.counters, "buffer": buf, "teacher_pool": pool,
                         "rollout_workers": c.ray.num_rollout_workers, "teacher_replicas": c.ray.num_teacher_replicas}
        write_json_atomic(os.path.join(c.run_dir, "report.json"), report)
        try:
            plot_trace(report, os.path.join(c.run_dir, "lambda_trace.png"))
        except Exception as e:  # a plot must never lose the run
            self.log(f"[kdtw] could not draw the λ plot: {e}")
        if self.tracker is not None:
            for name in ("config.yaml", "report.json", "lambda_trace.png"):
                self.tracker.artifact(os.path.join(c.run_dir, name))
            if best is not None:
                self.tracker.artifact(selected_dir, "student")
        if best is None:
            self.log("[kdtw] no checkpoint was validated: nothing selected")
        else:
            tag = "eligible" if best["eligible"] else f"NOT eligible (no checkpoint within δ={c.train.eligibility_delta})"
            self.log(f"[kdtw] selected phase-{best['phase']} step {best['step']} ({tag}) -> {selected_dir}\n"
                     + format_validation(best["validation"], key))
        return report

    def snapshot(self) -> dict:
        """Learner state and buffer contents as they are now (tests compare them with a checkpoint)."""
        import ray

        lstate, contents = ray.get([self.learner.state.remote(), self.buffer.contents.remote()])
        return {"step": self.step, "learner": lstate["learner"], "student": lstate["student"], "buffer": contents}

    def close(self) -> None:
        """Stop every actor of this system (an in-process caller keeps its Ray session)."""
        import ray

        for a in [self.learner, self.pool, self.buffer, *self.workers, *self.replicas]:
            if a is not None:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:
                    pass
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)


def _copy_dir(src: str, dst: str) -> None:
    """Copy a folder over ``dst`` with no moment where ``dst`` is missing (kdtw/atomic.py)."""
    tmp = make_tmp_dir(dst)
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        replace_dir(tmp, dst)
    except BaseException:
        remove_dir(tmp)
        raise


# ----------------------------------------------------------------------------- the job


def train(cfg: Config, *, resume: tuple[str, dict] | None = None, phase1: str | None = None, log: Log = print,
          hooks: list | None = None, track: bool = True, stopper: Stopper | None = None,
          resume_phase1: str | None = None) -> tuple[dict, Phase2]:
    """The whole job in this process (Ray already connected): returns the report and the
    (closed) system. ``resume``: a Phase-2 checkpoint; ``resume_phase1``: the run's Phase-1
    checkpoint (finished or not), from which Phase 1 goes on, or Phase 2 starts. With a
    ``stopper``, a signal in Phase 1 or 2 ends it with a checkpoint and `Interrupted`; the MLflow
    run is then marked KILLED (FAILED on an error)."""
    from actors.tracking import Tracker

    os.makedirs(cfg.run_dir, exist_ok=True)
    cfg.save(os.path.join(cfg.run_dir, "config.yaml"))
    meta1 = read_phase1(resume_phase1) if resume_phase1 else None
    run_id = resume[1].get("mlflow_run_id") if resume else (meta1 or {}).get("mlflow_run_id")
    tracker = Tracker(cfg, run_name="train_pcl", run_id=run_id, log=log) if track else None
    if tracker is not None:
        log(f"[mlflow] run {tracker.run_id} ({tracker.uri})")
    system = Phase2(cfg, tracker=tracker, log=log)
    system.hooks.extend(hooks or [])
    system.stopper = stopper
    try:
        if resume is not None:
            system.restore(*resume)
        else:
            if meta1 is not None and meta1.get("initial"):
                system.initial = meta1["initial"]  # the validation before training, made by the first session
            else:
                system.initial_validation()
            if phase1 is None and cfg.train.phase1_steps:
                if meta1 is not None and int(meta1["steps"]) >= cfg.train.phase1_steps:
                    log(f"[resume] Phase 1 finished ({meta1['steps']} steps, {resume_phase1}): Phase 2 starts")
                    phase1 = resume_phase1
                else:
                    from actors.phase1_rank import run_bc

                    phase1 = run_bc(cfg, tracker=tracker, log=log, resume=resume_phase1, stopper=stopper,
                                    meta={"mlflow_run_id": getattr(tracker, "run_id", None), "initial": system.initial})
            system.start(phase1)
        report = system.run()
        report["mlflow_run_id"] = getattr(tracker, "run_id", None)
    except BaseException as e:
        if tracker is not None:
            tracker.finish("KILLED" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "FAILED")
        raise
    finally:
        system.close()
    if tracker is not None:
        tracker.finish()
    return report, system


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML profile (default: conf/default.yaml)")
    p.add_argument("--phase1", help="a Phase-1 folder (jobs/train_bc.py output): skip Phase 1")
    p.add_argument("--resume", help="continue a run: its run folder or one of its checkpoints/step_* folders; "
                   "the run goes on in that folder")
    p.add_argument("--overwrite", action="store_true", help="delete the outputs of an earlier run in run_dir first")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. ray.num_rollout_workers=4")
    return p


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def body() -> int:
        from kdtw.cli import _check_run_dir, _clear_run

        resume, resume_phase1, old = None, None, []
        if args.resume:
            if args.config or args.phase1 or args.overwrite:
                raise ValueError("--resume continues a run with its own config: drop --config/--phase1/--overwrite "
                                 "(key=value overrides still apply)")
            resume_phase1 = phase1_to_resume(args.resume)
        if resume_phase1:  # stopped in Phase 1, or before Phase 2's first checkpoint
            here = os.path.abspath(args.resume)
            cfg = load_config(os.path.join(here, "config.yaml"), [f"run_dir={here}", *args.overrides]).with_absolute_paths()
        elif args.resume:
            ckpt, manifest = open_checkpoint(args.resume)
            for name in STATE_FILES:  # a crafted or unreadable state file is refused before Ray starts
                load_state(os.path.join(ckpt, name))
            here = run_folder(ckpt)  # where the run is now, not where it was made (None: the config's)
            cfg = load_config(os.path.join(ckpt, "config.yaml"),
                              ([f"run_dir={here}"] if here else []) + list(args.overrides)).with_absolute_paths()
            resume = (ckpt, manifest)
        else:
            cfg = load(args.config, args.overrides)
            old = _check_run_dir(cfg, overwrite=args.overwrite, resume_with=prog)
        if args.phase1:
            check_phase1(args.phase1)
        stopper = Stopper().install()
        started = False
        try:
            started = connect(cfg)
            if old:
                _clear_run(cfg.run_dir, old)
            report, _ = train(cfg, resume=resume, phase1=args.phase1, stopper=stopper, resume_phase1=resume_phase1)
        finally:
            stopper.restore()
            if started:  # the local Ray of this job: no process of it outlives the job
                import ray

                ray.shutdown()
        sel = report["selected"]
        print(json.dumps({"run_dir": cfg.run_dir, "selected_dir": report["selected_dir"],
                          "eligible": None if sel is None else sel["eligible"],
                          "mlflow_run_id": report["mlflow_run_id"]}))
        return 0

    return guarded(body, prog)


if __name__ == "__main__":
    sys.exit(main())
