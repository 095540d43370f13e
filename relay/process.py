"""The worker process: the pool, its lifecycle, and its shutdown.

1. RELAY_POOL_SIZE greenlets in a `gevent.pool.Pool` each run the engine's loop (relay.engine):
   fetch when leading, send a call, settle it. A greenlet that ends while the worker is not
   stopping is logged and replaced; /healthz says so while the pool is not full.
2. Housekeeping (heartbeat, due retries, reaping, trimming, the summary) runs beside them
   (relay.housekeeping); with `--burst` a watcher ends the run once nothing is left.
3. SIGTERM/SIGINT: gevent runs `stop` in a greenlet (never inside the signal handler), which
   logs once and sets a flag. Then: no fetch and no new call -> the calls in flight finish
   (up to PUSHER_TIMEOUT + 1 s) and are settled -> what is left is cut off -> everything
   still taken goes back to the queue untouched, in order -> exit 0. What Pusher accepted was
   settled, so a restarted worker does not send it again. It is worse to lose a notification
   than to send it twice.
4. SIGTSTP: quiet (relay.pause): no more fetching; the window's calls are sent and settled,
   the channels pass to another worker, and the process stays up until SIGTERM. `relay
   pause` and `relay quiet` reach it through Redis (the fetch and housekeeping scripts).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import redis
from redis.exceptions import NoPermissionError

from relay import redis_url
from relay.apps import DEFAULT
from relay.config import Config
from relay.connect import disconnect_all
from relay.engine import Engine, Settings
from relay.fate import Policy
from relay.history import Tally
from relay.housekeeping import MAINTENANCE_S, Housekeeper
from relay.metrics import Metrics
from relay.pause import Controls, OperatorGate, Quiet
from relay.queue import RedisQueue
from relay.redis_shared import REDIS_ERRORS
from relay.retry import Outage
from relay.routes import Route, Routes
from relay.settle import Settler
from relay.tracing_switch import NO_TRACING, Tracer

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 1.0
# A pool greenlet that ends is replaced, unless more than MOST_REPLACED ended within the window.
MOST_REPLACED = 10
REPLACE_WINDOW_S = 60.0


class Worker:
    def __init__(self, config: Config, queue: RedisQueue, routes: Routes,
                 metrics: Metrics, clock: Callable[[], float] = time.time,
                 burst: bool = False, tally: Tally | None = None,
                 tracer: Tracer = NO_TRACING) -> None:
        self.config = config
        # The dashboard's figures without a settle step of their own (Pusher calls, latency);
        # they ride on the next settle script (see history.py). cli feeds it Delivery's calls.
        self.tally = tally or Tally()
        self.queue = queue
        self.tracer = tracer
        self.metrics = metrics
        self.burst = burst
        self.redis_outage = Outage("Redis",
                                   where=f" at REDIS_URL={redis_url.mask(config.redis_url)}")
        self.stopping = gevent.event.Event()
        self.pool = gevent.pool.Pool(config.pool_size)
        self.services: list[gevent.Greenlet] = []
        self.replaced: list[float] = []  # when pool greenlets ended unexpectedly (monotonic)
        self.metrics_addr = "off"  # where /healthz answers, once the launcher bound it
        self.serving = False
        self.routes = routes  # each app's delivery, circuit and rate limit
        self.operator = OperatorGate(queue.worker_id, Controls(queue.client, queue.keys),
                                     metrics, queue.inflight_key, queue.push_cmd,
                                     held=lambda: self.engine.held)
        queue.on_gate_state = self.operator.observe  # what the scripts see of pause and quiet
        self.housekeeper = Housekeeper(config, queue, metrics, self.redis_outage,
                                       circuits=self.circuits_open,
                                       inflight=lambda: self.engine.held, report=self.report,
                                       on_reaped=lambda: self.engine.reaped(),
                                       operator=self.operator)
        settler = Settler(queue, metrics, self.redis_outage, self.tally,
                          self.housekeeper.stale_shedding, config.queue, clock,
                          apps_apart=lambda: len(self.routes) > 1)
        settings = Settings(prefetch=config.prefetch, channel_order=config.channel_order,
                            event=config.event,
                            policy=Policy(config.max_attempts, config.retry_for,
                                          config.max_age),
                            linger_s=config.linger)
        self.engine = Engine(settings, queue, routes, settler, metrics, self.redis_outage,
                             self.stopping, clock=clock, on_reaped=self.housekeeper.heartbeat,
                             operator=self.operator, tracer=tracer)
        self.operator.on_change = self.engine.wake_all
        metrics.pool_size.set(config.pool_size)

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a signal asks to stop (or, in burst mode, until drained)."""
        gevent.signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self.stop, "SIGINT")
        gevent.signal_handler(signal.SIGHUP, self.reload)
        gevent.signal_handler(signal.SIGTSTP, self.quiet, "SIGTSTP")
        return self.serve()

    def serve(self) -> int:
        """Serve until `stop` (or, in burst mode, until drained); the exit status."""
        # The effective configuration first: if Redis does not answer, the operator sees
        # what relay was told to use, then the outage line with the address and the reason.
        log.info("worker %s starting%s: %s", self.queue.worker_id,
                 " (burst: exits once drained)" if self.burst else "", self.config.describe())
        if self.routes.apps.path is not None:
            log.info("%s", self.routes.apps.describe())
        if not self._register():
            return 0
        log.info("worker %s started: registered in Redis, %d greenlets serving, a window of "
                 "%d", self.queue.worker_id, self.config.pool_size,
                 self.engine.window.prefetch)
        for _ in range(self.config.pool_size):
            self._spawn()
        self.serving = True
        self.services = self.housekeeper.start(self.stopping)
        if self.burst:
            self.services.append(gevent.spawn(
                self.housekeeper.every, self.stopping, MAINTENANCE_S, self._end_burst))
        self.stopping.wait()
        return self.shutdown()

    def _spawn(self) -> None:
        greenlet = self.pool.spawn(self.engine.serve)
        greenlet.link(self._ended)

    def _ended(self, greenlet: gevent.Greenlet) -> None:
        """A pool greenlet ended. At a stop that is expected; otherwise it is replaced, unless
        greenlets keep ending (a bug, not bad luck): then /healthz reports the pool short."""
        if self.stopping.is_set():
            return
        now = time.monotonic()
        self.replaced = [t for t in self.replaced if now - t < REPLACE_WINDOW_S] + [now]
        why = greenlet.exception
        cause = f"{type(why).__name__}: {why}" if why is not None else "no error"
        if len(self.replaced) > MOST_REPLACED:
            log.error("a pool greenlet ended unexpectedly (%s); %d ended within %.0f s, so it "
                      "is not replaced: /healthz reports the pool short", cause,
                      len(self.replaced), REPLACE_WINDOW_S)
            return
        log.error("a pool greenlet ended unexpectedly (%s); starting another", cause)
        self._spawn()

    def stop(self, why: str = "stop requested") -> None:
        if not self.stopping.is_set():
            log.info("%s: finishing the calls in flight, then exiting", why)
            self.stopping.set()
            self.engine.cut()  # the blocking pop ends now, not when it times out

    def reload(self) -> None:
        """SIGHUP: read RELAY_APPS again (relay.routes). Calls under way finish on the
        routes they started with; the next ones use the new."""
        if self.routes.reload():
            self.tracer.add_secrets([route.app.pusher.secret for route in self.routes])
            self.metrics.circuit_open.clear()  # a removed app's gauge goes, the others return
            for route in self.routes:
                self.metrics.circuit_open.labels(route.name).set(int(route.circuit.is_open))
            self.engine.wake_all()

    def circuits_open(self) -> list[tuple[str, bool]]:
        return [(route.name, route.circuit.is_open) for route in self.routes]

    def quiet(self, how: str = "SIGTSTP") -> None:
        """Fetch no more, send and settle what the window holds, stay up (relay.pause)."""
        if self.stopping.is_set():
            return
        if self.operator.go_quiet(Quiet("signal", how, time.time())):
            try:
                self.operator.publish_quiet()  # so the fetch scripts refuse, and stats show it
            except REDIS_ERRORS:
                pass  # the next housekeeping round marks it

    def _end_burst(self) -> None:
        """Burst: stop once the queue is empty, no retry is due and nothing is held."""
        if self.engine.held == 0 and self.queue.idle():
            self.stop("burst: queue drained, no retry due")

    def shutdown(self) -> int:
        deadline = max(r.app.timeout for r in self.routes) + SHUTDOWN_GRACE_S
        if not self.pool.join(timeout=deadline):
            log.warning("calls still in flight after %.1f s: cutting them off", deadline)
            self.pool.kill(timeout=SHUTDOWN_GRACE_S)
        gevent.killall(self.services, timeout=SHUTDOWN_GRACE_S)
        # A greenlet killed mid-command leaves its connection half-read: start afresh.
        disconnect_all(self.queue.client)
        try:
            returned = self.queue.release()
        except REDIS_ERRORS as exc:
            log.error("could not return the notifications still taken (%s): another worker "
                      "recovers them %.0f s after the last heartbeat", type(exc).__name__,
                      self.config.heartbeat_ttl)
            return 0
        if returned:
            self.metrics.requeued.inc(returned)
        log.info("stopped; %d notification(s) not yet sent returned to the queue", returned)
        return 0

    def _register(self) -> bool:
        """Wait (with backoff, quietly) until Redis answers: start order must not matter."""
        while not self.stopping.is_set():
            try:
                self.queue.probe()  # an ACL user missing a right is refused here, at start
                self.queue.heartbeat(self.config.heartbeat_ttl, self.report())
                self.redis_outage.succeeded()
                return True
            except NoPermissionError:
                raise  # no backoff cures it: the launcher reports it and exits 2
            except REDIS_ERRORS as exc:
                self.stopping.wait(self.redis_outage.failed(exc))
        return False

    @property
    def pool_missing(self) -> int:
        """Pool greenlets missing (0 while the pool is full, and during a stop)."""
        if self.stopping.is_set() or not self.serving:
            return 0
        return max(0, self.config.pool_size - len(self.pool))

    def report(self) -> dict[str, Any]:
        """What the dashboard shows of this process; rides in the heartbeat's info JSON."""
        house = self.housekeeper
        engine = self.engine
        circuits = [self._circuit(route) for route in self.routes]
        opened = [c for c in circuits if c["open"]]
        limits = {r.name: {"per_s": r.app.rate_limit, "burst": r.app.rate_burst}
                  for r in self.routes}
        return {"busy": engine.busy, "inflight": engine.held, "pool": self.config.pool_size,
                "prefetch": engine.window.prefetch,
                "metrics_addr": self.metrics_addr,
                # the first open circuit (or the only app's), and every app's when several
                "circuit": opened[0] if opened else circuits[0],
                "circuits": circuits if len(circuits) > 1 else None,
                "paused_for_s": max(c["paused_for_s"] for c in circuits),
                "rate_limit": limits.get(DEFAULT) or next(iter(limits.values())),
                "rate_limits": limits if len(limits) > 1 else None,
                "delivery": self.operator.state(),  # delivering, paused or quiet (relay.pause)
                "shedding": {"backlog": house.backlog_shedding.state(),
                             "max_age": house.stale_shedding.state()}}

    @staticmethod
    def _circuit(route: Route) -> dict[str, Any]:
        c = route.circuit
        now = c.clock()
        return {"app": route.name, "open": c.is_open, "reason": c.reason,
                "next_probe_in_s": round(max(0.0, c.next_probe_at - now), 1)
                if c.is_open else None,
                "paused_for_s": round(max(0.0, c.paused_until - now), 1)}

    def health(self) -> tuple[list[str], dict[str, Any]]:
        """Problems and facts for /healthz (relay.health adds the event loop's). An open
        circuit makes the worker unhealthy only when every app's is open: one app's outage
        does not stop the others' delivery, and a restart would not cure it."""
        problems: list[str] = []
        try:
            self.queue.client.ping()
            redis_state = "ok"
        except redis.RedisError as exc:
            redis_state = f"unreachable ({type(exc).__name__})"
            problems.append("redis")
        routes = list(self.routes)
        opened = {r.name: r.circuit.reason for r in routes if r.circuit.is_open}
        if opened and len(opened) == len(routes):
            problems.append("circuit")
        missing = self.pool_missing
        if missing:
            problems.append("pool")
        for route in routes:
            skew = route.delivery.clock_skew_s
            if skew is None:
                continue
            # a timestamp-expired 401 since the last success
            where = "" if len(routes) == 1 else f" (app {route.name})"
            problems.append(f"clock skew{where}: server clock offset unknown (no Date header)"
                            if math.isnan(skew) else
                            f"clock skew{where}: server clock off by {skew:+.0f} s")
        # The same counters as /metrics and the summary line: an error inside a 200 is failed.
        calls = Metrics.total(self.metrics.calls)
        if len(routes) == 1:
            circuit: Any = f"open: {opened[routes[0].name]}" if opened else "closed"
        else:
            circuit = {r.name: f"open: {opened[r.name]}" if r.name in opened else "closed"
                       for r in routes}
        return problems, {
            "worker": self.queue.worker_id, "redis": redis_state,
            "circuit": circuit,
            "pool": {"size": self.config.pool_size, "missing": missing,
                     "replaced_lately": len(self.replaced)},
            "pusher_calls": {"total": int(calls), "failed": int(
                calls - Metrics.total(self.metrics.calls, status="2xx"))},
            "inflight": self.engine.held, "stopping": self.stopping.is_set(),
            # paused and quiet are healthy: said here, never a problem
            **self.operator.facts(time.time())}
