"""Development mode end to end: `python -m relay.devmode --push-demo --exit-after-first`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis

from relay.devmode import BANNER, DEMO_DATA, DEV_QUEUE, dev_queue, redis_cli, worker_env
from relay.producer import DEFAULT_QUEUE
from relay.redis_server import RedisServer, free_port
from tests.support import ROOT, pending


def run_devmode(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("RELAY_", "PUSHER_", "REDIS_"))}
    # Port 9300 may be taken on a developer's machine; the default itself is not under test.
    full.update(RELAY_METRICS_ADDR="off", **env)
    return subprocess.run([sys.executable, "-m", "relay.devmode", "--push-demo",
                           "--exit-after-first"], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=90, stdin=subprocess.DEVNULL)


def assert_demo_delivered(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stderr
    assert BANNER in done.stderr
    assert f"WARNING relay.devmode: {BANNER}" in done.stderr  # loud: at WARNING level
    # The local server logs each event it accepted (print_events=True).
    assert "event hit on test (socket_id=None): " + '{"title":"' + DEMO_DATA["title"] in (
        done.stderr)
    assert "RPUSH" in done.stderr and "from relay.producer import notify" in done.stderr
    assert "stopped; 0 notification(s)" in done.stderr  # the worker was stopped with SIGTERM


def test_devmode_uses_the_redis_and_queue_it_is_told(r: redis.Redis, redis_server: RedisServer,
                                                    queue_name: str) -> None:
    done = run_devmode({"REDIS_URL": redis_server.url, "RELAY_QUEUE": queue_name})
    assert_demo_delivered(done)
    assert f"using the Redis at {redis_server.url} (REDIS_URL)" in done.stderr
    assert f"consuming the queue {queue_name} (RELAY_QUEUE)" in done.stderr
    assert f"redis-cli -p {redis_server.port} RPUSH {queue_name} " in done.stderr
    assert pending(r, queue_name) == {"queue": 0, "retry": 0, "inflight": 0, "parked": 0}
    assert int(r.hget(queue_name + ":stats", "delivered") or 0) == 1


def test_devmode_never_takes_from_the_real_queue_unless_told(r: redis.Redis,
                                                              redis_server: RedisServer
                                                              ) -> None:
    # A shared Redis where a real app keeps its `notifications`: REDIS_URL alone is not
    # enough for development mode to consume them (they would be acked into the fake server).
    real = [json.dumps({"channel": "site-1", "title": f"real {n}"}) for n in range(3)]
    r.rpush(DEFAULT_QUEUE, *real)
    done = run_devmode({"REDIS_URL": redis_server.url})
    assert_demo_delivered(done)
    assert f"consuming the queue {DEV_QUEUE} (development mode's own" in done.stderr
    assert f"RPUSH {DEV_QUEUE} " in done.stderr and f"RELAY_QUEUE={DEV_QUEUE}" in done.stderr
    assert [x.decode() for x in r.lrange(DEFAULT_QUEUE, 0, -1)] == real  # untouched
    assert not r.keys(DEFAULT_QUEUE + ":*")
    assert int(r.hget(DEV_QUEUE + ":stats", "delivered") or 0) == 1


def test_devmode_starts_an_embedded_redis_unless_redis_url_is_set() -> None:
    done = run_devmode({})
    assert_demo_delivered(done)
    assert "REDIS_URL is not set: started an embedded redis-server at redis://127.0.0.1:" in (
        done.stderr)
    assert ":6379" not in done.stderr  # the default Redis is never looked at


def test_devmode_refuses_a_redis_url_that_does_not_answer() -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    done = run_devmode({"REDIS_URL": nobody})
    assert done.returncode == 1
    assert f"no Redis answers at REDIS_URL={nobody}; unset REDIS_URL" in done.stderr
    assert "started an embedded" not in done.stderr  # no silent swap for another Redis
    assert "local Pusher-compatible server at" not in done.stderr  # nothing else started


def test_worker_gets_the_local_server_and_no_other_credentials(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHER_KEY", "real-key")
    monkeypatch.setenv("PUSHER_SECRET", "real-secret")
    monkeypatch.setenv("PUSHER_TIMEOUT", "3")
    env = worker_env("redis://127.0.0.1:1/0", "http://k:s@127.0.0.1:2/apps/1", "q")
    assert env["PUSHER_URL"] == "http://k:s@127.0.0.1:2/apps/1"
    assert (env["REDIS_URL"], env["RELAY_QUEUE"], env["PUSHER_TIMEOUT"]) == (
        "redis://127.0.0.1:1/0", "q", "3")
    assert "PUSHER_KEY" not in env and "PUSHER_SECRET" not in env


def test_dev_queue_is_its_own_unless_relay_queue_is_set() -> None:
    assert dev_queue({}) == DEV_QUEUE != DEFAULT_QUEUE
    assert dev_queue({"RELAY_QUEUE": ""}) == DEV_QUEUE
    assert dev_queue({"RELAY_QUEUE": "notifications"}) == "notifications"


@pytest.mark.parametrize(("url", "command"), [
    ("redis://localhost:6379/0", "redis-cli -p 6379"),
    ("redis://127.0.0.1:7000", "redis-cli -p 7000"),
    ("redis://cache.internal:6380/3", "redis-cli -h cache.internal -p 6380 -n 3"),
    ("redis://:hunter2@cache.internal:6380/0", "redis-cli -u 'redis://***@cache.internal:6380/0'"),
    ("unix:///run/redis.sock", "redis-cli -s /run/redis.sock"),
])
def test_redis_cli_line(url: str, command: str) -> None:
    assert redis_cli(url) == command
