import sys, os, time, glob
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main/jobs")
import torch
import throughput as T
from kdtw.config import load_config
for f in glob.glob("/tmp/probe_*_*.txt"): os.remove(f)
run_dir = "/work/main/runs/bench_throughput"
user = [f"run_dir={run_dir}", "train.phase1_steps=0", "train.val_examples=2", "train.log_every=100000",
        "ray.checkpoint_every=0", "train.value_warmup_steps=0"]
extra = [a for a in sys.argv[1:]]
p1 = "/work/main/runs/bench_throughput_phase1"
steps = ["train.phase2_steps=40", "train.validate_every=400"]
cfgp = "conf/default.yaml"
def local(tag):
    torch.set_num_threads(1)
    loop = T.local_loop(load_config(cfgp, user), p1)
    loop.learn(*loop.collect())
    f = f"/tmp/probe_wait_{os.getpid()}.txt"
    if os.path.exists(f): os.remove(f)
    tc = tl = 0; n = 0
    for _ in range(40):
        t = time.perf_counter(); tr, de = loop.collect(); t1 = time.perf_counter(); loop.learn(tr, de); t2 = time.perf_counter()
        tc += t1 - t; tl += t2 - t1; n += len(tr) + len(de)
    w = sum(float(l.split()[1]) for l in open(f)) / 40
    os.remove(f)
    print(f"{tag}: {n/(tc+tl):.1f} traj/s; per step ms: rollouts {tc/40*1e3 - w:.0f}, demos {w:.0f}, learn {tl/40*1e3:.0f}", flush=True)
    return n/(tc+tl)
a = local("local")
r = T.ray_run(load_config(cfgp, user + steps + ["train.max_staleness=0", "ray.max_staleness=0", "ray.num_rollout_workers=1", "ray.num_teacher_replicas=1"] + extra), own_ray=True, phase1=p1)
print("sync", extra, round(r["traj_per_s"], 1), {k: round(v) for k, v in r["worker_ms"].items()}, [(k, round(v, 2)) for k, v in r["by_role"][:4]], flush=True)
for f in glob.glob("/tmp/probe_wait_*.txt"):
    rows = [l.split() for l in open(f)]
    v = [float(x[1]) for x in rows]
    print("  worker: demo wait ms per step", round(sum(v)/len(v), 1), "over", len(v))
for f in glob.glob("/tmp/probe_learn_*.txt"):
    rows = [[float(x) for x in l.split()] for l in open(f)][5:]
    print("  learner ms: sample, learn, publish =", [round(sum(c)/len(c), 1) for c in zip(*rows)])
b = local("local again")
print("sync / mean local", round(r["traj_per_s"] / ((a + b) / 2), 3))
