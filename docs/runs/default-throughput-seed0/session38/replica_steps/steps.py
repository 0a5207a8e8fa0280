import time, torch, random, uuid
torch.set_num_threads(1)
from kdtw.config import load_config
from kdtw.factory import load_pair
from kdtw.teacher_service import TeacherService
cfg = load_config("conf/tiny.yaml", [])
teacher, student = load_pair(cfg)
svc = TeacherService(teacher.lm if hasattr(teacher, "lm") else teacher)
T = svc.teacher
rng = random.Random(0)
def open_sessions(n, rows):
    sids = []
    reqs = []
    for i in range(n):
        sid = uuid.uuid4().hex
        prompt = [[rng.randrange(5, T.vocab_size) for _ in range(rng.randrange(12, 20))] for _ in range(rows)]
        reqs.append((sid, prompt, 0, [[rng.randrange(5, T.vocab_size)] for _ in range(rows)], True, False, "rollout", False, None))
        sids.append(sid)
    svc._steps(reqs)
    return sids
def step_reqs(sids, rows, start):
    return [(sid, None, start, [[rng.randrange(5, T.vocab_size)] for _ in range(rows)], True, False, "rollout", False, None) for sid in sids]
for n in (1, 2, 8, 16):
    sids = open_sessions(n, 2)
    start = 1
    for _ in range(3):  # warm
        svc._steps(step_reqs(sids, 2, start)); start += 1
    t0 = time.perf_counter(); k = 20
    for _ in range(k):
        svc._steps(step_reqs(sids, 2, start)); start += 1
    dt = (time.perf_counter() - t0) / k
    print(f"{n:>3} sessions x 2 rows: {dt*1000:.2f} ms per batch step ({dt*1000/n:.2f} ms a session)")
    for s in sids: svc.sessions.pop(s)
import cProfile, pstats
sids = open_sessions(16, 2); start = 1
for _ in range(3):
    svc._steps(step_reqs(sids, 2, start)); start += 1
pr = cProfile.Profile(); pr.enable()
for _ in range(50):
    svc._steps(step_reqs(sids, 2, start)); start += 1
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
