"""Where a teacher round trip's time goes at N = 1 and N = 8 (session 36).

Reads the logs `timing_probe.patch` writes (/tmp/prof/pool.<pid>.log: ``req`` t client gap kind,
``ans`` t client, ``batch`` t0 t1 requests; /tmp/prof/worker.<pid>.log: t_send t_answer since_last
start close), from one `benchmarks/throughput.py --skip-compare --workers 1,8` run: the first pool
log (by pid) is N = 1's, the second N = 8's; the first worker log N = 1's, the rest N = 8's.
Usage: tar xzf timing_logs.tar.gz && python timing_split.py prof
All times are CLOCK_MONOTONIC (one clock for every process on the machine).
"""

import bisect
import glob
import os
import sys


def q(xs):
    xs = sorted(xs)
    n = len(xs)
    return f"n={n} p10={xs[n // 10] * 1e3:.1f} p50={xs[n // 2] * 1e3:.1f} p90={xs[9 * n // 10] * 1e3:.1f} mean={sum(xs) / n * 1e3:.1f} ms"


def main(folder):
    pid = lambda f: int(os.path.basename(f).split(".")[1])  # noqa: E731
    pools = sorted(glob.glob(f"{folder}/pool.*.log"), key=pid)
    workers = sorted(glob.glob(f"{folder}/worker.*.log"), key=pid)
    for n, pf, wfs in [(1, pools[0], workers[:1]), (8, pools[1], workers[1:])]:
        own, rt, calls = [], [], []
        for wf in wfs:
            for r in (line.split() for line in open(wf)):
                t0, t1, since, start = float(r[0]), float(r[1]), float(r[2]), int(r[3])
                calls.append((t0, t1))
                rt.append(t1 - t0)
                if start > 0 and 0 <= since < 0.03:  # between two steps of one session
                    own.append(since)
        rows = [line.split() for line in open(pf)]
        gaps = [float(r[3]) for r in rows if r[0] == "req" and r[4] == "None" and 0 <= float(r[3]) < 0.03]
        batches = [(float(r[1]), float(r[2])) for r in rows if r[0] == "batch"]
        answers = sorted(float(r[1]) for r in rows if r[0] == "ans")
        requests = sorted(float(r[1]) for r in rows if r[0] == "req")
        sent, back = [], []
        for t0, t1 in calls:
            i = bisect.bisect_left(requests, t0)
            if i < len(requests) and requests[i] - t0 < 0.05:
                sent.append(requests[i] - t0)
            j = bisect.bisect_right(answers, t1) - 1
            if j >= 0 and t1 - answers[j] < 0.05:
                back.append(t1 - answers[j])
        print(f"N = {n}")
        print("  the worker's own work between two steps of a session:", q(own))
        print("  the pool's gap from a mid-session answer to that worker's next request:", q(gaps))
        print("  the worker's round trip (ray.get):", q(rt))
        print("  the pool's call to the replica (50 ms sleep + forward):", q([b - a for a, b in batches]))
        print("  worker sends -> the pool's batcher has the request:", q(sent))
        print("  the pool's batcher answers -> the worker has it:", q(back))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "prof")
