"""The operator's page: `python worker.py dashboard` (see app.py for the endpoints).

It needs Redis only, reads everything from it (history.py, the workers' heartbeat info),
and can run on any host, as many at once as you like.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import TextIO

import gevent
import gevent.event

from relay.config import Config
from relay.dashboard.app import DashboardApp, DashboardServer
from relay.dashboard.security import Guard, is_loopback
from relay.queue import RedisQueue

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CONFIG = 0, 2


def check_exposure(cfg: Config) -> str | None:
    """Why the dashboard must not start as configured, or None."""
    host = cfg.dashboard_addr.rpartition(":")[0]
    if not cfg.dashboard_auth and not is_loopback(host):
        return (f"RELAY_DASHBOARD_AUTH: required when RELAY_DASHBOARD_ADDR ({host}) is not "
                "loopback; set user:password or bind 127.0.0.1")
    return None


def serve(cfg: Config, queue: RedisQueue, err: TextIO = sys.stderr) -> int:
    """Serve until SIGTERM or SIGINT; exit 2 on an exposed address without auth."""
    problem = check_exposure(cfg)
    if problem is not None:
        err.write(f"relay: bad configuration: {problem}\n")
        return EXIT_CONFIG
    server = DashboardServer(cfg.dashboard_addr, DashboardApp(queue, Guard(cfg.dashboard_auth)))
    try:
        server.start()
    except OSError as exc:
        err.write(f"relay: cannot listen on RELAY_DASHBOARD_ADDR={cfg.dashboard_addr}: "
                  f"{exc.strerror or exc}\n")
        return EXIT_CONFIG
    host = cfg.dashboard_addr.rpartition(":")[0]
    log.info("dashboard for queue %s on http://%s:%d/ (basic auth %s)", cfg.queue, host,
             server.port, "on" if cfg.dashboard_auth else "off")
    stopping = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)
    stopping.wait()
    server.stop()
    log.info("dashboard stopped")
    return EXIT_OK
