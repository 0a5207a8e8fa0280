"""Train a τ-student on Ray: Phase 1 (BC, Ray Train), then asynchronous Phase 2 (PCL + λ).

    python jobs/train_pcl.py [--config conf/default.yaml] [--phase1 runs/default/phase1] [key=value ...]
    python jobs/train_pcl.py --resume runs/default [key=value ...]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train_pcl.py

Starts a local Ray (loopback only), or joins ``ray.address`` or ``ray job submit``'s cluster
(actors/cluster.py). Phase 1 runs on Ray Train (actors/phase1_rank.py) unless ``--phase1 DIR``
names its result. Phase 2 (DESIGN.md §7): the actors (actors/system.py) and the driver loop below:
collect → learn (PCL step, λ update) → sync (published weights) → validate (on a teacher replica,
while training goes on) → checkpoint; with one worker, ``ray.max_staleness=0`` and
``ray.publish_every=1`` it is step-for-step the local loop (kdtw/local.py), whose validation,
selection, log lines, export, report and plot it shares (kdtw/reporting.py). ``--resume`` goes on
in the run's folder and MLflow run. Ctrl-C/SIGTERM: the step in flight finishes, a checkpoint is
written, the run is marked KILLED, exit 130 with the line that resumes it. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from actors.cluster import Interrupted, Stopper, guarded, job_start, remote_cause, session  # noqa: E402
from kdtw.cli import OneLineParser, _clear_run  # noqa: E402  (usage errors as one line, as every other)
from kdtw.config import Config, load_config  # noqa: E402,F401  (load_config: tests build a resumed config)
from kdtw.factory import budget_table, load_splits, load_student  # noqa: E402
from kdtw.metrics import primary_metric  # noqa: E402
from kdtw.pacing import Pacing  # noqa: E402
from kdtw.settle import settle_budgets  # noqa: E402
from kdtw.phase1 import read_phase1  # noqa: E402
from kdtw.reporting import (  # noqa: E402
    LoopState, finish_run, format_validation, record_validation, validation_examples)

PROG = "python jobs/train_pcl.py"
Log = Callable[[str], None]


class Phase2:
    """The driver: Phase 2's loop over the job's actors (`actors.system.Actors`)."""

    def __init__(self, cfg: Config, *, tracker=None, log: Log = print) -> None:
        from actors.progress import Progress
        from actors.system import Actors, Validations

        self.cfg, self.tracker, self.log = cfg, tracker, log
        self.table = budget_table(cfg)
        splits = load_splits(cfg)
        self.train_set, self.val_set = splits["train"], validation_examples(cfg, splits)
        self.actors = Actors(cfg, log=log)
        self.student = load_student(cfg)  # the driver's copy: validation, selection, checkpoints
        self.actors.await_started()  # the replicas, pool and buffer (a line every 30 s while they pend)
        self.teacher = self.actors.remote_teacher(self.student.lm.tokenizer)
        self.progress = Progress(cfg, self.table.phrases, self.actors, tracker=tracker, log=log)
        self.state, self.step, self.initial, self.published = LoopState(), 0, None, None
        self.lam: list[float] = [0.0] * len(self.table)
        self.settled: dict | None = None  # the end's settling (train.settle_probes, kdtw/settle.py)
        self.val = Validations(self.actors, self.val_set, student=self.student, teacher=self.teacher,
                               record=self._record, log=log)
        self.hooks: list[Callable[[Phase2, int], None]] = []
        self.stopper: Stopper | None = None  # set by `train`: a signal ends the loop with a checkpoint

    replicas, pool, workers = (property(lambda s, k=k: getattr(s.actors, k)) for k in ("replicas", "pool", "workers"))
    counters = property(lambda self: self.progress.counters)

    def start(self, phase1_dir: str | None) -> None:
        """Learner (from the Phase-1 folder, if any) and workers; validates the Phase-1 student."""
        self.published = self.actors.start(phase1_dir)
        if phase1_dir:
            self._validate("[phase 1] done", step=0, phase=1)

    def restore(self, ckpt: str, manifest: dict) -> None:
        """The actors and the driver's loop state (`write_job_checkpoint`'s) from a checkpoint (actors/system.py)."""
        from actors.system import restore_driver

        d, self.published = self.actors.restore(ckpt)
        self.step, self.initial = int(manifest["step"]), d["initial"]
        restore_driver(d, ckpt, self.cfg.run_dir, self.state, self.counters)
        self.log(f"[resume] {ckpt}: Phase-2 step {self.step}, policy version {self.published[0]}")
        self.val.resume(self.published, manifest)

    def run(self) -> dict:
        """Phase-2 steps up to ``train.phase2_steps``, then selection, export and the report (also
        after a loss, weights or logits gone non-finite, which is then raised, as the local loop does)."""
        with Stopper.deferred(self.stopper):  # a first signal: stop after the step in flight
            try:
                self._loop()
            except Exception as e:
                if isinstance(cause := remote_cause(e), FloatingPointError):  # what was validated is exported first
                    self.finish(stopped={"error": str(cause), "phase": 2, "step": self.step})
                raise
        return self.finish()

    def _loop(self) -> None:
        import ray

        from actors.common import RETRY_ERRORS

        tc, r = self.cfg.train, self.cfg.ray
        pace = Pacing(tc.max_staleness, r.steps_per_batch, tc.buffer_tokens,
                      batch_tokens=tc.batch_size * self.cfg.decoding.max_new_tokens)  # a rollout batch, at most
        self.progress.begin()
        version = self.published[0]
        # ref -> ("collect", worker id) | ("learn", None); a hook may wait on the collects (benchmarks)
        self.inflight = inflight = {}
        idle = set(range(len(self.workers)))
        learn_ref = None
        while self.step < tc.phase2_steps:
            # learn: one step in flight at a time, at most steps_per_batch per rollout batch
            if learn_ref is None and pace.may_learn():
                nxt = self.step + 1
                publish = nxt % tc.validate_every == 0 or nxt == tc.phase2_steps or (
                    r.checkpoint_every and nxt % r.checkpoint_every == 0)
                learn_ref = self.actors.learner.step.remote(publish=publish)
                inflight[learn_ref] = ("learn", None)
            # collect: every idle worker whose paths would still be fresh when learned from,
            # unless the buffer would evict paths the learner has not seen (its own backpressure)
            pending = sum(1 for kind, _ in inflight.values() if kind == "collect")
            for wid in sorted(idle):
                if not pace.may_collect(version, learn_ref is not None, self.published[0], pending):
                    break
                inflight[self.workers[wid].collect.remote(*self.published)] = ("collect", wid)
                idle.discard(wid)
                pending += 1
            if not inflight:  # nothing can move: the reported count is out of date
                pace.stalled()
                continue
            done, _ = ray.wait(list(inflight) + self.val.refs(), num_returns=1)
            if done[0] not in inflight:  # the validation in flight came back
                self.val.land()
                continue
            kind, wid = inflight.pop(done[0])
            if kind == "collect":
                idle.add(wid)
                try:
                    res = ray.get(done[0])
                except RETRY_ERRORS as e:
                    self.progress.worker_failed(wid, e)
                    self.actors.replace_worker(wid)
                    continue
                pace.collected(res["buffer_unseen"])
                self.progress.rollout(res)
                continue
            learn_ref = None
            res = ray.get(done[0])
            pace.learned(None if res is None else res["buffer_unseen"])
            if res is None:  # the buffer could not fill a batch
                continue
            self.step, self.lam, version = self.step + 1, res["stats"].lam, res["stats"].version
            self.published = res.get("weights", self.published)  # sync: the next collects use these
            self.progress.step(self.step, res, self.state, workers=len(self.workers))
            if self.step % tc.validate_every == 0 or self.step == tc.phase2_steps:
                self._validate(f"[validate] phase-2 step {self.step}", step=self.step, phase=2,
                               settle=self.step == tc.phase2_steps)
            stopping = self.stopper is not None and self.stopper.requested is not None
            ckpt = None
            if stopping or self.step == tc.phase2_steps or (r.checkpoint_every and self.step % r.checkpoint_every == 0):
                if (stopping or self.step == tc.phase2_steps) and inflight:  # the last rollouts land first, counted
                    for ref in ray.wait(list(inflight), num_returns=len(inflight), timeout=120)[0]:
                        try:
                            self.progress.rollout(ray.get(ref), landing=True)
                        except RETRY_ERRORS as e:
                            self.progress.worker_failed(inflight[ref][1], e, replace=False)
                    inflight.clear()
                ckpt = self.checkpoint()
            for hook in self.hooks:
                hook(self, self.step)
            if stopping and self.step < tc.phase2_steps:
                raise Interrupted(self.stopper.requested, self.step, ckpt, self.cfg.run_dir)

    def _validate(self, title: str, *, step: int, phase: int, settle: bool = False) -> None:
        """Validate the published weights, log, consider them for selection; in the background but the
        last, which with ``settle`` first settles the budgets (train.settle_probes, kdtw/settle.py)."""
        self.val.land()
        lam = self.lam if phase == 2 else [0.0] * len(self.table)
        if not settle and self.cfg.ray.background_validation:
            return self.val.start(self.published, (title, step, phase, list(lam)))
        self.val.load(self.published[1])
        if settle and self.cfg.train.settle_probes:
            self.settled = settle_budgets(self.cfg, self.student, self.teacher, self.train_set, self.table,
                                          log=self.log)
            lam = self.lam = [lam + d for lam, d in zip(self.lam, self.settled["shift"])]
        self._record(self.val.now(), title, step, phase, lam)

    def _record(self, v: dict, title: str, step: int, phase: int, lam: list) -> None:
        record_validation(self.cfg, self.state, v, title, step=step, phase=phase, lam=lam, student=self.student,
                          log=self.log, metrics=None if self.tracker is None else self.tracker.metrics)

    def checkpoint(self) -> str:
        from actors.system import write_job_checkpoint

        path = write_job_checkpoint(self.cfg, self.step, self.actors.save(), student=self.student, state=self.state,
                                    initial=self.initial, counters=self.counters,
                                    meta={"mlflow_run_id": getattr(self.tracker, "run_id", None),
                                          "validation_in_flight": self.val.manifest(self.step)})
        self.log(f"[checkpoint] {path}")
        return path

    def finish(self, stopped: dict | None = None) -> dict:
        """Selection, export, report.json and the plot (kdtw/reporting.py), plus the system's figures."""
        c = self.cfg
        self.val.land()
        report = finish_run(c, self.state, self.table, self.initial, teacher=self.teacher, val_set=self.val_set,
                            seconds={"phase2": self.counters["seconds"]}, log=self.log, calibrate=self.actors.calibrate,
                            extra={"ray": self.progress.report(), "settled": self.settled, "stopped": stopped})
        if self.tracker is not None:
            self.tracker.run_artifacts(c.run_dir, report["selected_dir"])
        return report

    def snapshot(self) -> dict:
        return {"step": self.step, **self.actors.snapshot()}

    def close(self) -> None:
        self.actors.close()


