import sys, os, time, glob
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main/jobs")
import torch
import throughput as T
from kdtw.config import load_config
for f in glob.glob("/tmp/probe_*_*.txt"): os.remove(f)
run_dir = "/work/main/runs/bench_throughput"
user = [f"run_dir={run_dir}", "train.phase1_steps=0", "train.val_examples=2", "train.log_every=100000",
        "ray.checkpoint_every=0", "train.value_warmup_steps=0"]
extra = sys.argv[1:]
p1 = "/work/main/runs/bench_throughput_phase1"
N = 60
cfgp = "conf/default.yaml"
torch.set_num_threads(1)
loop = T.local_loop(load_config(cfgp, user), p1)
loop.learn(*loop.collect())
learn_ms = []
def hook(_s, _step):
    tr, de = loop.collect(); t = time.perf_counter(); loop.learn(tr, de); learn_ms.append(1000 * (time.perf_counter() - t))
import train_pcl
_orig = train_pcl.train
def _train(*a, hooks=None, **k):
    return _orig(*a, hooks=[*(hooks or []), hook], **k)
train_pcl.train = _train
r = T.ray_run(load_config(cfgp, user + [f"train.phase2_steps={N}", "train.validate_every=1000", "train.max_staleness=0", "ray.max_staleness=0", "ray.num_rollout_workers=1", "ray.num_teacher_replicas=1"] + extra), own_ray=True, phase1=p1)
torch.set_num_threads(1)
def stats(f):
    rows = [[float(x) for x in l.split()] for l in open(f)][5:]
    w = sum(x[1] for x in rows) / len(rows); tot = sum(x[2] for x in rows) / len(rows)
    return len(rows), w, tot
me = f"/tmp/probe_wait_{os.getpid()}.txt"
print("sync traj/s", round(r["traj_per_s"], 1), extra)
for f in glob.glob("/tmp/probe_wait_*.txt"):
    n, w, tot = stats(f)
    print(("local (driver, interleaved)" if f == me else "ray worker"), f"collect {tot:.0f} ms, of it demo wait/decode {w:.0f} -> rollouts {tot - w:.0f} (n={n})")
print(f"local learn {sum(learn_ms[5:])/len(learn_ms[5:]):.0f} ms")
for f in glob.glob("/tmp/probe_learn_*.txt"):
    rows = [[float(x) for x in l.split()] for l in open(f)][5:]
    print("ray learner ms: sample, learn, publish =", [round(sum(c)/len(c), 1) for c in zip(*rows)])
