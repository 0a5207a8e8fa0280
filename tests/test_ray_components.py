"""The Ray system's Ray-free parts (kdtw/teacher_service.py, kdtw/checkpoint.py, kdtw/phase1.py,
the compact replay buffer): remote-teacher parity, dynamic batching, routing, checkpoints,
data-parallel Phase 1, and the import rule (no ray/mlflow under kdtw/)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import subprocess
import sys
import time
from collections import deque

import pytest
import torch

from conftest import PROMPTS, ROOT
from conftest_ray import free_port, tiny
from kdtw.buffer import ReplayBuffer
from kdtw.checkpoint import CheckpointError, load_state, open_checkpoint, save_state, write_checkpoint
from kdtw.decoding import generate
from kdtw.local import LocalLoop
from kdtw.rollout import DemoQueue, collect, demo_batch_size, demo_generator, prompt_ids, score_paths, start_demos
from kdtw.teacher_service import MISS, DynamicBatcher, LocalClient, RemoteTeacher, Router, TeacherService, next_logits
from kdtw.trajectory import Trajectory


def test_kdtw_imports_neither_ray_nor_mlflow():
    code = ("import sys, kdtw.teacher_service, kdtw.checkpoint, kdtw.phase1, kdtw.buffer, kdtw.local, kdtw.cli; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}); print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


# ----------------------------------------------------------------------------- remote teacher


def _proxy(teacher, student, **kw):
    service = TeacherService(teacher, **kw)
    return RemoteTeacher(LocalClient(service), student.lm.tokenizer, service.spec()), service


def test_remote_teacher_decodes_and_scores_like_the_local_one(pair):
    teacher, student = pair
    proxy, service = _proxy(teacher, student, max_batch=2)  # max_batch 2: merged requests split in chunks
    for kw in ({"mode": "budgeted", "tau_bias": 6.0}, {"mode": "teacher"}):
        for sample in (False, True):
            a = generate(student, teacher, PROMPTS, max_new_tokens=8, do_sample=sample, teacher_do_sample=sample,
                         generator=torch.Generator().manual_seed(3), **kw)
            b = generate(student, proxy, PROMPTS, max_new_tokens=8, do_sample=sample, teacher_do_sample=sample,
                         generator=torch.Generator().manual_seed(3), **kw)
            assert a.tokens == b.tokens and a.call_mask == b.call_mask
            assert any(map(any, a.call_mask))
    paths = a.tokens
    local = score_paths(teacher, PROMPTS, paths)
    remote = proxy.score_paths(PROMPTS, paths)
    for x, y in zip(local, remote):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-6)
    # rows with different prefix lengths in one forward = one forward per row
    rows = [[3, 4, 5], [6], [7, 8]]
    prefixes = [[9, 10], [], [11, 12, 13]]
    merged = next_logits(teacher, rows, prefixes)
    for i in range(3):
        alone = next_logits(teacher, rows[i : i + 1], prefixes[i : i + 1])
        assert torch.allclose(merged[i], alone[0], atol=1e-5)
    tokens = service.run_batch("token", [(rows, prefixes, False)])[0]
    assert tokens == merged.argmax(-1).tolist()
    # top-k scoring: each request its own k, in one forward; the path's own log p unchanged
    p_rows = [[3, 4], [5]]
    two, three = service.run_mixed([("topk", (p_rows[:1], paths[:1], 2)), ("topk", (p_rows[1:], paths[1:2], 3))])
    (lp, ids, tl), = two
    assert len(ids) == len(paths[0]) and all(len(r) == 2 for r in ids) and all(len(r) == 3 for r in three[0][1])
    alone = service.run_batch("score", [(p_rows[:1], paths[:1])])[0][0]
    assert torch.allclose(torch.tensor(lp), torch.tensor(alone), atol=1e-5)
    assert all(a >= b for r in tl for a, b in zip(r, r[1:])) and max(max(r) for r in tl) <= 0


@pytest.mark.parametrize("extra", [[], ["train.decoded_per_budget=1", "decoding.call_rule=systematic"],
                                   ["train.phase2_demo_steps=3"]])
def test_collect_through_a_remote_teacher_is_the_local_loops_collect(tmp_path, extra):
    """`kdtw.rollout.collect` with the teacher behind a client (worker 0 of the Ray loop) makes
    `LocalLoop.collect`'s batch: same streams, same paths, same teacher log-probs (also with
    λ probes decoded as validation decodes them, train.decoded_per_budget, and with the
    demonstrations of 3 steps decoded at once, train.phase2_demo_steps)."""
    cfg = tiny(tmp_path, "train.phase1_steps=0", *extra)
    steps = cfg.train.phase2_demo_steps
    loop = LocalLoop(cfg, log=lambda _: None)
    student = copy.deepcopy(loop.student)
    proxy, service = _proxy(loop.teacher, student)
    d = cfg.decoding

    def on_replica(prompts, bids, gen):  # what RolloutWorker does through the pool
        trajs, state = service.demos(prompts, bids, max_new_tokens=d.max_new_tokens, batch_size=demo_batch_size(cfg, steps),
                                     gen_state=gen.get_state())

        def wait():
            gen.set_state(state)
            return trajs

        return wait

    streams = {fn: (random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed), demo_generator(cfg.seed),
                    DemoQueue(steps)) for fn in (None, on_replica)}
    for _ in range(2 if steps == 1 else steps + 1):  # more batches: the streams go on in step
        l_trajs, l_demos = loop.collect()
        for fn, (rng, gen, dgen, queue) in streams.items():
            trajs, demos = collect(cfg, student, proxy, loop.train_set, loop.table, rng=rng, gen=gen, demo_gen=dgen,
                                   version=0, demos_elsewhere=fn, demo_queue=queue)
            trained = [t for t in trajs if not t.decoded]  # λ probes come on top of the batch
            assert len(trained) + len(demos) == cfg.train.batch_size and len(demos) == len(l_demos) > 0
            for a, b in zip(trajs + demos, l_trajs + l_demos):
                assert (a.source_ids, a.budget_id, a.tokens, a.actions_tau, a.origin, a.decoded) == \
                       (b.source_ids, b.budget_id, b.tokens, b.actions_tau, b.origin, b.decoded)
                assert a.teacher_logp == b.teacher_logp and a.behaviour_logp == b.behaviour_logp
    assert len(service.sessions) == 0  # every rollout closed its session
    assert any(t.decoded for t in l_trajs) == ("train.decoded_per_budget=1" in extra)


def test_demonstrations_decoded_ahead_resume_exactly_and_carry_the_version_they_are_handed_out_at(tmp_path):
    """train.phase2_demo_steps=3: a collector decodes three steps' demonstrations at once and
    hands them out one step's at a time, each labelled with the version of the step that takes
    it. A collector stopped after the first of three (its streams and `DemoQueue.state` through a
    state file, as a Ray checkpoint keeps a worker's) resumes with the same batches."""
    cfg = tiny(tmp_path, "train.phase1_steps=0", "train.phase2_demo_steps=3")
    loop = LocalLoop(cfg, log=lambda _: None)

    def streams():
        return random.Random(5), torch.Generator().manual_seed(5), demo_generator(5), DemoQueue(3)

    def run(s, versions):
        rng, gen, dgen, queue = s
        return [collect(cfg, loop.student, loop.teacher, loop.train_set, loop.table, rng=rng, gen=gen, demo_gen=dgen,
                        version=v, demo_queue=queue) for v in versions]

    def key(batch):
        trajs, demos = batch
        return [(t.source_ids, t.tokens, t.actions_tau, t.teacher_logp, t.behaviour_logp, t.origin, t.policy_version)
                for t in trajs + demos]

    ref = run(streams(), range(7))
    n_demo = round(cfg.train.batch_size * cfg.train.demo_ratio)
    assert n_demo > 0 and all(len(d) == n_demo for _, d in ref)
    assert [{t.policy_version for t in d} for _, d in ref] == [{v} for v in range(7)]
    assert all(t.origin == "teacher_demo" and not any(t.actions_tau) for _, d in ref for t in d)
    group = [t.source_ids for _, d in ref[:3] for t in d]  # one decode, three steps' distinct draws
    assert len({tuple(x) for x in group}) > n_demo

    s = streams()
    assert key(run(s, [0])[0]) == key(ref[0])
    rng, gen, dgen, queue = s
    path = str(tmp_path / "worker.pt")
    save_state({"rng": rng.getstate(), "gen": gen.get_state(), "demo_gen": dgen.get_state(),
                "demos_ahead": queue.state()}, path)
    st = load_state(path)
    assert st["demos_ahead"]["taken"] == 1 and len(st["demos_ahead"]["prompts"]) == 3 * n_demo
    rng, gen, dgen, queue = streams()
    rng.setstate(st["rng"])
    gen.set_state(st["gen"])
    queue.restore(st["demos_ahead"], lambda p, b, g: start_demos(cfg, loop.teacher, p, b, g, steps=3)(), dgen)
    assert torch.equal(dgen.get_state(), st["demo_gen"])  # the decode leaves the stream where it was saved
    assert [key(b) for b in run((rng, gen, dgen, queue), range(1, 7))] == [key(b) for b in ref[1:]]
    with pytest.raises(ValueError, match="resume with train.phase2_demo_steps=3"):
        DemoQueue(2).restore(st["demos_ahead"], lambda p, b, g: [], dgen)


def _real_output_positions(paths: list[list[int]], batch_size: int) -> int:
    """Output positions a scored rollout feeds the teacher: every token up to its EOS, except the
    last token of the longest row of each decode batch (scored, never fed)."""
    out = 0
    for s in range(0, len(paths), batch_size):
        chunk = paths[s : s + batch_size]
        T = max(map(len, chunk))
        out += sum(min(len(p), T - 1) for p in chunk)
    return out


def test_teacher_sessions_compute_each_position_once_and_survive_a_lost_session(pair):
    """Through a session, a rollout costs the teacher its prompt once plus one position per output
    token (calls and scoring together), where resending the prefix at every call cost O(T²); a
    replica that lost the session (evicted or restarted) answers MISS and the client's resend of
    the whole prefix gives the same paths and log-probs."""
    teacher, student = pair
    prompts = PROMPTS * 2

    def rollouts(t, seed=5):  # what student_rollouts decodes, with calls made likely
        return generate(student, t, prompts, max_new_tokens=10, batch_size=4, do_sample=True, teacher_do_sample=True,
                        tau_bias=3.0, score_teacher=True, generator=torch.Generator().manual_seed(seed))

    ref = rollouts(teacher)
    service = TeacherService(teacher)
    sent = []  # (rows of logits sent back, rows in the batch) per answered step

    class Recording(LocalClient):
        def step(self, sid, rows, start, tokens, *rest):
            res = super().step(sid, rows, start, tokens, *rest)
            if res[0] is not None:
                sent.append((len(res[0]), len(tokens)))
            return res

    proxy = RemoteTeacher(Recording(service), student.lm.tokenizer, service.spec())
    got = rollouts(proxy)
    assert any(map(any, got.call_mask)) and not all(map(all, got.call_mask))
    assert got.tokens == ref.tokens and got.teacher_logp == ref.teacher_logp
    # a call step sends back the logits of its calling rows only, not the whole batch's
    assert sent and all(0 < n <= b for n, b in sent) and any(n < b for n, b in sent)
    src = sum(map(len, prompt_ids(teacher, prompts)))
    assert service.positions["rollout"] == src + _real_output_positions(got.tokens, 4)
    assert len(service.sessions) == 0

    class Forgetful(LocalClient):  # the replica loses the session at every third step
        steps = 0

        def step(self, sid, rows, start, tokens, *rest):
            Forgetful.steps += 1
            if Forgetful.steps % 3 == 0:
                self.service.sessions.pop(sid)
            return super().step(sid, rows, start, tokens, *rest)

    lossy = TeacherService(teacher)
    proxy2 = RemoteTeacher(Forgetful(lossy), student.lm.tokenizer, lossy.spec())
    again = rollouts(proxy2)
    assert proxy2.misses > 0 and lossy.misses == proxy2.misses
    assert again.tokens == ref.tokens and again.call_mask == ref.call_mask
    for a, b in zip(again.teacher_logp, ref.teacher_logp):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    # a step the replica cannot continue is a miss, not a wrong answer
    assert lossy.step("nope", None, 3, [[1]] * 2) == MISS


def test_session_store_evicts_the_least_recently_used_within_its_bytes(pair):
    teacher, student = pair
    service = TeacherService(teacher, cache_mb=1e-9)  # room for one session only
    proxy = RemoteTeacher(LocalClient(service), student.lm.tokenizer, service.spec())
    ids, mask = teacher.encode_prompts(PROMPTS)
    s1, s2 = proxy.start(ids, mask), proxy.start(ids, mask)
    x = torch.tensor([[5], [6], [7]])
    proxy.extend_logp(s1, x)
    proxy.extend_logp(s2, x)  # evicts s1
    assert len(service.sessions) == 1 and service.sessions.evictions == 1 and service.sessions.bytes > 0
    last, lp = proxy.extend_logp(s1, x)  # s1's replica state is gone: resent whole, same answer
    assert proxy.misses == 1
    fresh = teacher.start(ids, mask)
    ref_last, ref_lp = teacher.extend_logp(fresh, torch.cat([x, x], 1))
    assert torch.allclose(last, ref_last, atol=1e-5) and torch.allclose(lp, ref_lp[:, 1:], atol=1e-5)
    proxy.close(s1)
    proxy.close(s2)
    assert len(service.sessions) == 0 and service.sessions.bytes == 0


# ----------------------------------------------------------------------------- batching, routing


def test_dynamic_batcher_merges_waits_and_fails_together():
    calls: list[list] = []

    async def run(payloads):
        calls.append(payloads)
        await asyncio.sleep(0.05)
        if "boom" in payloads:
            raise RuntimeError("replica down")
        return [p * 10 for p in payloads]

    async def scenario():
        # four clients at once, four expected: one batch, long before max_wait
        b = DynamicBatcher(run, max_batch=100, max_wait_s=2.0, expected=4)
        t0 = time.monotonic()
        out = await asyncio.gather(*(b.submit(i, 1, client=i) for i in range(4)))
        assert out == [0, 10, 20, 30] and len(calls) == 1 and time.monotonic() - t0 < 1.0
        # max_batch in sequences: 3-row requests pair up under max_batch=6
        calls.clear()
        b = DynamicBatcher(run, max_batch=6, max_wait_s=0.01)
        await asyncio.gather(*(b.submit(i, 3) for i in range(4)))
        assert [len(c) for c in calls] == [2, 2]
        # one slot busy: requests arriving meanwhile leave together as soon as it frees
        calls.clear()
        b = DynamicBatcher(run, max_batch=100, max_wait_s=0.0, slots=1)
        t0 = time.monotonic()
        first = asyncio.ensure_future(b.submit(0, 1))
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(b.submit(i, 1)) for i in range(1, 6)]
        await asyncio.sleep(0)  # the five are queued now
        t1 = time.monotonic()
        await asyncio.gather(first, *rest)
        assert [len(c) for c in calls] == [1, 5]
        st = b.stats.as_dict()
        assert st["requests_per_batch"] == 3.0
        # the five arrived while the first was answered (50 ms from t0): each queued behind the
        # busy replica for the rest of that answer, then left at once (max_wait 0); the first
        # queued for neither
        assert 5 * (t0 + 0.05 - t1) - 0.01 <= st["behind_s"] <= st["queued_s"] <= st["behind_s"] + 0.1
        assert st["behind_s"] > 0
        # the clients of the last batch are waited for; a client that stays away is not, twice
        calls.clear()
        b = DynamicBatcher(run, max_batch=100, max_wait_s=0.3)
        await asyncio.gather(b.submit(0, 1, client="a"), b.submit(1, 1, client="b"))

        async def late(x, client, delay):
            await asyncio.sleep(delay)
            return await b.submit(x, 1, client=client)

        t0 = time.monotonic()
        await asyncio.gather(late(0, "a", 0.0), late(1, "b", 0.06))
        assert [len(c) for c in calls] == [2, 2] and time.monotonic() - t0 < 0.25
        t0 = time.monotonic()
        await b.submit(0, 1, client="a")  # "b" comes back fast as a rule: waited for, max_wait ...
        assert time.monotonic() - t0 >= 0.3
        assert b.stats.timeouts == 1 and b.stats.wait_s >= 0.3 and b.stats.serve_s >= 3 * 0.05 - 0.01
        t0 = time.monotonic()
        await b.submit(0, 1, client="a")  # ... once: "b" was not in the last batch
        assert time.monotonic() - t0 < 0.2 and [len(c) for c in calls] == [2, 2, 1, 1]
        b._answered["c"], b._gap[("c", None)], b._prev = time.monotonic(), 5.0, {"a", "c"}
        t0 = time.monotonic()
        await b.submit(0, 1, client="a")  # "c" usually takes 5 s to come back: not waited for
        assert time.monotonic() - t0 < 0.2
        # a failed batch fails every caller in it
        b = DynamicBatcher(run, max_batch=100, max_wait_s=0.02)
        res = await asyncio.gather(b.submit("boom", 1), b.submit("x", 1), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in res)

    asyncio.run(scenario())


