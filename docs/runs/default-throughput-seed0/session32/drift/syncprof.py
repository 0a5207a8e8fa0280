import sys, os, subprocess, threading, time
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "jobs"); sys.path.insert(0, ".")
from throughput import ray_run, ROOT
from kdtw.config import load_config
run_dir = os.path.join(ROOT, "runs", "bench_throughput")
user = [f"run_dir={run_dir}", "train.phase1_steps=0", "train.val_examples=2", "train.log_every=100000",
        "ray.checkpoint_every=0", "train.value_warmup_steps=0"]
cfg = load_config("conf/default.yaml", [*user, "train.phase2_steps=150", "train.validate_every=1500", "train.max_staleness=0",
      "ray.max_staleness=0", "ray.num_rollout_workers=1", "ray.num_teacher_replicas=1"])
def prof():
    time.sleep(35)
    out = subprocess.run("ps -eo pid,args", shell=True, capture_output=True, text=True).stdout
    procs = []
    for line in out.splitlines():
        for role in ("RolloutWorker", "LearnerActor"):
            if f"ray::{role}" in line:
                procs.append((role, line.split()[0]))
    print("procs", procs, flush=True)
    ps = [subprocess.Popen(["/work/main/.venv/bin/py-spy", "record", "-p", pid, "-d", "12", "-r", "50", "-f", "raw", "-o", f"/tmp/prof_{role}.txt"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for role, pid in procs]
    for p in ps: p.wait()
#threading.Thread(target=prof, daemon=True).start()
r = ray_run(cfg, own_ray=True, phase1=run_dir + "_phase1")
print(r["traj_per_s"], r["worker_ms"])
