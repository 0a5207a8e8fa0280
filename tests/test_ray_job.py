"""`ray job submit` of jobs/train_pcl.py to a local head with token auth, dashboard on loopback;
the MLflow run it leaves has the λ and teacher-use metrics."""

from __future__ import annotations

import json
import os
import subprocess
import time

from conftest import ROOT
from conftest_ray import VENV_BIN, free_port, ray_env


def test_ray_job_submit_runs_train_pcl_and_logs_to_mlflow(tmp_path, monkeypatch):
    env = ray_env(dict(os.environ))
    env.pop("MLFLOW_TRACKING_URI", None)  # the job's default store, <run_dir>/mlflow.db, is what is checked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # undone after the test (set_tracking_uri below sets it)
    ray = os.path.join(VENV_BIN, "ray")
    gcs, dash = free_port(), free_port()
    run_dir = tmp_path / "run"  # absolute: the job runs in a copy of the working dir
    start = subprocess.run([ray, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
                            # own agent ports: another Ray on this machine holds the default ones
                            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                            "--disable-usage-stats"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        submit = [ray, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".", "--",
                  "python", "jobs/train_pcl.py", "--config", "conf/tiny.yaml", f"run_dir={run_dir}",
                  "train.phase1_steps=2", "train.phase2_steps=4", "train.validate_every=2", "train.val_examples=4",
                  "train.log_every=2", "train.max_staleness=1", "ray.num_rollout_workers=2", "ray.phase1_threads=2"]
        deadline = time.monotonic() + 120
        while True:
            job = subprocess.run(submit, env=env, cwd=ROOT, capture_output=True, text=True, timeout=480)
            log = job.stdout + job.stderr
            # the head answers before its job agent has registered on a loaded machine: wait for it
            if job.returncode == 0 or "No available agent" not in log or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0 and "succeeded" in log, log[-4000:]
        assert "[phase 1]" in log and "[phase 2] step 4/4" in log
        assert "(gloo, 2 torch thread(s) each)" in log
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{run_dir}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert "lambda/light" in m and "use_hat/light" in m
    assert any(k.startswith("teacher_use/") for k in m) and "loss" in m and "trajectories_per_s" in m
    assert "bc/loss" in m and "val/light/use" in m and "buffer_fill" in m and "teacher_batch_requests" in m
    assert run.data.params["ray.num_rollout_workers"] == "2"
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "report.json", "lambda_trace.png", "student"} <= arts
    assert os.path.exists(run_dir / "student" / "kdtw_student.json")
    # the Phase-1 rank ran with ray.phase1_threads (2), not the other roles' ray.torch_threads (1)
    from kdtw.phase1 import read_phase1

    assert read_phase1(str(run_dir / "phase1"))["torch_threads"] == 2


def test_train_bc_finds_models_under_a_relative_models_dir_and_resumes(tmp_path):
    """Ray Train ranks run in their own folders: a relative models_dir (conf/default.yaml's
    `models/default`) must still reach them (the job makes local paths absolute). A finished
    Phase 1 goes on with more steps (--resume); the profile run again into its folder is refused;
    jobs/train_pcl.py --phase1 <run_dir>/phase1 runs Phase 2 from it in that folder."""
    import sys

    env = ray_env(dict(os.environ))
    tiny = os.path.join(ROOT, "conf", "tiny.yaml")
    pre = subprocess.run(
        [sys.executable, "-m", "kdtw.cli", "pretrain", "--config", tiny, "models_dir=models",
         "pretrain.teacher_steps=2", "pretrain.student_steps=2", "pretrain.eval_examples=2"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert pre.returncode == 0, pre.stderr[-3000:]
    job = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "train_bc.py"), "--config", tiny, "models_dir=models",
         "run_dir=run", "teacher.source=pretrain", "student.source=pretrain", "train.phase1_steps=2",
         "ray.num_cpus=2"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert os.path.exists(tmp_path / "run" / "phase1" / "student" / "kdtw_student.json")
    # rank 0's progress lines reach the terminal once each, from the driver, without Ray's prefix
    lines = [x for x in (job.stdout + job.stderr).splitlines() if "[phase 1] step 2/2" in x]
    assert len(lines) == 1 and lines[0].startswith("[phase 1] step 2/2 bc loss"), lines
    # a finished Phase 1 goes on with more steps from its folder, in the same MLflow run
    more = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "train_bc.py"), "--resume", "run", "train.phase1_steps=3",
         "ray.num_cpus=2"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert more.returncode == 0, (more.stdout + more.stderr)[-4000:]
    assert "[phase 1] resumed at step 2/3" in more.stdout, more.stdout[-3000:]
    out = json.loads(more.stdout.strip().splitlines()[-1])
    assert out["mlflow_run_id"] == json.loads(job.stdout.strip().splitlines()[-1])["mlflow_run_id"]
    with open(tmp_path / "run" / "phase1" / "kdtw_phase1.json") as f:
        assert json.load(f)["steps"] == 3
    # the profile once more into that folder: refused before anything starts, the run kept
    again = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "train_bc.py"), "--config", tiny, "models_dir=models",
         "run_dir=run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "holds another run (phase1/, config.yaml)" in again.stderr, again.stderr
    assert f"train_bc.py --resume {tmp_path / 'run'}`" in again.stderr and "--overwrite" in again.stderr
    # Phase 2 from that Phase 1, in the same folder (docs/ray.md's "Phase 1 alone"): its phase1/ is
    # the job's input, not an earlier run's output
    pcl = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "train_pcl.py"), "--config", tiny, "--phase1", "run/phase1",
         "models_dir=models", "run_dir=run", "teacher.source=pretrain", "student.source=pretrain",
         "train.phase2_steps=2", "train.validate_every=1000", "train.val_examples=4", "ray.num_cpus=2"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert pcl.returncode == 0, (pcl.stdout + pcl.stderr)[-4000:]
    assert os.path.exists(tmp_path / "run" / "report.json")
    with open(tmp_path / "run" / "phase1" / "kdtw_phase1.json") as f:
        assert json.load(f)["steps"] == 3  # read, not rewritten


def test_phase1_step_benchmark_times_the_local_loop_and_the_ray_train_rank(tmp_path):
    """benchmarks/phase1_step.py runs both sides on one config and prints their seconds per step."""
    import re
    import sys

    env = ray_env(dict(os.environ))
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "phase1_step.py"), "--config",
         os.path.join(ROOT, "conf", "tiny.yaml"), "--steps", "3", "--warmup", "1", "--repeats", "1",
         "--run-dir", str(tmp_path / "bench"), "ray.num_cpus=2"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert re.search(r"single-process loop\s+run 1: \d+\.\d+ s/step \(steal \d+\.\d+ cores\)", run.stdout), run.stdout
    assert re.search(r"Ray Train rank\s+run 1: \d+\.\d+ s/step", run.stdout), run.stdout
    m = re.search(r"Ray Train rank (\d+\.\d+) s/step: (\d+\.\d+)x the local step", run.stdout)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, run.stdout
    assert not os.path.exists(tmp_path / "bench")  # its scratch runs are removed
