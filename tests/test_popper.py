"""relay.popper against a real redis-server: one blocking pop per process, cut short on stop."""

from __future__ import annotations

import gevent
import gevent.event
import redis

from relay.popper import PopCut, PopGate
from tests.support import wait_for
from tests.test_queue import items, registered


def blocked_pops(r: redis.Redis) -> int:
    return sum(1 for c in r.client_list() if c.get("cmd") == "blmove")


def test_one_greenlet_pops_the_others_wait_without_redis(r: redis.Redis,
                                                        queue_name: str) -> None:
    q = registered(r, queue_name)
    fetchers = [gevent.spawn(q.fetch, slot, 10, 60.0, False) for slot in range(3)]
    wait_for(lambda: blocked_pops(r) == 1 and q.pops.waiting == 2, 10,
             "one fetch in BLMOVE, two waiting for it")
    first = items(1, "a")
    r.rpush(queue_name, *first)
    # Woken by the push, not by the end of its 60 s block (20 s is load's margin).
    assert fetchers[0].get(timeout=20) == first
    # The pop was handed to the next in line, which blocks in turn: still one in BLMOVE.
    wait_for(lambda: blocked_pops(r) == 1 and q.pops.waiting == 1, 10, "the hand-over")
    second = items(1, "b")
    r.rpush(queue_name, *second)
    assert fetchers[1].get(timeout=20) == second
    assert r.lrange(q.slot_key(1), 0, -1) == second
    q.pops.close()
    assert fetchers[2].get(timeout=20) == []


def test_close_cuts_the_blocked_pop_short_and_nothing_is_lost(r: redis.Redis,
                                                              queue_name: str) -> None:
    q = registered(r, queue_name)
    popper = gevent.spawn(q.fetch, 0, 10, 60.0, False)
    waiter = gevent.spawn(q.fetch, 1, 10, 60.0, False)
    wait_for(lambda: blocked_pops(r) == 1 and q.pops.waiting == 1, 10, "the fetches to block")
    q.pops.close()
    # Both end long before the 60 s block (20 s is load's margin), empty-handed.
    assert popper.get(timeout=20) == []
    assert waiter.get(timeout=20) == []
    # The cut connection was dropped, not handed back half-read: Redis sees no pop left.
    wait_for(lambda: blocked_pops(r) == 0, 10, "the cut pop's connection to go")
    pushed = items(2)
    r.rpush(queue_name, *pushed)
    assert r.lrange(queue_name, 0, -1) == pushed  # nobody pops any more
    assert q.fetch(2, 10, 60.0, False) == []  # a closed gate never blocks
    assert r.ping()  # the pool's connections still work
    assert q.fetch(2, 10, 0) == pushed  # the non-blocking fetch is unaffected


def test_a_greenlet_killed_while_waiting_passes_the_pop_on() -> None:
    gate = PopGate()
    entered: list[str] = []
    release = gevent.event.Event()

    def hold(name: str) -> None:
        with gate.popping():
            entered.append(name)
            release.wait()

    first = gevent.spawn(hold, "first")
    wait_for(lambda: entered == ["first"], 5, "the first to hold the pop")
    doomed = gevent.spawn(hold, "doomed")
    third = gevent.spawn(hold, "third")
    wait_for(lambda: gate.waiting == 2, 5, "two waiters")
    doomed.kill()
    release.set()
    gevent.joinall([first, third], timeout=10, raise_error=True)
    assert entered == ["first", "third"]
    assert gate.waiting == 0


def test_after_close_popping_raises_at_once() -> None:
    gate = PopGate()
    gate.close()
    try:
        with gate.popping():
            raise AssertionError("a closed gate let a pop begin")
    except PopCut:
        pass
    gate.close()  # twice is harmless
