"""Fault tests: Pusher failing in every way, Redis restarting, workers killed repeatedly.

Each test counts what arrived at the server and what is left in Redis, and asserts that
nothing was lost and nothing was dead-lettered for a fault that was not the notification's.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import redis

from relay.delivery import BACKENDS
from relay.redis_server import RedisServer
from tests.support import dead as _dead
from tests.support import delivered as _delivered
from tests.support import inflight as _inflight
from tests.support import pending, wait_for, wait_settled
from tests.support import push as _push

# Where the transport (PUSHER_HTTP_CLIENT) matters, a test runs over each: how a hung or cut
# connection surfaces, and how an answer's status and headers are read. Elsewhere (kills,
# Redis restarts, the circuit's timing) it runs on the default transport only.
over_every_transport = pytest.mark.parametrize("transport", sorted(BACKENDS))




def _all_delivered(pusher, count, timeout=60.0) -> Counter:
    return wait_for(lambda: len(_delivered(pusher)) == count and _delivered(pusher),
                    timeout, f"all {count} notifications delivered")


def test_three_sigkills_during_a_drain(r, pusher, start_worker, queue_name):
    total = 6000  # killed at 1,200, 2,400 and 3,600 delivered
    pusher.set_mode(delay=0.02)
    _push(r, queue_name, total, channels=100)
    held, killed = 0, []
    for round_ in range(3):
        w = start_worker(RELAY_POOL_SIZE="20")
        target = (round_ + 1) * total // 5
        wait_for(lambda t=target: len(pusher.events()) >= t, 60, "the drain to progress")
        w.kill()
        killed.append(w)
        held += _inflight(r, queue_name)  # frozen by the kill: the most that can repeat
    start_worker(RELAY_POOL_SIZE="20")
    counts = _all_delivered(pusher, total, timeout=120)
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= held
    wait_settled(r, queue_name, gone=killed)
    assert r.llen(f"{queue_name}:dead") == 0


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


def test_redis_killed_and_restarted_mid_drain(durable_redis, pusher, start_worker, queue_name):
    total = 3000
    client = redis.Redis.from_url(durable_redis.url)
    pusher.set_mode(delay=0.02)
    _push(client, queue_name, total, channels=50)
    w = start_worker(REDIS_URL=durable_redis.url)
    wait_for(lambda: len(pusher.events()) >= 500, what="the drain to be under way")
    durable_redis.kill()
    # Keep it down until the worker has noticed: an instant restart may go unseen, as
    # redis-py reconnects idle connections by itself.
    wait_for(lambda: "Redis unreachable" in w.log(), what="the worker to notice the outage")
    outage_calls = pusher.stats()["requests_total"]
    durable_redis.start()
    client = redis.Redis.from_url(durable_redis.url)
    counts = _all_delivered(pusher, total, timeout=90)
    wait_settled(client, queue_name)
    assert client.llen(f"{queue_name}:dead") == 0
    assert sum(c - 1 for c in counts.values()) <= 10 * 10  # at most what was in flight
    assert pusher.stats()["requests_total"] > outage_calls
    log = w.log()
    assert log.count("Redis unreachable") == 1, log
    assert "Redis reachable again" in log


def test_503_for_5s_then_healthy(r, pusher, start_worker, queue_name):
    total = 500
    w = start_worker()
    pusher.set_mode(status=503)
    _push(r, queue_name, total)
    wait_for(lambda: "circuit open" in w.log(), what="the circuit to open")
    # The outage is measured on the server's clock from its first 503, not from the test's
    # push: a loaded machine may start the worker's calls late, and that must not count.
    first = wait_for(lambda: pusher.stats()["requests"], what="the first 503")[0]["at"]
    wait_for(lambda: time.time() - first >= 5, timeout=30, what="5 s of outage")
    pusher.clear_mode()
    _all_delivered(pusher, total)
    assert r.llen(f"{queue_name}:dead") == 0
    outage = [q for q in pusher.stats()["requests"] if q["at"] < first + 5]
    # 10 greenlets' first calls, then one probe at 1 and 3 s after the circuit opened (the
    # next, at 7 s, finds Pusher healthy): the backlog is not hammered (a count on the
    # server's clock, however slow the worker).
    assert len(outage) <= 25, len(outage)
    assert w.log().count("circuit open") == 1


@over_every_transport
def test_429_with_retry_after_pauses_every_greenlet(r, pusher, start_worker, queue_name,
                                                    transport):
    w = start_worker(PUSHER_HTTP_CLIENT=transport)
    pusher.set_mode(status=429, retry_after="2", fail_next=1)
    _push(r, queue_name, 1)
    # Wait for the worker to have read the answer: a call already under way when the 429
    # is answered cannot know of it.
    wait_for(lambda: "429" in w.log(), what="the worker to take in the 429")
    _push(r, queue_name, 50)  # work is waiting: only the pause holds it back
    wait_for(lambda: len(pusher.events()) == 51, what="everything after the pause")
    requests = pusher.stats()["requests"]
    refused_at = next(q["at"] for q in requests if q["status"] == 429)
    later = [q["at"] for q in requests if q["at"] > refused_at]
    assert later and min(later) - refused_at >= 2.0
    assert r.llen(f"{queue_name}:dead") == 0


def test_401_for_2s_then_accepted(r, pusher, start_worker, queue_name):
    total = 100
    pusher.set_mode(status=401)
    w = start_worker()
    _push(r, queue_name, total)
    wait_for(lambda: "circuit open" in w.log(), what="the circuit to open")
    started = time.monotonic()
    # The probe 1 s after the opening is refused too (the circuit stays open, with no second
    # "circuit open" line); the one at 3 s finds Pusher accepting again.
    wait_for(lambda: time.monotonic() - started >= 2, timeout=30, what="2 s of 401s")
    pusher.clear_mode()
    _all_delivered(pusher, total)
    assert r.llen(f"{queue_name}:dead") == 0
    wait_for(lambda: "circuit closed" in w.log(), what="the circuit to close")
    log = w.log()
    assert log.count("circuit open") == 1 and log.count("circuit closed") == 1


@over_every_transport
def test_hanging_server_costs_a_timeout_and_sigterm_still_exits_in_time(r, pusher,
                                                                        start_worker,
                                                                        queue_name, transport):
    pusher.set_mode(hang=True)
    w = start_worker(PUSHER_TIMEOUT="1", PUSHER_HTTP_CLIENT=transport)
    # One channel each: calls of one channel go one at a time (per-channel order), and the
    # point here is calls hanging side by side, as those of unrelated channels do.
    r.rpush(queue_name, *[json.dumps({"channel": f"c{i}", "n": i}) for i in range(30)])
    wait_for(lambda: pusher.stats()["requests_total"] >= 3, what="calls to hang")
    # The calls time out (1 s), fail transiently, and the circuit opens after a run of them.
    wait_for(lambda: "circuit open" in w.log(), timeout=10, what="timeouts to open the circuit")
    w.signal(signal.SIGTERM)
    # PUSHER_TIMEOUT (1 s) + a few seconds, with the margin a loaded 2-core machine needs;
    # a worker stuck on a hung call would never exit, which wait() catches.
    assert w.wait(timeout=15) == 0
    pusher.clear_mode()
    left = pending(r, queue_name)
    assert left["inflight"] == 0
    assert left["queue"] + left["retry"] == 30  # nothing delivered, nothing lost, nothing dead
    assert r.llen(f"{queue_name}:dead") == 0


def test_sigterm_during_slow_calls_sends_nothing_twice(r, pusher, start_worker, queue_name):
    """A deploy while Pusher is slow (2 s a call): the calls in flight finish and are settled
    before the exit, the rest goes back untouched, and the next worker sends nothing again."""
    total = 2000
    pusher.set_mode(delay=2.0)
    r.rpush(queue_name, *[json.dumps({"channel": f"c{i % 100}", "n": i}) for i in range(total)])
    w = start_worker(PUSHER_TIMEOUT="5", RELAY_POOL_SIZE="50")
    wait_for(lambda: pusher.count()["requests_total"] >= 50, what="the calls in flight")
    w.signal(signal.SIGTERM)
    assert w.wait(timeout=15) == 0
    accepted = _delivered(pusher)
    assert accepted and set(accepted.values()) == {1}
    assert pending(r, queue_name) == {"queue": total - len(accepted), "retry": 0,
                                      "inflight": 0, "parked": 0}
    pusher.clear_mode()
    start_worker(RELAY_POOL_SIZE="50")
    counts = _all_delivered(pusher, total)
    assert set(counts.values()) == {1}, "something Pusher had accepted was sent again"


def test_413_is_dead_lettered_once_and_not_retried(r, pusher, start_worker, queue_name):
    pusher.set_mode(status=413, fail_next=1)
    start_worker()
    r.rpush(queue_name, json.dumps({"channel": "c", "n": 0}))
    dead = wait_for(lambda: r.lrange(f"{queue_name}:dead", 0, -1), what="the dead letter")
    [entry] = [json.loads(d) for d in dead]
    assert "413" in entry["error"] and entry["attempts"] == 1
    _push(r, queue_name, 3)
    pusher.wait_for_events(3)
    assert pusher.stats()["by_status"].get("413") == 1
    assert r.zcard(f"{queue_name}:retry") == 0


def test_a_notification_failing_every_time_is_dead_lettered_as_exhausted(r, pusher,
                                                                         start_worker,
                                                                         queue_name):
    # Every call answers 500: the notification is retried with backoff until
    # RELAY_MAX_ATTEMPTS, then dead-lettered as exhausted (three failures do not open the
    # circuit, so each one counts as an attempt).
    pusher.set_mode(status=500)
    w = start_worker(RELAY_MAX_ATTEMPTS="3")
    r.rpush(queue_name, json.dumps({"channel": "c", "n": 0}))
    [entry] = wait_for(lambda: _dead(r, queue_name), 30, "the dead letter")
    assert entry["error_class"] == "exhausted", entry
    assert entry["attempts"] == 3 and "500" in entry["error"], entry
    assert json.loads(entry["payload"]) == {"channel": "c", "n": 0}  # the original, unwrapped
    assert pusher.stats()["by_status"] == {"500": 3}  # one call per attempt, no more
    assert pending(r, queue_name) == {"queue": 0, "retry": 0, "inflight": 0, "parked": 0}
    assert "circuit open" not in w.log()


def test_sigterm_while_redis_is_down_exits_in_time_and_loses_nothing(durable_redis, pusher,
                                                                     start_worker,
                                                                     queue_name):
    total = 100
    client = redis.Redis.from_url(durable_redis.url)
    pusher.set_mode(delay=1.0)  # calls are in flight when Redis goes
    _push(client, queue_name, total)
    w = start_worker(REDIS_URL=durable_redis.url, RELAY_POOL_SIZE="5", PUSHER_TIMEOUT="2")
    wait_for(lambda: _inflight(client, queue_name) > 0, what="calls in flight")
    client.close()
    durable_redis.kill()
    wait_for(lambda: "Redis unreachable" in w.log(), what="the worker to notice the outage")
    w.signal(signal.SIGTERM)
    # PUSHER_TIMEOUT + a few seconds, with a loaded machine's margin: settle steps that keep
    # retrying through the outage must not hold the exit forever.
    assert w.wait(timeout=30) == 0, w.log()
    pusher.clear_mode()
    durable_redis.start()
    client = redis.Redis.from_url(durable_redis.url)
    # What it held stays in its lists until another worker recovers them: nothing is lost.
    start_worker(REDIS_URL=durable_redis.url)
    wait_for(lambda: set(_delivered(pusher)) == set(range(total)), 60, "everything delivered")
    wait_settled(client, queue_name, gone=[w])
    assert client.llen(f"{queue_name}:dead") == 0
    client.close()
