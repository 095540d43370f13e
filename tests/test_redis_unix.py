"""A local socket: `unix:///path/redis.sock?db=N` for the producer, the worker and `stats`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from relay import producer
from relay.redis_server import RedisServer
from tests.support import ROOT, wait_for
from tests.topology import require


@pytest.fixture(scope="module")
def unix_server() -> Iterator[RedisServer]:
    require()
    server = RedisServer()
    sock = os.path.join(server.dir, "redis.sock")
    server.extra = ["--unixsocket", sock, "--unixsocketperm", "700"]
    with server:
        yield server


def test_delivery_through_a_unix_socket(unix_server, pusher, start_worker, queue_name,
                                        monkeypatch) -> None:
    url = f"unix://{unix_server.dir}/redis.sock?db=2"
    monkeypatch.setenv("REDIS_URL", url)
    p = producer.Producer(queue=queue_name)
    for i in range(10):
        p.notify("c", {"n": i})
    assert p.client.connection_pool.connection_kwargs["db"] == 2
    p.close()
    worker = start_worker(REDIS_URL=url)
    wait_for(lambda: len(pusher.events()) == 10, timeout=30, what="delivery over the socket")
    env = {"REDIS_URL": url, "RELAY_QUEUE": queue_name, "RELAY_METRICS_ADDR": "off",
           "PATH": "/usr/bin:/bin"}
    stats = subprocess.run([sys.executable, str(ROOT / "worker.py"), "stats", "--json"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["totals"]["delivered"] == 10
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
