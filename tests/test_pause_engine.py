"""Pause and quiet in one worker process, in-process (tests/test_engine.py's `serve`): what the
engine does with a pause that lands mid-drain, how soon it resumes, and what /healthz and
/metrics say. Across processes: tests/test_pause_e2e.py."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import gevent
import redis

from relay.health import health
from relay.pause import Controls
from tests.support import delivered, events_total, pending, wait_for
from tests.test_engine import push, serve  # noqa: F401 - serve is a fixture

__all__ = ["serve"]


def controls(r: redis.Redis, worker) -> Controls:
    return Controls(r, worker.queue.keys)


def stays(condition, seconds: float, what: str) -> None:
    """condition() holds throughout `seconds`: a "never" needs a span of time to be seen."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), f"{what} stopped holding"
        gevent.sleep(0.05)


def in_channel_order(pusher) -> bool:
    """Each channel's notifications arrived in the order they were pushed."""
    seen: dict[str, list[int]] = defaultdict(list)
    for event in pusher.events():
        seen[event["channel"]].append(json.loads(event["data"])["n"])
    return all(ns == sorted(ns) for ns in seen.values())


def test_a_pause_mid_drain_settles_the_calls_in_flight_and_puts_back_the_rest(
        r, pusher, serve, queue_name) -> None:  # noqa: F811
    pusher.set_mode(delay=0.5)
    push(r, queue_name, 300, channels=30)
    running = serve(RELAY_POOL_SIZE="5", PUSHER_TIMEOUT="10")
    engine = running.worker.engine
    wait_for(lambda: engine.busy == 5, what="five calls in flight")
    pause, _, _ = controls(r, running.worker).pause("mid-drain", "ops@test")
    wait_for(lambda: engine.operator.holding, 2, "the worker to learn the pause")
    # The five calls finish and are settled as delivered; the window's rest goes back.
    wait_for(lambda: engine.busy == 0 and engine.held == 0, 15, "the calls in flight to end")
    assert r.llen(running.worker.queue.inflight_key) == 0
    sent = events_total(pusher)
    assert 50 <= sent < 300  # the calls that were in flight, and none started after
    assert int(r.hget(f"{queue_name}:stats", "delivered")) == sent  # settled, not put back
    stays(lambda: events_total(pusher) == sent and pending(r, queue_name)["queue"] == 300 - sent,
          1.0, "nothing sent while paused, everything else in the queue")
    pusher.clear_mode()
    controls(r, running.worker).resume()
    wait_for(lambda: events_total(pusher) >= 300, 30, "all 300 after the resume")
    counts = delivered(pusher)
    assert sorted(counts) == list(range(300)) and set(counts.values()) == {1}  # none twice
    assert in_channel_order(pusher)
    assert pause.reason == "mid-drain"


def test_resume_is_seen_within_a_second_even_by_an_idle_worker(
        r, pusher, serve, queue_name) -> None:  # noqa: F811
    """Idle, the process waits in a blocking pop of up to 3 s; paused it does not fetch at all,
    and its housekeeping comes round every 0.5 s, so a resume is not kept waiting."""
    running = serve(RELAY_POOL_SIZE="4")
    worker = running.worker
    wait_for(lambda: worker.engine.fetching, what="the idle worker's blocking pop")
    c = controls(r, worker)
    c.pause("idle", "ops@test")
    wait_for(lambda: worker.engine.operator.holding, 2, "the idle worker to learn the pause")
    push(r, queue_name, 5, channels=5)
    stays(lambda: events_total(pusher) == 0, 1.0, "nothing sent while paused")
    c.resume()
    resumed = time.monotonic()
    pusher.wait_for_events(5, timeout=10)
    # 1 s is the bar; the margin is for a loaded 2-core machine. A worker that waited for its
    # next blocking pop to end (3 s) or for an idle round would miss it.
    assert time.monotonic() - resumed < 1.5


def test_healthz_and_metrics_say_paused_then_quiet_and_stay_healthy(
        r, pusher, serve, queue_name) -> None:  # noqa: F811
    running = serve(RELAY_POOL_SIZE="2")
    worker = running.worker
    c = controls(r, worker)
    wait_for(lambda: worker.health()[1]["redis"] == "ok", what="the worker up")
    registry = worker.metrics.registry
    assert registry.get_sample_value("relay_paused") == 0
    pause, _, _ = c.pause("pusher incident", "ops@test", 600)
    wait_for(lambda: worker.engine.operator.holding, 2, "the pause learned")
    ok, body = health(worker.health, None)
    assert ok and body["status"] == "ok" and body["delivery"] == "paused"
    assert body["pause"]["reason"] == "pusher incident" and body["pause"]["who"] == "ops@test"
    assert 590 < body["pause"]["left_s"] <= 600
    assert registry.get_sample_value("relay_paused") == 1
    assert registry.get_sample_value("relay_paused_since_seconds") == pause.since
    c.resume()
    wait_for(lambda: not worker.engine.operator.holding, 2, "the resume learned")
    assert registry.get_sample_value("relay_paused") == 0
    assert registry.get_sample_value("relay_paused_since_seconds") == 0
    worker.quiet()  # what SIGTSTP runs
    ok, body = health(worker.health, None)
    assert ok and body["delivery"] == "quiet" and body["quiet"]["how"] == "SIGTSTP"
    assert registry.get_sample_value("relay_quiet") == 1
    assert set(c.quiet_workers()) == {worker.queue.worker_id}  # marked in Redis at once
    # Quiet takes nothing more: what is pushed now waits for another worker.
    push(r, queue_name, 3, channels=3)
    stays(lambda: r.llen(queue_name) == 3, 1.0, "a quiet worker leaving the queue alone")
    assert running.stop() == 0
