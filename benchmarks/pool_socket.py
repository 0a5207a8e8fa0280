"""The teacher pool's two transports side by side in one run: session steps over the pool's Unix
socket (actors/pool_socket.py) against the same requests as Ray actor calls.

    RAY_AUTH_MODE=token python benchmarks/pool_socket.py [--clients 1,8] [--sessions 20] [--steps 15]

The real `TeacherPool` in front of one real `TeacherActor` of ``--config`` (conf/tiny.yaml: a
forward takes about a millisecond, so the transport's cost shows), no added latency. N client
actors each run ``--sessions`` teacher sessions (a prompt of ``--batch`` rows, ``--steps`` steps of
one token each with logits and log p back, then a close) through a `PoolClient`, all at once;
the transports alternate, twice, and the second pass is printed (the first warms up). Prints
requests per second through the pool, each client's mean round trip, the pool's batches, and the
ratios socket / actor calls."""

from __future__ import annotations

import argparse
import os
import sys
import time

import ray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kdtw.config import load_config


@ray.remote(num_cpus=0)
class Client:
    def __init__(self, pool, name: str, socket: bool) -> None:
        from actors.teacher_pool import PoolClient

        self.client = PoolClient(pool, name, socket=socket)

    def run(self, sessions: int, steps: int, batch: int) -> dict:
        import uuid

        rows = [[5 + (i % 7), 9, 11, 3] for i in range(batch)]
        n = 0
        t0 = time.perf_counter()
        for _ in range(sessions):
            sid = uuid.uuid4().hex
            self.client.step(sid, rows, 0, [[7]] * batch, True, False, "rollout", True, None)
            for k in range(1, steps + 1):
                out = self.client.step(sid, None, k, [[7]] * batch, True, k == steps, "rollout", True, None)
                assert not isinstance(out, str), out  # a miss: the session was not kept
            n += steps + 1
        return {"requests": n, "seconds": time.perf_counter() - t0, "socket": self.client.via_socket,
                "ray": self.client.via_ray}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "conf", "tiny.yaml"))
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4, help="rows per session")
    a = ap.parse_args(argv)
    from actors.teacher import TeacherActor
    from actors.teacher_pool import TeacherPool

    cfg = load_config(a.config, ["ray.teacher_latency_ms=0"])
    ns = [int(x) for x in a.clients.split(",")]
    ray.init(num_cpus=max(ns) + 4, include_dashboard=False, log_to_driver=False, logging_level="error",
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        replica = TeacherActor.options(num_cpus=0).remote(cfg, 0)
        pool = TeacherPool.remote([replica], max_batch=cfg.ray.teacher_max_batch,
                                  max_wait_ms=cfg.ray.teacher_max_wait_ms)
        ray.get(pool.spec.remote())
        res: dict = {}
        for n in ns:
            for _ in range(2):  # alternated twice; the second pass is kept
                for socket in (True, False):
                    clients = [Client.remote(pool, f"c{socket}{n}{i}", socket) for i in range(n)]
                    ray.get([c.run.remote(1, 2, a.batch) for c in clients])  # connected, warm
                    ray.get(pool.stats.remote(reset=True))
                    t0 = time.perf_counter()
                    out = ray.get([c.run.remote(a.sessions, a.steps, a.batch) for c in clients])
                    wall = time.perf_counter() - t0
                    batch = ray.get(pool.stats.remote(reset=True))["batch"]
                    assert all((o["socket"] > 0) == socket and (o["ray"] > 0) != socket for o in out), out
                    res[n, socket] = {"per_s": sum(o["requests"] for o in out) / wall,
                                      "rt_ms": 1e3 * sum(o["seconds"] / o["requests"] for o in out) / n,
                                      "per_batch": batch["requests_per_batch"]}
                    for c in clients:
                        ray.kill(c)
        print(f"\n{os.cpu_count()} CPU cores; {os.path.relpath(a.config, ROOT)} teacher, one replica, no added latency; "
              f"{a.sessions} sessions of {a.steps + 1} requests a client, {a.batch} rows each")
        print("   clients   transport     requests/s   round trip ms   requests per teacher batch")
        for n in ns:
            for socket in (True, False):
                r = res[n, socket]
                print(f"   {n:7d}   {'socket' if socket else 'actor call':10s}   {r['per_s']:11.0f}   {r['rt_ms']:13.2f}"
                      f"   {r['per_batch']:.2f}")
            s, c = res[n, True], res[n, False]
            print(f"   {n:7d}   socket / actor calls: {s['per_s'] / c['per_s']:.2f}x requests/s, "
                  f"{s['rt_ms'] / c['rt_ms']:.2f}x round trip")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
