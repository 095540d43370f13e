"""Builds a worker process from its settings: the Redis client, the queue, delivery,
metrics, the health server and the watchdog; runs it; closes everything after.

The command line (relay.cli) only parses; everything with a socket is made here.
"""

from __future__ import annotations

import argparse
import logging
import sys

import redis
from gevent import monkey
from redis.exceptions import NoPermissionError

from relay import admin, explain, logs, redis_url, tracing_switch
from relay.apps import Apps
from relay.config import Config
from relay.connect import redis_client
from relay.health import HealthServer, Report, Watchdog
from relay.history import Tally
from relay.metrics import Metrics
from relay.process import Worker
from relay.queue import RedisQueue
from relay.routes import Routes

log = logging.getLogger(__name__)

SPARE_CONNECTIONS = 8  # housekeeping greenlets and the metrics endpoint
EXIT_CONFIG = 2  # bad configuration, or a Redis user missing a right the worker needs


def assemble(cfg: Config, apps: Apps, burst: bool = False) -> Worker:
    """The worker and its parts (Redis client, queue, each app's route, metrics), not yet
    running: what `run` runs, and what in-process tests drive. `apps`: relay.apps.from_config
    (the caller reports a bad RELAY_APPS file before anything opens)."""
    metrics = Metrics(apps.names)
    client = redis_client(cfg.redis_url, cfg.pool_size + SPARE_CONNECTIONS)
    queue = RedisQueue(client, cfg.queue, cfg.order, owned=cfg.channel_order,
                       spread=cfg.prefetch)
    logs.set_worker(queue.worker_id)  # every line from here on names this process
    tally = Tally()  # the dashboard's call figures, riding on settle steps (history.py)
    routes = Routes(apps, queue, metrics, tally, cfg.http_client, cfg.pool_size)
    # Off unless an OTLP endpoint is set (and the otel extra installed): then nothing loads.
    tracer = tracing_switch.start(cfg.queue, queue.worker_id,
                                  secrets=[app.pusher.secret for app in apps])
    return Worker(cfg, queue, routes, metrics, burst=burst, tally=tally, tracer=tracer)


def close(worker: Worker) -> None:
    """Release what `assemble` opened; spans still queued get a short deadline."""
    worker.tracer.close()
    worker.routes.close()
    worker.queue.client.close()


def run(cfg: Config, apps: Apps, burst: bool = False) -> int:
    """Run the worker until stopped (or drained, with burst); returns the exit status."""
    if not monkey.is_module_patched("socket"):
        log.warning("gevent has not patched the standard library: greenlets will block each "
                    "other; start relay with `python worker.py`")
    worker = assemble(cfg, apps, burst)
    metrics = worker.metrics
    watchdog = server = None
    try:
        if cfg.metrics_addr != "off":
            watchdog = Watchdog(on_block=metrics.blocked.inc)
            watchdog.start()
            server = start_health_server(cfg.metrics_addr, metrics, worker.health, watchdog)
            if server is not None:  # what `relay check` asks, from any host (heartbeat)
                worker.metrics_addr = f"{server.host}:{server.port}"
        return worker.run()
    except NoPermissionError as exc:
        log.error("Redis refused a command the worker needs (%s); grant it to the REDIS_URL "
                  "user (README, \"Redis deployments\"); nothing was taken from the queue",
                  explain.reason(exc))
        return EXIT_CONFIG
    finally:
        for part in (server, watchdog):
            if part is not None:
                part.stop()
        close(worker)


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
    """A subcommand (stats, dead, enqueue, check, pause...) with a small client of its own."""
    try:
        client = redis_client(cfg.redis_url, SPARE_CONNECTIONS, wait=False)
    except redis.RedisError as exc:
        where = redis_url.mask(cfg.redis_url)
        sys.stdout.write(f"{command} failed: {explain.redis_error(exc, where)}\n")
        return admin.redis_failure_status(command)
    try:
        return admin.run(command, args, cfg, client)
    finally:
        client.close()
