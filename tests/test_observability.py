"""What a real worker subprocess reports on /metrics and /healthz: the retried, requeued,
recovered, shed, age and blocked-loop metrics, and /healthz answering 503 while Redis is
down (and 200 again once it is back)."""

from __future__ import annotations

import json
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from relay.redis_server import RedisServer, free_port
from tests.support import (
    ROOT,
    WorkerProcess,
    healthz,
    inflight_lists,
    metrics,
    wait_for,
    wait_settled,
)

DELIVERED = 'relay_notifications_delivered_total{app="default"}'
RETRIED = 'relay_notifications_retried_total{app="default"}'


def envelope(n: int, enqueued_at: float) -> str:
    return json.dumps({"relay": 1, "channels": ["c"], "event": "e", "data": {"n": n},
                       "enqueued_at": enqueued_at})


def with_metrics(**settings: str) -> tuple[int, dict[str, str]]:
    port = free_port()
    return port, {"RELAY_METRICS_ADDR": f"127.0.0.1:{port}", **settings}


def test_retried_requeued_shed_and_age_metrics(r, pusher, start_worker, queue_name):
    port, settings = with_metrics(RELAY_MAX_AGE="60")
    start_worker(**settings)
    m = metrics(port)
    for name in (RETRIED, "relay_notifications_requeued_total",
                 "relay_delivery_age_seconds_count"):
        assert m[name] == 0, name

    # retried: one 500, then the notification goes on its second attempt.
    pusher.set_mode(status=500, fail_next=1)
    r.rpush(queue_name, json.dumps({"channel": "c", "n": 0}))
    wait_for(lambda: metrics(port)[RETRIED] == 1, 15, "retried 1")
    wait_for(lambda: metrics(port)[DELIVERED] == 1, 15, "the retry delivered")

    # age: an envelope carrying enqueued_at is observed once delivered, however young.
    r.rpush(queue_name, envelope(1, time.time()))
    wait_for(lambda: metrics(port)["relay_delivery_age_seconds_count"] == 1, 15,
             "one age observation")
    assert metrics(port)["relay_delivery_age_seconds_sum"] < 60

    # shed (max_age): an envelope older than RELAY_MAX_AGE is dropped and counted.
    r.rpush(queue_name, envelope(2, time.time() - 3600))
    wait_for(lambda: metrics(port).get('relay_notifications_shed_total{policy="max_age"}') == 1,
             15, "one notification shed for its age")

    # requeued: a 429 is the app's limit, not the notifications': what it refused goes back
    # untouched, with no attempt counted, and everything pauses for Retry-After.
    pusher.set_mode(status=429, retry_after="1", fail_next=1)
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": n}) for n in range(3, 23)])
    wait_for(lambda: metrics(port)["relay_notifications_requeued_total"] >= 1, 15,
             "notifications put back after a 429")
    wait_for(lambda: metrics(port)[DELIVERED] == 22, 60, "all delivered after the pause")
    m = metrics(port)
    assert m[RETRIED] == 1  # the 429 cost no attempt
    assert m['relay_notifications_shed_total{policy="max_age"}'] == 1
    assert r.llen(f"{queue_name}:dead") == 0


def test_backlog_shedding_is_counted(r, pusher, start_worker, queue_name):
    # The worker trims at start-up housekeeping and then periodically: with Pusher hanging
    # nothing drains, so exactly the excess is dropped.
    pusher.set_mode(hang=True)
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": n}) for n in range(300)])
    port, settings = with_metrics(RELAY_MAX_BACKLOG="100", RELAY_POOL_SIZE="1", RELAY_PREFETCH="10",
                                  PUSHER_TIMEOUT="30")
    start_worker(**settings)
    shed = wait_for(lambda: metrics(port).get('relay_notifications_shed_total{policy="backlog"}'),
                    15, "the backlog shed")
    taken = 300 - 100 - int(shed)  # what the window (RELAY_PREFETCH) took before the trim
    assert 0 <= taken <= 10, shed
    pusher.clear_mode()


def test_recovered_counts_a_dead_workers_items(r, pusher, start_worker, queue_name):
    pusher.set_mode(delay=0.05)
    victim = start_worker()
    port, settings = with_metrics()
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": n}) for n in range(400)])
    wait_for(lambda: any(n for k, n in inflight_lists(r, queue_name).items()
                         if victim.pid_tag in k), what="the victim holding notifications")
    victim.kill()
    held = sum(n for k, n in inflight_lists(r, queue_name).items() if victim.pid_tag in k)
    assert held > 0
    start_worker(**settings)
    wait_for(lambda: metrics(port)["relay_notifications_recovered_total"] == held, 30,
             f"the survivor to count {held} recovered")
    wait_settled(r, queue_name, gone=[victim], timeout=60)


BLOCKER = textwrap.dedent("""
    # The worker, plus one greenlet that blocks the event loop once, the way an unpatched
    # call would: what the watchdog exists to catch.
    import runpy
    import sys
    from gevent import monkey
    monkey.patch_all()
    import gevent

    def block():
        gevent.sleep(2)
        monkey.get_original("time", "sleep")(1.5)

    gevent.spawn(block)
    sys.argv = [{worker!r}]
    runpy.run_path({worker!r}, run_name="__main__")
""")


def test_a_blocked_event_loop_is_counted_and_unhealthy(tmp_path: Path, worker_env, pusher):
    port, settings = with_metrics()
    script = tmp_path / "blocking_worker.py"
    script.write_text(BLOCKER.format(worker=str(ROOT / "worker.py")))
    w = WorkerProcess({**worker_env, **settings, "PYTHONPATH": str(ROOT)},
                      tmp_path / "worker.log", script=script)
    try:
        w.wait_started()
        wait_for(lambda: metrics(port)["relay_event_loop_blocked_total"] >= 1, 20,
                 "relay_event_loop_blocked_total to count the block")
        status, body = healthz(port)
        assert status == 503 and "event_loop" in body["problems"], body
        assert "event loop was blocked" in w.log()
        w.signal(signal.SIGTERM)
        assert w.wait(timeout=30) == 0
    finally:
        w.kill()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, to stop and start (appendonly: nothing lost on a kill)."""
    with RedisServer(appendonly=True) as server:
        yield server


def test_healthz_is_503_while_redis_is_down(own_redis, pusher, start_worker, queue_name):
    port, settings = with_metrics()
    w = start_worker(REDIS_URL=own_redis.url, **settings)
    status, body = healthz(port)
    assert status == 200 and body["status"] == "ok" and body["redis"] == "ok", body
    own_redis.kill()
    status, body = wait_for(lambda: (s := healthz(port))[0] == 503 and s, 20,
                            "/healthz to answer 503")
    assert body["status"] == "unhealthy" and "redis" in body["problems"], body
    assert body["redis"].startswith("unreachable")
    own_redis.start()
    wait_for(lambda: healthz(port)[0] == 200, 30, "/healthz 200 again once Redis is back")
    client = redis.Redis.from_url(own_redis.url)
    client.rpush(queue_name, json.dumps({"channel": "c", "n": 0}))
    pusher.wait_for_events(1, timeout=30)
    client.close()
    assert w.alive
