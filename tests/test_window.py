"""relay.window against a real redis-server: lost replies, the stop, a killed greenlet."""

from __future__ import annotations

import time
from collections.abc import Iterator

import gevent
import pytest
import redis

from relay.queue import Op, RedisQueue
from relay.redis_server import RedisServer
from relay.window import PopCut, Window
from tests.faultproxy import LostReply
from tests.support import wait_for
from tests.test_queue import items


def raws(taken: list[tuple[bytes, tuple[str, ...]]]) -> list[bytes]:
    return [raw for raw, _ in taken]


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[LostReply]:
    lossy = LostReply(redis_server.port)
    yield lossy
    lossy.close()


@pytest.fixture
def window(proxy: LostReply, queue_name: str) -> Iterator[Window]:
    """A window whose every Redis command goes through the lossy proxy."""
    client = redis.Redis.from_url(proxy.url, socket_timeout=10)
    queue = RedisQueue(client, queue_name)
    queue.heartbeat(60)
    yield Window(queue, prefetch=100)
    client.close()


def test_a_fetch_takes_up_to_the_room_and_counts_what_it_holds(r: redis.Redis,
                                                               window: Window) -> None:
    window.prefetch = 4
    r.rpush(window.queue.keys.queue, *items(6))
    assert raws(window.fetch(window.room, may_block=True)) == items(6)[:4]
    assert (window.held, window.room, window.backlog) == (4, 0, True)
    window.forget(items(6)[:2])
    assert (window.held, window.room) == (2, 2)


def test_a_lost_fetch_reply_is_adopted_before_anything_newer(r: redis.Redis, proxy: LostReply,
                                                             window: Window) -> None:
    queue = window.queue.keys.queue
    r.rpush(queue, *items(5))
    proxy.lose_reply_to(b"EVALSHA")
    with pytest.raises(redis.ConnectionError):
        window.fetch(3, may_block=False)
    assert proxy.lost.is_set()
    assert r.lrange(window.queue.inflight_key, 0, -1) == items(5)[:3]  # moved, never seen
    assert window.resync and window.held == 0
    r.rpush(queue, *items(2, "later"))
    # Adopted first, in their order, then the rest: nothing taken later overtakes them.
    assert raws(window.fetch(100, may_block=False)) == items(5) + items(2, "later")
    assert window.held == 7 and not window.resync
    assert raws(window.fetch(100, may_block=False)) == []  # nothing adopted twice


def test_a_lost_pop_reply_is_adopted(r: redis.Redis, proxy: LostReply, window: Window) -> None:
    window.backlog = False  # a quiet queue: the next fetch is the blocking pop
    proxy.lose_reply_to(b"BLMOVE")
    popper = gevent.spawn(window.fetch, 10, True)
    wait_for(lambda: any(c.get("cmd") == "blmove" for c in r.client_list()), 5, "the pop")
    r.rpush(window.queue.keys.queue, *items(3))
    with pytest.raises(redis.ConnectionError):
        popper.get(timeout=10)
    assert r.lrange(window.queue.inflight_key, 0, -1) == items(3)  # popped and topped up
    assert raws(window.fetch(10, may_block=True)) == items(3)


def test_twins_are_adopted_only_as_often_as_they_are_missing(r: redis.Redis, proxy: LostReply,
                                                             window: Window) -> None:
    twin = b'{"channel":"twin"}'
    queue = window.queue.keys.queue
    r.rpush(queue, twin)
    assert raws(window.fetch(1, may_block=False)) == [twin]
    r.rpush(queue, twin, twin)
    proxy.lose_reply_to(b"EVALSHA")
    with pytest.raises(redis.ConnectionError):
        window.fetch(2, may_block=False)
    assert raws(window.fetch(10, may_block=False)) == [twin, twin]  # one was known already
    assert window.known[twin] == 3


def test_the_stop_cuts_a_blocking_pop_short(r: redis.Redis, window: Window) -> None:
    window.backlog = False
    popper = gevent.spawn(window.fetch, 10, True)
    wait_for(lambda: any(c.get("cmd") == "blmove" for c in r.client_list()), 5, "the pop")
    window.cut()
    with pytest.raises(PopCut):
        popper.get(timeout=2)  # at once, not when the pop's 3 s are over
    assert raws(window.fetch(10, may_block=True)) == []  # closed: no fetch begins
    assert window.queue.release() == 0


def test_the_stop_cuts_the_linger_and_the_release_returns_what_the_pop_took(
        r: redis.Redis, window: Window) -> None:
    window.backlog, window.linger_s = False, 30.0
    popper = gevent.spawn(window.fetch, 10, True)
    wait_for(lambda: any(c.get("cmd") == "blmove" for c in r.client_list()), 5, "the pop")
    r.rpush(window.queue.keys.queue, items(1)[0])
    wait_for(lambda: r.llen(window.queue.inflight_key) == 1, what="the pop taking it")
    window.cut()  # lingering for 30 s: cut short too
    with pytest.raises(PopCut):
        popper.get(timeout=2)
    assert window.queue.release() == 1
    assert r.lrange(window.queue.keys.queue, 0, -1) == items(1)


def test_a_greenlet_killed_mid_pop_leaves_the_item_for_the_release(r: redis.Redis,
                                                                   window: Window) -> None:
    window.backlog = False
    popper = gevent.spawn(window.fetch, 10, True)
    wait_for(lambda: any(c.get("cmd") == "blmove" for c in r.client_list()), 5, "the pop")
    popper.kill()
    r.rpush(window.queue.keys.queue, *items(2))
    wait_for(lambda: not any(c.get("cmd") == "blmove" for c in r.client_list()),
             what="the killed pop's connection to close")
    # Whatever the killed pop took waits in the list; the shutdown returns it in order.
    window.queue.release()
    assert r.lrange(window.queue.keys.queue, 0, -1) == items(2)


def test_what_is_settled_leaves_the_window(r: redis.Redis, window: Window) -> None:
    r.rpush(window.queue.keys.queue, *items(3))
    taken = raws(window.fetch(3, may_block=False))
    assert window.queue.settle([Op.ack(taken[0]), Op.put_back(taken[1])]).landed == [True, True]
    window.forget(taken[:2])
    assert window.held == 1 and dict(window.known) == {taken[2]: 1}
    assert raws(window.fetch(10, may_block=False)) == [taken[1]]  # the put-back comes next


def test_a_fetch_that_finds_the_queue_empty_does_not_hold_the_next_one_back(
        r: redis.Redis, window: Window) -> None:
    """Only a fetch that saw something it could not move waits before looking again. An empty
    queue is no such thing: at a steady 500/s the next item comes within milliseconds, and
    holding fetches back for SHORT_BLOCK_S made it wait 50 ms on average (p99 100 ms)."""
    window.backlog = True  # a settle saw an item, which another fetch has taken since
    assert window.fetch(window.room, may_block=False) == []
    assert not window.backlog and window.may_pop
    assert window.idle_until == float("-inf")


def test_a_fetch_that_could_move_nothing_in_view_looks_again_only_later(
        r: redis.Redis, window: Window) -> None:
    """What the fetch saw and could not move (here: every item is capped in its lane, the
    queue's head another owner's would be the same) is not read again in a loop."""
    window.prefetch = 200
    r.rpush(window.queue.keys.queue, *[f'{{"channel": "c", "n": {n}}}' for n in range(40)])
    assert len(window.fetch(window.room, may_block=False)) == 30  # a lane's cap
    assert window.fetch(window.room, may_block=False) == []
    assert window.idle_until > time.monotonic()
