import os, time, threading, subprocess

def procs():
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit(): continue
        try:
            st = open(f"/proc/{p}/stat").read()
            cmd = open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:70]
        except OSError:
            continue
        f = st[st.rindex(")")+2:].split()
        out[p] = (cmd, int(f[11]) + int(f[12]))
    return out

def tasks(pid):
    out = {}
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            st = open(f"/proc/{pid}/task/{t}/stat").read()
            f = st[st.rindex(")")+2:].split()
            out[t] = (st[st.index("(")+1:st.rindex(")")], int(f[11]) + int(f[12]))
    except OSError:
        pass
    return out

def diff(a, b, dt):
    agg = {}
    for k, (n, c) in b.items():
        if k in a:
            agg[n] = agg.get(n, 0) + (c - a[k][1]) / 100 / dt
    return sorted(((v, n) for n, v in agg.items() if v > 0.004), reverse=True)

def watch(pattern="RayTrainWorker", start=25, span=40):
    def run():
        pid = None
        while pid is None:
            for p, (cmd, _) in procs().items():
                if pattern in cmd: pid = p
            time.sleep(0.5)
        time.sleep(start)
        a, ta, t = procs(), tasks(pid), time.time()
        time.sleep(span)
        b, tb, dt = procs(), tasks(pid), time.time() - t
        print("   PROCS:", "; ".join(f"{n.strip()[:50]}={v:.3f}" for v, n in diff(a, b, dt)), flush=True)
        print("   RANK THREADS:", "; ".join(f"{n}={v:.3f}" for v, n in diff(ta, tb, dt)), flush=True)
    threading.Thread(target=run, daemon=True).start()
