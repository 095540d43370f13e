"""Flow control that drops or reorders on purpose: max backlog, max age, lifo, batching."""

from __future__ import annotations

import json
import time

from relay.housekeeping import Episode
from tests.support import pending, wait_for


def _n(events):
    return [json.loads(e["data"])["n"] for e in events]


def test_max_backlog_drops_the_oldest_excess_and_counts_it(r, pusher, start_worker,
                                                           queue_name):
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(500)])
    pusher.set_mode(hang=True)  # nothing leaves by delivery while the trim is checked
    w = start_worker(RELAY_MAX_BACKLOG="100", RELAY_POOL_SIZE="1", RELAY_PREFETCH="10",
                     PUSHER_TIMEOUT="30")
    wait_for(lambda: r.llen(queue_name) <= 100, what="the backlog trimmed to 100")
    stats = r.hgetall(f"{queue_name}:stats")
    left_now = pending(r, queue_name)  # queue and in-flight read at one instant
    assert int(stats[b"shed_backlog"]) + left_now["queue"] + left_now["inflight"] == 500
    left = [json.loads(x)["n"] for x in r.lrange(queue_name, 0, -1)]
    assert left == sorted(left) and left[-1] == 499  # the newest were kept
    pusher.clear_mode()
    wait_for(lambda: "RELAY_MAX_BACKLOG=100: dropping the oldest" in w.log(), what="one log")
    assert w.log().count("dropping the oldest") == 1


def test_max_age_drops_stale_envelopes_only(r, pusher, start_worker, queue_name):
    now = time.time()

    def env(n, age):
        return json.dumps({"relay": 1, "channels": ["c"], "event": "e", "data": {"n": n},
                           "enqueued_at": now - age})

    r.rpush(queue_name, env(0, 600), json.dumps({"channel": "c", "n": 1}), env(2, 0),
            env(3, 3600))
    w = start_worker(RELAY_MAX_AGE="60")
    events = pusher.wait_for_events(2)
    wait_for(lambda: int(r.hget(f"{queue_name}:stats", "shed_max_age") or 0) == 2,
             what="two stale envelopes counted")
    assert sorted(_n(events)) == [1, 2]  # classic messages carry no time: never stale
    assert r.llen(f"{queue_name}:dead") == 0 and r.llen(queue_name) == 0
    # Logged just after the ack that counts them: wait for the line, don't race it.
    wait_for(lambda: "older than RELAY_MAX_AGE=60 s" in w.log(), what="the episode logged")


def test_lifo_delivers_the_newest_first(r, pusher, start_worker, queue_name):
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(25)])
    start_worker(RELAY_ORDER="lifo", RELAY_POOL_SIZE="1")
    events = pusher.wait_for_events(25)
    assert _n(events) == list(range(24, -1, -1))


def test_a_lone_notification_is_not_held_back_to_fill_a_batch(r, pusher, start_worker,
                                                              queue_name):
    start_worker()
    for n in range(3):
        r.rpush(queue_name, json.dumps({"channel": "c", "n": n}))
        pusher.wait_for_events(n + 1, timeout=5)  # each arrives alone, at once
    assert {e["path"] for e in pusher.events()} == {"/apps/1/events"}


def test_envelope_channels_count_against_the_rate_limit(r, pusher, start_worker, queue_name):
    many = [f"ch{i}" for i in range(30)]
    # The worker is started (and its budget full) first; the clock starts at the push, so
    # the worker's start-up, however slow on a loaded machine, is not counted as waiting.
    start_worker(RELAY_RATE_LIMIT="40", RELAY_RATE_BURST="10")
    pushed_at = time.time()
    r.rpush(queue_name, *[json.dumps({"relay": 1, "channels": many, "event": "e",
                                      "data": {"n": n}}) for n in range(3)])
    events = pusher.wait_for_events(90, timeout=60)
    # 90 channel-events at 40/s with a burst of 9 cannot arrive in less than (90 - 9) / 40 s;
    # counting each notification as one event would deliver them at once.
    assert max(e["received_at"] for e in events) - pushed_at >= (90 - 9) / 40 - 0.2


def test_episode_logs_once_at_start_and_once_after_a_quiet_spell(caplog):
    now = [0.0]
    ep = Episode("dropping things", clock=lambda: now[0])
    with caplog.at_level("INFO", logger="relay.housekeeping"):
        ep.dropped(3)
        now[0] = 5
        ep.dropped(2)
        ep.maybe_end()
        now[0] = 16
        ep.maybe_end()
        ep.maybe_end()
    messages = [rec.getMessage() for rec in caplog.records]
    assert messages == ["dropping things (counted in relay_notifications_shed_total)",
                        "shedding over: 5 dropped (dropping things)"]
