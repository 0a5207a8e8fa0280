import sys, time, os
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch
torch.set_num_threads(1)
from throughput import local_loop, ROOT
from kdtw.config import load_config
run_dir = os.path.join(ROOT, "runs", "bench_throughput")
cfg = load_config("conf/default.yaml", [f"run_dir={run_dir}", "train.phase1_steps=0", "train.val_examples=2",
      "train.log_every=100000", "ray.checkpoint_every=0", "train.value_warmup_steps=0"])
loop = local_loop(cfg, os.path.join(run_dir + "_phase1"))
loop.learn(*loop.collect())
tc = tl = 0.0; n = 0
for _ in range(40):
    t0 = time.perf_counter(); trajs, demos = loop.collect(); t1 = time.perf_counter()
    loop.learn(trajs, demos); t2 = time.perf_counter()
    tc += t1 - t0; tl += t2 - t1; n += len(trajs) + len(demos)
print(f"collect {tc/40*1e3:.0f} ms/step, learn {tl/40*1e3:.0f} ms/step, {n/40:.0f} paths/step, {n/(tc+tl):.1f} traj/s", "trajs", len(trajs), "demos", len(demos))
