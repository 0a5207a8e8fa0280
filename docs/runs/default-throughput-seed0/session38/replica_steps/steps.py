"""The replica's own work for one batch step of S teacher sessions of 2 rows each (conf/tiny.yaml's
teacher, one thread, `TeacherService._steps`): `python steps.py LABEL` prints ms a step for S = 1, 2, 8,
16 (40 steps each, after 3 warm-up steps) and the bytes the session store counts for one session;
`python steps.py LABEL --profile` then prints cProfile's top 25 by own time over 50 steps of 16 sessions.
Run from the repository root (PYTHONPATH=.)."""
import cProfile
import pstats
import random
import sys
import time
import uuid

import torch

from kdtw.config import load_config
from kdtw.factory import load_pair
from kdtw.teacher_service import TeacherService, _nbytes

torch.set_num_threads(1)
cfg = load_config("conf/tiny.yaml", [])
teacher, student = load_pair(cfg)
svc = TeacherService(teacher)
T = svc.teacher
rng = random.Random(0)


def open_sessions(n, rows):
    sids, reqs = [], []
    for _ in range(n):
        sid = uuid.uuid4().hex
        prompt = [[rng.randrange(5, T.vocab_size) for _ in range(rng.randrange(12, 20))] for _ in range(rows)]
        reqs.append((sid, prompt, 0, [[rng.randrange(5, T.vocab_size)] for _ in range(rows)], True, False, "rollout",
                     False, None))
        sids.append(sid)
    svc._steps(reqs)
    return sids


def step_reqs(sids, rows, start):
    return [(sid, None, start, [[rng.randrange(5, T.vocab_size)] for _ in range(rows)], True, False, "rollout", False,
             None) for sid in sids]


def steps(sids, start, k):
    for _ in range(k):
        svc._steps(step_reqs(sids, 2, start))
        start += 1
    return start


out = []
for n in (1, 2, 8, 16):
    sids = open_sessions(n, 2)
    start = steps(sids, 1, 3)
    t0 = time.perf_counter()
    steps(sids, start, 40)
    dt = (time.perf_counter() - t0) / 40
    out.append(f"{n}:{dt * 1000:.2f}")
    if n == 16:
        print("bytes of a session", svc.sessions.get(sids[0]).nbytes, _nbytes(svc.sessions.get(sids[0]).state))
    for s in sids:
        svc.sessions.pop(s)
print(sys.argv[1] if len(sys.argv) > 1 else "", " ".join(out))

if "--profile" in sys.argv:
    sids = open_sessions(16, 2)
    start = steps(sids, 1, 3)
    pr = cProfile.Profile()
    pr.enable()
    steps(sids, start, 50)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