def test_dynamic_batcher_does_not_wait_for_a_client_whose_session_ended():
    """A client's gap until its next request depends on what its last one was (measured in the
    scaling runs: ~10 ms inside a session and after a one-step scoring session, 30-112 ms after a
    demonstration session ended, and such batches left at max_wait): the gap is learnt per
    kind of request, so a batch waits for the client only where it comes back soon; `end` (a
    close sent apart from the last step) sets the kind and wakes a waiting batch."""
    calls: list[list] = []

    async def run(payloads):
        calls.append(payloads)
        await asyncio.sleep(0.01)
        return payloads

    async def scenario():
        b = DynamicBatcher(run, max_batch=100, max_wait_s=0.3)

        async def late(client, delay, kind=None):
            await asyncio.sleep(delay)
            return await b.submit(client, 1, client=client, kind=kind)

        async def timed(*coros):
            t0 = time.monotonic()
            await asyncio.gather(*coros)
            return time.monotonic() - t0

        await timed(late("a", 0), late("b", 0))
        assert await timed(late("a", 0), late("b", 0.02)) < 0.2  # mid-session: "b" waited for (one batch)
        assert len(calls[-1]) == 2
        await timed(late("a", 0), late("b", 0, kind="last"))
        # the first time after an ended session "b" is due (nothing measured yet): max_wait, then alone
        assert await timed(late("a", 0), late("b", 0.35)) >= 0.3 and [len(c) for c in calls[-2:]] == [1, 1]
        assert b._gap[("b", "last")] >= 0.35 and b._gap[("b", None)] < 0.1
        await timed(late("a", 0), late("b", 0, kind="last"))
        # "b" takes 0.35 s after a session: "a" is not kept waiting for it
        a_time, _ = await asyncio.gather(timed(late("a", 0)), late("b", 0.35))
        assert a_time < 0.2
        await timed(late("a", 0), late("b", 0))  # "b" in a session again: waited for
        assert len(calls[-1]) == 2
        # a close sent apart from the last step (`end`): due the first time, its 0.35 s then learnt
        b.end("b")
        await asyncio.gather(late("a", 0), late("b", 0.35))
        # alternating kinds, each with its own gap: back within 0.03 s after a one-step session
        for _ in range(2):
            await timed(late("a", 0), late("b", 0, kind="only"))
            await timed(late("a", 0), late("b", 0.03))  # waited for (the second time by its gap)
            assert len(calls[-1]) == 2
        assert 0.02 < b._gap[("b", "only")] < 0.2 and b._gap[("b", "closed")] >= 0.3

        async def close_b(delay):
            await asyncio.sleep(delay)
            b.end("b")

        # a batch waiting on "b" mid-session leaves when its close arrives, and "a" goes on alone
        assert await timed(late("a", 0), close_b(0.05)) < 0.2 and len(calls[-1]) == 1
        a_time, _ = await asyncio.gather(timed(late("a", 0)), late("b", 0.35))
        assert a_time < 0.2

    asyncio.run(scenario())


