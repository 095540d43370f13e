"""relay.pause: durations, the state in Redis (round trip, expiry, quiet marks, the quiet
worker's hand-off), how the fetch and housekeeping scripts carry it, and what the worker's
OperatorGate does with what it learns. Against a real redis-server; no worker process."""

from __future__ import annotations

import logging

import pytest
import redis

from relay.metrics import Metrics
from relay.pause import (
    Controls,
    OperatorGate,
    Pause,
    PauseError,
    Quiet,
    Seen,
    describe,
    parse_for,
    span,
)
from relay.queue import Op, RedisQueue
from tests.support import wait_for
from tests.test_ownership import note
from tests.test_queue import items, redis_now, registered, took


def controls(r: redis.Redis, q: RedisQueue) -> Controls:
    return Controls(r, q.keys)


def watched(q: RedisQueue) -> list[Seen]:
    """What the queue's scripts tell the gate, collected."""
    seen: list[Seen] = []
    q.on_gate_state = seen.append
    return seen


# -- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1.5s", 1.5), ("45", 45),
    (" 2H ", 7200), (None, None), ("", None)])
def test_for_durations(text: str | None, seconds: float | None) -> None:
    assert parse_for(text) == seconds


@pytest.mark.parametrize(("text", "why"), [
    ("abc", "not a duration: 'abc' (try 30s, 10m, 2h, 7d)"), ("10x", "not a duration"),
    ("-5s", "not a duration"), ("1e3", "not a duration"), ("0s", "longer than 0"),
    ("0", "longer than 0")])
def test_for_durations_that_do_not_parse(text: str, why: str) -> None:
    with pytest.raises(PauseError, match=why.replace("(", r"\(").replace(")", r"\)")):
        parse_for(text)


def test_a_hand_edited_pause_still_reads() -> None:
    assert Pause.from_hash({b"reason": b"x", b"since": b"soon", b"until": b""}) == \
        Pause("x", "?", 0.0, None)
    assert Pause.from_hash([]) is None
    assert Quiet.from_json(b"{not json") == Quiet("?", "?", 0.0)


def test_what_operators_read() -> None:
    pause = Pause("pusher incident", "ops@web1", 1_000_000.0, 1_000_600.0)
    assert describe(pause, 1_000_120.0) == (
        "by ops@web1 since 1970-01-12 13:46:40 UTC (2 min ago), until 1970-01-12 13:56:40 "
        "UTC (in 8 min): pusher incident")
    assert describe(Pause("", "ops@web1", 1_000_000.0, None), 1_000_000.5).endswith(
        "until `relay resume`: (no reason given)")
    assert [span(s) for s in (0.25, 12, 600, 9000, 200000)] == [
        "250 ms", "12 s", "10 min", "2.5 h", "2.3 d"]


# -- the pause in Redis ------------------------------------------------------------------------


