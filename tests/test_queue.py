"""relay.queue against a real redis-server: fetch, settle, retry, recovery, keys."""

from __future__ import annotations

import json
import time

import gevent
import pytest
import redis
from redis.crc import key_slot

from relay.deadletters import DeadLetters
from relay.message import retry_wrapper
from relay.queue import Keys, RedisQueue, WorkerReaped
from relay.redis_server import RedisServer
from tests.support import wait_for


def items(n: int, prefix: str = "m") -> list[bytes]:
    return [f'{{"channel":"c","n":"{prefix}{i}"}}'.encode() for i in range(n)]


def registered(r: redis.Redis, name: str, order: str = "fifo", slots: int = 4,
               worker_id: str | None = None) -> RedisQueue:
    q = RedisQueue(r, name, order, worker_id=worker_id)
    q.heartbeat(60, slots)
    return q


def redis_now(r: redis.Redis) -> float:
    seconds, micros = r.time()
    return seconds + micros / 1e6


# -- fetch -------------------------------------------------------------------------------------


def test_fetch_moves_a_batch_fifo_into_the_slot(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    pushed = items(5)
    r.rpush(queue_name, *pushed)
    assert q.fetch(0, 3, 0) == pushed[:3]
    assert r.lrange(q.slot_key(0), 0, -1) == pushed[:3]
    assert r.lrange(queue_name, 0, -1) == pushed[3:]
    # the slot is full: the next fetch moves nothing and returns the whole slot again
    assert q.fetch(0, 3, 0) == pushed[:3]
    assert r.llen(queue_name) == 2
    # another slot takes the rest
    assert q.fetch(1, 3, 0) == pushed[3:]
    assert r.llen(queue_name) == 0


def test_fetch_tops_up_after_an_ack(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    pushed = items(5)
    r.rpush(queue_name, *pushed)
    assert q.fetch(0, 3, 0) == pushed[:3]
    q.ack(0, pushed[:2])
    assert q.fetch(0, 3, 0) == [pushed[2], pushed[3], pushed[4]]


def test_orphan_in_the_slot_is_adopted(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    orphan = b'{"channel":"orphan"}'
    r.rpush(q.slot_key(0), orphan)  # as if a reply had been lost on the wire
    pushed = items(3)
    r.rpush(queue_name, *pushed)
    assert q.fetch(0, 3, 0) == [orphan, *pushed[:2]]
    assert r.lrange(queue_name, 0, -1) == pushed[2:]


def test_lifo_gives_the_newest_first(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name, order="lifo")
    pushed = items(5)
    r.rpush(queue_name, *pushed)
    assert q.fetch(0, 2, 0) == [pushed[4], pushed[3]]
    assert r.lrange(queue_name, 0, -1) == pushed[:3]


def test_fetch_on_an_empty_queue_blocks_then_returns_nothing(r: redis.Redis,
                                                             queue_name: str) -> None:
    q = registered(r, queue_name)
    started = time.monotonic()
    assert q.fetch(0, 10, 0.3) == []
    assert time.monotonic() - started >= 0.25  # it blocked (an upper bound would be load's)
    # Block 0 must not block at all (BLMOVE's 0 would wait forever): bounded by the timeout.
    assert gevent.with_timeout(10, q.fetch, 0, 10, 0) == []


def test_blocked_fetch_wakes_for_a_push(r: redis.Redis, redis_server: RedisServer,
                                        queue_name: str) -> None:
    q = registered(r, queue_name)
    fetcher = gevent.spawn(q.fetch, 0, 10, 60.0)
    wait_for(lambda: any(c.get("cmd") == "blmove" for c in r.client_list()), 5,
             "the fetch to block in BLMOVE")
    pushed = items(3)
    r.rpush(queue_name, *pushed)
    # Woken by the push, not by the end of its 60 s block (20 s is load's margin).
    assert fetcher.get(timeout=20) == pushed  # the first by BLMOVE, the rest topped up
    assert r.lrange(q.slot_key(0), 0, -1) == pushed


def test_fetch_raises_when_unregistered(r: redis.Redis, queue_name: str) -> None:
    q = RedisQueue(r, queue_name)
    r.rpush(queue_name, *items(2))
    with pytest.raises(WorkerReaped):
        q.fetch(0, 10, 0)
    assert r.llen(queue_name) == 2  # nothing moved
    assert q.heartbeat(60, 1) is False
    assert len(q.fetch(0, 10, 0)) == 2


def test_a_round_fetch_hands_the_queue_out_in_turn_one_slot_after_another(
        r: redis.Redis, queue_name: str) -> None:
    """relay.turns: one script for several greenlets; each slot gets the next items in the
    order asked, what it already held comes back too, and an empty queue gives nothing."""
    q = registered(r, queue_name)
    orphan = b'{"channel":"orphan"}'
    r.rpush(q.slot_key(2), orphan)  # a lost reply's leftover: adopted, as by fetch
    pushed = items(7)
    r.rpush(queue_name, *pushed)
    assert q.fetch_round([(1, 3), (0, 2), (2, 2), (3, 5)]) == [
        pushed[:3], pushed[3:5], [orphan, pushed[5]], [pushed[6]]]
    for slot, held in ((1, pushed[:3]), (0, pushed[3:5]), (2, [orphan, pushed[5]]),
                       (3, [pushed[6]])):
        assert r.lrange(q.slot_key(slot), 0, -1) == held
    assert r.llen(queue_name) == 0
    q.ack(1, pushed[:3])
    assert q.fetch_round([(1, 3), (0, 3)]) == [[], pushed[3:5]]


def test_a_round_fetch_of_a_reaped_worker_moves_nothing_and_returns_what_its_slots_held(
        r: redis.Redis, queue_name: str) -> None:
    q = RedisQueue(r, queue_name)
    r.rpush(q.slot_key(1), b"held")
    r.rpush(queue_name, *items(2))
    with pytest.raises(WorkerReaped):
        q.fetch_round([(0, 10), (1, 10)])
    # back at the head, where it is popped next (fifo), as fetch does
    assert r.lrange(queue_name, 0, -1) == [b"held", *items(2)]
    assert r.llen(q.slot_key(1)) == 0


# -- settle ------------------------------------------------------------------------------------


def test_ack_removes_exactly_the_given_items(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    twin = b'{"channel":"twin"}'
    other = b'{"channel":"other"}'
    r.rpush(queue_name, twin, other, twin)
    assert q.fetch(0, 10, 0) == [twin, other, twin]
    assert q.ack(0, [twin]) == 1
    assert r.lrange(q.slot_key(0), 0, -1) == [other, twin]
    assert q.ack(0, [b"never fetched"]) == 0
    assert q.ack(0, []) == 0
    assert r.hget(f"{queue_name}:stats", "delivered") == b"1"
    assert q.ack(0, [other, twin], stat="shed_max_age") == 2
    assert r.llen(q.slot_key(0)) == 0
    assert r.hgetall(f"{queue_name}:stats") == {b"delivered": b"1", b"shed_max_age": b"2"}


def test_ack_is_not_counted_twice_when_replayed(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    r.rpush(queue_name, *items(2))
    fetched = q.fetch(0, 10, 0)
    assert q.ack(0, fetched) == 2
    assert q.ack(0, fetched) == 0
    assert r.hget(f"{queue_name}:stats", "delivered") == b"2"


def test_dead_letter_is_idempotent(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    bad = b"not json"
    r.rpush(queue_name, bad, b'{"channel":"ok"}')
    q.fetch(0, 10, 0)
    entry = {"payload": "not json", "error": "not JSON", "failed_at": 1.5, "attempts": 0}
    assert q.dead_letter(0, bad, entry) is True
    assert q.dead_letter(0, bad, entry) is False
    dead = r.lrange(f"{queue_name}:dead", 0, -1)
    assert [json.loads(d) for d in dead] == [entry]
    assert r.lrange(q.slot_key(0), 0, -1) == [b'{"channel":"ok"}']
    assert r.hget(f"{queue_name}:stats", "dead") == b"1"


def test_retry_later_schedules_in_redis_time(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    raw = b'{"channel":"c"}'
    r.rpush(queue_name, raw)
    q.fetch(0, 10, 0)
    wrapper = retry_wrapper(raw.decode(), 1, 100.0, "HTTP 503")
    before = redis_now(r)
    assert q.retry_later(0, raw, wrapper, 30.0) is True
    after = redis_now(r)
    assert q.retry_later(0, raw, wrapper, 30.0) is False  # replay: nothing twice
    ((member, score),) = r.zrange(f"{queue_name}:retry", 0, -1, withscores=True)
    assert member == wrapper.encode()
    assert before + 30 <= score <= after + 30
    assert r.llen(q.slot_key(0)) == 0
    assert r.hget(f"{queue_name}:stats", "retried") == b"1"
    assert q.promote_due() == 0  # not due yet


@pytest.mark.parametrize("order", ["fifo", "lifo"])
def test_promote_moves_only_due_members_where_the_next_pop_is(r: redis.Redis, queue_name: str,
                                                              order: str) -> None:
    q = registered(r, queue_name, order=order)
    other = RedisQueue(r, queue_name, order)
    waiting = items(2, "old")
    r.rpush(queue_name, *waiting)
    now = redis_now(r)
    due, later = b"due-wrapper", b"later-wrapper"
    r.zadd(f"{queue_name}:retry", {due: now - 1, later: now + 3600})
    results = [q.promote_due(), other.promote_due()]
    assert sorted(results) == [0, 1]  # a second promoter finds nothing left
    assert r.zrange(f"{queue_name}:retry", 0, -1) == [later]
    queue = r.lrange(queue_name, 0, -1)
    assert queue == ([due, *waiting] if order == "fifo" else [*waiting, due])
    assert q.fetch(0, 1, 0) == [due]  # next in line


def test_promote_respects_its_limit(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    now = redis_now(r)
    r.zadd(f"{queue_name}:retry", {f"w{i}": now - 10 + i for i in range(5)})
    assert q.promote_due(limit=2) == 2
    assert r.zcard(f"{queue_name}:retry") == 3
    assert q.promote_due() == 3
    assert r.llen(queue_name) == 5


@pytest.mark.parametrize("order", ["fifo", "lifo"])
def test_requeue_restores_the_original_order(r: redis.Redis, queue_name: str,
                                             order: str) -> None:
    q = registered(r, queue_name, order=order)
    pushed = items(6)
    r.rpush(queue_name, *pushed)
    fetched = q.fetch(0, 3, 0)
    assert q.requeue(0, fetched) == 3
    assert r.lrange(queue_name, 0, -1) == pushed
    assert r.llen(q.slot_key(0)) == 0
    assert q.requeue(0, fetched) == 0  # replay: nothing twice
    assert r.lrange(queue_name, 0, -1) == pushed
    assert q.fetch(0, 3, 0) == fetched  # the same ones come out next


def test_requeue_of_a_subset(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    pushed = items(4)
    r.rpush(queue_name, *pushed)
    fetched = q.fetch(0, 3, 0)
    assert q.requeue(0, [fetched[0], fetched[2]]) == 2
    assert r.lrange(queue_name, 0, -1) == [pushed[0], pushed[2], pushed[3]]
    assert r.lrange(q.slot_key(0), 0, -1) == [pushed[1]]


# -- workers: heartbeat, reaping, release --------------------------------------------------------


def test_heartbeat_registers(r: redis.Redis, queue_name: str) -> None:
    q = RedisQueue(r, queue_name)
    before = redis_now(r)
    assert q.heartbeat(10, 7) is False
    assert q.heartbeat(10, 7) is True
    deadline = r.zscore(f"{queue_name}:workers", q.worker_id)
    assert deadline is not None and before + 10 <= deadline <= redis_now(r) + 10
    info = json.loads(r.hget(f"{queue_name}:workers:info", q.worker_id))
    assert info["slots"] == 7
    assert q.worker_slots(q.worker_id) == 7


def test_worker_ids_differ() -> None:
    client = redis.Redis()  # never connects: only the ids are compared
    assert RedisQueue(client, "q").worker_id != RedisQueue(client, "q").worker_id


def test_reap_returns_a_dead_workers_items_exactly_once(r: redis.Redis,
                                                        redis_server: RedisServer,
                                                        queue_name: str) -> None:
    dead = registered(r, queue_name, slots=3)
    pushed = items(7)
    r.rpush(queue_name, *pushed)
    slot0 = dead.fetch(0, 3, 0)
    slot2 = dead.fetch(2, 3, 0)
    assert r.lrange(queue_name, 0, -1) == pushed[6:]
    dead.heartbeat(-1, 3)  # its deadline is now in the past

    alive = [registered(redis.Redis.from_url(redis_server.url), queue_name) for _ in range(2)]
    reapers = [gevent.spawn(q.reap_expired) for q in alive]
    gevent.joinall(reapers, timeout=10, raise_error=True)
    outcomes = [g.value for g in reapers]
    assert sorted(outcomes, key=len) == [{}, {dead.worker_id: 6}]

    queue = r.lrange(queue_name, 0, -1)
    assert sorted(queue) == sorted(pushed)  # everything back, no duplicates
    assert queue[-1] == pushed[6]           # ahead of what was still waiting
    for slot in (slot0, slot2):             # each slot's items keep their order
        positions = [queue.index(x) for x in slot]
        assert positions == sorted(positions)
    assert r.zscore(f"{queue_name}:workers", dead.worker_id) is None
    # Kept (with its slot count) while its lists are swept for a thawed-zombie pop.
    assert r.hget(f"{queue_name}:workers:info", dead.worker_id) is not None
    assert r.zscore(f"{queue_name}:workers:reaped", dead.worker_id) is not None
    assert all(q.reap_expired() == {} for q in alive)
    with pytest.raises(WorkerReaped):
        dead.fetch(0, 3, 0)
    for q in alive:
        q.client.close()


def test_reap_leaves_live_workers_alone(r: redis.Redis, queue_name: str) -> None:
    live = registered(r, queue_name, slots=1)
    r.rpush(queue_name, *items(2))
    live.fetch(0, 2, 0)
    other = registered(r, queue_name)
    assert other.reap_expired() == {}
    assert r.llen(live.slot_key(0)) == 2


def test_reap_in_lifo_puts_items_at_the_tail(r: redis.Redis, queue_name: str) -> None:
    dead = registered(r, queue_name, order="lifo", slots=1)
    pushed = items(4)
    r.rpush(queue_name, *pushed)
    fetched = dead.fetch(0, 2, 0)
    assert fetched == [pushed[3], pushed[2]]
    dead.heartbeat(-1, 1)
    assert registered(r, queue_name, order="lifo").reap_expired() == {dead.worker_id: 2}
    assert r.lrange(queue_name, 0, -1) == pushed
    assert registered(r, queue_name, order="lifo").fetch(0, 2, 0) == fetched


def test_release_returns_own_items_and_unregisters(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name, slots=2)
    pushed = items(5)
    r.rpush(queue_name, *pushed)
    q.fetch(0, 2, 0)
    q.fetch(1, 2, 0)
    assert q.release(2) == 4
    assert sorted(r.lrange(queue_name, 0, -1)) == sorted(pushed)
    assert r.lrange(queue_name, 0, -1)[-1] == pushed[4]
    assert r.zscore(f"{queue_name}:workers", q.worker_id) is None
    assert r.hget(f"{queue_name}:workers:info", q.worker_id) is None
    with pytest.raises(WorkerReaped):
        q.fetch(0, 2, 0)
    assert q.release(2) == 0  # nothing left: harmless


# -- backlog and dead letters ----------------------------------------------------------------------


def test_trim_drops_the_oldest_excess(r: redis.Redis, queue_name: str) -> None:
    q = RedisQueue(r, queue_name)
    pushed = items(10)
    r.rpush(queue_name, *pushed)
    assert q.trim(4) == 6
    assert r.lrange(queue_name, 0, -1) == pushed[6:]
    assert q.trim(4) == 0
    assert q.trim(100) == 0
    assert r.hget(f"{queue_name}:stats", "shed_backlog") == b"6"
    assert q.lengths() == {"queue": 4, "retry": 0, "dead": 0}


def test_requeue_dead_moves_each_back_exactly_once(r: redis.Redis, redis_server: RedisServer,
                                                   queue_name: str) -> None:
    q = registered(r, queue_name)
    payloads = [b'{"channel":"a"}', b'{"channel":"b"}', b"junk"]
    r.rpush(queue_name, *payloads)
    q.fetch(0, 10, 0)
    for i, raw in enumerate(payloads):
        q.dead_letter(0, raw, {"payload": raw.decode(), "error": "x", "failed_at": float(i),
                               "attempts": 1})
    r.rpush(f"{queue_name}:dead", b"not relay's")
    entries = r.lrange(f"{queue_name}:dead", 0, -1)

    clients = [redis.Redis.from_url(redis_server.url) for _ in range(2)]
    admins = [DeadLetters(c, Keys(queue_name)) for c in clients]
    jobs = [gevent.spawn(a.requeue, entries) for a in admins]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert sum(j.value for j in jobs) == 3
    assert r.lrange(queue_name, 0, -1) == payloads  # as pushed, in order, once each
    assert r.lrange(f"{queue_name}:dead", 0, -1) == [b"not relay's"]
    assert admins[0].requeue(entries) == 0
    for c in clients:
        c.close()


# -- keys ----------------------------------------------------------------------------------------


def exercise_every_key(r: redis.Redis, name: str) -> RedisQueue:
    """Run every operation once, leaving each key the queue keeps non-empty."""
    q = registered(r, name, slots=2)
    r.rpush(name, *items(8))
    a, b, c, d, e, f = q.fetch(0, 6, 0)
    q.ack(0, [a])
    for n, raw in enumerate((b, c)):
        q.dead_letter(0, raw, {"payload": raw.decode(), "error": "e", "failed_at": n,
                               "attempts": 1})
    DeadLetters(r, q.keys).requeue(r.lrange(f"{name}:dead", 0, 0))  # one of two goes back
    q.retry_later(0, d, retry_wrapper(d.decode(), 1, 1.0, "e"), 60)
    r.zadd(f"{name}:retry", {"due": 0})
    q.promote_due()
    q.requeue(0, [e])
    q.fetch(1, 2, 0)
    q.trim(1)
    q.lengths()
    other = registered(r, name, slots=1)
    other.fetch(0, 1, 0)
    other.heartbeat(-1, 1)
    q.reap_expired()
    assert r.llen(q.slot_key(0)) == 1 and f  # f is still in flight
    return q


def test_every_key_starts_with_the_queue_name(r: redis.Redis, queue_name: str) -> None:
    q = exercise_every_key(r, queue_name)
    keys = {k.decode() for k in r.keys("*")}
    assert {queue_name, f"{queue_name}:stats", f"{queue_name}:retry", f"{queue_name}:workers",
            f"{queue_name}:workers:info", f"{queue_name}:dead", q.slot_key(0),
            q.slot_key(1)} <= keys
    assert all(k == queue_name or k.startswith(f"{queue_name}:") for k in keys), keys


def test_hash_tagged_name_keeps_every_key_in_one_slot(r: redis.Redis) -> None:
    name = "{notifications}"
    exercise_every_key(r, name)
    keys = r.keys("*")
    assert len(keys) >= 8
    assert {key_slot(k) for k in keys} == {key_slot(name.encode())}
    assert all(k.decode().startswith(name) for k in keys)


def test_lazy_fetch_takes_a_lone_item_in_one_blocking_pop(r, queue_name):
    from relay.queue import RedisQueue

    q = RedisQueue(r, queue_name, "fifo")
    q.heartbeat(10, 1)
    r.rpush(queue_name, b"a", b"b", b"c")
    assert q.fetch(0, 10, 1.0, eager=False) == [b"a"]  # no top-up: one round trip
    assert r.lrange(q.slot_key(0), 0, -1) == [b"a"]
    assert q.fetch(0, 10, 1.0, eager=True) == [b"a", b"b", b"c"]  # adopts and tops up


def test_linger_tops_the_lone_item_up_with_what_arrived(r, queue_name):
    """RELAY_LINGER: the pop brings one item, then the batch is topped up after the wait
    (here the others were already there: with no linger the pop would take one alone)."""
    q = registered(r, queue_name, slots=1)
    r.rpush(queue_name, *items(3))
    assert q.fetch(0, 10, 1.0, eager=False, linger=0.01) == items(3)
    assert q.fetch(0, 10, 1.0, eager=False, linger=0.01) == items(3)  # adopted again
    r.delete(q.slot_key(0))
    r.rpush(queue_name, *items(3))
    assert q.fetch(0, 1, 1.0, eager=False, linger=0.01) == items(3)[:1]  # a probe: no wait


def test_a_stop_cuts_the_linger_short(r, queue_name):
    q = registered(r, queue_name, slots=1)
    r.rpush(queue_name, *items(2))
    fetch = gevent.spawn(q.fetch, 0, 10, 1.0, False, 30.0)
    wait_for(lambda: r.llen(q.slot_key(0)) == 1, what="the pop")  # now lingering for 30 s
    assert not fetch.ready()
    q.pops.close()
    assert fetch.get(timeout=5) == []  # what it moved stays in the slot for shutdown
    assert r.lrange(q.slot_key(0), 0, -1) == items(2)[:1]


def test_a_reaped_worker_hands_back_what_a_blocking_pop_put_in_its_slot(
        r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    r.rpush(queue_name, *items(3))
    r.zrem(q.keys.workers, q.worker_id)  # another worker declared this one dead
    assert q.fetch(0, 10, 1.0, eager=False) == [items(3)[0]]  # BLMOVE does not check
    with pytest.raises(WorkerReaped):
        q.fetch(0, 10, 0)  # the next fetch does: the slot goes back, first in line
    assert r.llen(q.slot_key(0)) == 0
    assert r.lrange(queue_name, 0, -1) == items(3)


def _expire(r: redis.Redis, q: RedisQueue) -> None:
    """Make q's heartbeat deadline lie in the past, as if it had stopped beating."""
    r.zadd(q.keys.workers, {q.worker_id: 1})


def test_a_reaped_workers_lists_are_swept_for_a_while(r: redis.Redis, queue_name: str) -> None:
    frozen, live = registered(r, queue_name, worker_id="frozen"), registered(r, queue_name)
    r.rpush(queue_name, *items(2))
    assert frozen.fetch(0, 1, 0) == items(2)[:1]
    _expire(r, frozen)
    assert live.reap_expired() == {"frozen": 1}
    # It thaws, pops once more, and dies before its heartbeat: the sweep finds the item.
    r.lmove(queue_name, frozen.slot_key(2), "LEFT", "RIGHT")
    assert live.reap_expired() == {"frozen": 1}
    assert r.lrange(queue_name, 0, -1) == items(2)
    assert r.zscore(live.keys.reaped, "frozen") is not None


def test_a_worker_registered_again_is_not_swept(r: redis.Redis, queue_name: str) -> None:
    frozen, live = registered(r, queue_name, worker_id="frozen"), registered(r, queue_name)
    _expire(r, frozen)
    live.reap_expired()
    assert frozen.heartbeat(60, 4) is False  # it thawed: registered anew
    r.rpush(queue_name, *items(1))
    assert frozen.fetch(0, 10, 0) == items(1)
    assert live.reap_expired() == {}
    assert r.lrange(frozen.slot_key(0), 0, -1) == items(1)
    assert r.zscore(live.keys.reaped, "frozen") is None


def test_the_sweep_forgets_a_worker_after_the_grace(r: redis.Redis, queue_name: str) -> None:
    gone, live = registered(r, queue_name, worker_id="gone"), registered(r, queue_name)
    _expire(r, gone)
    live.reap_expired()
    assert r.hexists(live.keys.info, "gone")
    r.zadd(live.keys.reaped, {"gone": 1})  # reaped long ago
    live.reap_expired()
    assert r.zscore(live.keys.reaped, "gone") is None
    assert not r.hexists(live.keys.info, "gone")


def test_a_clean_shutdown_leaves_nothing_to_sweep(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    r.rpush(queue_name, *items(3))
    q.fetch(0, 10, 0)
    assert q.release(4) == 3
    assert r.zcard(q.keys.reaped) == 0 and not r.hexists(q.keys.info, q.worker_id)
