"""What the Phase-2 driver counts and reports, kept apart from its loop (jobs/train_pcl.py): the
run's counters (paths, tokens, teacher positions, worker failures, seconds; saved in every
checkpoint), each learner step's λ-trace record, MLflow metrics and status line (every
``train.log_every`` steps and at least every 30 s), with the buffer's and the pool's own figures
asked for at most once a second."""

from __future__ import annotations

import time
from typing import Callable

from kdtw.reporting import (
    LoopState,
    StatusPacer,
    format_step,
    step_metrics,
    trace_entry,
)
from kdtw.teacher_service import BatchStats


class Progress:
    def __init__(self, cfg, phrases: list[str], actors, *, tracker=None, log: Callable[[str], None] = print) -> None:
        self.cfg, self.phrases, self.actors, self.tracker, self.log = cfg, phrases, actors, tracker, log
        self.counters = {"worker_failures": 0, "trajectories": 0, "rollout_batches": 0, "seconds": 0.0,
                         **{f"teacher_{k}": 0 for k in BatchStats.KEYS},  # the pool's batches, waits, ...
                         # teacher positions the replicas computed for Phase-2 rollouts (calls, scoring,
                         # demonstrations; with ray.teacher_in_workers the workers' own teachers make the
                         # calls and scoring, uncounted) and the prompt + output tokens of those paths
                         "rollout_teacher_positions": 0, "rollout_tokens": 0}
        self._positions_seen = 0  # the pool's running count of rollout positions at the last look
        self._stats_at, self._pace = 0.0, StatusPacer(cfg.train.log_every, cfg.train.phase2_steps)
        self._last = {"buffer_fill": 0.0, "teacher_batch_requests": 0.0}
        self.begin()

    def begin(self) -> None:
        """The start of this session's loop (a resumed run adds its seconds to the saved ones)."""
        self._t0, self._t_prev, self._trajs0 = time.perf_counter(), self.counters["seconds"], self.counters["trajectories"]
        self._steps, self._use = 0, [[0.0, 0] for _ in self.phrases]

    def rollout(self, res: dict, *, landing: bool = False) -> None:
        """A rollout batch a worker delivered; ``landing``: after the last learner step (the run's
        end or a stop), which the loop's seconds then run to."""
        c = self.counters
        if landing:
            c["seconds"] = self._t_prev + time.perf_counter() - self._t0
        c["rollout_tokens"] += res["tokens"] + res["prompt_tokens"]
        c["trajectories"] += res["paths"]
        c["rollout_batches"] += 1
        for k, v in res["seconds"].items():
            c[f"worker_{k}_s"] = c.get(f"worker_{k}_s", 0.0) + v
        for k, v in res.get("pool_requests", {}).items():  # the workers' pool requests, by transport
            c[f"pool_requests_{k}"] = c.get(f"pool_requests_{k}", 0) + v
        for k, (s, n) in enumerate(zip(res["use"]["sum"], res["use"]["count"])):
            self._use[k][0] += s
            self._use[k][1] += n

    def worker_failed(self, wid: int, err: BaseException, *, replace: bool = True) -> None:
        self.counters["worker_failures"] += 1
        self.log(f"[ray] rollout worker {wid} failed ({type(err).__name__})"
                 + ("; starting a replacement" if replace else ", its batch lost as the loop ends"))

    def step(self, step: int, res: dict, state: LoopState, *, workers: int) -> None:
        """Learner step ``step`` done (``res``: `actors.learner.LearnerActor.step`'s result): its trace
        record, MLflow metrics and (every ``log_every`` steps, or 20 s after the last) status line."""
        tc, c, st = self.cfg.train, self.counters, res["stats"]
        now = time.perf_counter()
        self._steps += 1
        c["learner_s"] = c.get("learner_s", 0.0) + res["seconds"]
        if self._steps == max(2, workers):  # every worker has delivered: steady state from here
            c["warm_seconds"], c["warm_trajectories"] = now - self._t0, c["trajectories"] - self._trajs0
        c["seconds"] = self._t_prev + now - self._t0
        state.losses.append(st.loss)
        state.lam_trace.append(trace_entry(step, st))
        out = step_metrics(st, self.phrases)
        out.update({"policy_lag": res["policy_lag"], "policy_version": st.version,
                    "trajectories_per_s": (c["trajectories"] - self._trajs0) / max(now - self._t0, 1e-9),
                    "worker_failures": c["worker_failures"]})
        out.update({f"teacher_use/{p}": s / n for p, (s, n) in zip(self.phrases, self._use) if n})
        self._use = [[0.0, 0] for _ in self.phrases]
        due = step % tc.log_every == 0 or step == tc.phase2_steps
        if due or now - self._stats_at >= 1.0:
            self._stats_at = now
            self._system_stats()
            out.update(self._last)
        if self.tracker is not None:
            self.tracker.metrics(out, step=step)
        if self._pace.due(step):  # `due`, or 20 s after the last line (kdtw.reporting.STATUS_EVERY_S)
            s = self._last
            pool = "" if self.cfg.ray.teacher_in_workers else f" teacher batch {s['teacher_batch_requests']:.2f}"
            self.log(f"[phase 2] step {step}/{tc.phase2_steps} " + format_step(st)
                     + f" traj/s {out['trajectories_per_s']:.1f} lag {res['policy_lag']:.2f} "
                     f"buffer {s['buffer_fill']:.2f}" + pool)

    def _system_stats(self) -> None:
        buf, pool = self.actors.stats()
        for k in BatchStats.KEYS:
            self.counters[f"teacher_{k}"] += pool["batch"][k]
        self._count_positions(pool)
        self._last = {
            "buffer_fill": buf["fill"], "buffer_bytes_per_token": buf["bytes"] / max(buf["tokens"], 1),
            "teacher_batch_requests": pool["batch"]["requests_per_batch"],
            "teacher_batch_rows": pool["batch"]["rows_per_batch"], "teacher_failures": pool["router"]["failures"],
            "teacher_positions_per_token": self.counters["rollout_teacher_positions"]
            / max(self.counters["rollout_tokens"], 1)}

    def _count_positions(self, pool_stats: dict) -> None:
        """Add the rollout positions the pool counted since the last look (its count starts at
        zero with each pool; the run's total lives in the counters, which checkpoints keep)."""
        now = pool_stats["positions"].get("rollout", 0)
        self.counters["rollout_teacher_positions"] += now - self._positions_seen
        self._positions_seen = now

    def report(self) -> dict:
        """report.json's ``ray`` section: the counters, the buffer's and the pool's figures."""
        buf, pool = self.actors.stats(reset=False)
        self._count_positions(pool)
        r = self.cfg.ray
        return {**self.counters, "buffer": buf, "teacher_pool": pool, "rollout_workers": r.num_rollout_workers,
                "teacher_replicas": r.num_teacher_replicas, "teacher_in_workers": r.teacher_in_workers}
