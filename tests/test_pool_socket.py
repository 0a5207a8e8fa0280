"""The teacher pool's socket (actors/pool_socket.py) without Ray: the wire format round-trips what
the pool sends and refuses what it does not, and a server in its own event loop answers
clients, refuses a wrong token, reports a handler's error and leaves ``close`` unanswered."""

from __future__ import annotations

import asyncio
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from actors.pool_socket import (
    SocketClient,
    WireError,
    decode,
    encode,
    new_address,
    serve,
)

scalars = st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.floats(allow_nan=False) | st.text(max_size=8)
arrays = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.bool_]),
                    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
values = st.recursive(scalars | arrays, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=5).filter(lambda k: k != "__nd__"), inner, max_size=3),
                      max_leaves=12)


def split(frame: bytes) -> tuple[bytes, bytes]:
    h, b = struct.unpack("!II", frame[:8])
    assert len(frame) == 8 + h + b
    return frame[8 : 8 + h], frame[8 + h :]


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and \
            np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


@settings(max_examples=150, deadline=None)
@given(values)
def test_a_frame_round_trips(value):
    out = decode(*split(encode(value)))
    assert same(value, out)
    for x in [out] if isinstance(out, np.ndarray) else []:
        x[...] = x  # writable


def test_the_pool_answers_round_trip():
    """A session step's answer (logits or None, log p or None), a miss, a scoring answer."""
    step = (np.arange(12, dtype=np.float32).reshape(3, 4), None)
    got = decode(*split(encode({"id": 3, "ok": step})))
    assert got["id"] == 3 and np.array_equal(got["ok"][0], step[0]) and got["ok"][1] is None
    assert decode(*split(encode({"id": 1, "ok": "miss"}))) == {"id": 1, "ok": "miss"}
    assert decode(*split(encode([np.float32(0.5), np.int64(7)]))) == [0.5, 7]


def test_what_does_not_travel_is_refused():
    with pytest.raises(WireError, match="object"):
        encode(np.array([object()], dtype=object))
    with pytest.raises(WireError, match="set"):
        encode({1, 2})
    with pytest.raises(WireError, match="reserved"):
        encode({"__nd__": 1})
    head, blob = split(encode(np.zeros(4, np.float32)))
    with pytest.raises(WireError, match="past its frame"):
        decode(head, blob[:-1])
    with pytest.raises(WireError, match="dtype"):
        decode(b'{"__nd__":[0,"object",[1]]}', b"\0" * 8)
    with pytest.raises(WireError, match="not a frame"):
        decode(b"\x80not json", b"")


class Server:
    """`serve` in an event loop of its own thread, with a handler that records what it got."""

    def __init__(self, handle) -> None:
        self.address = new_address()
        self.token = "t0ken"
        self.loop = asyncio.new_event_loop()
        self.errors: list = []  # what the loop would log: exceptions no task handled
        self.loop.set_exception_handler(lambda _, ctx: self.errors.append(ctx))
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(serve(self.address, self.token, handle))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def stop(self) -> None:
        async def down():  # the connections of clients gone meanwhile see their end
            self.server.close()
            await asyncio.sleep(0.2)

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_server_answers_its_clients_and_refuses_a_wrong_token():
    seen = []

    async def handle(op, args, client):
        seen.append((op, args, client))
        if op == "boom":
            raise ValueError("no such session")
        if op == "slow":
            await asyncio.sleep(0.05)
        return {"client": client, "logits": np.full((2, 3), float(args[0]), np.float32)}

    srv = Server(handle)
    try:
        clients = [SocketClient(srv.address, srv.token, f"w{i}", timeout_s=10) for i in range(4)]
        results = {}

        def work(i, c):
            results[i] = [c.call("slow" if k % 2 else "step", i * 10 + k) for k in range(5)]

        threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        for i in range(4):
            assert [r["client"] for r in results[i]] == [f"w{i}"] * 5
            assert [float(r["logits"][0, 0]) for r in results[i]] == [i * 10 + k for k in range(5)]
        with pytest.raises(RuntimeError, match="ValueError: no such session"):
            clients[0].call("boom", 1)
        clients[0].send("close", "sid-1")  # not answered: the next call gets its own answer
        assert float(clients[0].call("step", 99)["logits"][1, 2]) == 99
        assert ("close", ["sid-1"], "w0") in seen
        intruder = SocketClient(srv.address, "wrong", "x", timeout_s=10)
        with pytest.raises(ConnectionError):
            intruder.call("step", 1)
        assert all(c != "x" for _, _, c in seen)
        for c in clients:
            c.shut()
    finally:
        srv.stop()


def test_a_client_that_goes_away_mid_request_leaves_the_server_serving():
    """A client killed while its request is being answered (a rollout worker killed mid-step):
    the answer has nowhere to go, nothing fails in the server's loop, and others are served."""
    started = threading.Event()

    async def handle(op, args, client):
        if op == "slow":
            started.set()
            await asyncio.sleep(0.3)
        return np.arange(3, dtype=np.int64) + args[0]

    srv = Server(handle)
    try:
        for _ in range(3):
            gone = SocketClient(srv.address, srv.token, "gone", timeout_s=10)
            gone.sock.sendall(encode({"id": 1, "op": "slow", "args": [0]}))
            assert started.wait(10)
            started.clear()
            gone.shut()
        time.sleep(0.5)  # the slow answers were due meanwhile
        other = SocketClient(srv.address, srv.token, "other", timeout_s=10)
        assert other.call("step", 5).tolist() == [5, 6, 7]
        other.shut()
    finally:
        srv.stop()
    assert srv.errors == []
