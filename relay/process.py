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
from relay.circuit import Circuit
from relay.config import Config
from relay.connect import disconnect_all
from relay.delivery import Delivery
from relay.engine import Engine, Settings
from relay.fate import Policy
from relay.history import Tally
from relay.housekeeping import MAINTENANCE_S, Housekeeper
from relay.metrics import Metrics
from relay.pause import Controls, OperatorGate, Quiet
from relay.queue import RedisQueue
from relay.ratelimit import RateLimiter
from relay.redis_shared import REDIS_ERRORS
from relay.retry import Outage
from relay.settle import Settler

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 1.0
# A pool greenlet that ends is replaced, unless more than MOST_REPLACED ended within the window.
MOST_REPLACED = 10
REPLACE_WINDOW_S = 60.0


class Worker:
    def __init__(self, config: Config, queue: RedisQueue, delivery: Delivery,
                 metrics: Metrics, clock: Callable[[], float] = time.time,
                 burst: bool = False, tally: Tally | None = None) -> None:
        self.config = config
        # The dashboard's figures without a settle step of their own (Pusher calls, latency);
        # they ride on the next settle script (see history.py). cli feeds it Delivery's calls.
        self.tally = tally or Tally()
        self.queue = queue
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
        limiter = None
        if config.rate_limit > 0:
            limiter = RateLimiter(queue.client, queue.keys.ratelimit, config.rate_limit,
                                  config.rate_burst, sleep=gevent.sleep,
                                  lock=gevent.lock.Semaphore(),
                                  on_wait=metrics.rate_waits.inc)
        self.circuit = Circuit()
        self.operator = OperatorGate(queue.worker_id, Controls(queue.client, queue.keys),
                                     metrics, queue.inflight_key, queue.push_cmd,
                                     held=lambda: self.engine.held)
        queue.on_gate_state = self.operator.observe  # what the scripts see of pause and quiet
        self.housekeeper = Housekeeper(config, queue, metrics, self.redis_outage,
                                       circuit_open=lambda: self.circuit.is_open,
                                       inflight=lambda: self.engine.held, report=self.report,
                                       on_reaped=lambda: self.engine.reaped(),
                                       operator=self.operator)
        settler = Settler(queue, metrics, self.redis_outage, self.tally,
                          self.housekeeper.stale_shedding, config.queue, clock)
        settings = Settings(prefetch=config.prefetch, channel_order=config.channel_order,
                            event=config.event, limits=config.limits,
                            policy=Policy(config.max_attempts, config.retry_for,
                                          config.max_age),
                            linger_s=config.linger)
        self.engine = Engine(settings, queue, delivery, settler, metrics, self.redis_outage,
                             self.stopping, limiter=limiter, circuit=self.circuit, clock=clock,
                             on_reaped=self.housekeeper.heartbeat, operator=self.operator)
        self.operator.on_change = self.engine.wake_all
        self.delivery = delivery
        metrics.pool_size.set(config.pool_size)

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a signal asks to stop (or, in burst mode, until drained)."""
        gevent.signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self.stop, "SIGINT")
        gevent.signal_handler(signal.SIGTSTP, self.quiet, "SIGTSTP")
        return self.serve()

    def serve(self) -> int:
        """Serve until `stop` (or, in burst mode, until drained); the exit status."""
        # The effective configuration first: if Redis does not answer, the operator sees
        # what relay was told to use, then the outage line with the address and the reason.
        log.info("worker %s starting%s: %s", self.queue.worker_id,
                 " (burst: exits once drained)" if self.burst else "", self.config.describe())
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
        deadline = self.config.pusher.timeout + SHUTDOWN_GRACE_S
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
        c, now = self.circuit, self.circuit.clock()
        house = self.housekeeper
        engine = self.engine
        return {"busy": engine.busy, "inflight": engine.held, "pool": self.config.pool_size,
                "prefetch": engine.window.prefetch,
                "metrics_addr": self.metrics_addr,
                "circuit": {"open": c.is_open, "reason": c.reason,
                            "next_probe_in_s": round(max(0.0, c.next_probe_at - now), 1)
                            if c.is_open else None},
                "paused_for_s": round(max(0.0, c.paused_until - now), 1),
                "delivery": self.operator.state(),  # delivering, paused or quiet (relay.pause)
                "rate_limit": {"per_s": self.config.rate_limit, "burst": self.config.rate_burst},
                "shedding": {"backlog": house.backlog_shedding.state(),
                             "max_age": house.stale_shedding.state()}}

    def health(self) -> tuple[list[str], dict[str, Any]]:
        """Problems and facts for /healthz (relay.health adds the event loop's)."""
        problems: list[str] = []
        try:
            self.queue.client.ping()
            redis_state = "ok"
        except redis.RedisError as exc:
            redis_state = f"unreachable ({type(exc).__name__})"
            problems.append("redis")
        circuit = self.circuit
        if circuit.is_open:
            problems.append("circuit")
        missing = self.pool_missing
        if missing:
            problems.append("pool")
        skew = self.delivery.clock_skew_s
        if skew is not None:  # a timestamp-expired 401 since the last success
            problems.append("clock skew: server clock offset unknown (no Date header)"
                            if math.isnan(skew) else
                            f"clock skew: server clock off by {skew:+.0f} s")
        # The same counters as /metrics and the summary line: an error inside a 200 is failed.
        calls = Metrics.total(self.metrics.calls)
        return problems, {
            "worker": self.queue.worker_id, "redis": redis_state,
            "circuit": f"open: {circuit.reason}" if circuit.is_open else "closed",
            "pool": {"size": self.config.pool_size, "missing": missing,
                     "replaced_lately": len(self.replaced)},
            "pusher_calls": {"total": int(calls), "failed": int(
                calls - Metrics.total(self.metrics.calls, status="2xx"))},
            "inflight": self.engine.held, "stopping": self.stopping.is_set(),
            # paused and quiet are healthy: said here, never a problem
            **self.operator.facts(time.time())}
