import random, time, torch
from kdtw.config import load_config
from kdtw.local import LocalLoop
from kdtw.rollout import teacher_demos, sample_tasks, collect
torch.set_num_threads(1)
cfg = load_config("conf/default.yaml")
loop = LocalLoop(cfg, log=lambda s: None)
T, tab = loop.teacher, loop.table
rng = random.Random(1); g = torch.Generator().manual_seed(1)
def demos(n, reps):
    t = time.perf_counter()
    for _ in range(reps):
        p, b, _ = sample_tasks(loop.train_set, tab, n, rng, cfg.task.instruction)
        teacher_demos(T, p, b, max_new_tokens=40, batch_size=50 * 8, generator=g)
    return time.perf_counter() - t
def col(reps):
    t = time.perf_counter()
    for _ in range(reps): collect(cfg, loop.student, T, loop.train_set, tab, rng=rng, gen=g, demo_gen=g, version=0)
    return time.perf_counter() - t
col(2); demos(8, 2)
r = {8: 0, 32: 0, 64: 0}; c = 0
for _ in range(3):
    r[8] += demos(8, 8); r[32] += demos(32, 2); r[64] += demos(64, 1); c += col(8)
print("one thread, seconds per rollout step (8 demonstrations), 24 steps each:")
for n, v in r.items(): print(f"  demonstrations decoded {n // 8} step(s) at a time: {v / 24:.3f} s")
print(f"  whole collect (24 student paths + 8 demonstrations, 1 step at a time): {c / 24:.3f} s")
