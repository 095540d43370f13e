"""Fixtures: our own redis-server on a free port, the local Pusher-compatible server, and
workers as subprocesses. Nothing here touches the Redis on 6379."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from gevent.hub import Hub

import relay.redis_server
from relay.pusher_server import LocalPusher
from relay.redis_server import RedisServer
from tests.support import WorkerProcess, worker_processes

_queue_names = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    """pytest-timeout's SIGALRM handler raises pytest.fail.Exception in whichever greenlet
    runs when the alarm lands. In a spawned one, gevent's hub would print it and let that
    greenlet die: the test would pass, or hang on with no second alarm. As a SYSTEM_ERROR,
    the hub throws it into the main greenlet, the test's, instead."""
    Hub.SYSTEM_ERROR = (*Hub.SYSTEM_ERROR, pytest.fail.Exception)
    _own_share_of_ports(os.environ.get("RUN_TESTS_SHARD"))


def _own_share_of_ports(shard: str | None) -> None:
    """Under ./run-tests's shards ("INDEX/COUNT"), each pytest process picks the free ports of
    its servers from its own share of relay.redis_server.OWN_PORTS: a port one process found
    free and has not bound yet is never the one the other picks. Shared out by hundreds, so
    the neighbours some tests take with a port (P and P+1, P00 and P01) are the same share's."""
    if not shard:
        return
    index, count = (int(n) for n in shard.split("/"))
    mine = [port for port in relay.redis_server.OWN_PORTS if port // 100 % count == index]
    relay.redis_server._candidates = itertools.cycle(random.sample(mine, len(mine)))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()  # our own throwaway server: nothing of anyone else's is in it
    yield client
    client.close()


@pytest.fixture
def queue_name() -> str:
    return f"q{next(_queue_names)}"


@pytest.fixture(scope="session")
def pusher_server() -> Iterator[LocalPusher]:
    with LocalPusher() as server:
        yield server


@pytest.fixture
def pusher(pusher_server: LocalPusher) -> LocalPusher:
    pusher_server.reset()
    return pusher_server


@pytest.fixture
def worker_env(redis_server: RedisServer, pusher: LocalPusher, queue_name: str
               ) -> dict[str, str]:
    return {
        "REDIS_URL": redis_server.url,
        "PUSHER_URL": pusher.url,
        "RELAY_QUEUE": queue_name,
        "RELAY_METRICS_ADDR": "off",
        "RELAY_HEARTBEAT_TTL": "2",
        "PUSHER_TIMEOUT": "2",
        "RELAY_POOL_SIZE": "10",
    }


@pytest.fixture
def start_worker(worker_env: dict[str, str], tmp_path: Path
                 ) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers with the test's settings plus overrides; all are killed at the end."""
    with worker_processes(worker_env, tmp_path) as start:
        yield start