def test_router_retries_elsewhere_and_prefers_the_least_loaded():
    r = Router(3, cooldown_s=60)
    r.load = [2, 0, 1]
    seen = []

    async def fn(i):
        seen.append(i)
        if i == 1:
            raise ConnectionError("dead replica")
        return i

    assert asyncio.run(r.call(fn, 1, (ConnectionError,))) == 2  # 1 (least loaded) fails, then 2
    assert seen == [1, 2] and r.failures == 1 and r.retries == 1 and r.load == [2, 0, 1]
    assert r.pick(set()) == 2  # replica 1 cools down after its failure


# ----------------------------------------------------------------------------- replay buffer


class ListBuffer:
    """The original list-of-records buffer (reference semantics for the compact one)."""

    def __init__(self, capacity, ratio, stale, seed):
        self.cap, self.ratio, self.stale, self.rng = capacity, ratio, stale, random.Random(seed)
        self.items = {"student": deque(), "teacher_demo": deque()}

    def tokens(self):
        return sum(len(t) for q in self.items.values() for t in q)

    def add(self, trajs):
        for t in trajs:
            self.items[t.origin].append(t)
        n = 0
        while self.tokens() > self.cap:
            self.items[max(self.items, key=lambda k: len(self.items[k]))].popleft()
            n += 1
        return n

    def drop_stale(self, version):
        self.items["student"] = deque(t for t in self.items["student"] if version - t.policy_version <= self.stale)

    def sample(self, n, version, newest):
        self.drop_stale(version)
        nd = round(n * self.ratio)
        s, d = list(self.items["student"]), list(self.items["teacher_demo"])
        if newest:
            return s[len(s) - (n - nd):] + (d[len(d) - nd:] if nd else [])
        return self.rng.sample(s, n - nd) + self.rng.sample(d, nd)


