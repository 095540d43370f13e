"""Housekeeping in one script (RedisQueue.maintain) and its pace; an idle worker's Redis load."""

from __future__ import annotations

from collections.abc import Callable

import gevent
import pytest
import redis

from relay.housekeeping import IDLE_MAINTENANCE_S, MAINTENANCE_S, MIN_WAIT_S, next_round_s
from relay.redis_server import RedisServer
from relay.redis_shared import BLOCK_S
from tests.support import WorkerProcess, wait_for
from tests.test_queue import items, redis_now, registered, took


@pytest.mark.parametrize("order", ["fifo", "lifo"])
def test_one_round_promotes_trims_and_measures(r: redis.Redis, queue_name: str,
                                               order: str) -> None:
    q = registered(r, queue_name, order=order)
    waiting = items(5)
    r.rpush(queue_name, *waiting)
    now = redis_now(r)
    r.zadd(f"{queue_name}:retry", {b"due": now - 1, b"later": now + 30})
    round_ = q.maintain(max_backlog=4, reap=False)
    assert round_.promoted == 1
    assert round_.dropped == 2  # 6 after the promotion, 4 allowed: the 2 oldest go
    assert round_.length == 4
    assert round_.next_due_s is not None and 25 < round_.next_due_s <= 30
    assert round_.recovered == {}
    expected = [b"due", *waiting][2:] if order == "fifo" else waiting[2:] + [b"due"]
    assert r.lrange(queue_name, 0, -1) == expected
    assert r.hget(f"{queue_name}:stats", "shed_backlog") == b"2"
    assert r.zrange(f"{queue_name}:retry", 0, -1) == [b"later"]


def test_no_limit_no_retry(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    r.rpush(queue_name, *items(3))
    round_ = q.maintain(max_backlog=0, reap=True)
    assert (round_.promoted, round_.dropped, round_.length) == (0, 0, 3)
    assert round_.next_due_s is None


def test_reaping_rounds_recover_expired_workers_once(r: redis.Redis, queue_name: str) -> None:
    dead = registered(r, queue_name)
    pushed = items(3)
    r.rpush(queue_name, *pushed)
    assert took(dead.fetch(3)) == (pushed, 0)
    dead.heartbeat(-1)  # its deadline is now in the past
    alive = registered(r, queue_name)
    assert alive.maintain(0, reap=False).recovered == {}  # not a reaping round
    assert r.llen(queue_name) == 0
    round_ = alive.maintain(0, reap=True)
    assert round_.recovered == {dead.worker_id: 3}
    assert r.lrange(queue_name, 0, -1) == pushed
    assert alive.maintain(0, reap=True).recovered == {}  # once only
    # A zombie's later pop into its old list is swept by the next reaping round.
    r.rpush(dead.inflight_key, b"late")
    assert alive.maintain(0, reap=True).recovered == {dead.worker_id: 1}


def test_the_pace() -> None:
    assert next_round_s(0, None) == IDLE_MAINTENANCE_S
    assert next_round_s(10, None) == MAINTENANCE_S
    assert next_round_s(0, 0.3) == 0.3  # a retry due soon is promoted on time
    assert next_round_s(0, 0.0) == MIN_WAIT_S  # overdue: soon, without spinning
    assert next_round_s(10, 5.0) == MAINTENANCE_S


def test_an_idle_worker_is_nearly_silent_on_redis(redis_server: RedisServer, queue_name: str,
                                                  start_worker: Callable[..., WorkerProcess]
                                                  ) -> None:
    """Defaults (50 greenlets): at most 3 Redis round trips a second while nothing happens.

    MONITOR shows the worker's top-level commands (a script's own are marked `lua`), each
    stamped with Redis's clock, which also measures the window: not a sleep, so a slow machine
    makes the worker send fewer commands in it, never more. Before issue 11, the 50
    greenlets' one-second pops alone made 50 a second."""
    start_worker(RELAY_POOL_SIZE="50", RELAY_HEARTBEAT_TTL="10")  # the defaults (tests run 2)
    poll = redis.Redis.from_url(redis_server.url, single_connection_client=True)
    mine = poll.client_info()["addr"]
    seen: list[tuple[float, str]] = []  # (time, command) of everyone else's top-level ones

    def watch() -> None:
        with redis.Redis.from_url(redis_server.url).monitor() as feed:
            for entry in feed.listen():
                addr = f"{entry['client_address']}:{entry['client_port']}"
                if entry.get("client_type") != "lua" and addr != mine:
                    seen.append((float(entry["time"]), entry["command"]))

    def redis_clock() -> float:
        return seen[-1][0] if seen else 0.0

    window_s = 10.0  # one summary line's reads (every 10 s) fall in it, as in any 10 s
    watcher = gevent.spawn(watch)
    try:
        # Past the start (the probe of every command, the registration, the first fetch).
        wait_for(lambda: seen, 20, "the worker's first command")
        began = seen[0][0]
        wait_for(lambda: redis_clock() >= began + BLOCK_S + 2, 30, "the start's commands")
        since = redis_clock()
        wait_for(lambda: redis_clock() > since + window_s, 60, "ten seconds of Redis's clock")
        window = [c for t, c in seen if since < t <= since + window_s]
    finally:
        watcher.kill()
        poll.close()
    assert window, "MONITOR saw nothing: the test would pass whatever the worker did"
    assert len(window) <= 3 * window_s, (f"{len(window)} commands in {window_s:.0f} s: "
                                         f"{[c[:60] for c in window[:12]]}")


def test_a_round_counts_what_waits_parked_for_this_worker(r: redis.Redis,
                                                         queue_name: str) -> None:
    """A busy channel's overflow leaves the queue for its lane list: the round still counts
    it (relay_parked, the summary's backlog), as nothing else would show it."""
    q = registered(r, queue_name, owned=True)
    r.rpush(queue_name, *[f'{{"channel": "busy", "n": {n}}}' for n in range(q.CAP + 7)])
    assert len(q.fetch(1000).items) == q.CAP
    round_ = q.maintain(max_backlog=0, reap=False)
    assert (round_.length, round_.parked) == (0, 7)
