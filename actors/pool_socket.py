"""The teacher pool's fast lane: session steps, closes and scoring from clients on the pool's own
node go over a Unix socket into the pool's event loop instead of one Ray actor task each.

Why: at N = 8 rollout workers against a 50 ms teacher the pool is the serial point of every
batch cycle, and 93% of its busy time was Ray's actor-task machinery (docs/runs/
default-throughput-seed0/session36/). Measured here (2026-12-05, two cores; session37/): an async
actor that answers at once, round trip 1.27 ms as a Ray actor call against 0.056 ms over a socket
with one client, 1,380 against 16,000-18,000 requests/s with eight (`transport_probe.py`); the
real pool and a conf/tiny.yaml replica (`benchmarks/pool_socket.py`), 1.35-1.42x the requests/s
with one client and 1.47-1.73x with eight.

The wire format runs no code: a frame is ``!II`` (header bytes, blob bytes), a JSON header, then
the blobs of the numpy arrays the header names (``{"__nd__": [offset, dtype, shape]}``, a fixed
set of dtypes). A client proves itself with the pool's random token first (the socket lives in
Linux's abstract namespace, or in a private temp folder elsewhere). A client on another node, or
one whose socket broke, goes through Ray actor calls as before: same answers, same pool state.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

DTYPES = frozenset({"float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool"})
_HEAD = struct.Struct("!II")
MAX_FRAME = 1 << 31  # a header or blob past this is a broken stream, not a message


class WireError(ValueError):
    """A frame that is not this protocol's."""


def encode(obj: Any) -> bytes:
    """One frame holding ``obj``: JSON-able values, tuples (as lists), numpy arrays and scalars."""
    blobs: list[bytes] = []
    offset = 0

    def walk(x):
        nonlocal offset
        if isinstance(x, np.ndarray):
            if x.dtype.name not in DTYPES:
                raise WireError(f"arrays of dtype {x.dtype} do not travel on the pool's socket")
            b = np.ascontiguousarray(x).tobytes()
            blobs.append(b)
            ref = {"__nd__": [offset, x.dtype.name, list(x.shape)]}
            offset += len(b)
            return ref
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            if "__nd__" in x:
                raise WireError("a dict key '__nd__' is reserved by the pool's wire format")
            return {str(k): walk(v) for k, v in x.items()}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise WireError(f"{type(x).__name__} does not travel on the pool's socket")

    head = json.dumps(walk(obj), separators=(",", ":")).encode()
    blob = b"".join(blobs)
    return _HEAD.pack(len(head), len(blob)) + head + blob


def decode(head: bytes, blob: bytes) -> Any:
    """The value `encode` framed (arrays come back as writable copies)."""

    def walk(x):
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            if "__nd__" in x:
                off, dtype, shape = x["__nd__"]
                if dtype not in DTYPES:
                    raise WireError(f"dtype {dtype!r} is not one the pool's socket carries")
                n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                if off < 0 or off + n > len(blob):
                    raise WireError("an array runs past its frame")
                return np.frombuffer(blob, dtype=dtype, count=n // np.dtype(dtype).itemsize,
                                     offset=off).reshape(shape).copy()
            return {k: walk(v) for k, v in x.items()}
        return x

    try:
        return walk(json.loads(head))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise WireError(f"not a frame of the pool's socket: {e}") from e


def _sizes(raw: bytes) -> tuple[int, int]:
    h, b = _HEAD.unpack(raw)
    if h > MAX_FRAME or b > MAX_FRAME:
        raise WireError(f"frame of {h} + {b} bytes")
    return h, b


def new_address() -> str:
    """A fresh socket address: in Linux's abstract namespace (nothing on disk), elsewhere in a
    private temp folder (0700: this user only)."""
    name = f"kdtw-pool-{os.getpid()}-{secrets.token_hex(6)}"
    if sys.platform.startswith("linux"):
        return "\0" + name
    return os.path.join(tempfile.mkdtemp(prefix="kdtw-pool-"), "s")


async def serve(address: str, token: str, handle: Callable[[str, list, Any], Awaitable[Any]]) -> asyncio.AbstractServer:
    """Serve frames at ``address`` in the running loop: a connection sends ``{"token", "client"}``
    first, then ``{"id", "op", "args"}`` requests; ``await handle(op, args, client)`` answers each
    (``{"id", "ok"}``, or ``{"id", "err"}`` when it raised), except ``close``, which is not answered.
    Requests of one connection run concurrently; a client that goes away is forgotten."""

    async def read(r: asyncio.StreamReader):
        h, b = _sizes(await r.readexactly(_HEAD.size))
        return decode(await r.readexactly(h), await r.readexactly(b))

    async def connection(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tasks: set[asyncio.Task] = set()
        lock = asyncio.Lock()

        async def answer(msg: dict, client) -> None:
            op = msg.get("op")
            try:
                out = {"id": msg.get("id"), "ok": await handle(op, msg.get("args") or [], client)}
            except Exception as e:  # the caller raises it
                out = {"id": msg.get("id"), "err": f"{type(e).__name__}: {e}"}
            if op == "close":
                return
            try:
                frame = encode(out)
            except WireError as e:
                frame = encode({"id": msg.get("id"), "err": str(e)})
            async with lock:
                if w.is_closing():
                    return  # the client went away (a killed worker): nobody to answer
                try:
                    w.write(frame)
                    await w.drain()
                except ConnectionError:
                    return

        try:
            hello = await read(r)
            if not isinstance(hello, dict) or not secrets.compare_digest(str(hello.get("token", "")), token):
                return
            client = hello.get("client")
            while True:
                msg = await read(r)
                if not isinstance(msg, dict):
                    return
                t = asyncio.get_running_loop().create_task(answer(msg, client))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, WireError):
            pass
        finally:
            w.close()

    return await asyncio.start_unix_server(connection, address)


class SocketClient:
    """Blocking requests to `serve`'s socket, one at a time (a lock: threads may share it)."""

    def __init__(self, address: str, token: str, client: Any, timeout_s: float | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(address)
        self.lock = threading.Lock()
        self.next_id = 0
        self.sock.sendall(encode({"token": token, "client": client}))

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the teacher pool closed its socket")
            buf += chunk
        return bytes(buf)

    def call(self, op: str, *args) -> Any:
        with self.lock:
            self.next_id += 1
            self.sock.sendall(encode({"id": self.next_id, "op": op, "args": list(args)}))
            h, b = _sizes(self._read(_HEAD.size))
            msg = decode(self._read(h), self._read(b))
        if not isinstance(msg, dict) or msg.get("id") != self.next_id:
            raise WireError("an answer out of turn on the teacher pool's socket")
        if "err" in msg:
            raise RuntimeError(f"teacher pool: {msg['err']}")
        return msg["ok"]

    def send(self, op: str, *args) -> None:
        """A request that gets no answer (``close``)."""
        with self.lock:
            self.sock.sendall(encode({"id": 0, "op": op, "args": list(args)}))

    def shut(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
