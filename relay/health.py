"""`/metrics` and `/healthz` on RELAY_METRICS_ADDR, and the stuck-event-loop watchdog.

1. `/metrics`: the worker's own Prometheus registry, in the text format.
2. `/healthz`: 200 and a small JSON body when the worker's `report()` names no problem
   (it checks that Redis answers a PING and the circuit to Pusher is closed) and the event
   loop has not been blocked lately; otherwise 503 with the reasons. This module imports
   nothing of relay's: it is given a registry and a report callable.
3. The watchdog turns on gevent's monitor thread: a greenlet that holds the hub longer than
   BLOCKED_S (CPU-bound work, or a call that was not monkey-patched) is counted, logged with
   its stack by a greenlet (the monitor thread itself must not take gevent locks), and
   reported by /healthz for UNHEALTHY_AFTER_BLOCK_S.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import gevent.events
from gevent.pywsgi import WSGIServer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

BLOCKED_S = 0.5
UNHEALTHY_AFTER_BLOCK_S = 60.0
REPORT_EVERY_S = 1.0

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class Watchdog:
    """Collects gevent's EventLoopBlocked events from the monitor thread."""

    def __init__(self, on_block: Callable[[], None]) -> None:
        self.on_block = on_block
        self.reports: deque[tuple[float, float, list[str]]] = deque(maxlen=20)
        self.last_block_at: float | None = None
        self._reporter: gevent.Greenlet | None = None

    def start(self) -> None:
        gevent.config.monitor_thread = True
        gevent.config.max_blocking_time = BLOCKED_S
        gevent.config.print_blocking_reports = False
        gevent.events.subscribers.append(self._on_event)
        gevent.get_hub().start_periodic_monitoring_thread()
        self._reporter = gevent.spawn(self._report_loop)

    def stop(self) -> None:
        if self._on_event in gevent.events.subscribers:
            gevent.events.subscribers.remove(self._on_event)
        if self._reporter is not None:
            self._reporter.kill()

    def _on_event(self, event: object) -> None:
        # Runs in the monitor thread: only touch plain data (deque.append is thread-safe).
        if isinstance(event, gevent.events.EventLoopBlocked):
            now = time.time()
            self.last_block_at = now
            self.reports.append((now, float(event.blocking_time), list(event.info)))

    def _report_loop(self) -> None:
        while True:
            gevent.sleep(REPORT_EVERY_S)
            while self.reports:
                _at, seconds, info = self.reports.popleft()
                self.on_block()
                stack = "\n".join(info).split("\nInfo:", 1)[0].strip("=\n ")
                log.error("the event loop was blocked for over %.1f s; stack:\n%s",
                          seconds, stack)

    def blocked_recently(self, now: float) -> bool:
        return self.last_block_at is not None and now - self.last_block_at < \
            UNHEALTHY_AFTER_BLOCK_S


# The worker's own verdict: (problems, facts), e.g. (["circuit"], {"circuit": "open: ..."}).
Report = Callable[[], tuple[list[str], dict[str, Any]]]


def health(report: Report, watchdog: Watchdog | None) -> tuple[bool, dict[str, Any]]:
    """The /healthz verdict and body: the worker's report plus the event loop's state."""
    problems, facts = report()
    problems = list(problems)
    if watchdog is not None and watchdog.blocked_recently(time.time()):
        problems.append("event_loop")
    body = {"status": "ok" if not problems else "unhealthy", "problems": problems, **facts,
            "event_loop": "blocked recently" if "event_loop" in problems else "ok"}
    return not problems, body


class HealthServer:
    """gevent's WSGI server on the metrics address; one per worker process."""

    def __init__(self, addr: str, registry: CollectorRegistry, report: Report,
                 watchdog: Watchdog | None) -> None:
        host, _, port = addr.rpartition(":")
        self.registry = registry
        self.report = report
        self.watchdog = watchdog
        self.server = WSGIServer((host.strip("[]"), int(port)), self.app, log=None,
                                 error_log=log)

    @property
    def host(self) -> str:
        return str(self.server.server_host)

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def start(self) -> None:
        self.server.start()
        log.info("metrics and health on http://%s:%d/metrics and /healthz",
                 self.server.server_host, self.port)

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body = generate_latest(self.registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path == "/healthz":
            ok, report = health(self.report, self.watchdog)
            data = json.dumps(report).encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [data]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]
