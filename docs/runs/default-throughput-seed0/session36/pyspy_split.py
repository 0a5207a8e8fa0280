"""Shares of a py-spy raw profile (``py-spy record --native -f raw``): busy samples (stacks whose
last frames wait: epoll, condition variables, locks, sleeps, left out), and of them kdtw's code
(the deepest kdtw/ or actors/ frame not calling straight into Ray), the model's forward within it,
and the rest (Ray, asyncio). Usage: python pyspy_split.py pyspy_pool.raw.gz pyspy_worker.raw.gz
"""

import gzip
import sys

IDLE = ("epoll_wait", "pthread_cond_wait", "pthread_cond_timedwait", "select_epoll", "condition_variable::wait",
        "PyThread_acquire_lock", "futex", "nanosleep", "poll (", "Event.wait", "Condition.wait", "sem_wait", "recv")

for path in sys.argv[1:]:
    busy = ours = model = 0
    for line in gzip.open(path, "rt"):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, n = line.rsplit(" ", 1)
        n, frames = int(n), stack.split(";")
        if any(any(w in f for w in IDLE) for f in frames[-6:]):
            continue
        busy += n
        k = [i for i, f in enumerate(frames) if ("kdtw/" in f or "actors/" in f) and ".py:" in f]
        if k and not any("ray/" in f or "_raylet" in f for f in frames[k[-1] + 1 : k[-1] + 3]):
            ours += n
            model += n if any("models.py" in f for f in frames) else 0
    print(f"{path}: {busy} busy samples; kdtw's code {ours / busy:.2f} (the model's forward {model / busy:.2f}), "
          f"Ray and asyncio {(busy - ours) / busy:.2f}")
