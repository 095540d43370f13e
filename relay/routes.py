"""Where a notification goes: each Pusher app's route (RELAY_APPS), with its own delivery,
circuit, 429 pause and rate limit, so one app's outage or quota never holds back another's.

1. `Route`: one app's Delivery (its credentials, timeout, master key; one connection pool),
   its Circuit, and its share of the rate limit (RELAY_RATE_LIMIT for `default`, the app's
   own `rate_limit` otherwise), shared by every worker process through its own Redis key.
2. `Routes`: the routes by app name, built once at start and again on SIGHUP (`reload`):
   apps added get a route, changed ones a new route, removed ones none. A call keeps the
   route it started with, so what is in flight finishes on the old one; a retired route's
   connections are closed once no call uses it.
3. Without RELAY_APPS there is one app, `default`: PUSHER_URL's, with the global settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
import gevent.lock

from relay import apps as apps_module
from relay.apps import DEFAULT, App, Apps
from relay.circuit import Circuit
from relay.delivery import MAX_BATCH, Delivery
from relay.history import Tally
from relay.metrics import Metrics
from relay.queue import RedisQueue
from relay.ratelimit import RateLimiter

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Route:
    app: App
    delivery: Delivery
    circuit: Circuit
    limiter: RateLimiter | None = None
    last_success_at: float | None = None  # wall clock, for fate.is_suspect
    calls: int = 0  # calls under way on it
    retired: bool = False
    batch: int = field(init=False)

    def __post_init__(self) -> None:
        # A call carries at most a batch, and never more events than the rate limit's burst.
        self.batch = MAX_BATCH if self.limiter is None else min(MAX_BATCH, self.limiter.burst)

    @property
    def name(self) -> str:
        return self.app.name

    @property
    def where(self) -> str:
        """" (app NAME)" for a log line when several apps are configured, else ""."""
        return "" if self.circuit.app is None else f" (app {self.name})"

    def name_in_logs(self, shown: bool) -> None:
        """Its circuit's and delivery's failure lines name the app (several apps) or not."""
        self.circuit.app = self.delivery.app = self.name if shown else None

    def close_if_idle(self) -> None:
        if self.retired and self.calls == 0:
            self.delivery.close()


class Routes:
    def __init__(self, apps: Apps, queue: RedisQueue, metrics: Metrics, tally: Tally,
                 http_client: str, pool_size: int) -> None:
        self.queue = queue
        self.metrics = metrics
        self.tally = tally
        self.http_client = http_client
        self.pool_size = pool_size
        self.apps = apps
        self.by_name: dict[str, Route] = {app.name: self._route(app) for app in apps}
        self._name_in_logs()

    def get(self, name: str | None) -> Route | None:
        return self.by_name.get(DEFAULT if name is None else name)

    def __iter__(self):  # noqa: ANN204 - an iterator of Route
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    def _route(self, app: App) -> Route:
        metrics, tally, name = self.metrics, self.tally, app.name

        def on_call(status: int | None, seconds: float) -> None:
            metrics.observe_call(name, status, seconds)
            tally.call(status, seconds)

        delivery = Delivery(app.pusher, self.pool_size, on_call=on_call,
                            http_client=self.http_client)
        limiter = None
        if app.rate_limit > 0:
            limiter = RateLimiter(self.queue.client, self.queue.keys.ratelimit_of(name),
                                  app.rate_limit, app.rate_burst,
                                  sleep=gevent.sleep, lock=gevent.lock.Semaphore(),
                                  on_wait=metrics.rate_waits.labels(name).inc)
        return Route(app, delivery, Circuit(), limiter)

    def reload(self, on_change: Callable[[], None] = lambda: None) -> bool:
        """SIGHUP: read RELAY_APPS again. A bad file keeps the apps as they are (one line
        says why); otherwise routes are added, replaced and retired. True when it changed."""
        if self.apps.path is None:
            log.info("SIGHUP: no RELAY_APPS file to read again (PUSHER_URL's app stays)")
            return False
        found = apps_module.reload(self.apps.path, self.apps)
        if isinstance(found, apps_module.AppsError):
            return False
        changes = self.apps.changes(found)
        routes = dict(self.by_name)
        for name in (*changes.removed, *changes.changed):
            old = routes.pop(name)
            old.retired = True
            old.close_if_idle()
        for name in (*changes.added, *changes.changed):
            routes[name] = self._route(found.by_name[name])
        self.metrics.start_at_zero(changes.added)
        self.apps, self.by_name = found, routes
        self._name_in_logs()
        if changes:
            on_change()
        return bool(changes)

    def _name_in_logs(self) -> None:
        for route in self.by_name.values():
            route.name_in_logs(len(self.by_name) > 1)

    def close(self) -> None:
        for route in self.by_name.values():
            route.delivery.close()
