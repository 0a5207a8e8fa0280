"""The asynchronous driver's pacing rules (kdtw/pacing.py), apart from Ray: staleness, the
buffer's backpressure, learner steps per rollout batch; and the order of work they give when
driven as jobs/train_pcl.py drives them."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kdtw.pacing import Pacing


def pacing(**kw) -> Pacing:
    return Pacing(**{"max_staleness": 2, "steps_per_batch": 1, "buffer_tokens": 1000, "batch_tokens": 100, **kw})


def test_staleness_counts_a_step_in_flight():
    p = pacing(max_staleness=2)
    assert p.may_collect(version=7, learning=False, published=5, pending=0)  # 2 old: allowed
    assert not p.may_collect(version=7, learning=True, published=5, pending=0)  # 3 once the step lands
    assert not p.may_collect(version=8, learning=False, published=5, pending=0)
    s = pacing(max_staleness=0)  # synchronous: only with the learner's newest weights and no step in flight
    assert s.may_collect(version=3, learning=False, published=3, pending=0)
    assert not s.may_collect(version=3, learning=True, published=3, pending=0)


def test_backpressure_keeps_unseen_and_pending_within_the_buffer():
    p = pacing(buffer_tokens=1000, batch_tokens=100)
    p.collected(unseen=700)
    assert p.may_collect(0, False, 0, pending=2)  # 700 + 3 * 100 = 1000 fits
    assert not p.may_collect(0, False, 0, pending=3)  # 1100 would not
    p.learned(unseen=300)
    assert p.may_collect(0, False, 0, pending=6)
    assert not p.may_collect(0, False, 0, pending=7)
    p.stalled()  # nothing in flight: the stale count is dropped
    assert p.unseen == 0 and p.may_collect(0, False, 0, pending=9)


def test_learner_steps_per_batch_and_starving():
    p = pacing(steps_per_batch=2)
    assert not p.may_learn()  # no rollout batch yet
    p.collected(unseen=100)
    assert p.may_learn()
    p.learned(unseen=50)
    assert p.may_learn()
    p.learned(unseen=0)
    assert not p.may_learn()  # two steps for one batch
    p.collected(unseen=100)
    assert p.may_learn()
    p.learned(None)  # the buffer could not fill a batch
    assert p.starved and p.unseen == 0 and p.steps == 2 and not p.may_learn()
    p.collected(unseen=100)  # a new batch lifts it
    assert not p.starved and p.may_learn()
    p.learned(None)
    p.stalled()
    assert p.may_learn()


def drive(p: Pacing, workers: int, steps: int, publish_every: int, rng: random.Random) -> list[tuple]:
    """jobs/train_pcl.py's use of `Pacing`, with work that lands in a random order: the events
    ("collect" worker version, "learn" version) in the order they were started, and the admission
    checks' inputs (unseen reported, pending) at each collect."""
    version = published = 0
    inflight: list[tuple] = []  # ("collect", worker, weights version) | ("learn",)
    idle, log, learning = set(range(workers)), [], False
    while p.steps < steps:
        if not learning and p.may_learn():
            inflight.append(("learn",))
            learning = True
            log.append(("learn", version))
        pending = sum(1 for x in inflight if x[0] == "collect")
        for w in sorted(idle):
            if not p.may_collect(version, learning, published, pending):
                break
            log.append(("collect", w, published, version + learning - published, p.unseen, pending))
            inflight.append(("collect", w, published))
            idle.discard(w)
            pending += 1
        if not inflight:
            p.stalled()
            continue
        done = inflight.pop(rng.randrange(len(inflight)))
        if done[0] == "collect":
            idle.add(done[1])
            p.collected(unseen=min(p.buffer_tokens, p.unseen + p.batch_tokens))
        else:
            learning = False
            version += 1
            if version % publish_every == 0:
                published = version
            p.learned(unseen=max(0, p.unseen - p.batch_tokens))
    return log


@settings(max_examples=60, deadline=None)
@given(workers=st.integers(1, 6), staleness=st.integers(0, 8), steps_per_batch=st.integers(1, 3),
       publish_every=st.integers(1, 3), batches_fit=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_driven_in_any_order_the_rules_hold(workers, staleness, steps_per_batch, publish_every, batches_fit, seed):
    publish_every = min(publish_every, staleness + 1)  # the config's rule: with fewer, no rollout could start
    p = pacing(max_staleness=staleness, steps_per_batch=steps_per_batch, buffer_tokens=100 * batches_fit,
               batch_tokens=100)
    log = drive(p, workers, steps=30, publish_every=publish_every, rng=random.Random(seed))
    collects = [e for e in log if e[0] == "collect"]
    learns = [e for e in log if e[0] == "learn"]
    assert len(learns) >= 30 and collects
    for _, _, _, lag, unseen, pending in collects:
        assert lag <= staleness  # a step in flight counted
        assert unseen + (pending + 1) * 100 <= 100 * batches_fit
    # never more learner steps started than steps_per_batch for each rollout batch landed before
    assert p.steps <= p.batches * steps_per_batch


def test_synchronous_pacing_alternates_one_batch_and_its_steps():
    """max_staleness 0, one worker, weights published every step: the local loop's order
    (collect, then steps_per_batch learner steps), whatever order work lands in."""
    for spb in (1, 2):
        p = pacing(max_staleness=0, steps_per_batch=spb, buffer_tokens=10_000)
        log = drive(p, workers=1, steps=12, publish_every=1, rng=random.Random(spb))
        kinds = [e[0] for e in log]
        assert kinds == (["collect"] + ["learn"] * spb) * (12 // spb)
        assert all(e[3] == 0 for e in log if e[0] == "collect")  # every batch with the newest weights