def _rand_traj(rng, version, *, big=False):
    T = rng.randint(1, 14)
    origin = "student" if rng.random() < 0.7 else "teacher_demo"
    hi = 200_000 if big else 150
    prompt = [rng.randrange(hi) for _ in range(rng.randint(1, 6))]
    return Trajectory(source_ids=prompt, budget_id=rng.randrange(6), tokens=[rng.randrange(hi) for _ in range(T)],
                      actions_tau=[origin == "student" and rng.random() < 0.3 for _ in range(T)],
                      behaviour_logp=[float(torch.tensor(-rng.random() * 5).float()) for _ in range(T)],
                      teacher_logp=[float(torch.tensor(-rng.random() * 9).float()) for _ in range(T)],
                      origin=origin, policy_version=version, worker_id=rng.randrange(4),
                      greedy_tau=[rng.random() < 0.2 for _ in range(T)] if origin == "student" and rng.random() < .8 else [])


def _key(t):
    return (t.source_ids, t.budget_id, t.tokens, t.actions_tau, t.behaviour_logp, t.teacher_logp, t.origin,
            t.policy_version, t.worker_id, t.greedy_tau)


@pytest.mark.parametrize("big", [False, True])
def test_compact_buffer_behaves_like_the_list_buffer(big, tmp_path):
    rng = random.Random(7)
    new = ReplayBuffer(capacity_tokens=300, demo_ratio=0.25, max_staleness=2, batch_size=8, seed=1)
    ref = ListBuffer(300, 0.25, 2, seed=1)
    for version in range(60):
        batch = [_rand_traj(rng, version, big=big) for _ in range(rng.randint(1, 9))]
        assert new.add(batch) == ref.add(batch)
        assert new.tokens == ref.tokens() and new.counts() == {k: len(v) for k, v in ref.items.items()}
        new.drop_stale(version)
        ref.drop_stale(version)
        assert new.counts() == {k: len(v) for k, v in ref.items.items()}
        if new.ready(8) and rng.random() < 0.7:
            newest = rng.random() < 0.3
            got = new.sample(8, current_version=version, take_newest=newest)
            want = ref.sample(8, version, newest)
            assert [_key(t) for t in got] == [_key(t) for t in want]
    path = str(tmp_path / "b.parquet")
    new.save(path)
    again = ReplayBuffer(capacity_tokens=300, demo_ratio=0.25, max_staleness=2, batch_size=8)
    again.load(path)
    assert [_key(t) for t in again.all()] == [_key(t) for t in new.all()]


