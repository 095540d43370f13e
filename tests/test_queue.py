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
from relay.queue import Keys, Op, RedisQueue, Taken, WorkerReaped
from relay.redis_server import RedisServer
from tests.support import wait_for


def items(n: int, prefix: str = "m") -> list[bytes]:
    return [f'{{"channel":"c","n":"{prefix}{i}"}}'.encode() for i in range(n)]


def registered(r: redis.Redis, name: str, order: str = "fifo",
               worker_id: str | None = None, owned: bool = False) -> RedisQueue:
    """A registered worker's queue; without channel ownership unless asked: these tests are
    about the queue's own mechanics (ownership is tests/test_ownership.py's)."""
    q = RedisQueue(r, name, order, worker_id=worker_id, owned=owned)
    q.heartbeat(60)
    return q


def took(taken: Taken) -> tuple[list[bytes], int | None]:
    """A fetch's items (without their lane keys) and the queue's length after."""
    return [raw for raw, _ in taken.items], taken.length


def redis_now(r: redis.Redis) -> float:
    seconds, micros = r.time()
    return seconds + micros / 1e6


# -- fetch -------------------------------------------------------------------------------------


def test_fetch_moves_up_to_most_fifo_into_the_inflight_list(r: redis.Redis,
                                                            queue_name: str) -> None:
    q = registered(r, queue_name)
    pushed = items(5)
    r.rpush(queue_name, *pushed)
    assert took(q.fetch(3)) == (pushed[:3], 2)
    assert r.lrange(q.inflight_key, 0, -1) == pushed[:3]
    assert r.lrange(queue_name, 0, -1) == pushed[3:]
    assert took(q.fetch(10)) == (pushed[3:], 0)
    assert took(q.fetch(10)) == ([], 0)
    assert [raw for raw, _ in q.inflight_items()] == pushed
    # The list keeps the name a per-slot list had for slot 0 (workers before 1.1 reap it).
    assert q.inflight_key == f"{queue_name}:inflight:{q.worker_id}:0"


def test_lifo_gives_the_newest_first(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name, order="lifo")
    pushed = items(5)
    r.rpush(queue_name, *pushed)
    assert took(q.fetch(2)) == ([pushed[4], pushed[3]], 3)
    assert r.lrange(queue_name, 0, -1) == pushed[:3]


def test_pop_on_an_empty_queue_blocks_then_returns_nothing(r: redis.Redis,
                                                           queue_name: str) -> None:
    q = registered(r, queue_name)
    started = time.monotonic()
    assert took(q.pop(0.3, 10)) == ([], 0)  # the fetch behind the pop found nothing either
    assert time.monotonic() - started >= 0.25  # it blocked (an upper bound would be load's)


