"""The engine in-process, the way arq and dramatiq test their workers: a real Worker built by
the launcher, served in a greenlet of the test process (burst mode, or stopped by the test),
against a real redis-server and the local Pusher-compatible server, whose fault modes script
the answers. Subprocess tests keep only what needs a process (signals, kill -9)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
import redis

from tests.support import Running, delivered, pending, serving, wait_for


@pytest.fixture
def serve(worker_env: dict[str, str]) -> Iterator[Callable[..., Running]]:
    """serve(burst=..., **settings): a worker built from the test's settings, serving."""
    with serving(worker_env) as start:
        yield start


def push(r: redis.Redis, queue: str, count: int, channels: int = 10, start: int = 0) -> None:
    r.rpush(queue, *[json.dumps({"channel": f"c{n % channels}", "n": n})
                     for n in range(start, start + count)])


def in_redis(r: redis.Redis, queue: str) -> int:
    return sum(pending(r, queue).values())


def test_a_burst_drains_everything_and_exits_0(r, pusher, serve, queue_name) -> None:
    push(r, queue_name, 300, channels=30)
    r.rpush(queue_name, b"not json", json.dumps({"channel": "bad name!", "n": -1}))
    assert serve(burst=True).result() == 0
    assert sorted(delivered(pusher)) == list(range(300))
    assert r.llen(f"{queue_name}:dead") == 2
    assert in_redis(r, queue_name) == 0
    assert r.hget(f"{queue_name}:stats", "delivered") == b"300"


def test_ordering_off_is_the_same_path_without_lanes_per_channel(r, pusher, serve,
                                                                 queue_name) -> None:
    """RELAY_CHANNEL_ORDER=false: every notification is a lane of its own, so one channel's
    backlog goes out in parallel calls (what order forbids); nothing is lost either way."""
    pusher.set_mode(delay=0.2)
    push(r, queue_name, 60, channels=1)
    running = serve(RELAY_CHANNEL_ORDER="false", RELAY_POOL_SIZE="6")
    wait_for(lambda: running.worker.engine.busy >= 2, what="calls on one channel side by side")
    pusher.clear_mode()
    pusher.wait_for_events(60)
    assert sorted(delivered(pusher)) == list(range(60))


def test_the_window_bounds_what_the_process_holds(r, pusher, serve, queue_name) -> None:
    pusher.set_mode(hang=True)
    push(r, queue_name, 200, channels=50)
    running = serve(RELAY_PREFETCH="25", RELAY_POOL_SIZE="10", PUSHER_TIMEOUT="30")
    wait_for(lambda: running.worker.engine.busy == 3, what="the calls to hang")
    # Ten greenlets, but 25 fit the window: two full calls and one of five.
    inflight = r.llen(running.worker.queue.inflight_key)
    assert inflight == running.worker.engine.held == 25
    assert r.llen(queue_name) == 175
    pusher.clear_mode()


def test_one_failed_call_counts_once_for_the_circuit(r, pusher, serve, queue_name) -> None:
    """Nine notifications of one channel, taken one by one while the first call hangs, leave
    in one call; when it fails, the circuit hears of one failure (it opens at five)."""
    pusher.set_mode(hang=True)
    running = serve(RELAY_POOL_SIZE="10", PUSHER_TIMEOUT="30")
    worker = running.worker
    r.rpush(queue_name, json.dumps({"channel": "a", "n": 0}))
    wait_for(lambda: pusher.count()["requests_total"] == 1, what="the first call hanging")
    for n in range(1, 10):
        r.rpush(queue_name, json.dumps({"channel": "a", "n": n}))
        wait_for(lambda: r.llen(queue_name) == 0, what="the worker taking it")
    pusher.set_mode(status=500)  # the hung call's connection drops; the nine get a 500
    wait_for(lambda: r.zcard(f"{queue_name}:retry") == 10, what="all ten in the retry set")
    circuit = worker.routes.get(None).circuit
    failures, opened = circuit.failures, circuit.is_open
    pusher.clear_mode()
    # Two calls failed (a retry due meanwhile may have made a third): counted per greenlet,
    # the nine notifications' call alone would have counted nine and opened the circuit.
    assert failures in (2, 3) and not opened, (failures, opened)