def test_buffer_bytes_per_token_is_small():
    rng = random.Random(0)
    buf = ReplayBuffer(capacity_tokens=200_000, demo_ratio=0.25, max_staleness=10, batch_size=8)
    # the tiny task's prompts: a head per budget (phrase + instruction) and a 1-8 word source
    heads = [[1] + [rng.randrange(150) for _ in range(11)] for _ in range(6)]
    for v in range(1500):
        batch = []
        for _ in range(8):
            t = _rand_traj(rng, v)
            t.source_ids = rng.choice(heads) + [rng.randrange(150) for _ in range(rng.randint(1, 8))] + [2]
            batch.append(t)
        buf.add(batch)
    assert buf.nbytes() / buf.tokens <= 16, buf.nbytes() / buf.tokens
    assert len(buf._heads.rows) < 100  # heads are shared, not one per prompt


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_atomic_verified_and_pruned(tmp_path):
    def writer(text):
        def write(folder):
            os.makedirs(os.path.join(folder, "sub"))
            with open(os.path.join(folder, "sub", "a.txt"), "w") as f:
                f.write(text)
            return {"mlflow_run_id": "abc"}
        return write

    for step in (3, 6, 9):
        write_checkpoint(str(tmp_path), step, writer(f"s{step}"), keep=2)
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["latest", "step_0000006", "step_0000009"]
    ckpt, manifest = open_checkpoint(str(tmp_path))
    assert ckpt.endswith("step_0000009") and manifest["step"] == 9 and manifest["mlflow_run_id"] == "abc"
    assert open_checkpoint(os.path.join(tmp_path, "checkpoints", "step_0000006"))[1]["step"] == 6
    with open(os.path.join(ckpt, "sub", "a.txt"), "a") as f:
        f.write("!")
    with pytest.raises(CheckpointError, match="corrupt: sub/a.txt does not match its checksum"):
        open_checkpoint(ckpt)
    notes = []  # the run folder falls back to the newest intact checkpoint, saying so
    assert open_checkpoint(str(tmp_path), log=notes.append)[1]["step"] == 6 and "does not match" in notes[0]
    meta = os.path.join(tmp_path, "checkpoints", "step_0000006", "kdtw_checkpoint.json")
    with open(meta, "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="corrupt: unreadable"):
        open_checkpoint(os.path.dirname(meta))
    with pytest.raises(CheckpointError, match="corrupt: sub/a.txt does not match its checksum"):
        open_checkpoint(str(tmp_path))  # none intact: the error of the one `latest` names
    with pytest.raises(CheckpointError, match="does not exist: give a run folder"):
        open_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="not a kdtw checkpoint"):
        open_checkpoint(str(tmp_path / "checkpoints"))