def test_a_blocked_pop_wakes_for_a_push_and_tops_up_in_the_same_round_trip(
        r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    popper = gevent.spawn(q.pop, 60.0, 3)
    wait_for(lambda: any(c.get("cmd") == "blmove" for c in r.client_list()), 5,
             "the pop to block in BLMOVE")
    pushed = items(5)
    r.rpush(queue_name, *pushed)
    # Woken by the push, not by the end of its 60 s block (20 s is load's margin): the first
    # by BLMOVE, two more by the script pipelined behind it, and the queue's length after.
    assert took(popper.get(timeout=20)) == (pushed[:3], 2)
    assert r.lrange(q.inflight_key, 0, -1) == pushed[:3]


def test_a_pop_takes_no_more_than_asked(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    r.rpush(queue_name, *items(3))
    assert took(q.pop(1.0, 1)) == (items(3)[:1], 2)


def test_a_pop_after_a_redis_restart_loads_its_script_again(r: redis.Redis,
                                                           queue_name: str) -> None:
    q = registered(r, queue_name)
    r.script_flush()
    r.rpush(queue_name, *items(3))
    assert took(q.pop(1.0, 3)) == (items(3), 0)  # loaded and run again at once


def test_fetch_raises_when_unregistered(r: redis.Redis, queue_name: str) -> None:
    q = RedisQueue(r, queue_name)
    r.rpush(queue_name, *items(2))
    with pytest.raises(WorkerReaped):
        q.fetch(10)
    assert r.llen(queue_name) == 2  # nothing moved
    assert q.heartbeat(60) is False
    assert took(q.fetch(10)) == (items(2), 0)


def test_a_reaped_workers_pop_takes_nothing(r: redis.Redis, queue_name: str) -> None:
    """The blocking pop only waits (BLMOVE from the queue to itself); the script behind it
    sees the worker was reaped and takes nothing."""
    q = registered(r, queue_name)
    r.rpush(queue_name, *items(3))
    r.zrem(q.keys.workers, q.worker_id)  # another worker declared this one dead
    with pytest.raises(WorkerReaped):
        q.pop(1.0, 10)
    assert r.llen(q.inflight_key) == 0
    assert r.lrange(queue_name, 0, -1) == items(3)


# -- settle ------------------------------------------------------------------------------------


def test_settle_carries_out_every_fate_of_a_call_in_one_script(r: redis.Redis,
                                                               queue_name: str) -> None:
    q = registered(r, queue_name)
    a, b, c, d, e, f = items(6)
    r.rpush(queue_name, a, b, c, d, e, f, b"waiting")
    q.fetch(6)
    wrapper = retry_wrapper(c.decode(), 1, 100.0, "HTTP 503")
    entry = {"payload": d.decode(), "error": "rejected", "failed_at": 1.5, "attempts": 1}
    before = redis_now(r)
    ops = [Op.ack(a), Op.shed(b), Op.retry(c, wrapper, 30.0), Op.dead(d, entry),
           Op.put_back(e), Op.put_back(f)]
    assert (q.settle(ops, "calls=1").landed, q.length()) == ([True] * 6, 3)
    after = redis_now(r)
    assert r.llen(q.inflight_key) == 0
    assert r.lrange(queue_name, 0, -1) == [e, f, b"waiting"]  # put back in order, next
    ((member, score),) = r.zrange(f"{queue_name}:retry", 0, -1, withscores=True)
    assert member == wrapper.encode() and before + 30 <= score <= after + 30
    assert [json.loads(x) for x in r.lrange(f"{queue_name}:dead", 0, -1)] == [entry]
    assert r.hgetall(f"{queue_name}:stats") == {
        b"delivered": b"1", b"shed_max_age": b"1", b"retried": b"1", b"dead": b"1"}
    history = {}
    for key in r.keys(f"{queue_name}:history:s:*"):
        for field, n in r.hgetall(key).items():
            history[field] = history.get(field, 0) + int(n)
    assert history == {b"delivered": 1, b"shed": 1, b"retried": 1, b"dead": 1,
                       b"requeued": 2, b"calls": 1}


def test_a_replayed_settle_does_nothing_twice(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    a, b, c = items(3)
    r.rpush(queue_name, a, b, c)
    q.fetch(3)
    ops = [Op.ack(a), Op.put_back(b), Op.dead(c, {"payload": "x", "error": "e",
                                                    "failed_at": 1, "attempts": 0})]
    assert q.settle(ops).landed == [True, True, True]
    assert q.settle(ops).landed == [False, False, False]  # after a lost reply: nothing twice
    assert r.lrange(queue_name, 0, -1) == [b]
    assert r.llen(f"{queue_name}:dead") == 1
    assert r.hget(f"{queue_name}:stats", "delivered") == b"1"


def test_settle_removes_exactly_one_of_twins(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    twin, other = b'{"channel":"twin"}', b'{"channel":"other"}'
    r.rpush(queue_name, twin, other, twin)
    q.fetch(3)
    assert q.settle([Op.ack(twin)]).landed == [True]
    assert r.lrange(q.inflight_key, 0, -1) == [other, twin]
    assert q.settle([Op.ack(b"never fetched")]).landed == [False]


@pytest.mark.parametrize("order", ["fifo", "lifo"])
def test_put_back_restores_the_original_order(r: redis.Redis, queue_name: str,
                                              order: str) -> None:
    q = registered(r, queue_name, order=order)
    pushed = items(6)
    r.rpush(queue_name, *pushed)
    fetched, _ = took(q.fetch(3))
    assert q.settle([Op.put_back(x) for x in fetched]).landed == [True] * 3
    assert r.lrange(queue_name, 0, -1) == pushed
    assert r.llen(q.inflight_key) == 0
    assert took(q.fetch(3))[0] == fetched  # the same ones come out next


def test_an_unknown_op_is_refused_and_changes_nothing(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    r.rpush(queue_name, *items(1))
    q.fetch(1)
    with pytest.raises(redis.ResponseError, match="unknown op"):
        q.settle([Op("z", items(1)[0])])


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
    assert took(q.fetch(1))[0] == [due]  # next in line


def test_promote_respects_its_limit(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    now = redis_now(r)
    r.zadd(f"{queue_name}:retry", {f"w{i}": now - 10 + i for i in range(5)})
    assert q.promote_due(limit=2) == 2
    assert r.zcard(f"{queue_name}:retry") == 3
    assert q.promote_due() == 3
    assert r.llen(queue_name) == 5


def test_put_back_of_a_subset(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    pushed = items(4)
    r.rpush(queue_name, *pushed)
    fetched, _ = took(q.fetch(3))
    assert q.settle([Op.put_back(fetched[0]), Op.put_back(fetched[2])]).landed == [True, True]
    assert r.lrange(queue_name, 0, -1) == [pushed[0], pushed[2], pushed[3]]
    assert r.lrange(q.inflight_key, 0, -1) == [pushed[1]]


# -- workers: heartbeat, reaping, release --------------------------------------------------------


def test_heartbeat_registers(r: redis.Redis, queue_name: str) -> None:
    q = RedisQueue(r, queue_name)
    before = redis_now(r)
    assert q.heartbeat(10, {"busy": 3}) is False
    assert q.heartbeat(10) is True
    deadline = r.zscore(f"{queue_name}:workers", q.worker_id)
    assert deadline is not None and before + 10 <= deadline <= redis_now(r) + 10
    info = json.loads(r.hget(f"{queue_name}:workers:info", q.worker_id))
    assert info["slots"] == 1  # one in-flight list: what a reaper of any version reads
    assert q.worker_slots(q.worker_id) == 1
    assert q.worker_slots("never-registered") == 1  # its list :0 is looked at all the same


def test_worker_ids_differ() -> None:
    client = redis.Redis()  # never connects: only the ids are compared
    assert RedisQueue(client, "q").worker_id != RedisQueue(client, "q").worker_id


def test_reap_returns_a_dead_workers_items_exactly_once(r: redis.Redis,
                                                        redis_server: RedisServer,
                                                        queue_name: str) -> None:
    dead = registered(r, queue_name)
    pushed = items(7)
    r.rpush(queue_name, *pushed)
    slot0, _ = took(dead.fetch(3))
    slot2, _ = took(dead.fetch(3))
    assert r.lrange(queue_name, 0, -1) == pushed[6:]
    dead.heartbeat(-1)  # its deadline is now in the past

    alive = [registered(redis.Redis.from_url(redis_server.url), queue_name) for _ in range(2)]
    reapers = [gevent.spawn(q.reap_expired) for q in alive]
    gevent.joinall(reapers, timeout=10, raise_error=True)
    outcomes = [g.value for g in reapers]
    assert sorted(outcomes, key=len) == [{}, {dead.worker_id: 6}]

    queue = r.lrange(queue_name, 0, -1)
    assert sorted(queue) == sorted(pushed)  # everything back, no duplicates
    assert queue[-1] == pushed[6]           # ahead of what was still waiting
    for slot in (slot0, slot2):             # they keep their order
        positions = [queue.index(x) for x in slot]
        assert positions == sorted(positions)
    assert r.zscore(f"{queue_name}:workers", dead.worker_id) is None
    # Kept (with its list count) while its lists are swept for a thawed-zombie pop.
    assert r.hget(f"{queue_name}:workers:info", dead.worker_id) is not None
    assert r.zscore(f"{queue_name}:workers:reaped", dead.worker_id) is not None
    assert all(q.reap_expired() == {} for q in alive)
    with pytest.raises(WorkerReaped):
        dead.fetch(3)
    for q in alive:
        q.client.close()


def test_reap_leaves_live_workers_alone(r: redis.Redis, queue_name: str) -> None:
    live = registered(r, queue_name)
    r.rpush(queue_name, *items(2))
    live.fetch(2)
    other = registered(r, queue_name)
    assert other.reap_expired() == {}
    assert r.llen(live.inflight_key) == 2


def test_reap_in_lifo_puts_items_at_the_tail(r: redis.Redis, queue_name: str) -> None:
    dead = registered(r, queue_name, order="lifo")
    pushed = items(4)
    r.rpush(queue_name, *pushed)
    fetched, _ = took(dead.fetch(2))
    assert fetched == [pushed[3], pushed[2]]
    dead.heartbeat(-1)
    assert registered(r, queue_name, order="lifo").reap_expired() == {dead.worker_id: 2}
    assert r.lrange(queue_name, 0, -1) == pushed
    assert took(registered(r, queue_name, order="lifo").fetch(2))[0] == fetched


def test_release_returns_own_items_and_unregisters(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    pushed = items(5)
    r.rpush(queue_name, *pushed)
    q.fetch(2)
    q.fetch(2)
    assert q.release() == 4
    assert r.lrange(queue_name, 0, -1) == pushed  # back first in line, in order
    assert r.zscore(f"{queue_name}:workers", q.worker_id) is None
    assert r.hget(f"{queue_name}:workers:info", q.worker_id) is None
    with pytest.raises(WorkerReaped):
        q.fetch(2)
    assert q.release() == 0  # nothing left: harmless


def test_the_per_slot_lists_of_a_worker_before_1_1_are_recovered(r: redis.Redis,
                                                                 queue_name: str) -> None:
    """A rolling upgrade: a worker of the previous version, with one in-flight list per
    greenlet slot and `slots` in its info, dies; a worker of this version returns every list."""
    old = "oldhost:123:abcdef"
    lists = {n: items(2, f"s{n}-") for n in (0, 3, 49)}
    for n, held in lists.items():
        r.rpush(f"{queue_name}:inflight:{old}:{n}", *held)
    r.zadd(f"{queue_name}:workers", {old: 1})  # its heartbeat long expired
    r.hset(f"{queue_name}:workers:info", old, json.dumps({"slots": 50, "ttl": 10}))
    assert registered(r, queue_name).reap_expired() == {old: 6}
    assert sorted(r.lrange(queue_name, 0, -1)) == sorted(x for v in lists.values() for x in v)
    assert not r.keys(f"{queue_name}:inflight:{old}:*")


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
    q.fetch(10)
    q.settle([Op.dead(raw, {"payload": raw.decode(), "error": "x", "failed_at": float(i),
                            "attempts": 1}) for i, raw in enumerate(payloads)])
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
    q = registered(r, name, owned=True)
    r.rpush(name, *items(8))
    (a, b, c, d, e, f), _ = took(q.fetch(6))
    q.settle([Op.ack(a)] + [Op.dead(raw, {"payload": raw.decode(), "error": "e",
                                         "failed_at": n, "attempts": 1})
                           for n, raw in enumerate((b, c))])
    DeadLetters(r, q.keys).requeue(r.lrange(f"{name}:dead", 0, 0))  # one of two goes back
    q.settle([Op.retry(d, retry_wrapper(d.decode(), 1, 1.0, "e"), 60), Op.put_back(e)])
    r.zadd(f"{name}:retry", {"due": 0})
    q.promote_due()
    q.trim(1)
    q.lengths()
    other = registered(r, name, owned=True)
    r.rpush(name, b'{"channel":"d"}')
    assert took(other.fetch(2))[0] == [b'{"channel":"d"}']  # "c" is q's: handed over to it
    other.heartbeat(-1)
    q.reap_expired()
    assert r.lrange(q.inflight_key, 0, -1) == [f]  # f is still in flight
    assert r.llen(q.keys.lane("c")) == 1  # a "c" left in the queue, parked for q, its owner
    r.rpush(name, b"waiting")
    return q


def test_every_key_starts_with_the_queue_name(r: redis.Redis, queue_name: str) -> None:
    q = exercise_every_key(r, queue_name)
    keys = {k.decode() for k in r.keys("*")}
    assert {queue_name, f"{queue_name}:stats", f"{queue_name}:retry", f"{queue_name}:workers",
            f"{queue_name}:workers:info", f"{queue_name}:dead", q.inflight_key,
            q.keys.owners, q.keys.held(q.worker_id), q.keys.parked(q.worker_id),
            q.keys.lane("c")} <= keys
    assert all(k == queue_name or k.startswith(f"{queue_name}:") for k in keys), keys


def test_hash_tagged_name_keeps_every_key_in_one_slot(r: redis.Redis) -> None:
    name = "{notifications}"
    exercise_every_key(r, name)
    keys = r.keys("*")
    assert len(keys) >= 7
    assert {key_slot(k) for k in keys} == {key_slot(name.encode())}
    assert all(k.decode().startswith(name) for k in keys)


def _expire(r: redis.Redis, q: RedisQueue) -> None:
    """Make q's heartbeat deadline lie in the past, as if it had stopped beating."""
    r.zadd(q.keys.workers, {q.worker_id: 1})


def test_a_reaped_workers_lists_are_swept_for_a_while(r: redis.Redis, queue_name: str) -> None:
    frozen, live = registered(r, queue_name, worker_id="frozen"), registered(r, queue_name)
    r.rpush(queue_name, *items(2))
    assert took(frozen.fetch(1))[0] == items(2)[:1]
    _expire(r, frozen)
    assert live.reap_expired() == {"frozen": 1}
    # It thaws, pops once more, and dies before its heartbeat: the sweep finds the item.
    r.lmove(queue_name, frozen.inflight_key, "LEFT", "RIGHT")
    assert live.reap_expired() == {"frozen": 1}
    assert r.lrange(queue_name, 0, -1) == items(2)
    assert r.zscore(live.keys.reaped, "frozen") is not None


def test_a_worker_registered_again_is_not_swept(r: redis.Redis, queue_name: str) -> None:
    frozen, live = registered(r, queue_name, worker_id="frozen"), registered(r, queue_name)
    _expire(r, frozen)
    live.reap_expired()
    assert frozen.heartbeat(60) is False  # it thawed: registered anew
    r.rpush(queue_name, *items(1))
    assert took(frozen.fetch(10))[0] == items(1)
    assert live.reap_expired() == {}
    assert r.lrange(frozen.inflight_key, 0, -1) == items(1)
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
    q.fetch(10)
    assert q.release() == 3
    assert r.zcard(q.keys.reaped) == 0 and not r.hexists(q.keys.info, q.worker_id)
