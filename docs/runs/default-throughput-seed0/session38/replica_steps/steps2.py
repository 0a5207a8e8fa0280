import time, torch, random, uuid, sys
torch.set_num_threads(1)
from kdtw.config import load_config
from kdtw.factory import load_pair
from kdtw.teacher_service import TeacherService, _nbytes
cfg = load_config("conf/tiny.yaml", [])
teacher, student = load_pair(cfg)
svc = TeacherService(teacher)
T = svc.teacher
rng = random.Random(0)
def open_sessions(n, rows):
    sids, reqs = [], []
    for i in range(n):
        sid = uuid.uuid4().hex
        prompt = [[rng.randrange(5, T.vocab_size) for _ in range(rng.randrange(12, 20))] for _ in range(rows)]
        reqs.append((sid, prompt, 0, [[rng.randrange(5, T.vocab_size)] for _ in range(rows)], True, False, "rollout", False, None))
        sids.append(sid)
    svc._steps(reqs)
    return sids
def step_reqs(sids, rows, start):
    return [(sid, None, start, [[rng.randrange(5, T.vocab_size)] for _ in range(rows)], True, False, "rollout", False, None) for sid in sids]
out = []
for n in (1, 2, 8, 16):
    sids = open_sessions(n, 2); start = 1
    for _ in range(3):
        svc._steps(step_reqs(sids, 2, start)); start += 1
    t0 = time.perf_counter(); k = 40
    for _ in range(k):
        svc._steps(step_reqs(sids, 2, start)); start += 1
    dt = (time.perf_counter() - t0) / k
    out.append(f"{n}:{dt*1000:.2f}")
    if n == 16:
        print("bytes of a session", svc.sessions.get(sids[0]).nbytes, _nbytes(svc.sessions.get(sids[0]).state))
    for s in sids: svc.sessions.pop(s)
print(sys.argv[1], " ".join(out))
