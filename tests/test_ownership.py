"""relay.ownership against a real redis-server: a channel has one owner at a time, across
processes. Each "process" here is a RedisQueue with a worker id of its own, driven step by step
(take, hand over, settle, release, park, unpark, die, be reaped), so every interleaving that
matters is written down, and a property test then mixes them at random."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
import redis

from relay.lanes import Entry, Lanes
from relay.queue import Op, RedisQueue, Taken


def note(channel: str | list[str], n: int, app: str | None = None) -> bytes:
    if isinstance(channel, list) or app:
        obj = {"relay": 1, "channels": channel if isinstance(channel, list) else [channel],
               "event": "e", "data": {"n": n}}
        if app:
            obj["app"] = app
        return json.dumps(obj).encode()
    return json.dumps({"channel": channel, "n": n}).encode()


def proc(r: redis.Redis, queue: str, name: str, order: str = "fifo", spread: int = 1000
         ) -> RedisQueue:
    q = RedisQueue(r, queue, order, worker_id=name, spread=spread)
    q.heartbeat(60)
    return q


def got(taken: Taken) -> list[bytes]:
    return [raw for raw, _ in taken.items]


def ack(q: RedisQueue, taken: Taken, *only: bytes) -> None:
    """Settle what was taken (or only these of it) as delivered, with its lane keys."""
    q.settle([Op.ack(raw, keys) for raw, keys in taken.items if not only or raw in only])


def owner(r: redis.Redis, q: RedisQueue, key: str) -> str | None:
    found = r.hget(q.keys.owners, key)
    return found.decode() if found else None


def lane(r: redis.Redis, q: RedisQueue, key: str) -> list[bytes]:
    return r.lrange(q.keys.lane(key), 0, -1)


# -- take, hand over, release -------------------------------------------------------------------


def test_a_free_channel_is_taken_and_released_when_its_lane_empties(r, queue_name) -> None:
    a = proc(r, queue_name, "A")
    r.rpush(queue_name, note("c", 0), note("c", 1))
    taken = a.fetch(10)
    assert taken.items == [(note("c", 0), ("c",)), (note("c", 1), ("c",))]
    assert owner(r, a, "c") == "A" and r.hget(a.keys.held("A"), "c") == b"2"
    a.settle([Op.ack(note("c", 0), ("c",))])
    assert owner(r, a, "c") == "A"  # one still held
    assert a.settle([Op.ack(note("c", 1), ("c",))]).parked == 0
    assert owner(r, a, "c") is None and not r.exists(a.keys.held("A"))


def test_another_process_hands_an_owned_channels_notification_over(r, queue_name) -> None:
    a, b = proc(r, queue_name, "A"), proc(r, queue_name, "B")
    r.rpush(queue_name, note("c", 0))
    first = a.fetch(10)
    r.rpush(queue_name, note("c", 1), note("d", 2))
    taken = b.fetch(10)
    assert got(taken) == [note("d", 2)]  # c is A's: handed over, d was free
    assert lane(r, a, "c") == [note("c", 1)] and r.smembers(a.keys.parked("A")) == {b"c"}
    # A settles its last c: the lane is not empty, so A keeps c, and is told of parked ones.
    assert a.settle([Op.ack(note("c", 0), ("c",))]).parked == 1
    assert owner(r, a, "c") == "A"
    assert got(a.fetch(10)) == [note("c", 1)]  # unparked, in order, before anything newer
    assert lane(r, a, "c") == [] and r.scard(a.keys.parked("A")) == 0
    ack(b, taken)
    del first


def test_a_busy_channel_parks_beyond_its_cap_and_others_still_come_in(r, queue_name) -> None:
    a = proc(r, queue_name, "A")
    cap = a.CAP
    r.rpush(queue_name, *[note("busy", n) for n in range(cap + 20)], note("quiet", 99))
    taken = a.fetch(1000)
    assert got(taken) == [note("busy", n) for n in range(cap)] + [note("quiet", 99)]
    assert lane(r, a, "busy") == [note("busy", n) for n in range(cap, cap + 20)]
    assert taken.parked == 1 and r.llen(queue_name) == 0
    r.rpush(queue_name, note("busy", 1000))  # newer: behind the parked ones, not around them
    a.fetch(1000)
    assert lane(r, a, "busy")[-1] == note("busy", 1000)
    ack(a, taken, *[note("busy", n) for n in range(10)])  # ten answered: room for ten more
    again = a.fetch(1000)
    assert got(again) == [note("busy", n) for n in range(cap, cap + 10)]


def test_put_back_goes_before_what_is_parked(r, queue_name) -> None:
    a = proc(r, queue_name, "A")
    r.rpush(queue_name, *[note("c", n) for n in range(a.CAP + 5)])
    taken = a.fetch(1000)
    first_ten = taken.items[:10]
    a.settle([Op.put_back(raw, keys) for raw, keys in first_ten])
    assert lane(r, a, "c")[:11] == [note("c", n) for n in range(10)] + [note("c", a.CAP)]
    assert r.llen(queue_name) == 0
    ack(a, taken, *[note("c", n) for n in range(10, a.CAP)])
    assert got(a.fetch(1000)) == [note("c", n) for n in [*range(10), *range(a.CAP, a.CAP + 5)]]


def test_put_back_of_a_free_channel_goes_to_the_queue_and_releases_it(r, queue_name) -> None:
    a = proc(r, queue_name, "A")
    r.rpush(queue_name, note("c", 0), note("c", 1))
    taken = a.fetch(10)
    a.settle([Op.put_back(raw, keys) for raw, keys in taken.items])
    assert r.lrange(queue_name, 0, -1) == [note("c", 0), note("c", 1)]
    assert owner(r, a, "c") is None


def test_an_envelope_over_two_owners_waits_until_one_can_take_both(r, queue_name) -> None:
    a, b = proc(r, queue_name, "A"), proc(r, queue_name, "B")
    r.rpush(queue_name, note("x", 0))
    held_by_a = a.fetch(10)
    r.rpush(queue_name, note("y", 1))
    held_by_b = b.fetch(10)
    r.rpush(queue_name, note(["x", "y"], 2), note("x", 3), note("y", 4))
    assert got(a.fetch(10)) == []  # all three parked: the envelope first in both lanes
    assert lane(r, a, "x") == [note(["x", "y"], 2), note("x", 3)]
    assert lane(r, a, "y") == [note(["x", "y"], 2), note("y", 4)]
    ack(a, held_by_a)  # A is done with x; B still holds y 1: the envelope waits
    waiting = a.fetch(10)
    assert got(waiting) == [] and waiting.waiting == 1
    ack(b, held_by_b)  # now B holds no y: A takes y over with the envelope
    taken = got(a.fetch(10))  # the envelope first, then what each lane held behind it
    assert taken[0] == note(["x", "y"], 2)
    assert sorted(taken[1:]) == sorted([note("x", 3), note("y", 4)])
    assert owner(r, a, "y") == "A" and not r.sismember(b.keys.parked("B"), "y")


def test_an_apps_channels_are_lanes_of_their_own(r, queue_name) -> None:
    a, b = proc(r, queue_name, "A"), proc(r, queue_name, "B")
    r.rpush(queue_name, note("c", 0))
    a.fetch(10)
    r.rpush(queue_name, note("c", 1, app="tenant-b"), note("c", 2, app="default"))
    taken = b.fetch(10)
    assert taken.items == [(note("c", 1, app="tenant-b"), ("tenant-b:c",))]
    assert lane(r, a, "c") == [note("c", 2, app="default")]  # `default` is the plain channel


def test_what_has_no_readable_channel_goes_straight_to_the_window(r, queue_name) -> None:
    a = proc(r, queue_name, "A")
    r.rpush(queue_name, b"not json", b'{"channel": "has space"}', b'{"relay": 1}')
    assert [keys for _, keys in a.fetch(10).items] == [(), (), ()]
    assert not r.exists(a.keys.owners)


# -- death, recovery and a clean stop ----------------------------------------------------------


def test_a_dead_owners_channels_pass_to_the_reaper_its_window_first(r, queue_name) -> None:
    a, b = proc(r, queue_name, "A"), proc(r, queue_name, "B")
    r.rpush(queue_name, *[note("c", n) for n in range(a.CAP + 3)], note("d", 50))
    a.fetch(1000)  # c 0..29 in its window, c 30..32 parked; d 50 too
    r.rpush(queue_name, note("c", 60))
    assert got(b.fetch(10)) == []  # handed to A
    a.heartbeat(-1)  # A dies
    assert b.reap_expired() == {"A": a.CAP + 1}  # its window, to the front of its lanes
    assert lane(r, a, "c") == [note("c", n) for n in [*range(a.CAP + 3), 60]]  # in order
    assert lane(r, a, "d") == [note("d", 50)]
    assert owner(r, a, "c") == owner(r, a, "d") == "B" and r.llen(queue_name) == 0
    assert r.smembers(b.keys.parked("B")) == {b"c", b"d"}
    assert not r.exists(a.keys.held("A"), a.keys.parked("A"), a.inflight_key)
    taken = b.fetch(1000)
    assert got(taken) == [note("c", n) for n in range(b.CAP)] + [note("d", 50)] or \
        got(taken) == [note("d", 50)] + [note("c", n) for n in range(b.CAP)]


def test_channels_of_a_worker_reaped_by_a_1_0_worker_pass_to_the_next_sweeper(
        r, queue_name) -> None:
    """A rolling deploy: a 1.0 worker, which knows no ownership, reaps a dead 1.1 worker (its
    lists back to the queue, unregistered, in the reaped set). What the dead one parked would
    wait for an owner that never comes: the next 1.1 sweeper takes its channels over."""
    a, b = proc(r, queue_name, "A"), proc(r, queue_name, "B")
    r.rpush(queue_name, *[note("c", n) for n in range(a.CAP + 3)])
    a.fetch(1000)  # c 0..29 in A's window, c 30..32 parked for A
    # The 1.0 REAP: the in-flight list back to the queue's head, unregistered, marked reaped.
    while r.lmove(a.inflight_key, queue_name, "RIGHT", "LEFT"):
        pass
    r.zrem(a.keys.workers, "A")
    r.zadd(a.keys.reaped, {"A": float(r.time()[0])})
    assert b.maintain(0, reap=True).recovered == {}  # nothing in A's lists any more
    assert owner(r, a, "c") == "B" and not r.exists(a.keys.held("A"), a.keys.parked("A"))
    # What A parked goes first, then what the 1.0 reaper returned (recovered notifications
    # may arrive after later ones of their channel: the README says so).
    first = b.fetch(1000)
    ack(b, first)
    taken = got(first) + got(b.fetch(1000))
    assert taken == [note("c", n) for n in [*range(a.CAP, a.CAP + 3), *range(a.CAP)]]
    assert r.llen(queue_name) == 0


def test_a_worker_that_knows_no_ownership_is_never_given_a_channel(r, queue_name) -> None:
    """A 1.0 worker registers without `owns_channels`: sharing a backlog out, rendezvous
    hashing leaves it out, or what is parked for it would wait forever."""
    a = proc(r, queue_name, "A", spread=0)
    r.zadd(a.keys.workers, {"old": float(r.time()[0]) + 60})
    r.hset(a.keys.info, "old", json.dumps({"slots": 10, "pid": 1}))
    r.rpush(queue_name, *[note(f"c{n}", n) for n in range(50)])
    assert len(got(a.fetch(1000))) == 50
    assert set(r.hvals(a.keys.owners)) == {b"A"}


def test_a_channel_whose_owner_left_unregistered_is_taken_over(r, queue_name) -> None:
    """An owner that is gone without handing its channel over (a 1.0 worker's stop): the next
    taker owns it, and what was parked for the old owner goes first."""
    a = proc(r, queue_name, "A")
    r.hset(a.keys.owners, "c", "ghost")
    r.hset(a.keys.held("ghost"), "c", 0)
    r.rpush(a.keys.lane("c"), note("c", 0), note("c", 1))
    r.sadd(a.keys.parked("ghost"), "c")
    r.rpush(queue_name, note("c", 2))
    first = a.fetch(10)  # parked behind the ghost's, now A's: the next fetch unparks
    assert owner(r, a, "c") == "A" and not r.exists(a.keys.held("ghost"))
    taken = got(first) + got(a.fetch(10))
    assert taken == [note("c", n) for n in range(3)]


def test_the_last_worker_to_stop_gives_everything_back_in_order(r, queue_name) -> None:
    a = proc(r, queue_name, "A")
    r.rpush(queue_name, *[note("c", n) for n in range(a.CAP + 3)])
    a.fetch(1000)
    assert a.release() == a.CAP + 3
    assert r.lrange(queue_name, 0, -1) == [note("c", n) for n in range(a.CAP + 3)]
    assert not r.exists(a.keys.owners, a.keys.held("A"), a.keys.parked("A"))


def test_an_envelope_across_a_dead_owner_and_a_live_one_keeps_both_orders(
        r, queue_name) -> None:
    a, b = proc(r, queue_name, "A"), proc(r, queue_name, "B")
    r.rpush(queue_name, note("x", 0))
    a.fetch(10)
    r.rpush(queue_name, note("y", 1))
    b_held = b.fetch(10)
    r.rpush(queue_name, note(["x", "y"], 2), note("x", 3), note("y", 4))
    b.fetch(10)  # parked: the envelope in x (A's) and y (B's), then x 3 and y 4
    a.heartbeat(-1)
    b.reap_expired()  # x passes to B, with A's window (x 0) at the front of its lane
    assert lane(r, a, "x") == [note("x", 0), note(["x", "y"], 2), note("x", 3)]
    # B owns both lanes now: the envelope comes in behind x 0 (and, in B's own lanes, behind
    # y 1, which B still holds), x 3 and y 4 behind it.
    order = got(b.fetch(10))
    assert sorted(order) == sorted([note("x", 0), note(["x", "y"], 2), note("x", 3),
                                    note("y", 4)])
    envelope = order.index(note(["x", "y"], 2))
    assert order.index(note("x", 0)) < envelope < order.index(note("x", 3))
    assert envelope < order.index(note("y", 4))
    ack(b, b_held)


def test_a_stopping_worker_hands_its_channels_to_a_live_one(r, queue_name) -> None:
    a, b = proc(r, queue_name, "A"), proc(r, queue_name, "B")
    r.rpush(queue_name, *[note("c", n) for n in range(a.CAP + 3)])
    a.fetch(1000)
    r.rpush(queue_name, note("c", 90))
    assert got(b.fetch(10)) == []  # c is A's
    assert a.release() == a.CAP
    assert lane(r, a, "c") == [note("c", n) for n in [*range(a.CAP + 3), 90]]
    assert owner(r, a, "c") == "B" and r.llen(queue_name) == 0
    assert got(b.fetch(1000)) == [note("c", n) for n in range(b.CAP)]


def test_a_long_backlog_is_shared_out_channel_by_channel(r, queue_name) -> None:
    """With more waiting than a window, a channel nobody owns goes to the live worker that
    rendezvous hashing picks, whoever takes it; below that, to the taker."""
    a, b = proc(r, queue_name, "A", spread=5), proc(r, queue_name, "B", spread=5)
    r.rpush(queue_name, *[note(f"c{n}", n) for n in range(40)])
    taken = got(a.fetch(40))
    owners = {k.decode(): v.decode() for k, v in r.hgetall(a.keys.owners).items()}
    assert set(owners.values()) == {"A", "B"}  # shared, not all the first taker's
    assert all(owners[f"c{n}"] == "A" for n in range(35, 40))  # the last five: the taker's
    theirs = sorted(k for k, w in owners.items() if w == "B")
    assert sorted(json.loads(x)["channel"] for x in got(b.fetch(40))) == theirs
    assert len(taken) + len(theirs) == 40


def test_lifo_keeps_the_owners_rules(r, queue_name) -> None:
    a, b = proc(r, queue_name, "A", "lifo"), proc(r, queue_name, "B", "lifo")
    r.rpush(queue_name, note("c", 0), note("c", 1))
    assert got(a.fetch(1)) == [note("c", 1)]  # newest first
    assert got(b.fetch(1)) == []  # c is A's
    assert lane(r, a, "c") == [note("c", 0)]


# -- the property: processes, steps and deaths at random ----------------------------------------


class Process:
    """One worker as the engine drives its window: takes, sends lane by lane, settles."""

    def __init__(self, r: redis.Redis, queue: str, name: str, rng: random.Random,
                 spread: int = 1000) -> None:
        self.q = proc(r, queue, name, spread=spread)
        self.rng = rng
        self.lanes = Lanes(batch=3)
        self.calls: list[list[Entry]] = []

    def fetch(self, room: int) -> None:
        held = len(self.lanes)
        taken = self.q.fetch(max(0, room - held))
        entries = []
        for raw, keys in taken.items:
            entry = Entry(raw, json.loads(raw), keys or (f"#{raw!r}",), alone=len(keys) > 1)
            entry.extra = keys
            entries.append(entry)
        self.lanes.add(entries)

    def send(self) -> None:
        call = self.lanes.next_call()
        if call:
            self.calls.append(call)

    def answer(self, delivered: dict[str, list[int]]) -> None:
        """Pusher accepts the call (it arrives), or (a 429, the circuit) it goes back
        untouched with what waits behind it in its lanes, as the engine does."""
        if not self.calls:
            return
        call = self.calls.pop(self.rng.randrange(len(self.calls)))
        if self.rng.random() < 0.1:
            behind = self.lanes.take_behind(call)
            ops = [Op.put_back(e.raw, e.extra) for e in [*call, *behind]]
        else:
            for entry in call:
                n = entry.item["data"]["n"] if "data" in entry.item else entry.item["n"]
                for key in entry.keys:
                    delivered[key].append(n)
            ops = [Op.ack(e.raw, e.extra) for e in call]
        self.q.settle(ops)
        self.lanes.finish(call)


def drain(r: redis.Redis, queue: str, procs: list[Process],
          delivered: dict[str, list[int]]) -> None:
    """Every process goes on until nothing is queued, held or parked."""
    for _ in range(2000):
        for p in procs:
            p.fetch(40)
            p.send()
            p.answer(delivered)
        if not any(p.calls or len(p.lanes) for p in procs) and not r.llen(queue) \
                and not any(r.scard(p.q.keys.parked(p.q.worker_id)) for p in procs):
            return


@pytest.mark.parametrize("spread", [1000, 0])
@pytest.mark.parametrize("seed", range(15))
def test_random_processes_keep_each_channels_order_and_lose_nothing(r, queue_name, seed,
                                                                    spread) -> None:
    """Three processes take, hand over, park, send, answer (now and then putting a call back)
    and die at random; dead ones are reaped and replaced. Every notification arrives, and the
    first arrival of each keeps its channel's order (put-backs and recoveries included: no
    retry happens here, the one exception the promise makes)."""
    rng = random.Random(seed)
    procs = [Process(r, queue_name, f"P{i}", rng, spread) for i in range(3)]
    pushed = 0
    delivered: dict[str, list[int]] = defaultdict(list)
    for step in range(600):
        action = rng.random()
        p = rng.choice(procs)
        if action < 0.2 and step < 450:
            batch = []
            for _ in range(rng.randint(1, 5)):
                picked = rng.sample("abcd", 2 if rng.random() < 0.1 else 1)
                batch.append(note(picked if len(picked) > 1 else picked[0], pushed))
                pushed += 1
            r.rpush(queue_name, *batch)
        elif action < 0.45:
            p.fetch(rng.choice((3, 8, 40)))
        elif action < 0.7:
            p.send()
        elif action < 0.97:
            p.answer(delivered)
        else:  # a death: its calls in flight did not arrive; a new process starts
            p.q.heartbeat(-1)
            procs.remove(p)
            rng.choice(procs).q.reap_expired()
            procs.append(Process(r, queue_name, f"N{step}", rng, spread))
    drain(r, queue_name, procs, delivered)
    firsts: dict[str, list[int]] = {}
    for key, numbers in delivered.items():
        seen: set[int] = set()
        firsts[key] = [n for n in numbers if not (n in seen or seen.add(n))]
        assert firsts[key] == sorted(firsts[key]), f"channel {key}: {firsts[key]}"
    arrived = {n for numbers in delivered.values() for n in numbers}
    assert arrived == set(range(pushed)), f"lost: {sorted(set(range(pushed)) - arrived)}"
    assert not r.exists(procs[0].q.keys.owners)  # every channel released at the end
