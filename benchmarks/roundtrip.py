"""One teacher round trip's Ray overhead by payload size, side by side in one run.

    python benchmarks/roundtrip.py [--vocab 3713] [--rows 24] [--calling 4] [--n 200]

A stand-in replica returns next-token logits of ``--rows`` rows (a whole decode batch, what a
session step sent before 2026-12-02) or of ``--calling`` rows (what it sends now: the rows that
call the teacher at that step), each through an asyncio pass-through actor (the teacher pool's
hop) and straight to the replica. No model runs: this is serialisation and transport alone, on a
local Ray with 2 CPUs. Prints milliseconds a call and the ratios."""

from __future__ import annotations

import argparse
import time

import numpy as np
import ray


@ray.remote(num_cpus=0)
class Replica:
    def run(self, rows: int, vocab: int):
        return np.zeros((rows, vocab), np.float32), np.zeros((rows, 3), np.float32)


@ray.remote(num_cpus=0, max_concurrency=100)
class Pool:
    def __init__(self, replica) -> None:
        self.replica = replica

    async def step(self, rows: int, vocab: int):
        return await self.replica.run.remote(rows, vocab)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=3713, help="conf/default.yaml's actions; SmolLM2: 49153")
    ap.add_argument("--rows", type=int, default=24, help="a rollout batch's on-policy rows (default profile)")
    ap.add_argument("--calling", type=int, default=4)
    ap.add_argument("--n", type=int, default=200, help="calls per measurement")
    a = ap.parse_args(argv)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        replica = Replica.remote()
        pool = Pool.remote(replica)
        res: dict = {}
        for _ in range(2):  # alternated twice; the second pass is kept (the first warms up)
            for rows in (a.rows, a.calling):
                for name, call in (("pool", lambda r: pool.step.remote(r, a.vocab)),
                                   ("direct", lambda r: replica.run.remote(r, a.vocab))):
                    for _ in range(20):
                        ray.get(call(rows))
                    t = time.perf_counter()
                    for _ in range(a.n):
                        ray.get(call(rows))
                    res[(rows, name)] = (time.perf_counter() - t) / a.n * 1e3
        for rows in (a.rows, a.calling):
            kb = rows * a.vocab * 4 / 1024
            print(f"{rows:3d} rows ({kb:7.0f} KB of logits): through the pool {res[(rows, 'pool')]:6.2f} ms, "
                  f"straight to the replica {res[(rows, 'direct')]:6.2f} ms")
        print(f"{a.calling} rows against {a.rows}: through the pool "
              f"{res[(a.calling, 'pool')] / res[(a.rows, 'pool')]:.2f}x the time")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
