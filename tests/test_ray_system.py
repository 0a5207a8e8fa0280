"""The Ray system (jobs/train_pcl.py, actors/): parity with the single-process loop, faults,
driver death and resume, and bad inputs. One ``ray.init(num_cpus=2)`` for the module."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, signal_when
from conftest_ray import free_port, load_job, ray_env, ray_session, tiny  # noqa: F401
from kdtw.buffer import from_table
from kdtw.checkpoint import load_state, open_checkpoint, write_checkpoint
from kdtw.local import LocalLoop
from kdtw.models import Student

TINY = os.path.join(ROOT, "conf", "tiny.yaml")
# small and quick: few validation examples, no Phase 1 unless a test wants it
QUICK = ["train.phase1_steps=0", "train.val_examples=4", "train.log_every=5"]


def _fields(t):
    return (t.source_ids, t.budget_id, t.tokens, t.actions_tau, t.behaviour_logp, t.teacher_logp, t.origin,
            t.policy_version, t.worker_id, t.greedy_tau, t.tau_prob)


@pytest.mark.parametrize("mode", ["pool", "pool_demos_in_worker", "teacher_in_workers"])
def test_sync_parity_with_the_local_loop(ray_session, tmp_path, mode):
    """1 worker, 1 teacher, staleness 0: the Ray loop's first 20 losses are the local loop's,
    with the worker's teacher calls going through the pool (its demonstrations decoded on the
    replica, or token by token through the pool in a thread beside its rollouts) or to its own
    teacher copy."""
    in_workers = mode == "teacher_in_workers"
    train_pcl = load_job("train_pcl")
    over = [*QUICK, "train.phase2_steps=20", "train.validate_every=1000", "train.max_staleness=0",
            "ray.num_rollout_workers=1", "ray.num_teacher_replicas=1", "ray.publish_every=1", "ray.checkpoint_every=0",
            "train.value_warmup_steps=5", "train.settle_probes=2", "train.settle_rounds=1",
            # with its own teacher the worker decodes the demonstrations too (conf/default.yaml's
            # asynchronous setting; here, synchronous, null would put them on the replica)
            *(["ray.teacher_in_workers=true"] if in_workers else []),
            *(["ray.teacher_side_demos=false"] if mode != "pool" else [])]
    local = LocalLoop(tiny(tmp_path / "local", *over), log=lambda _: None)
    local.learner.start_phase2()
    local_losses, local_lam = [], []
    for _ in range(20):
        m = local.learn(*local.collect())
        local_losses.append(m.loss)
        local_lam.append(local.learner.lam.tolist())
    report, system = train_pcl.train(tiny(tmp_path / "ray", *over), log=lambda _: None, track=False)
    ray_losses = system.state.losses
    assert len(ray_losses) == 20
    diff = max(abs(a - b) for a, b in zip(local_losses, ray_losses))
    print(f"sync parity: max |loss_ray - loss_local| over 20 steps = {diff:.2e}")
    assert diff < 1e-5, (local_losses, ray_losses)
    ray_lam = [r["lam"] for r in report["lambda_trace"]]
    assert torch.allclose(torch.tensor(ray_lam), torch.tensor(local_lam), atol=1e-5)
    assert report["ray"]["rollout_batches"] == 20 and report["ray"]["worker_failures"] == 0
    # rollouts reached the pool's replicas only when the workers had no teacher of their own, and
    # then over the pool's socket (ray.teacher_socket), none by actor call
    assert (report["ray"]["rollout_teacher_positions"] > 0) != in_workers
    assert (report["ray"]["pool_requests_socket"] > 0) != in_workers and report["ray"]["pool_requests_actor_call"] == 0
    # demonstrations through the pool came from the worker's second client (its thread's)
    assert ("0/demos" in report["ray"]["teacher_pool"]["clients"]) == (mode == "pool_demos_in_worker")
    # the end's settling (train.settle_probes): the driver settles the published weights as the
    # local loop settles its student, through the remote teacher
    from kdtw.settle import settle_budgets

    want = settle_budgets(local.cfg, local.student, local.teacher, local.train_set, local.table, log=lambda _: None)
    assert report["settled"]["shift"] == pytest.approx(want["shift"], abs=1e-4)
    assert report["validations"][-1]["lam"] == pytest.approx(
        [a + b for a, b in zip(local_lam[-1], want["shift"])], abs=1e-4)
    # the Ray job validates on a teacher replica (actors/system.py: `Actors.validate`): the same
    # table as the local loop's validation of its settled student
    from kdtw.reporting import validate

    mine, theirs = validate(local.cfg, local.student, local.teacher, local.val_set), report["validations"][-1]
    for phrase, row in mine["budgets"].items():
        assert theirs["budgets"][phrase]["use"] == pytest.approx(row["use"], abs=1e-9), phrase
        assert theirs["budgets"][phrase]["bleu"] == pytest.approx(row["bleu"], abs=1e-6), phrase
    # the export's call thresholds, calibrated on a replica (`Actors.calibrate`), are those the
    # local loop's teacher gives the selected student
    from kdtw.reporting import budget_prompts, calibrate_export

    sel = Student.load(report["selected_dir"])
    cal = calibrate_export(local.cfg, sel, local.teacher, budget_prompts(local.cfg, local.table, local.val_set),
                           list(local.table.targets))
    want = {b.phrase: (None if c.theta == float("inf") else c.theta) for b, c in zip(local.table, cal)}
    assert report["call_thresholds"] is not None and report["call_thresholds"].keys() == want.keys()
    for phrase, theta in want.items():
        assert report["call_thresholds"][phrase] == (None if theta is None else pytest.approx(theta, abs=1e-6)), phrase


def test_rollouts_landing_after_the_last_step_are_counted(ray_session, tmp_path):
    """Asynchronous, two workers: the rollout batches still in flight at the last learner step land
    in the buffer before the end, and the report counts them (paths, batches, tokens) as it counts
    the teacher positions the pool computed for them: every path in the buffer is in the report, and
    the replicas computed at most one position per rollout token (the prompt once a path)."""
    train_pcl = load_job("train_pcl")
    cfg = tiny(tmp_path, *QUICK, "train.phase2_steps=8", "train.validate_every=1000", "train.max_staleness=4",
               "ray.num_rollout_workers=2", "ray.num_teacher_replicas=1", "ray.teacher_latency_ms=10",
               "ray.checkpoint_every=0", "ray.teacher_side_demos=false")
    report, _ = train_pcl.train(cfg, log=lambda _: None, track=False)
    r = report["ray"]
    print(f"paths {r['trajectories']} in {r['rollout_batches']} batches, the buffer's {r['buffer']['added']}; "
          f"{r['rollout_teacher_positions']} positions for {r['rollout_tokens']} tokens")
    assert r["trajectories"] == r["buffer"]["added"] == r["rollout_batches"] * cfg.train.batch_size
    assert 0 < r["rollout_teacher_positions"] <= r["rollout_tokens"]


@pytest.mark.parametrize("transport", ["socket", "ray"])
def test_teacher_sessions_through_the_pool_one_position_per_token_with_a_replica_killed(ray_session, tmp_path,
                                                                                        transport):
    """Rollouts through the Ray pool: each decode batch is a session pinned to a replica; the
    replicas compute the prompt once and one position per output token (calls and scoring), as
    counted by the pool. The replica holding a session is killed mid-session: the next step is
    a miss, the client resends the prefix, and paths and teacher log-probs equal a local run.
    Requests go over the pool's socket or as actor calls (``transport``); over the socket, a
    client whose socket breaks just after the pool took a step goes on by actor calls (that step
    misses there and the prefix is resent) with the same paths."""
    ray = ray_session
    from actors.common import RETRY_ERRORS
    from actors.teacher import TeacherActor
    from actors.teacher_pool import PoolClient, TeacherPool
    from kdtw.decoding import generate
    from kdtw.factory import load_pair
    from kdtw.rollout import prompt_ids
    from kdtw.teacher_service import RemoteTeacher

    cfg = tiny(tmp_path, "ray.teacher_cpus=0")
    teacher, student = load_pair(cfg)  # the replicas load the same teacher from the same config
    replicas = [TeacherActor.options(num_cpus=0, max_restarts=2).remote(cfg, i) for i in range(2)]
    pool = TeacherPool.remote(replicas, max_batch=256, max_wait_ms=1.0)
    spec = ray.get(pool.spec.remote())
    prompts = [f"With full teacher use, translate to French: {w}" for w in ("the cat sleeps", "a dog runs", "we eat")] * 2
    killed = []

    def pid(replica):
        return ray.get(replica.__ray_call__.remote(lambda _: os.getpid()))

    class Cutter(PoolClient):  # its socket breaks after the pool took the third step
        steps = 0

        def step(self, *payload):
            Cutter.steps += 1
            if Cutter.steps == 3:
                assert self.lane is not None
                self.lane.call("step", *payload)  # taken, its answer lost with the socket
                self.lane.shut()
            return super().step(*payload)

    class Killer(PoolClient):  # kills the replica of the first session before its third step
        steps = 0

        def step(self, *payload):
            Killer.steps += 1
            if Killer.steps == 3 and not killed:
                i = ray.get(pool.where.remote(payload[0]))
                before = pid(replicas[i])
                ray.kill(replicas[i], no_restart=False)  # Ray restarts it, without its sessions
                # ray.kill returns before the process dies, and a call sent meanwhile is answered by
                # the old process (38 of 40, docs/probes/ray_kill_race.py): wait for the new one, so this step misses
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        if pid(replicas[i]) != before:
                            break
                    except RETRY_ERRORS:
                        pass
                    time.sleep(0.02)
                else:
                    raise AssertionError(f"replica {i} not restarted 60 s after ray.kill")
                killed.append(i)
            return super().step(*payload)

    def rollouts(t):
        return generate(student, t, prompts, max_new_tokens=12, batch_size=3, do_sample=True, teacher_do_sample=True,
                        tau_bias=2.0, score_teacher=True, generator=torch.Generator().manual_seed(11))

    ref = rollouts(teacher)
    sock = transport == "socket"
    cases = [(PoolClient(pool, "w0", socket=sock), False), (Killer(pool, "w1", socket=sock), True)]
    for client, kill in cases + ([(Cutter(pool, "w2"), None)] if sock else []):
        before = ray.get(pool.stats.remote(reset=False))["positions"].get("rollout", 0)
        proxy = RemoteTeacher(client, student.lm.tokenizer, spec)
        got = rollouts(proxy)
        assert any(map(any, got.call_mask))
        assert got.tokens == ref.tokens and got.call_mask == ref.call_mask
        for a, b in zip(got.teacher_logp, ref.teacher_logp):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
        stats = ray.get(pool.stats.remote(reset=False))
        positions = stats["positions"]["rollout"] - before
        prompt = sum(map(len, prompt_ids(teacher, prompts)))
        output = sum(min(len(p), max(map(len, got.tokens[s : s + 3])) - 1)
                     for s in range(0, len(prompts), 3) for p in got.tokens[s : s + 3])
        calls = sum(map(sum, got.call_mask))
        print(f"teacher positions: {positions} for {prompt} prompt + {output} output tokens "
              f"({calls} calls; resending the prefix at every call would compute more), misses {proxy.misses}")
        if sock:  # every request over the socket; once cut, by actor calls (the miss, the resend, ...)
            assert client.via_socket > 0 and (client.via_ray == 0 if kill is not None else client.via_ray >= 2)
        else:
            assert client.via_socket == 0 and client.via_ray > 0
        if kill is False:
            assert positions == prompt + output and proxy.misses == 0
        else:  # the lost session's prompt and prefix computed once more
            assert (killed if kill else client.lane is None) and proxy.misses >= 1
            # at least every position once: equal when the kill (asynchronous) lands before the
            # replica answered any request of that session, so nothing it computed was counted
            assert prompt + output <= positions <= prompt + output + proxy.misses * (prompt + 12 * 3)
        assert stats["sessions"]["open"] == 0
    for a in [pool, *replicas]:
        ray.kill(a)


def test_a_replica_answers_requests_while_it_decodes_demonstrations(ray_session, tmp_path):
    """Demonstrations run in their own concurrency group on a replica: a scoring request sent
    after a long demonstration call is answered before that call ends (a replica without the
    group answered it only afterwards, so a rollout's first session step waited on the
    demonstrations it was started beside); the positions computed are all counted."""
    ray = ray_session
    from actors.teacher import TeacherActor
    from kdtw.factory import load_teacher
    from kdtw.rollout import prompt_ids

    cfg = tiny(tmp_path, "ray.teacher_cpus=0")
    replica = TeacherActor.options(num_cpus=0).remote(cfg, 0)
    ray.get(replica.spec.remote())  # loaded
    prompts = [f"With full teacher use, translate to French: {w}" for w in ("the cat sleeps", "a dog runs")] * 150
    demos = replica.demos.remote(prompts, [0] * len(prompts), max_new_tokens=40, batch_size=20,
                                 gen_state=torch.Generator().manual_seed(3).get_state())
    rows = prompt_ids(load_teacher(cfg), prompts[:2])
    score = replica.run.remote([("score", (rows, [[5, 6, 7], [8, 9]]))])
    done, _ = ray.wait([score, demos], num_returns=1, timeout=120)
    assert done == [score], "the scoring request waited for the demonstrations"
    (answer,), _ = ray.get(score)
    assert [len(x) for x in answer] == [3, 2]
    trajs, _, counted_demos = ray.get(demos)
    assert len(trajs) == len(prompts)
    assert counted_demos.get("rollout", 0) > 0
    assert ray.get(replica.run.remote([]))[1] == {}  # every position was in one of the two answers
    ray.kill(replica)


@pytest.mark.parametrize("in_workers", [False, True], ids=["pool", "teacher_in_workers"])
def test_killed_workers_and_teacher_replica_do_not_stop_the_run(ray_session, tmp_path, in_workers):
    """Rollout workers killed three times and a teacher replica once; the run completes. With
    ``ray.teacher_in_workers`` (conf/default.yaml's placement) each replacement worker loads its
    own teacher copy, and the replicas only validate (the killed one restarts for that)."""
    ray = ray_session
    train_pcl = load_job("train_pcl")
    cfg = tiny(tmp_path, *QUICK, "train.phase2_steps=12", "train.validate_every=6", "train.max_staleness=2",
               "ray.num_rollout_workers=2", "ray.num_teacher_replicas=2", "ray.teacher_latency_ms=20",
               "ray.checkpoint_every=0", "ray.teacher_side_demos=false",
               *(["ray.teacher_in_workers=true"] if in_workers else []))
    killed = {"workers": 0, "teacher": 0}

    def chaos(system, step):
        if step in (2, 4, 6):
            ray.kill(system.workers[(step // 2 + 1) % 2])  # w0, w1, then w0's replacement
            killed["workers"] += 1
        if step == 3:  # kill replica 0 while it serves a batch: its sessions must move to replica 1
            deadline = time.time() + (0 if in_workers else 30)  # in the workers' mode it serves no rollout
            while ray.get(system.pool.stats.remote(reset=False))["router"]["load"][0] == 0 and time.time() < deadline:
                time.sleep(0.002)
            ray.kill(system.replicas[0], no_restart=False)  # Ray restarts it (max_restarts)
            killed["teacher"] += 1

    report, system = train_pcl.train(cfg, log=lambda _: None, hooks=[chaos], track=False)
    assert killed == {"workers": 3, "teacher": 1}
    assert system.step == 12 and len(system.state.losses) == 12
    assert all(torch.isfinite(torch.tensor(system.state.losses)))
    assert report["ray"]["worker_failures"] == 3
    assert [v["step"] for v in report["validations"] if v["step"] > 0][-2:] == [6, 12]  # on the replicas after the kill
    pool = report["ray"]["teacher_pool"]
    if in_workers:  # the workers' own teachers answered every call: no rollout reached a replica
        assert report["ray"]["rollout_teacher_positions"] == 0
    else:
        # the kill was seen and routed around. Whether a session was pinned to the replica at that
        # moment depends on timing (the load it waits for may be a demonstration or scoring request:
        # measured, a CI run under load saw 1 failure and 0 misses), so the MISS-and-resend path is
        # asserted where it is deterministic: test_teacher_sessions_through_the_pool_..._killed above
        assert pool["router"]["failures"] >= 1
        assert report["ray"]["rollout_teacher_positions"] > 0
    assert report["ray"]["rollout_tokens"] > 0
    assert report["selected"] is not None and os.path.exists(tmp_path / "student" / "kdtw_student.json")


def test_killed_driver_resumes_exactly(ray_session, tmp_path):
    """A driver killed mid-run (SIGKILL) resumes from its last checkpoint: step, every λ_k,
    optimizer state, buffer contents, the workers' draws (with demonstrations decoded 3 steps
    ahead, train.phase2_demo_steps) and the MLflow run id restored exactly; training goes on."""
    ray = ray_session
    train_pcl = load_job("train_pcl")
    from actors.tracking import Tracker

    run_dir = tmp_path / "run"
    gcs = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "train_pcl.py"), "--config", TINY, f"run_dir={run_dir}", *QUICK,
           "train.phase2_steps=400", "train.validate_every=1000", "train.max_staleness=1", "ray.checkpoint_every=3",
           "train.phase2_demo_steps=3",
           "ray.num_rollout_workers=1", f"ray.address={gcs}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ray_env(dict(os.environ)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if latest.exists() and latest.read_text().strip() >= "step_0000006":
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert latest.exists(), "no checkpoint within 180 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ckpt, manifest = open_checkpoint(str(run_dir))
    step = manifest["step"]
    assert step >= 6 and manifest["mlflow_run_id"]

    cfg = train_pcl.load_config(os.path.join(ckpt, "config.yaml"), [f"train.phase2_steps={step + 4}"])
    tracker = Tracker(cfg, run_name="train_pcl", run_id=manifest["mlflow_run_id"])
    assert tracker.run_id == manifest["mlflow_run_id"]
    system = train_pcl.Phase2(cfg, tracker=tracker, log=lambda _: None)
    try:
        system.restore(ckpt, manifest)
        snap = system.snapshot()
        saved = load_state(os.path.join(ckpt, "learner.pt"))
        assert snap["step"] == step
        assert snap["learner"]["step"] == saved["step"] and snap["learner"]["version"] == saved["version"]
        assert torch.equal(snap["learner"]["lam"], saved["lam"])
        assert torch.equal(torch.nan_to_num(snap["learner"]["use_hat"]), torch.nan_to_num(saved["use_hat"]))
        assert snap["learner"]["reward_std"] == saved["reward_std"]
        opt_now, opt_saved = snap["learner"]["optimizer"], saved["optimizer"]
        assert opt_now["param_groups"] == opt_saved["param_groups"]
        assert opt_now["state"].keys() == opt_saved["state"].keys() and opt_saved["state"]
        for k, st in opt_saved["state"].items():
            for name, v in st.items():
                assert torch.equal(torch.as_tensor(opt_now["state"][k][name]), torch.as_tensor(v)), (k, name)
        weights = Student.load(os.path.join(ckpt, "student")).state_dict()
        for k, v in weights.items():
            assert torch.equal(torch.tensor(snap["student"][k]), v), k
        driver = load_state(os.path.join(ckpt, "driver.pt"))
        assert len(driver["teachers"]) == len(system.replicas) and driver["teachers"][0] is not None
        for t, st in zip(system.replicas, driver["teachers"]):  # sampled teacher tokens go on in step
            assert torch.equal(ray.get(t.rng_state.remote()), st)
        for w, st in zip(system.workers, driver["workers"]):  # tasks, calls and demonstrations too
            now = ray.get(w.rng_state.remote())
            assert now["rng"] == st["rng"]
            assert torch.equal(now["gen"], st["gen"]) and torch.equal(now["demo_gen"], st["demo_gen"])
            ahead, saved_ahead = now["demos_ahead"], st["demos_ahead"]
            assert (ahead is None) == (saved_ahead is None)
            if ahead is not None:
                assert {k: ahead[k] for k in ("prompts", "budget_ids", "taken")} == \
                       {k: saved_ahead[k] for k in ("prompts", "budget_ids", "taken")}
                assert torch.equal(ahead["gen"], saved_ahead["gen"])
        stored = from_table(pq.read_table(os.path.join(ckpt, "buffer.parquet")))
        assert len(stored) > 0 and [_fields(t) for t in snap["buffer"]] == [_fields(t) for t in stored]
        report = system.run()
    finally:
        system.close()
    tracker.finish()
    assert system.step == step + 4 and len(report["lambda_trace"]) == step + 4
    hist = tracker.client.get_metric_history(tracker.run_id, "loss")
    steps = sorted(m.step for m in hist)
    # one MLflow run across the kill, one point per step: the steps the killed driver had logged
    # after its checkpoint, redone now, are not logged twice
    assert steps == list(range(1, step + 5))


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_phase1_relay_waits_on_the_queue_prints_every_line_and_ends(ray_session):
    """rank 0's lines reach the driver's log in order; the relay waits on the queue (no polling),
    ends at the None `run_bc` puts after the last line, and ends too when the queue is gone."""
    import threading

    from ray.util.queue import Queue

    from actors.phase1_rank import _relay

    for gone in (False, True):
        lines, got = Queue(actor_options={"num_cpus": 0}), []
        tail = threading.Thread(target=_relay, args=(lines, got.append), daemon=True)
        tail.start()
        for i in range(3):
            lines.put(f"[phase 1] step {i}")
        deadline = time.time() + 30
        while len(got) < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert got == [f"[phase 1] step {i}" for i in range(3)]
        assert tail.is_alive()  # no end without the None: it is waiting, not giving up
        if gone:
            ray_session.kill(lines.actor)
        else:
            lines.put(None)
        tail.join(timeout=30)
        assert not tail.is_alive() and len(got) == 3
        if not gone:
            ray_session.kill(lines.actor)


def test_ctrl_c_in_phase_1_checkpoints_and_resume_goes_on_from_that_step(tmp_path):
    """SIGINT while Phase 1 runs on Ray Train: the ranks finish the step in flight and write the
    Phase-1 checkpoint, the MLflow run is KILLED, the job exits 130 with the --resume line and
    leaves no process of its Ray. ``--resume`` goes on from that step (not from 0) into Phase 2,
    in the same MLflow run, with one point per Phase-1 step."""
    import psutil
    from mlflow.tracking import MlflowClient

    from kdtw.phase1 import read_phase1

    run_dir = tmp_path / "run"
    env = ray_env(dict(os.environ))
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(k, None)
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "train_pcl.py"), "--config", TINY, f"run_dir={run_dir}",
           "train.phase1_steps=100000", "train.val_examples=4", "train.log_every=5", "ray.num_cpus=2"]
    rc, _, err, kids = signal_when(cmd, "[phase 1] step 5/", env=env, stop_s=120,
                                   before=lambda proc: psutil.Process(proc.pid).children(recursive=True))
    assert rc == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("kdtw: interrupted by SIGINT at Phase-1 step ") and \
        last.endswith(f"checkpoint {run_dir}/phase1; continue with: python jobs/train_pcl.py --resume {run_dir}"), err
    step = int(last.split("Phase-1 step ")[1].split(",")[0])
    assert step >= 5 and read_phase1(str(run_dir / "phase1"))["steps"] == step
    _, alive = psutil.wait_procs(kids, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.name() for p in alive]
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]

    resumed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "train_pcl.py"), "--resume", str(run_dir),
         f"train.phase1_steps={step + 2}", "train.phase2_steps=2", "train.validate_every=2", "ray.num_cpus=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[phase 1] resumed at step {step}/{step + 2}" in resumed.stdout, resumed.stdout[-3000:]
    assert read_phase1(str(run_dir / "phase1"))["steps"] == step + 2
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(runs[0].info.run_id, "FINISHED")]
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "bc/loss")) == \
        list(range(1, step + 3))


def test_background_validations_equal_waited_ones_and_a_checkpoint_restarts_one_in_flight(ray_session, tmp_path):
    """Phase-2 validations run on a replica while training goes on (`ray.background_validation`):
    the same tables, in step order, as the loop that waits for each. A checkpoint written with one
    in flight (a stop at a validation step) names it, and the resumed run validates those weights."""
    from actors.cluster import Interrupted, Stopper

    train_pcl = load_job("train_pcl")
    over = [*QUICK, "train.phase2_steps=4", "train.validate_every=2", "train.max_staleness=0",
            "ray.num_rollout_workers=1", "ray.num_teacher_replicas=1", "ray.checkpoint_every=0"]
    waited, _ = train_pcl.train(tiny(tmp_path / "wait", *over, "ray.background_validation=false"),
                                log=lambda _: None, track=False)
    stopper = Stopper()

    def stop_after_step_1(system, step):
        if step == 1:  # as a signal would: the loop stops after step 2, a validation step
            stopper.requested = "SIGINT"

    with pytest.raises(Interrupted) as stopped:
        train_pcl.train(tiny(tmp_path / "bg", *over), hooks=[stop_after_step_1], stopper=stopper,
                        log=lambda _: None, track=False)
    assert stopped.value.step == 2
    ckpt, manifest = open_checkpoint(str(tmp_path / "bg"))
    assert manifest["validation_in_flight"]["step"] == 2
    saved = load_state(os.path.join(ckpt, "driver.pt"))
    assert saved["loop"]["validations"] == []  # not landed when the checkpoint was written
    cfg = train_pcl.load_config(os.path.join(ckpt, "config.yaml"))
    report, _ = train_pcl.train(cfg, resume=(ckpt, manifest), log=lambda _: None, track=False)
    assert [v["step"] for v in report["validations"]] == [v["step"] for v in waited["validations"]] == [2, 4]
    for mine, theirs in zip(report["validations"], waited["validations"]):
        assert mine["lam"] == pytest.approx(theirs["lam"], abs=1e-6)
        for phrase, row in theirs["budgets"].items():
            assert mine["budgets"][phrase]["use"] == pytest.approx(row["use"], abs=1e-9), (mine["step"], phrase)
            assert mine["budgets"][phrase]["bleu"] == pytest.approx(row["bleu"], abs=1e-6), (mine["step"], phrase)


def test_ctrl_c_checkpoints_and_a_copied_run_resumes_where_it_is(ray_session, tmp_path, monkeypatch):
    """SIGINT to a running job that started its own Ray: the step in flight finishes, a
    checkpoint is written, the MLflow run is KILLED, the job exits 130 with one line saying how
    to resume, and no process of its Ray is left (which listened on loopback only). The run
    folder, copied elsewhere and the original moved away, resumes where it is now, and its
    MLflow run holds one point per step."""
    import json
    import shutil

    import psutil
    from mlflow.tracking import MlflowClient

    train_pcl = load_job("train_pcl")
    run_dir = tmp_path / "run"
    env = ray_env(dict(os.environ))
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(k, None)
    # a short Phase 1 on Ray Train first: the signal in Phase 2 must still reach the job's handler
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "train_pcl.py"), "--config", TINY, f"run_dir={run_dir}", *QUICK,
           "train.phase1_steps=2", "train.phase2_steps=400", "train.validate_every=1000", "ray.checkpoint_every=1000",
           "ray.num_rollout_workers=1", "ray.num_cpus=2"]

    def look(proc):  # the job's own Ray runs, and listens on loopback only
        kids = psutil.Process(proc.pid).children(recursive=True)
        assert any(k.name().startswith(("gcs_server", "raylet")) for k in kids)
        for p in [psutil.Process(proc.pid), *kids]:
            try:
                conns = p.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            listening = {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
            assert listening <= LOOPBACK, (p.name(), listening)
        return kids

    rc, _, err, kids = signal_when(cmd, "[phase 2] step 10/", env=env, before=look)
    assert rc == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("kdtw: interrupted by SIGINT at Phase-2 step ") and \
        last.endswith(f"continue with: python jobs/train_pcl.py --resume {run_dir}"), err[-3000:]
    step = int(last.split("Phase-2 step ")[1].split(",")[0])
    ckpt, manifest = open_checkpoint(str(run_dir))
    assert manifest["step"] == step >= 10 and f"checkpoint {ckpt};" in last
    _, alive = psutil.wait_procs(kids, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.name() for p in alive]
    run_id = manifest["mlflow_run_id"]
    assert MlflowClient(f"sqlite:///{run_dir}/mlflow.db").get_run(run_id).info.status == "KILLED"

    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run_dir, moved)
    gone = tmp_path / "gone"
    shutil.move(run_dir, gone)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert train_pcl.main(["--resume", str(moved), f"train.phase2_steps={step + 3}"]) == 0
    assert not run_dir.exists()  # nothing written where the run was made
    assert (gone / "checkpoints" / "latest").read_text().strip() == os.path.basename(ckpt)
    with open(moved / "report.json") as f:
        assert len(json.load(f)["lambda_trace"]) == step + 3
    assert open_checkpoint(str(moved))[1]["step"] == step + 3
    client = MlflowClient(f"sqlite:///{moved}/mlflow.db")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, step + 4))


def _job(*args: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "train_pcl.py"), *args], cwd=ROOT,
                            env=env or ray_env(dict(os.environ)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_bad_inputs_are_one_line_errors(tmp_path):
    fake = tmp_path / "fake"

    def write(folder):
        with open(os.path.join(folder, "learner.pt"), "w") as f:
            f.write("state")
        return {"mlflow_run_id": None}

    ckpt = write_checkpoint(str(fake), 3, write)
    with open(os.path.join(ckpt, "learner.pt"), "a") as f:
        f.write("garbage")
    empty = tmp_path / "empty"
    empty.mkdir()
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text("{}")
    run = f"run_dir={tmp_path / 'run'}"
    from kdtw.factory import task_tokenizer

    # a tokenizer of another vocabulary (the tiny task with a smaller lexicon) for the teacher
    task_tokenizer(tiny(tmp_path, "task.generator.lexicon_size=30")).save_pretrained(str(tmp_path / "tok"))
    # a `kdtw pretrain` teacher whose weights file was cut short
    from kdtw.factory import load_teacher

    teacher = load_teacher(tiny(tmp_path))
    cut = tmp_path / "cut" / "teacher"
    teacher.model.save_pretrained(str(cut))
    teacher.tokenizer.save_pretrained(str(cut))
    os.truncate(cut / "model.safetensors", 1000)
    # a Parquet task without the configured source column
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    for split in ("train", "validation"):
        pq.write_table(pa.table({"en": ["a b"] * 8, "target": ["c d"] * 8}), tmp_path / "data" / f"{split}.parquet")
    parquet = ["task.kind=datasets", f"task.dataset={tmp_path / 'data'}", "task.source_column=source",
               "task.data_files={train: train.parquet, validation: validation.parquet}",
               "task.splits={train: train, validation: validation}", f"teacher.tokenizer={tmp_path / 'tok'}",
               f"student.tokenizer={tmp_path / 'tok'}"]
    cases = {
        "cannot reach a Ray cluster at 127.0.0.1": _job("--config", TINY, run, f"ray.address=127.0.0.1:{free_port()}"),
        "is not a kdtw checkpoint": _job("--resume", str(empty)),
        "is corrupt: learner.pt does not match its checksum": _job("--resume", str(fake)),
        "is smaller than one batch": _job("--config", TINY, run, "train.buffer_tokens=10"),
        "ray.num_rollout_workers=0 must be an integer >= 1": _job(
            "--config", TINY, run, "ray.num_rollout_workers=0"),
        "holds another run (report.json)": _job("--config", TINY, f"run_dir={old}"),
        "drop --config/--phase1/--overwrite": _job("--resume", str(fake), "--overwrite"),
        # found before Ray starts, not as a dead actor's traceback
        f"no pretrained teacher at {tmp_path / 'none' / 'teacher'}: run `kdtw pretrain": _job(
            "--config", TINY, run, f"models_dir={tmp_path / 'none'}", "teacher.source=pretrain"),
        "teacher and student tokenizers differ": _job("--config", TINY, run, f"teacher.tokenizer={tmp_path / 'tok'}"),
        f"cannot load the weights in '{cut}'": _job("--config", TINY, run, f"models_dir={cut.parent}",
                                                    "teacher.source=pretrain"),
        "unrecognized arguments: --bogus (see `python jobs/train_pcl.py --help`)": _job("--bogus"),
        "column 'source' not found in split 'train'": _job("--config", TINY, run, *parquet),
        "nothing answers at 127.0.0.1:": _job("--config", TINY, run, env=ray_env(
            {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})),
        # found once the local Ray is up, before anything is written (Ray would wait without end)
        "Phase 1 asks for 1 GPU (ray.num_teacher_replicas=1 x ray.teacher_gpus = 1) and this Ray has 0": _job(
            "--config", TINY, run, "ray.teacher_gpus=1"),
    }
    for expected, proc in cases.items():
        out, err = proc.communicate(timeout=120)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 2, (expected, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("kdtw: error: ") and expected in lines[0], (expected, err)
    assert not os.path.exists(tmp_path / "run")  # nothing written for any of them


def test_resources_beyond_the_ray_are_refused_on_a_local_ray_and_said_on_a_cluster(ray_session, tmp_path):
    """`check_fit` against this module's Ray (2 CPUs, no GPU): Phase 2's rollout workers at one CPU
    each, or Phase 1's ranks on GPUs, are refused with the keys to change where the job started the
    Ray itself; on a Ray it joined (an autoscaler may add nodes) the same is one line and the job
    goes on. What fits passes."""
    from actors.cluster import ClusterError, check_fit

    fits = tiny(tmp_path, "ray.num_rollout_workers=2")
    check_fit(fits, (1, 2), local=True)
    workers = tiny(tmp_path, "ray.num_rollout_workers=3", "ray.rollout_worker_cpus=1")
    with pytest.raises(ClusterError, match=r"Phase 2 asks for 3.5 CPUs .*ray.num_rollout_workers=3 x "
                                           r"ray.rollout_worker_cpus = 3\) and this Ray has 2: set ray.num_cpus"):
        check_fit(workers, (2,), local=True)
    check_fit(workers, (1,), local=True)  # Phase 1 alone does not run the workers
    ranks = tiny(tmp_path, "ray.learner_ranks=2", "ray.learner_gpus=1")
    with pytest.raises(ClusterError, match=r"Phase 1 asks for 2 GPUs \(ray.learner_ranks=2 x ray.learner_gpus = 2\)"):
        check_fit(ranks, (1, 2), local=True, beside_teachers=False)  # jobs/train_bc.py: the ranks alone
    lines: list[str] = []
    check_fit(ranks, (1,), local=False, beside_teachers=False, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("[ray] Phase 1 asks for 2 GPUs") and "waits" in lines[0], lines
    # jobs/train_pcl.py starts the teacher replicas before Phase 1: its ranks run beside them
    check_fit(tiny(tmp_path, "ray.learner_ranks=7"), (1,), local=True)  # 7 x 0.25 + 0.25 = 2
    with pytest.raises(ClusterError, match=r"Phase 1 asks for 2.25 CPUs \(ray.learner_ranks=8 x ray.learner_cpus = 2 "
                                           r"\+ ray.num_teacher_replicas=1 x ray.teacher_cpus = 0.25\)"):
        check_fit(tiny(tmp_path, "ray.learner_ranks=8"), (1,), local=True)
    check_fit(tiny(tmp_path, "ray.learner_ranks=8"), (1,), local=True, beside_teachers=False)


def test_a_placement_group_without_room_says_so_while_it_waits_then_gives_up(ray_session, tmp_path, capsys):
    from actors.cluster import ClusterError
    from actors.system import _placement

    with pytest.raises(ClusterError, match=r"no room for the placement group .*'GPU': 1.* after 2 s"):
        _placement(tiny(tmp_path, "ray.teacher_gpus=1"), wait_s=2, every_s=1)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[ray] waiting")]
    assert [ln.split(" s ")[0] for ln in lines] == ["[ray] waiting 1", "[ray] waiting 2"], lines
    assert ray_session.util.placement_group_table() and not any(  # removed, not left pending
        p["state"] == "PENDING" for p in ray_session.util.placement_group_table().values())


def test_actors_without_room_are_waited_for_with_a_line_until_they_start(ray_session):
    """On a cluster it joined, the job's actors may pend for want of CPUs (`check_fit` only says
    so once): `await_started` says what it waits for every ``every_s`` until they start; here two
    workers pend behind a blocker holding the Ray's free CPUs, which the first line kills. A
    constructor's error is raised, not waited on."""
    from actors.cluster import remote_cause
    from actors.common import await_started
    from kdtw.models import ModelError

    ray = ray_session

    @ray.remote
    class Held:
        def __init__(self, error=None):
            if error is not None:
                raise error

    free = ray.available_resources().get("CPU", 0.0)
    assert free > 0, ray.available_resources()
    blocker = Held.options(num_cpus=free).remote()
    await_started({"blocker": [blocker]})
    workers = [Held.options(num_cpus=free / 2).remote() for _ in range(2)]
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        ray.kill(blocker)

    learner = Held.options(num_cpus=0).remote()
    await_started({"learner": [learner]})  # started (a process start can take over a second): not named below
    await_started({"rollout worker": workers, "learner": [learner]}, every_s=1.0, log=log)
    assert lines and all(ln.startswith("[ray] waiting ") for ln in lines), lines  # workers take a while to start
    assert lines[0].startswith("[ray] waiting 1 s for 2 rollout workers to start (free now: 0 CPU, 0 GPU; "), lines
    assert "`ray status`" in lines[0], lines
    assert ray.get([w.__ray_ready__.remote() for w in workers]) == [True, True]
    for w in workers:
        ray.kill(w)
    with pytest.raises(Exception) as info:
        await_started({"learner": [Held.options(num_cpus=0).remote(ModelError("no such model"))]}, every_s=60)
    assert isinstance(remote_cause(info.value), ModelError), info.value


