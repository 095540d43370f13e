"""Builds a worker process from its settings: the Redis client, the queue, delivery,
metrics, the health server and the watchdog; runs it; closes everything after.

The command line (relay.cli) only parses; everything with a socket is made here.
"""

from __future__ import annotations

import argparse
import logging

import redis
from gevent import monkey
from redis.backoff import NoBackoff
from redis.retry import Retry

from relay import admin
from relay.config import Config
from relay.delivery import Delivery
from relay.health import HealthServer, Report, Watchdog
from relay.metrics import Metrics
from relay.queue import RedisQueue
from relay.redis_shared import REDIS_CONNECT_TIMEOUT_S, REDIS_SOCKET_TIMEOUT_S
from relay.worker import Worker

log = logging.getLogger(__name__)

SPARE_CONNECTIONS = 8  # housekeeping greenlets and the metrics endpoint


def redis_client(url: str, max_connections: int) -> redis.Redis:
    """One pool for the process; redis-py's own retries are off because ours know more."""
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=None,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0), health_check_interval=30)
    return redis.Redis(connection_pool=pool)


def run(cfg: Config, burst: bool = False) -> int:
    """Run the worker until stopped (or drained, with burst); returns the exit status."""
    assert cfg.pusher is not None  # load(need_pusher=True) guarantees it
    if not monkey.is_module_patched("socket"):
        log.warning("gevent has not patched the standard library: greenlets will block each "
                    "other; start relay with `python worker.py`")
    metrics = Metrics()
    client = redis_client(cfg.redis_url, cfg.pool_size + SPARE_CONNECTIONS)
    queue = RedisQueue(client, cfg.queue, cfg.order)
    delivery = Delivery(cfg.pusher, cfg.pool_size, on_call=metrics.observe_call,
                        http_client=cfg.http_client)
    worker = Worker(cfg, queue, delivery, metrics, burst=burst)
    watchdog = server = None
    try:
        if cfg.metrics_addr != "off":
            watchdog = Watchdog(on_block=metrics.blocked.inc)
            watchdog.start()
            server = start_health_server(cfg.metrics_addr, metrics, worker.health, watchdog)
        return worker.run()
    finally:
        for part in (server, watchdog):
            if part is not None:
                part.stop()
        delivery.close()
        client.close()


def start_health_server(addr: str, metrics: Metrics, report: Report,
                        watchdog: Watchdog) -> HealthServer | None:
    """Serve /metrics and /healthz; a taken port costs the endpoint, never the delivery."""
    server = HealthServer(addr, metrics.registry, report, watchdog)
    try:
        server.start()
    except OSError as exc:
        log.error("no /metrics or /healthz: cannot listen on %s (%s); give each process its "
                  "own RELAY_METRICS_ADDR (supervisord: 127.0.0.1:93%%(process_num)02d)",
                  addr, exc.strerror or exc)
        return None
    return server


def run_admin(command: str, args: argparse.Namespace, cfg: Config) -> int:
    """A subcommand (stats, dead, enqueue, check) with a small client of its own."""
    client = redis_client(cfg.redis_url, SPARE_CONNECTIONS)
    try:
        return admin.run(command, args, cfg, client)
    finally:
        client.close()
