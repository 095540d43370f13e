"""`python worker.py --burst`: drain the queue and the due retries, then exit 0."""

from __future__ import annotations

import json
import signal
import time

from relay.message import retry_wrapper
from tests.support import wait_for


def _inflight_keys(r, queue_name):
    return [k for k in r.keys(f"{queue_name}:inflight:*") if r.llen(k)]


def test_burst_drains_queue_and_due_retries_then_exits_0(r, pusher, start_worker, queue_name):
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": n}) for n in range(300)])
    r.rpush(queue_name, "not json")
    due = retry_wrapper(json.dumps({"channel": "due", "n": -1}), 1, time.time(), "HTTP 500")
    later = retry_wrapper(json.dumps({"channel": "later", "n": -2}), 1, time.time(), "HTTP 500")
    r.zadd(f"{queue_name}:retry", {due: 0, later: time.time() + 3600})
    proc = start_worker(wait=False, args=["--burst"])
    assert proc.wait(60) == 0, proc.log()
    channels = [e["channel"] for e in pusher.events()]
    assert sorted(channels) == sorted(["c"] * 300 + ["due"])
    assert r.llen(queue_name) == 0
    assert _inflight_keys(r, queue_name) == []
    assert r.llen(f"{queue_name}:dead") == 1
    # A retry not yet due is left for the next run, untouched.
    assert r.zrange(f"{queue_name}:retry", 0, -1) == [later.encode()]
    assert r.zcard(f"{queue_name}:workers") == 0  # unregistered on the way out
    assert "burst: queue drained" in proc.log()


def test_burst_on_an_empty_queue_exits_at_once(r, pusher, start_worker):
    proc = start_worker(wait=False, args=["run", "--burst"])
    assert proc.wait(30) == 0, proc.log()
    assert pusher.count()["events_total"] == 0


def test_a_retry_scheduled_during_the_burst_is_kept_for_the_next_run(r, pusher, start_worker,
                                                                     queue_name):
    pusher.set_mode(status=500, status_channels=["refused"])
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": n}) for n in range(20)])
    r.rpush(queue_name, json.dumps({"channel": "refused"}))
    proc = start_worker(wait=False, args=["--burst"])
    assert proc.wait(60) == 0, proc.log()
    assert pusher.count()["events_total"] == 20
    assert r.llen(queue_name) == 0 and _inflight_keys(r, queue_name) == []
    # Not lost: waiting for its next attempt (or, had the burst outlived the policy, dead).
    waiting = r.zrange(f"{queue_name}:retry", 0, -1)
    dead = r.lrange(f"{queue_name}:dead", 0, -1)
    assert len(waiting) + len(dead) == 1
    if waiting:
        assert json.loads(json.loads(waiting[0])["payload"])["channel"] == "refused"


def test_sigterm_during_a_burst_exits_0_and_loses_nothing(r, pusher, start_worker,
                                                         queue_name):
    pusher.set_mode(delay=0.2)
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": n}) for n in range(500)])
    proc = start_worker(wait=False, args=["--burst"], RELAY_POOL_SIZE="5")
    wait_for(lambda: pusher.count()["events_total"] >= 10, timeout=30, what="some deliveries")
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.log()
    assert _inflight_keys(r, queue_name) == []
    delivered = {json.loads(e["data"])["n"] for e in pusher.events()}
    left = {json.loads(x)["n"] for x in r.lrange(queue_name, 0, -1)}
    assert delivered | left == set(range(500))
    assert left, "the burst was meant to be cut short"
    # The next burst finishes the job.
    pusher.clear_mode()
    again = start_worker(wait=False, args=["--burst"])
    assert again.wait(60) == 0, again.log()
    assert {json.loads(e["data"])["n"] for e in pusher.events()} == set(range(500))
    assert r.llen(queue_name) == 0
