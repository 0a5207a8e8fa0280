import asyncio, os, socket, struct, sys, tempfile, time, json
import numpy as np, ray

@ray.remote(num_cpus=0, max_concurrency=1000)
class Pool:
    def __init__(self):
        self.path = None
    async def serve(self):
        d = tempfile.mkdtemp(prefix="mbpool-")
        self.path = os.path.join(d, "s")
        async def handle(r, w):
            try:
                while True:
                    hdr = await r.readexactly(4)
                    n, = struct.unpack("!I", hdr)
                    body = await r.readexactly(n)
                    out = await self.step(json.loads(body))
                    a = np.zeros((2, 64), np.float32).tobytes()
                    h = json.dumps({"n": len(a)}).encode()
                    w.write(struct.pack("!II", len(h), len(a)) + h + a)
                    await w.drain()
            except asyncio.IncompleteReadError:
                pass
        self.srv = await asyncio.start_unix_server(handle, self.path)
        return self.path
    async def step(self, payload):
        await asyncio.sleep(0)
        return np.zeros((2, 64), np.float32)

@ray.remote(num_cpus=0)
class Client:
    def __init__(self, pool, path):
        self.pool, self.path = pool, path
    def run_ray(self, n):
        t = time.perf_counter()
        for i in range(n):
            ray.get(self.pool.step.remote(["sid", None, i, [[1, 2, 3]], True, False, "rollout", True, None]))
        return (time.perf_counter() - t) / n
    def run_sock(self, n):
        s = socket.socket(socket.AF_UNIX); s.connect(self.path)
        t = time.perf_counter()
        for i in range(n):
            b = json.dumps(["sid", None, i, [[1, 2, 3]], True, False, "rollout", True, None]).encode()
            s.sendall(struct.pack("!I", len(b)) + b)
            hl, al = struct.unpack("!II", self._rx(s, 8)); h = json.loads(self._rx(s, hl)); a = np.frombuffer(self._rx(s, al), np.float32)
        return (time.perf_counter() - t) / n
    def _rx(self, s, n):
        buf = bytearray()
        while len(buf) < n:
            c = s.recv(n - len(buf))
            if not c: raise EOFError
            buf += c
        return bytes(buf)

ray.init(num_cpus=12, include_dashboard=False, logging_level="error")
pool = Pool.remote(); path = ray.get(pool.serve.remote())
for N in (1, 8):
    cs = [Client.remote(pool, path) for _ in range(N)]
    ray.get([c.run_ray.remote(50) for c in cs]); ray.get([c.run_sock.remote(50) for c in cs])
    for rep in range(2):
        t = time.perf_counter(); r = ray.get([c.run_ray.remote(400) for c in cs]); tr = time.perf_counter() - t
        t = time.perf_counter(); s = ray.get([c.run_sock.remote(400) for c in cs]); ts = time.perf_counter() - t
        print(f"N={N} ray {1e3*np.mean(r):.3f} ms/rt ({N*400/tr:.0f} req/s)  sock {1e3*np.mean(s):.3f} ms/rt ({N*400/ts:.0f} req/s)", flush=True)
    for c in cs: ray.kill(c)
ray.shutdown()
