"""Command line: `python worker.py [settings]` runs the worker; subcommands administer.

Bad configuration ends the process at start with one line naming the setting, status 2.
Settings flags go before or after a subcommand name; each is also an environment variable.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

import redis
from gevent import monkey
from redis.backoff import NoBackoff
from redis.retry import Retry

from relay import __version__, admin, config, logs
from relay.delivery import Delivery
from relay.health import HealthServer, Watchdog
from relay.history import Tally
from relay.metrics import Metrics
from relay.queue import RedisQueue
from relay.worker import BLOCK_S, Worker

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
# Above the blocking pop's wake-up (BLOCK_S), so an idle pop is never a socket timeout.
REDIS_SOCKET_TIMEOUT_S = BLOCK_S + 4.0
REDIS_CONNECT_TIMEOUT_S = 3.0
SPARE_CONNECTIONS = 8  # housekeeping greenlets and the metrics endpoint


def redis_client(url: str, max_connections: int) -> redis.Redis:
    """One pool for the process; redis-py's own retries are off because ours know more."""
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=None,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0), health_check_interval=30)
    return redis.Redis(connection_pool=pool)


class Parser(argparse.ArgumentParser):
    """argparse echoes unknown arguments; a mistyped --pusher-url would print its secret."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            words = message.split(":", 1)[1].split()
            flags = [w.split("=", 1)[0] for w in words if w.startswith("-")]
            message = ("unrecognized arguments: " + " ".join(flags)
                       + " (values not shown: they may hold secrets)")
        elif "invalid choice:" in message:
            message = message.split("invalid choice:", 1)[0] + "invalid choice (not shown)"
        super().error(re.sub(r"//[^/@\s]+@", "//***@", message))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="worker.py",
        description="relay: move notifications from a Redis list to the Pusher HTTP API.\n"
                    "Without a subcommand it runs the worker.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    config.add_arguments(parser)
    settings = argparse.ArgumentParser(add_help=False)
    config.add_arguments(settings, suppress=True)
    settings_no_event = argparse.ArgumentParser(add_help=False)
    config.add_arguments(settings_no_event, suppress=True, skip=frozenset({"RELAY_EVENT"}))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", parents=[settings], help="run the worker (the default)")
    admin.add_subcommands(sub, [settings], [settings_no_event])
    return parser


def load_config(args: argparse.Namespace, need_pusher: bool = True) -> config.Config | None:
    try:
        return config.load(args=args, need_pusher=need_pusher)
    except config.ConfigError as exc:
        sys.stderr.write(f"relay: bad configuration: {exc}\n")
        return None


def run(cfg: config.Config) -> int:
    assert cfg.pusher is not None  # load(need_pusher=True) guarantees it
    if not monkey.is_module_patched("socket"):
        log.warning("gevent has not patched the standard library: greenlets will block each "
                    "other; start relay with `python worker.py`")
    metrics = Metrics()
    client = redis_client(cfg.redis_url, cfg.pool_size + SPARE_CONNECTIONS)
    queue = RedisQueue(client, cfg.queue, cfg.order)
    tally = Tally()  # the dashboard's call figures (history.py)

    def on_call(status: int | None, seconds: float) -> None:
        metrics.observe_call(status, seconds)
        tally.call(status, seconds)

    delivery = Delivery(cfg.pusher, cfg.pool_size, on_call=on_call, http_client=cfg.http_client)
    worker = Worker(cfg, queue, delivery, metrics, tally=tally)
    watchdog = server = None
    try:
        if cfg.metrics_addr != "off":
            watchdog = Watchdog(on_block=metrics.blocked.inc)
            watchdog.start()
            server = start_health_server(cfg.metrics_addr, worker, watchdog)
        return worker.run()
    finally:
        for part in (server, watchdog):
            if part is not None:
                part.stop()
        delivery.close()
        client.close()


def start_health_server(addr: str, worker: Worker, watchdog: Watchdog) -> HealthServer | None:
    """Serve /metrics and /healthz; a taken port costs the endpoint, never the delivery."""
    server = HealthServer(addr, worker, watchdog)
    try:
        server.start()
    except OSError as exc:
        log.error("no /metrics or /healthz: cannot listen on %s (%s); give each process its "
                  "own RELAY_METRICS_ADDR (supervisord: 127.0.0.1:93%%(process_num)02d)",
                  addr, exc.strerror or exc)
        return None
    return server


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    cfg = load_config(args, need_pusher=command == "run")
    if cfg is None:
        return EXIT_CONFIG
    logs.setup(cfg.log_level, cfg.log_format)
    if command == "run":
        return run(cfg)
    client = redis_client(cfg.redis_url, SPARE_CONNECTIONS)
    try:
        return admin.run(command, args, cfg, client)
    finally:
        client.close()