def test_the_circuit_opening_puts_the_window_back_in_order(r, pusher, serve,
                                                           queue_name) -> None:
    pusher.set_mode(status=401)
    items = [json.dumps({"channel": f"c{n % 3}", "n": n}) for n in range(90)]
    r.rpush(queue_name, *items)
    running = serve(RELAY_POOL_SIZE="5")
    wait_for(lambda: running.worker.routes.get(None).circuit.is_open, what="the circuit to open")
    # Nothing waits in the process while the circuit is open: back in the queue, in the order
    # taken (the calls that got the 401 wait in the retry set; a probe may hold one more).
    wait_for(lambda: r.llen(running.worker.queue.inflight_key) <= 1, what="the put-back")
    retried = {json.loads(json.loads(w)["payload"])["n"]
               for w in r.zrange(f"{queue_name}:retry", 0, -1)}
    queued = [json.loads(x)["n"] for x in r.lrange(queue_name, 0, -1)]
    for channel in range(3):
        mine = [n for n in queued if n % 3 == channel]
        assert mine == sorted(mine), f"channel c{channel} put back out of order: {mine}"
    assert retried and len(queued) + len(retried) >= 89
    assert r.llen(f"{queue_name}:dead") == 0
    pusher.clear_mode()
    pusher.wait_for_events(90)
    assert sorted(delivered(pusher)) == list(range(90))


def test_a_call_that_fails_unexpectedly_goes_back_and_is_sent_later(
        r, pusher, serve, queue_name, caplog) -> None:
    """Fail safe: a call whose sending raises something unforeseen is put back, never taken
    as delivered (the old lanes' default answer meant "delivered")."""
    running = serve(RELAY_POOL_SIZE="2")
    delivery = running.worker.routes.get(None).delivery
    real_send = delivery.send
    failures = iter([RuntimeError("a bug in the transport")])

    def send_failing_once(notes, *rest: Any) -> Any:
        error = next(failures, None)
        if error is not None:
            raise error
        return real_send(notes, *rest)

    delivery.send = send_failing_once
    with caplog.at_level(logging.ERROR):
        push(r, queue_name, 5, channels=5)
        pusher.wait_for_events(5)
    assert sorted(delivered(pusher)) == list(range(5))
    assert "its notifications go back to the queue" in caplog.text
    assert r.hget(f"{queue_name}:stats", "delivered") == b"5"
    assert int(r.hget(f"{queue_name}:stats", "retried") or 0) == 0  # no attempt spent


def test_a_greenlet_that_dies_is_replaced(r, pusher, serve, queue_name, caplog) -> None:
    running = serve(RELAY_POOL_SIZE="4")
    worker = running.worker
    wait_for(lambda: len(worker.pool) == 4, what="the pool")
    with caplog.at_level(logging.ERROR):
        victim = next(iter(worker.pool.greenlets))
        victim.kill()  # ended from outside: GreenletExit, which the loop does not swallow
        wait_for(lambda: "starting another" in caplog.text, what="the replacement")
    assert len(worker.pool) == 4 and worker.pool_missing == 0
    problems, facts = worker.health()
    assert "pool" not in problems and facts["pool"]["replaced_lately"] == 1
    push(r, queue_name, 20)
    pusher.wait_for_events(20)


def test_a_pool_that_keeps_dying_is_reported_by_healthz(r, pusher, serve, queue_name) -> None:
    running = serve(RELAY_POOL_SIZE="3")
    worker = running.worker
    wait_for(lambda: len(worker.pool) == 3, what="the pool")
    for _ in range(12):  # more than MOST_REPLACED within the minute
        alive = [g for g in worker.pool.greenlets if not g.dead]
        if alive:
            alive[0].kill()
        gevent.sleep(0)  # the links run: the pool forgets it, the worker replaces it
    wait_for(lambda: worker.pool_missing > 0, what="the pool to stay short")
    problems, facts = worker.health()
    assert "pool" in problems and facts["pool"]["missing"] >= 1


