"""Is a call sent right after ``ray.kill(actor, no_restart=False)`` answered by the old process?

Session 35 (2026-12-05), this 2-core machine, two runs of 20 kills per delay:
no delay: 20 and 18 answered by the old process (2 ActorUnavailableError);
1 ms: 3 and 1 old (the rest ActorUnavailableError); 10 ms: none old.
So a test that kills a replica and goes on at once may still talk to the old one: the replica-kill
session test in tests/test_ray_system.py waits for a new pid. Run: .venv/bin/python docs/probes/ray_kill_race.py
"""
import collections
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from conftest_ray import ray_env

ray_env()
import ray

ray.init(num_cpus=2, include_dashboard=False, logging_level="error", runtime_env={"env_vars": {"PYTHONPATH": ROOT}})


@ray.remote(max_restarts=-1)
class P:
    def pid(self):
        return os.getpid()


for delay in (0.0, 0.001, 0.01):
    out = collections.Counter()
    for _ in range(20):
        a = P.options(num_cpus=0).remote()
        p0 = ray.get(a.pid.remote())
        ray.kill(a, no_restart=False)
        if delay:
            time.sleep(delay)
        try:
            out["old process answered" if ray.get(a.pid.remote()) == p0 else "new process answered"] += 1
        except Exception as e:  # noqa: BLE001
            out[type(e).__name__] += 1
        ray.kill(a)
    print(f"delay {delay}: {dict(out)}", flush=True)
ray.shutdown()
