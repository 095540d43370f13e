"""The worker as a real subprocess, against our redis-server and the local Pusher server."""

from __future__ import annotations

import json
import signal
import time

from tests.support import dead as _dead
from tests.support import inflight as _inflight
from tests.support import pending, wait_for


def test_classic_message_arrives_as_specified(r, pusher, start_worker, queue_name):
    start_worker(RELAY_EVENT="page-hit")
    r.rpush(queue_name, json.dumps({"channel": "site-42", "title": "Home", "url": "/"}))
    [event] = pusher.wait_for_events(1)
    assert event["channel"] == "site-42"
    assert event["name"] == "page-hit"
    assert json.loads(event["data"]) == {"title": "Home", "url": "/"}
    assert event["socket_id"] is None
    wait_for(lambda: not any(pending(r, queue_name).values()), what="the ack")


def test_envelope_with_channels_event_and_socket_id(r, pusher, start_worker, queue_name):
    start_worker()
    r.rpush(queue_name, json.dumps({
        "relay": 1, "channels": ["a", "b", "private-c"], "event": "update",
        "data": {"n": 1}, "socket_id": "123.456", "enqueued_at": time.time()}))
    events = pusher.wait_for_events(3)
    assert sorted(e["channel"] for e in events) == ["a", "b", "private-c"]
    assert {e["name"] for e in events} == {"update"}
    assert {e["socket_id"] for e in events} == {"123.456"}
    assert {e["data"] for e in events} == {'{"n":1}'}


def test_many_messages_in_fifo_order_with_one_worker_slot(r, pusher, start_worker, queue_name):
    start_worker(RELAY_POOL_SIZE="1")
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(35)])
    events = pusher.wait_for_events(35)
    assert [json.loads(e["data"])["n"] for e in events] == list(range(35))
    assert {e["path"] for e in events} == {"/apps/1/batch_events"}  # batched, 10 a call


def test_poison_goes_to_dead_letters_and_neighbours_are_delivered(r, pusher, start_worker,
                                                                  queue_name):
    poison = {
        "not json": "{oops",
        "not an object": "[1, 2]",
        "no channel": json.dumps({"title": "x"}),
        "invalid channel name": json.dumps({"channel": "bad channel!"}),
        "event name": json.dumps({"relay": 1, "channels": ["ok"], "event": "e" * 201,
                                  "data": 1}),
        "data too big": json.dumps({"channel": "ok", "blob": "x" * 10_300}),
    }
    good = [json.dumps({"channel": "ok", "n": i}) for i in range(len(poison) + 1)]
    items = [x for pair in zip(good, poison.values(), strict=False) for x in pair] + good[-1:]
    r.rpush(queue_name, *items)
    start_worker()
    pusher.wait_for_events(len(good))
    dead = wait_for(lambda: len(_dead(r, queue_name)) == len(poison) and _dead(r, queue_name),
                    what="every poison message in the dead-letter list")
    assert sorted(d["payload"] for d in dead) == sorted(poison.values())
    for d in dead:
        assert d["error"] and d["failed_at"] > 0 and d["attempts"] == 0
        assert d["error_class"] == "invalid"
    reasons = " | ".join(d["error"] for d in dead)
    for word in ("not JSON", "not a JSON object", "no channel", "invalid channel",
                 "event name", "bytes"):
        assert word in reasons
    assert sorted(json.loads(e["data"])["n"] for e in pusher.events()) == list(range(len(good)))
    wait_for(lambda: _inflight(r, queue_name) == 0, what="nothing left in flight")


def test_sigterm_during_inflight_calls_exits_cleanly_and_loses_nothing(r, pusher, start_worker,
                                                                       queue_name):
    pusher.set_mode(delay=1.0)
    w = start_worker(RELAY_POOL_SIZE="5", PUSHER_TIMEOUT="3")
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(200)])
    wait_for(lambda: _inflight(r, queue_name) > 0, what="calls in flight")
    w.signal(signal.SIGTERM)
    # The contract's PUSHER_TIMEOUT (3 s) + a few seconds, with the margin a loaded 2-core
    # machine needs; that it stopped taking work is asserted below by what is left.
    assert w.wait(timeout=15) == 0
    assert _inflight(r, queue_name) == 0
    assert r.zcard(f"{queue_name}:workers") == 0
    delivered = {json.loads(e["data"])["n"] for e in pusher.events()}
    left = {json.loads(x)["n"] for x in r.lrange(queue_name, 0, -1)}
    assert delivered | left == set(range(200))  # each either delivered or back in the queue
    assert left, "the worker drained the queue instead of stopping"
    assert "stopped;" in w.log()


def test_503_for_a_while_dead_letters_nothing_and_delivers_all(r, pusher, start_worker,
                                                               queue_name):
    pusher.set_mode(status=503)
    start_worker()
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(30)])
    wait_for(lambda: pusher.stats()["requests_total"] >= 3, what="calls answered 503")
    pusher.clear_mode()
    wait_for(lambda: {json.loads(e["data"])["n"] for e in pusher.events()} >= set(range(30)),
             timeout=60, what="all 30 delivered after the outage")
    assert _dead(r, queue_name) == []


def test_401_dead_letters_nothing_and_opens_the_circuit(r, pusher, start_worker, queue_name):
    pusher.set_mode(status=401)
    w = start_worker()
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(20)])
    wait_for(lambda: "circuit open" in w.log(), what="the circuit to open")
    calls_then = pusher.stats()["requests_total"]
    assert _dead(r, queue_name) == []
    pusher.clear_mode()
    wait_for(lambda: len(pusher.events()) >= 20, timeout=30, what="delivery after recovery")
    assert _dead(r, queue_name) == []
    assert calls_then <= 20  # one batch call per greenlet at most before the circuit opened
    assert w.log().count("circuit open") == 1
    wait_for(lambda: "circuit closed" in w.log(), what="the circuit to close")


def test_linger_lets_a_quiet_spells_first_notification_share_its_call(r, pusher, start_worker,
                                                                      queue_name):
    """RELAY_LINGER: the pop that ends a quiet spell waits for what follows it closely, and
    they leave in one batch call. Without it (RELAY_LINGER=0) the first goes alone at once,
    before the others are even pushed. One greenlet, warmed up by a first notification, so that
    its next fetch is the lone blocking pop of a quiet queue."""
    for linger in ("2", "0"):
        pusher.reset()
        w = start_worker(RELAY_LINGER=linger, RELAY_POOL_SIZE="1")
        r.rpush(queue_name, json.dumps({"channel": "warm", "n": -1}))
        pusher.wait_for_events(1)
        pusher.reset()
        wait_for(lambda: int(r.info("clients")["blocked_clients"]) >= 1, what="the pop")
        r.rpush(queue_name, json.dumps({"channel": "c0", "n": 0}))
        if linger == "0":
            pusher.wait_for_events(1)  # sent alone, at once
        else:
            wait_for(lambda: r.llen(queue_name) == 0, what="the pop taking it")
        with r.pipeline(transaction=False) as pipe:
            for i in range(1, 5):
                pipe.rpush(queue_name, json.dumps({"channel": f"c{i}", "n": i}))
            pipe.execute()
        events = pusher.wait_for_events(5)
        assert sorted(json.loads(e["data"])["n"] for e in events) == list(range(5))
        made = pusher.stats()["requests_total"]
        assert made == 1 if linger == "2" else made == 2, (linger, made)
        w.signal()
        assert w.wait() == 0
