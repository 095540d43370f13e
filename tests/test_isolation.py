"""Issue 8 §0: notifications that a server refuses cannot stall the others.

The local server answers a chosen status for chosen channels (`status_channels`), the way
a proxy or WAF in front of a self-hosted server might, and 200 for everything else.
"""

from __future__ import annotations

import json

import pytest

from tests.support import wait_for

BAD = [f"bad-{i}" for i in range(20)]


def _good(tag: str, n: int) -> str:
    return json.dumps({"channel": f"good-{tag}-{n}", "n": n})


def _dead(r, queue_name):
    return [json.loads(x) for x in r.lrange(f"{queue_name}:dead", 0, -1)]


def _inflight(r, queue_name):
    return sum(r.llen(k) for k in r.keys(f"{queue_name}:inflight:*"))


@pytest.mark.parametrize("status", [500, 403])
def test_failing_notifications_do_not_stall_the_others(r, pusher, start_worker, queue_name,
                                                      status):
    pusher.set_mode(status=status, status_channels=BAD)
    worker = start_worker(RELAY_MAX_ATTEMPTS="3")
    # A worker that has been running: Pusher accepted its calls before.
    r.rpush(queue_name, _good("warm", 0))
    pusher.wait_for_events(1)
    mixed = []
    for n in range(200):
        mixed.append(_good("first", n))
        if n % 10 == 5:  # one refused notification in every batch's worth
            mixed.append(json.dumps({"channel": BAD[n // 10], "n": n}))
    r.rpush(queue_name, *mixed)
    events = pusher.wait_for_events(201, timeout=60)
    assert {e["channel"] for e in events} == {f"good-first-{n}" for n in range(200)} | {
        "good-warm-0"}
    dead = wait_for(lambda: (d := _dead(r, queue_name)) and len(d) == 20 and d, timeout=60,
                    what="the refused notifications to be dead-lettered")
    assert {json.loads(d["payload"])["channel"] for d in dead} == set(BAD)
    assert {d["error_class"] for d in dead} == {"exhausted"}
    assert {d["attempts"] for d in dead} == {3}
    assert all(f"HTTP {status}" in d["error"] for d in dead)
    # Later ones go too, at once.
    r.rpush(queue_name, *[_good("later", n) for n in range(10)])
    events = pusher.wait_for_events(211, timeout=30)
    assert {e["channel"] for e in events[201:]} == {f"good-later-{n}" for n in range(10)}
    assert len(events) == 211  # each good one exactly once
    wait_for(lambda: _inflight(r, queue_name) == 0 and r.zcard(f"{queue_name}:retry") == 0,
             what="nothing left in flight or waiting")
    log = worker.log()
    if status == 500:
        assert "circuit open" not in log  # partial failures are not Pusher's
    else:
        # A refused lone notification may open it: a good one then closes it, so it ends
        # closed. (Counting the lines would not do: an identical "circuit open" line within
        # seconds of the last is held back by relay.logs.RepeatFilter; "closed" lines differ.)
        gate = [line for line in log.splitlines()
                if "circuit open" in line or "circuit closed" in line]
        assert not gate or "circuit closed" in gate[-1], log