def test_pause_update_and_resume_round_trip(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    c = controls(r, q)
    assert c.read() is None
    before = redis_now(r)
    first, was, now = c.pause("pusher incident", "ops@web1", 60)
    assert not was and before <= first.since <= now
    assert first.until == pytest.approx(now + 60, abs=0.01)
    assert c.read() == first
    assert 59_000 < r.pttl(f"{queue_name}:pause") <= 60_000
    # A second pause updates reason, who and deadline, and keeps when it began.
    second, was, _ = c.pause("still broken", "dev@web2", 600)
    assert was and second.since == first.since and second.until > first.until + 500
    assert c.read() == second == Pause("still broken", "dev@web2", first.since, second.until)
    # Without --for it lasts until resumed: no expiry left.
    third, _, _ = c.pause("indefinitely", "ops@web1")
    assert third.until is None and c.read() == third
    assert r.ttl(f"{queue_name}:pause") == -1
    was, _ = c.resume()
    assert was == third and c.read() is None
    assert c.resume()[0] is None  # resuming twice is harmless


def test_a_pause_for_a_while_expires_by_itself(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name)
    r.rpush(queue_name, *items(3))
    controls(r, q).pause("a short one", "ops@web1", 0.3)
    assert took(q.fetch(10)) == ([], None)
    # Redis ends it: no worker, no command.
    wait_for(lambda: not r.exists(f"{queue_name}:pause"), 5, "the pause to expire")
    assert controls(r, q).read() is None
    assert took(q.fetch(10)) == (items(3), 0)


def test_the_keys_share_the_queues_hash_tag_under_cluster() -> None:
    from relay.queue import Keys

    keys = Keys("notifications", cluster=True)
    assert (keys.pause, keys.quiet) == ("{notifications}:pause", "{notifications}:quiet")
    assert Keys("notifications").pause == "notifications:pause"


# -- the fetch scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("owned", [False, True])
def test_a_paused_fetch_takes_nothing_and_says_why(r: redis.Redis, queue_name: str,
                                                   owned: bool) -> None:
    q = registered(r, queue_name, owned=owned)
    seen = watched(q)
    r.rpush(queue_name, *items(5))
    pause, _, _ = controls(r, q).pause("deploy", "ops@web1", None)
    assert took(q.fetch(10)) == ([], None)
    assert took(q.pop(0.05, 10)) == ([], None)  # the blocking pop's fetch too
    assert r.lrange(queue_name, 0, -1) == items(5)  # untouched, in order
    assert r.llen(q.inflight_key) == 0
    assert [s.pause for s in seen] == [pause, pause] and seen[0].at >= pause.since
    controls(r, q).resume()
    assert took(q.fetch(10))[0] == items(5)


def test_a_quiet_workers_fetch_takes_nothing_the_others_do(r: redis.Redis,
                                                           queue_name: str) -> None:
    a, b = registered(r, queue_name, worker_id="A"), registered(r, queue_name, worker_id="B")
    seen = watched(a)
    c = controls(r, a)
    r.rpush(queue_name, *items(4))
    assert c.quiet("nobody", "ops@web1", "relay quiet") == 0  # not registered
    assert c.quiet("A", "ops@web1", "relay quiet") == 1
    assert c.quiet("A", "dev@web2", "page") == 2  # the first mark stays
    assert took(a.fetch(10)) == ([], None)
    assert seen[0].pause is None and seen[0].quiet.who == "ops@web1"
    assert seen[0].quiet.how == "relay quiet"
    assert took(b.fetch(10))[0] == items(4)
    assert set(c.quiet_workers()) == {"A"}


def test_a_maintenance_round_carries_the_state_and_drops_stale_quiet_marks(
        r: redis.Redis, queue_name: str) -> None:
    a = registered(r, queue_name, worker_id="A", owned=True)
    seen = watched(a)
    c = controls(r, a)
    a.maintain(0, reap=False)
    assert seen[-1].pause is None and seen[-1].quiet is None and seen[-1].owned == 0
    pause, _, _ = c.pause("migration", "ops@web1", 30)
    c.quiet("A", "ops@web1", "relay quiet")
    r.hset(f"{queue_name}:quiet", "gone", '{"who": "x", "how": "y", "since": 1}')
    r.rpush(queue_name, note("c", 0))
    c.resume()
    a.fetch(10)  # quiet: nothing; paused no more
    r.hdel(f"{queue_name}:quiet", "A")
    a.fetch(10)  # now it owns c
    c.pause("migration", "ops@web1", 30)
    c.quiet("A", "ops@web1", "relay quiet")
    round_ = a.maintain(0, reap=False)
    assert round_.length == 0  # MAINTAIN's own answer is as it was
    last = seen[-1]
    assert last.pause.reason == "migration" and last.pause.since > pause.since
    assert last.quiet.who == "ops@web1" and last.owned == 1
    assert set(c.quiet_workers()) == {"A"}  # the unregistered worker's mark is gone


# -- a quiet worker hands its channels on ------------------------------------------------------


def test_a_quiet_worker_hands_its_channels_on_once_nothing_is_in_flight(
        r: redis.Redis, queue_name: str) -> None:
    a = registered(r, queue_name, worker_id="A", owned=True)
    b = registered(r, queue_name, worker_id="B", owned=True)
    c = controls(r, a)
    r.rpush(queue_name, *[note("c", n) for n in range(a.CAP + 3)])
    taken = a.fetch(1000)  # c 0..29 in its window, 30..32 parked for it
    assert c.hand_off("A", a.inflight_key, a.push_cmd) == ""  # not marked quiet yet
    c.quiet("A", "signal", "SIGTSTP")
    r.rpush(queue_name, note("c", 60))
    assert took(b.fetch(10))[0] == []  # parked for A, the owner
    assert c.hand_off("A", a.inflight_key, a.push_cmd) == ""  # its window still holds 30
    a.settle([Op.ack(raw, keys) for raw, keys in taken.items])
    assert c.hand_off("A", a.inflight_key, a.push_cmd) == "B"
    assert r.hget(a.keys.owners, "c") == b"B"
    assert not r.exists(a.keys.held("A"), a.keys.parked("A"))
    assert took(b.fetch(10))[0] == [note("c", n) for n in (30, 31, 32, 60)]  # in order


def test_no_heir_while_every_other_worker_is_quiet(r: redis.Redis, queue_name: str) -> None:
    a = registered(r, queue_name, worker_id="A", owned=True)
    registered(r, queue_name, worker_id="B", owned=True)
    c = controls(r, a)
    r.rpush(queue_name, *[note("c", n) for n in range(a.CAP + 1)])
    a.settle([Op.ack(raw, keys) for raw, keys in a.fetch(1000).items])  # c 30 stays parked
    c.quiet("A", "signal", "SIGTSTP")
    c.quiet("B", "signal", "SIGTSTP")
    assert c.hand_off("A", a.inflight_key, a.push_cmd) == ""
    assert r.hget(a.keys.owners, "c") == b"A"


# -- the worker's gate ---------------------------------------------------------------------------


def test_the_gate_logs_each_change_once_and_wakes_the_engine(caplog) -> None:
    metrics = Metrics()
    gate = OperatorGate(metrics=metrics)
    woken = []
    gate.on_change = lambda: woken.append(1)
    first = Pause("pusher incident", "ops@web1", 100.0, 160.0)
    with caplog.at_level(logging.INFO, logger="relay.pause"):
        gate.observe(Seen(100.5, None, None, 0))
        assert gate.may_fetch and not gate.holding and woken == []
        gate.observe(Seen(101.0, first, None, 0))
        gate.observe(Seen(101.5, first, None, 0))
        gate.observe(Seen(100.9, None, None, 0))  # an older reply: ignored
        assert gate.holding and not gate.may_fetch and woken == [1]
        assert metrics.paused._value.get() == 1
        assert metrics.paused_since._value.get() == 100.0
        updated = Pause("still", "dev@web2", 100.0, 700.0)
        gate.observe(Seen(102.0, updated, None, 0))
        gate.observe(Seen(701.0, None, None, 0))
        assert not gate.holding and woken == [1, 1]
        assert metrics.paused._value.get() == 0 and metrics.paused_since._value.get() == 0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("delivery paused by ops@web1 since ")
    assert "until 1970-01-01 00:02:40 UTC" in lines[0] and "pusher incident" in lines[0]
    assert lines[1].startswith("pause updated: now by dev@web2") and ": still" in lines[1]
    assert lines[2].startswith("delivery resumed (its --for ran out) after 10 min")


def test_quiet_is_for_good_and_told_once(caplog) -> None:
    gate = OperatorGate(held=lambda: 7)
    with caplog.at_level(logging.INFO, logger="relay.pause"):
        assert gate.go_quiet(Quiet("signal", "SIGTSTP", 5.0))
        assert not gate.go_quiet(Quiet("signal", "SIGTSTP", 6.0))
        gate.observe(Seen(10.0, None, Quiet("ops@web1", "relay quiet", 9.0), None))
        gate.observe(Seen(11.0, None, None, 0))  # a round that finds no mark: still quiet
    assert gate.quiet == Quiet("signal", "SIGTSTP", 5.0) and not gate.may_fetch
    assert not gate.holding and gate.state() == "quiet"
    assert not gate.quiet_in_redis  # the round found no mark: the next one writes it
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("quiet (SIGTSTP, by signal): fetching stops; the 7 notification")
