"""The shared rate limit: GCRA in Redis, against our redis-server."""

from __future__ import annotations

import json
import time

from relay.ratelimit import RateLimiter
from tests.support import wait_for


def _limiter(r, rate, burst, key="q:ratelimit", slept=None):
    return RateLimiter(r, key, rate, burst, sleep=(slept.append if slept is not None
                                                   else time.sleep))


def test_burst_keeps_headroom_then_all_or_nothing_until_the_interval_passes(r):
    # One event every 10 s: a loaded machine pausing between the calls for a few seconds
    # changes nothing here (at 10/s a pause of 0.05 s did).
    lim = _limiter(r, rate=0.1, burst=10)
    assert lim.burst == 9  # 10 % of the burst is kept back for arrival jitter
    assert lim.try_take(6)[0] == 6
    taken, wait_s = lim.try_take(5)  # only 3 are free: none are taken
    assert taken == 0
    assert 15 <= wait_s <= 20.1  # until 5 are free: two intervals of 10 s
    assert lim.try_take(3)[0] == 3
    assert lim.try_take(1)[0] == 0


def test_a_request_larger_than_the_burst_is_capped_at_the_burst(r):
    lim = _limiter(r, rate=10, burst=10)
    assert lim.try_take(50)[0] == 9


def test_refund_gives_back_budget(r):
    lim = _limiter(r, rate=1, burst=5)
    assert lim.try_take(4)[0] == 4
    assert lim.try_take(1)[0] == 0
    lim.refund(3)
    assert lim.try_take(3)[0] == 3
    assert lim.try_take(1)[0] == 0


def test_two_limiters_on_one_key_share_the_budget(r):
    a, b = _limiter(r, rate=1, burst=7), _limiter(r, rate=1, burst=7)
    assert a.try_take(4)[0] == 4
    assert b.try_take(3)[0] == 0  # 6 of 7 are usable (headroom): only 2 are left
    assert b.try_take(2)[0] == 2
    assert a.try_take(1)[0] == 0


def test_take_waits_with_the_given_sleep_and_never_spins(r):
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    waits: list[int] = []
    # One token a second: the second take must sleep even if this process is paused for a
    # good part of a second between the two calls.
    lim = RateLimiter(r, "q:ratelimit", 1, 1, sleep=sleep, on_wait=lambda: waits.append(1))
    assert lim.take(1) == 1
    assert lim.take(1) == 1  # the next token is 1 s away: take must sleep for it
    assert slept and all(s >= 0.005 for s in slept)  # a minimum pause, not a hot loop
    assert len(waits) == len(slept)  # each wait is reported (relay_rate_limit_waits_total)
    assert len(slept) <= 3  # it slept about the interval at once, not in small steps


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
    for _ in range(2):
        start_worker(RELAY_RATE_LIMIT=str(rate), RELAY_RATE_BURST=str(burst), wait=False)
    events = wait_for(lambda: len(pusher.events()) >= total and pusher.events(), timeout=30,
                      what="the rate-limited drain")
    received = sorted(e["received_at"] for e in events)
    # However fast the machine, the budget allows no more than burst + rate * t events by t,
    # measured from the first arrival (not from before the workers started), less one batch
    # and arrival jitter. Two workers each with its own limit would finish in half the time.
    assert received[-1] - received[0] >= (total - burst - 10) / rate - 0.5
    # Grants in any second are at most rate + burst; receipt adds jitter (a loaded machine
    # may bunch arrivals), so the bound is looser than that but below two separate limits.
    busiest = max(sum(1 for t in received if s <= t < s + 1.0) for s in received)
    assert busiest < 2 * rate, busiest
    assert r.llen(f"{queue_name}:dead") == 0


def test_throttled_greenlets_wait_on_a_local_lock_instead_of_polling_redis(r):
    import gevent
    import gevent.lock

    lim = RateLimiter(r, "q:ratelimit", 200, 2, sleep=gevent.sleep,
                      lock=gevent.lock.Semaphore())
    calls = []
    real = lim.try_take

    def counted(want):
        calls.append(want)
        return real(want)

    lim.try_take = counted
    gevent.joinall([gevent.spawn(lambda: [lim.take(1) for _ in range(3)]) for _ in range(20)],
                   timeout=30, raise_error=True)
    # 60 grants: each costs one successful call, plus at most one that learned the wait.
    assert len(calls) <= 2 * 60 + 5, len(calls)