def test_a_redis_error_while_handling_a_reap_does_not_end_the_greenlet(
        r, pusher, serve, queue_name, caplog) -> None:
    """Declared dead (a freeze), the worker re-registers; if Redis fails right then, the
    greenlet backs off and goes on: it does not die while the process reports healthy."""
    running = serve(RELAY_POOL_SIZE="1")
    worker = running.worker
    push(r, queue_name, 1)
    pusher.wait_for_events(1)
    real_heartbeat = worker.queue.heartbeat
    failures = iter([redis.ConnectionError("Redis went away right then")])

    def heartbeat_failing_once(*args: Any, **kwargs: Any) -> bool:
        error = next(failures, None)
        if error is not None:
            raise error
        return real_heartbeat(*args, **kwargs)

    worker.queue.heartbeat = heartbeat_failing_once
    r.zrem(worker.queue.keys.workers, worker.queue.worker_id)  # another worker reaped it
    with caplog.at_level(logging.WARNING):
        push(r, queue_name, 5, start=1)
        pusher.wait_for_events(6)
    assert sorted(delivered(pusher)) == list(range(6))
    assert len(worker.pool) == 1 and not any(g.dead for g in worker.pool.greenlets)
    assert "declared dead" in caplog.text


def test_a_failing_rate_limit_refund_costs_no_notification(r, pusher, serve, queue_name,
                                                           caplog) -> None:
    """A call that took budget but is not sent (the stop came while it waited) gives the
    budget back; if that fails, the notifications still go back untouched."""
    running = serve(RELAY_RATE_LIMIT="1", RELAY_RATE_BURST="1", RELAY_POOL_SIZE="2")
    worker = running.worker
    limiter = worker.routes.get(None).limiter
    assert limiter is not None

    def refund_failing(unused: int) -> None:
        raise redis.ConnectionError("Redis went away right then")

    limiter.refund = refund_failing
    push(r, queue_name, 3, channels=3)
    pusher.wait_for_events(1)
    wait_for(lambda: worker.engine.busy >= 1, what="a call waiting for budget")
    with caplog.at_level(logging.WARNING):
        assert running.stop() == 0
    assert "could not give back" in caplog.text
    sent = delivered(pusher)
    assert r.llen(queue_name) == 3 - len(sent)  # the rest back in the queue, untouched
    assert in_redis(r, queue_name) == 3 - len(sent)


def test_a_stop_mid_call_settles_what_pusher_accepted(r, pusher, serve, queue_name) -> None:
    """The stop waits for the calls in flight and settles them; the rest goes back. A worker
    started afterwards sends nothing twice."""
    pusher.set_mode(delay=1.0)
    push(r, queue_name, 200, channels=20)
    running = serve(RELAY_POOL_SIZE="5", PUSHER_TIMEOUT="10")
    wait_for(lambda: running.worker.engine.busy == 5, what="five calls in flight")
    assert running.stop() == 0
    accepted = len(pusher.events())
    assert accepted == 50  # the five calls in flight finished
    assert r.llen(queue_name) == 150 and r.llen(running.worker.queue.inflight_key) == 0
    pusher.clear_mode()
    assert serve(burst=True).result() == 0
    counts = delivered(pusher)
    assert sorted(counts) == list(range(200)) and set(counts.values()) == {1}


def test_burst_mode_exits_with_a_retry_not_yet_due_kept(r, pusher, serve, queue_name) -> None:
    """--burst drains the queue and the retries due now; a retry due later (its backoff is
    random, 50 ms to 1 s) either went out before the end or stays scheduled: never lost."""
    pusher.set_mode(status=503, fail_next=1)
    push(r, queue_name, 1)
    assert serve(burst=True).result() == 0
    left = pending(r, queue_name)
    assert left["queue"] == 0 and left["inflight"] == 0
    assert delivered(pusher).get(0, 0) + left["retry"] == 1
    assert r.hget(f"{queue_name}:stats", "retried") == b"1"