# ----------------------------------------------------------------------------- data-parallel Phase 1

RANK_SCRIPT = """
import hashlib, json, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from conftest_ray import tiny
from kdtw.phase1 import run_phase1
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
cfg = tiny({run!r}, "train.phase1_steps=3", "train.batch_size=8")
losses = []
loop = run_phase1(cfg, rank=rank, world=2, log=lambda _: None, on_metrics=lambda s, m: losses.append(m["bc/loss"]))
h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in loop.student.parameters())).hexdigest()
print(json.dumps({{"rank": rank, "hash": h, "batch": loop.cfg.train.batch_size, "steps": loop.learner.step}}))
dist.destroy_process_group()
"""


def test_data_parallel_phase1_keeps_ranks_identical(tmp_path):
    script = RANK_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), port=free_port(), run=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0]["hash"] == outs[1]["hash"]  # the same weights on both ranks after 3 steps
    assert outs[0]["batch"] == 4 and outs[0]["steps"] == 3  # each rank: half of the global batch


def test_cluster_yaml_is_a_valid_launcher_file_with_loopback_dashboard_and_token_auth():
    import importlib.util

    import jsonschema
    import yaml

    ray_dir = os.path.dirname(importlib.util.find_spec("ray").origin)  # without importing ray here
    with open(os.path.join(ray_dir, "autoscaler", "ray-schema.json")) as f:
        schema = json.load(f)

    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        text = f.read()
    cluster = yaml.safe_load(text)
    jsonschema.validate(cluster, schema)
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cluster["worker_start_ray_commands"])
    assert any("gpu" in k for k in cluster["available_node_types"])


@pytest.mark.parametrize("floor", [False, True])
def test_the_teacher_latency_is_slept_before_the_answer_or_makes_up_its_whole_time(pair, monkeypatch, floor):
    """``latency_s`` (the benchmark knob): slept in full before each answered batch, or
    (``latency_floor``) after it, for what the answer's own time left of it; a batch of session
    closes only waits for nothing."""
    import kdtw.teacher_service as ts

    teacher, _ = pair
    slept: list[float] = []
    monkeypatch.setattr(ts.time, "sleep", slept.append)
    ticks = iter(range(100))
    monkeypatch.setattr(ts.time, "perf_counter", lambda: 0.25 * next(ticks))  # each reading 0.25 s after the last
    service = TeacherService(teacher, latency_s=10.0, latency_floor=floor)
    rows, prefixes = [[3, 4, 5], [6]], [[9, 10], []]
    service.run_batch("token", [(rows, prefixes, False)])
    service.run_mixed([("token", (rows, prefixes, False))])
    service.run_mixed([("close", ("no-such-session",))])
    # with the floor: the answer's start and end are one reading apart (0.25 s), so 9.75 s is left
    assert slept == ([9.75, 9.75] if floor else [10.0, 10.0]), slept
