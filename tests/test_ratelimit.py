"""The shared rate limit: GCRA in Redis, against our redis-server."""

from __future__ import annotations

import json
import time

from relay.ratelimit import RateLimiter
from tests.support import wait_for


def _limiter(r, rate, burst, key="q:ratelimit", slept=None):
    return RateLimiter(r, key, rate, burst, sleep=(slept.append if slept is not None
                                                   else time.sleep))


def test_burst_then_nothing_until_the_interval_passes(r):
    lim = _limiter(r, rate=10, burst=5)
    assert lim.try_take(3)[0] == 3
    assert lim.try_take(10)[0] == 2  # the rest of the burst, not more
    taken, wait_s = lim.try_take(1)
    assert taken == 0
    assert 0.05 <= wait_s <= 0.11  # one interval (0.1 s), less the time spent since


def test_refund_gives_back_budget(r):
    lim = _limiter(r, rate=1, burst=4)
    assert lim.try_take(4)[0] == 4
    assert lim.try_take(1)[0] == 0
    lim.refund(3)
    assert lim.try_take(4)[0] == 3


def test_two_limiters_on_one_key_share_the_budget(r):
    a, b = _limiter(r, rate=1, burst=6), _limiter(r, rate=1, burst=6)
    assert a.try_take(4)[0] == 4
    assert b.try_take(4)[0] == 2
    assert a.try_take(1)[0] == 0


def test_take_waits_with_the_given_sleep_and_never_spins(r):
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    lim = RateLimiter(r, "q:ratelimit", 10, 1, sleep=sleep)
    assert lim.take(1) == 1
    assert lim.take(1) == 1  # the next token is 0.1 s away: take must sleep for it
    assert slept and all(s >= 0.005 for s in slept)  # a minimum pause, not a hot loop
    assert len(slept) <= 3 and sum(slept) >= 0.05  # it slept about the interval at once


def test_take_all_collects_more_than_a_burst(r):
    lim = _limiter(r, rate=1000, burst=3)
    assert lim.take_all(10) == 10


def test_stop_ends_the_wait(r):
    lim = _limiter(r, rate=0.001, burst=1)
    assert lim.take(1) == 1
    assert lim.take(1, stop=lambda: True) == 0


def test_two_workers_share_one_limit(r, pusher, start_worker, queue_name):
    rate, burst, total = 40, 5, 200
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(total)])
    started = time.time()
    for _ in range(2):
        start_worker(RELAY_RATE_LIMIT=str(rate), RELAY_RATE_BURST=str(burst), wait=False)
    events = wait_for(lambda: len(pusher.events()) >= total and pusher.events(), timeout=30,
                      what="the rate-limited drain")
    received = sorted(e["received_at"] for e in events)
    # However fast the machine, the budget allows no more than burst + rate * t events by t.
    assert received[-1] - started >= (total - burst) / rate - 0.2
    # Grants in any second are at most rate + burst; receipt adds jitter of up to one batch
    # (a batch granted just before a window can land inside it).
    busiest = max(sum(1 for t in received if s <= t < s + 1.0) for s in received)
    assert busiest <= rate + 2 * burst + 2, busiest
    assert r.llen(f"{queue_name}:dead") == 0
