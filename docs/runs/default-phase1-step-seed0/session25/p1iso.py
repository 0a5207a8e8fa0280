import json, os, shutil, sys, threading, time
ROOT = "/work/main"
sys.path.insert(0, ROOT); sys.path.insert(0, ROOT + "/benchmarks")
os.chdir(ROOT)
from kdtw.config import load_config
from phase1_step import local_run, ray_run, per_step, stolen
from throughput import cpu_jiffies

STEPS, WARM = int(os.environ.get("STEPS", 30)), 8

def thread_run(cfg, warmup):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", local_run(cfg, warmup)))
    t.start(); t.join()
    return out["r"]

NICE = False
def actor_run(cfg, warmup, **env):
    import ray
    from actors.cluster import session
    with session(cfg) as _:
        @ray.remote(num_cpus=cfg.ray.learner_cpus, runtime_env={"env_vars": env} if env else None)
        def go(cfg, renice=NICE):
            import os as _o
            if renice: _o.nice(-_o.nice(0))
            import sys; sys.path.insert(0, ROOT); sys.path.insert(0, ROOT + "/benchmarks")
            from phase1_step import local_run
            import os
            import gc, threading
            print("PYSTATE", sys.getswitchinterval(), sys.gettrace(), sys.getprofile(), gc.isenabled(), gc.get_threshold(), [t.name for t in threading.enumerate()], flush=True)
            sys.path.insert(0, "/tmp/iso")
            from thr import with_threads
            return with_threads(local_run)(cfg, warmup), dict((k, os.environ.get(k)) for k in ("OMP_NUM_THREADS", "MALLOC_ARENA_MAX", "LD_PRELOAD")), os.nice(0)
        r, e, nice = ray.get(go.remote(cfg))
        print("   actor env", e, "nice", nice, flush=True)
        return r

def localray_run(cfg, warmup):
    from actors.cluster import session
    import subprocess
    with session(cfg) as _:
        time.sleep(5)
        snap = lambda: {l.split()[0]: (l.split()[1], l.split(None, 2)[2][:60]) for l in subprocess.run(["ps", "-eo", "pid,cputimes,args"], capture_output=True, text=True).stdout.splitlines()[1:]}
        a = snap(); t = time.time()
        r = with_threads(local_run)(cfg, warmup)
        b = snap(); dt = time.time() - t
        for pid, (c, name) in b.items():
            if pid in a and int(c) - int(a[pid][0]) > 0: print(f"      {name:60s} {(int(c)-int(a[pid][0]))/dt:.3f} cores", flush=True)
        return r

sys.path.insert(0, '/tmp/iso')
from thr import threads, with_threads
modes = sys.argv[1].split(",")
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 1
for i in range(reps):
    for m in modes:
        rd = f"/tmp/iso/run_{m}{i}"
        shutil.rmtree(rd, ignore_errors=True)
        cfg = load_config("conf/default.yaml", [f"train.phase1_steps={STEPS}", "ray.checkpoint_every=0", f"run_dir={rd}"]).with_absolute_paths()
        globals()["NICE"] = m == "actornice0"
        if m in ('rank', 'new', 'old'):
            import watch; watch.watch()
        import actors.phase1_rank as pr
        if not hasattr(pr, "_new_relay"): pr._new_relay = pr._relay
        if m == "old":
            os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"
            def _relay(lines, log, stop):
                from ray.util.queue import Empty
                while True:
                    try: log(lines.get(timeout=0.5))
                    except Empty:
                        if stop.is_set(): return
                    except Exception: return
            pr._relay = _relay
        else:
            os.environ.pop("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None)
            pr._relay = pr._new_relay
        fn = {"old": ray_run, "new": ray_run, "localray": localray_run, "actornice0": actor_run, "local": with_threads(local_run), "thread": thread_run, "actor": actor_run, "rank": ray_run}[m]
        t = time.time()
        s, st = fn(cfg, WARM)
        print(f"{m:8s} rep {i}: {s:.3f} s/step steal {st:.2f} (wall {time.time()-t:.0f} s)", flush=True)
