"""Per-channel order end to end: one worker with the default pool, the local server recording
arrival order (an event is recorded when its call is answered, after the server's delay)."""

from __future__ import annotations

import json
import random
import time

import pytest

from tests.support import behind_a_later_one, wait_for

CHANNELS = 5
DEFAULT_POOL = "50"


def notifications(count: int, envelope_share: float = 0.1, seed: int = 7) -> list[str]:
    """Over five channels, a tenth of them envelopes over two; each carries its sequence
    number on each of its channels."""
    rng = random.Random(seed)
    seqs = [0] * CHANNELS
    out = []
    for _ in range(count):
        picked = rng.sample(range(CHANNELS), 2 if rng.random() < envelope_share else 1)
        stamp = {}
        for c in picked:
            stamp[f"ch{c}"] = seqs[c]
            seqs[c] += 1
        if len(picked) == 1:
            out.append(json.dumps({"channel": f"ch{picked[0]}", "s": stamp}))
        else:
            out.append(json.dumps({"relay": 1, "channels": list(stamp), "event": "hit",
                                   "data": {"s": stamp}}))
    return out


def events_of(items: list[str]) -> int:
    return sum(len(json.loads(i).get("channels", [1])) for i in items)


def assert_in_order(pusher, items: list[str], timeout: float) -> None:
    events = pusher.wait_for_events(events_of(items), timeout=timeout)
    assert len(events) == events_of(items)  # every one, none twice
    late = behind_a_later_one(events)
    assert late == [], f"{len(late)} of {len(events)} arrived behind a later one: {late[:3]}"


SERVER = {
    "at once": ({}, 5000),
    "random 0-20 ms": ({"delay_range": [0, 0.02]}, 2000),
    "50 ms": ({"delay": 0.05}, 500),
}


@pytest.mark.parametrize("server", list(SERVER))
def test_a_drain_keeps_each_channels_order(r, pusher, start_worker, queue_name, server):
    mode, count = SERVER[server]
    if mode:
        pusher.set_mode(**mode)
    items = notifications(count)
    r.rpush(queue_name, *items)
    start_worker(RELAY_POOL_SIZE=DEFAULT_POOL)
    assert_in_order(pusher, items, timeout=60)


@pytest.mark.parametrize("server", ["at once", "random 0-20 ms"])
def test_a_steady_200_per_second_keeps_each_channels_order(r, pusher, start_worker,
                                                           queue_name, server):
    mode, _ = SERVER[server]
    if mode:
        pusher.set_mode(**mode)
    items = notifications(600)
    start_worker(RELAY_POOL_SIZE=DEFAULT_POOL)
    began = time.perf_counter()
    for n, item in enumerate(items):
        wait = began + n / 200 - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        r.rpush(queue_name, item)
    assert_in_order(pusher, items, timeout=60)


def test_lifo_keeps_the_taking_order_per_channel_at_a_trickle(r, pusher, start_worker,
                                                              queue_name):
    """Without a backlog, newest-first takes them as they come: push order holds too."""
    pusher.set_mode(delay_range=[0, 0.02])
    items = notifications(200)
    start_worker(RELAY_POOL_SIZE=DEFAULT_POOL, RELAY_ORDER="lifo")
    for item in items:
        r.rpush(queue_name, item)
        wait_for(lambda: r.llen(queue_name) == 0, what="the worker taking it")
    assert_in_order(pusher, items, timeout=30)


def test_a_transiently_failing_notification_does_not_hold_back_its_channel(
        r, pusher, start_worker, queue_name):
    start_worker(RELAY_POOL_SIZE=DEFAULT_POOL, PUSHER_TIMEOUT="30")
    pusher.set_mode(hang=True)
    r.rpush(queue_name, json.dumps({"channel": "a", "n": 0}))
    wait_for(lambda: pusher.count()["requests_total"] == 1, what="the first call hanging")
    for n in range(1, 6):  # one by one: several greenlets take them, each waits its turn
        r.rpush(queue_name, json.dumps({"channel": "a", "n": n}))
        wait_for(lambda: r.llen(queue_name) == 0, what="a greenlet taking it")
    assert pusher.count() == {"events_total": 0, "requests_total": 1}  # the others wait
    pusher.clear_mode()  # the hung call's connection is dropped: a transient failure
    events = pusher.wait_for_events(6, timeout=30)
    numbers = [json.loads(e["data"])["n"] for e in events]
    # The others went on as soon as the first call failed, in their order; the failed one
    # went to the retry set (50 ms of backoff at least, then the next housekeeping round).
    assert [n for n in numbers if n] == [1, 2, 3, 4, 5]
    assert numbers.index(1) < numbers.index(0)
    assert int(r.hget(f"{queue_name}:stats", "retried")) == 1