def train(cfg: Config, *, resume: tuple[str, dict] | None = None, phase1: str | None = None, log: Log = print,
          hooks: list | None = None, track: bool = True, stopper: Stopper | None = None,
          resume_phase1: str | None = None) -> tuple[dict, Phase2]:
    """The whole job in this process (Ray already connected): returns the report and the
    (closed) system. ``resume``: a Phase-2 checkpoint; ``resume_phase1``: the run's Phase-1
    checkpoint (finished or not), from which Phase 1 goes on, or Phase 2 starts. With a
    ``stopper``, a signal in Phase 1 or 2 ends it with a checkpoint and `Interrupted`; the MLflow
    run is then marked KILLED (FAILED on an error)."""
    from actors.tracking import tracked

    cfg = cfg.for_ray_job()  # ray.max_staleness, where set, is the job's train.max_staleness
    os.makedirs(cfg.run_dir, exist_ok=True)
    cfg.save(os.path.join(cfg.run_dir, "config.yaml"))
    meta1 = read_phase1(resume_phase1) if resume_phase1 else {}
    run_id = resume[1].get("mlflow_run_id") if resume else meta1.get("mlflow_run_id")
    with tracked(cfg, run_name="train_pcl", run_id=run_id, log=log, enabled=track) as tracker:
        system = Phase2(cfg, tracker=tracker, log=log)
        system.hooks.extend(hooks or [])
        system.stopper = stopper
        try:
            if resume is not None:
                system.restore(*resume)
            else:
                system.initial = meta1.get("initial")  # the validation before training, from a first session
                if system.initial is None:
                    system.initial = system.val.now()
                    log("[kdtw] before training (greedy, validation):\n"
                        + format_validation(system.initial, primary_metric(cfg.task.metric)))
                if phase1 is None and cfg.train.phase1_steps:
                    from actors.phase1_rank import phase1_for_job  # Ray Train: imported when needed

                    phase1 = phase1_for_job(cfg, resume_phase1, initial=system.initial, tracker=tracker, log=log,
                                            stopper=stopper)
                system.start(phase1)
            report = system.run()
        finally:
            system.close()
        report["mlflow_run_id"] = getattr(tracker, "run_id", None)
    return report, system


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=__doc__.split("\n")[0])
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
        cfg, resume, resume_phase1, old = job_start(args, prog)  # every input checked before Ray starts
        phases = (2,) if args.phase1 or resume or not cfg.train.phase1_steps else (1, 2)
        with session(cfg, phases) as stopper:  # signals, and a local Ray that ends with the job
            if old:
                _clear_run(cfg.run_dir, old)
            report, _ = train(cfg, resume=resume, phase1=args.phase1, stopper=stopper, resume_phase1=resume_phase1)
        sel = report["selected"]
        print(json.dumps({"run_dir": cfg.run_dir, "selected_dir": report["selected_dir"],
                          "eligible": None if sel is None else sel["eligible"],
                          "mlflow_run_id": report["mlflow_run_id"]}))
        return 0

    return guarded(body, prog)


if __name__ == "__main__":
    sys.exit(main())