def test_the_driver_says_what_it_waits_for_on_a_replica_every_few_seconds(ray_session):
    """`get_with_lines` (the driver's wait on a validation or calibration on a teacher replica):
    a line every ``every_s`` while it waits, none for a quick answer, the remote error raised."""
    from actors.common import get_with_lines

    ray = ray_session

    @ray.remote(num_cpus=0)
    def slow(x, seconds):
        time.sleep(seconds)
        if x is None:
            raise ValueError("no such budget")
        return x

    lines: list[str] = []
    assert get_with_lines(slow.remote(7, 1.2), "[validate] decoding on teacher replica 0", log=lines.append,
                          every_s=0.3) == 7
    assert len(lines) >= 2 and all(re.fullmatch(r"\[validate\] decoding on teacher replica 0 \(\d+s\)", ln)
                                   for ln in lines), lines
    lines.clear()
    assert get_with_lines(slow.remote(8, 0.0), "quick", log=lines.append, every_s=30.0) == 8 and lines == []
    with pytest.raises(ValueError, match="no such budget"):
        get_with_lines(slow.remote(None, 0.0), "fails", log=lines.append, every_s=30.0)


def test_bad_input_raised_in_an_actor_constructor_is_one_line(ray_session, capsys):
    """An actor whose constructor refuses its input dies, and a call to it (here through another
    actor, as the pool calls a replica) fails with Ray's ActorDiedError, which keeps the
    constructor's error only as its first argument: `guarded` still prints that error as one line,
    status 2; a defect raised the same way keeps its traceback."""
    from actors.cluster import guarded, remote_cause
    from kdtw.models import ModelError

    ray = ray_session

    @ray.remote(num_cpus=0)
    class Refuses:
        def __init__(self, error):
            raise error

        def ping(self):
            return 1

    @ray.remote(num_cpus=0)
    class Asks:
        def __init__(self, other):
            self.other = other

        def ask(self):
            import ray

            return ray.get(self.other.ping.remote())

    bad = Asks.remote(Refuses.remote(ModelError("cannot load the weights in 'x': write it again")))
    with pytest.raises(Exception) as e:
        ray.get(bad.ask.remote())
    assert isinstance(remote_cause(e.value), ModelError)
    assert guarded(lambda: ray.get(bad.ask.remote())) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1] == "kdtw: error: cannot load the weights in 'x': write it again", err
    defect = Refuses.remote(ZeroDivisionError("a defect"))
    with pytest.raises(Exception) as e:
        guarded(lambda: ray.get(defect.ping.remote()))
    assert isinstance(remote_cause(e.value), ZeroDivisionError)


def test_an_error_raised_in_an_actor_is_one_line(tmp_path):
    """Bad input found inside the job's actors (here a learning rate that sends the weights past
    float range in Phase 2) ends the job with the cause as one line and status 2, not Ray's
    wrapped remote traceback, after report.json (which says where and why it stopped)."""
    proc = _job("--config", TINY, f"run_dir={tmp_path / 'run'}", *QUICK, "train.phase2_lr=1e30",
                "train.phase2_steps=6", "train.validate_every=1000", "ray.num_cpus=2")
    out, err = proc.communicate(timeout=300)
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert proc.returncode == 2, err[-3000:]
    assert last.startswith("kdtw: error: ") and "lower train.phase2_lr" in last and "ray::" not in last, err[-3000:]
    with open(tmp_path / "run" / "report.json") as f:
        stopped = json.load(f)["stopped"]
    assert stopped["phase"] == 2 and stopped["step"] < 6 and "train.phase2_lr" in stopped["error"]
