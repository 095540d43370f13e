"""The worker's housekeeping: given the queue, the metrics and a clock, never the Worker.

1. Heartbeat every RELAY_HEARTBEAT_TTL/4: this process stays registered in `Q:workers`.
2. In one script, every MAINTENANCE_S while there is work (a backlog, or anything in
   flight), every IDLE_MAINTENANCE_S while there is none (or at the next retry's due time,
   if sooner): move due retries back to the queue, trim an over-long backlog
   (RELAY_MAX_BACKLOG), note the backlog, list the workers whose heartbeat expired (every
   TTL/2) and return their in-flight items; then end quiet shedding episodes and publish
   the circuit gauge. The same script tells the operator's gate (relay.pause) whether
   delivery is paused; while it is, rounds come every PAUSED_ROUND_S, so a resume is seen.
3. Every SUMMARY_S: one progress line while there is work (`Summary`).
A Redis error in any of these is counted and shared with the worker's outage tracker; the
next round tries again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from relay.config import Config
from relay.metrics import Metrics
from relay.pause import OperatorGate
from relay.queue import RedisQueue
from relay.redis_shared import REDIS_ERRORS
from relay.retry import Outage

log = logging.getLogger(__name__)

MAINTENANCE_S = 0.5  # while there is a backlog
# Idle, one script a second is all the housekeeping costs Redis (issue 11: at most 3 round
# trips a second for an idle worker); a retry due sooner is promoted on time all the same.
IDLE_MAINTENANCE_S = 1.0
MIN_WAIT_S = 0.02
SUMMARY_S = 10.0
LOW_COUNT = 10  # below this many in an interval, the summary says the count, not a rate


class Episode:
    """A shedding episode, logged once when it starts and once when it has been quiet."""

    QUIET_S = 10.0

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.clock = clock
        self.total = 0
        self.last_at: float | None = None

    def dropped(self, n: int) -> None:
        if self.last_at is None:
            log.warning("%s (counted in relay_notifications_shed_total)", self.what)
            self.total = 0
        self.total += n
        self.last_at = self.clock()

    def maybe_end(self) -> None:
        if self.last_at is not None and self.clock() - self.last_at > self.QUIET_S:
            log.info("shedding over: %d dropped (%s)", self.total, self.what)
            self.last_at = None

    def state(self) -> dict[str, Any]:
        return {"active": self.last_at is not None, "dropped": self.total}


class Housekeeper:
    def __init__(self, config: Config, queue: RedisQueue, metrics: Metrics, outage: Outage,
                 circuits: Callable[[], list[tuple[str, bool]]], inflight: Callable[[], int],
                 report: Callable[[], dict[str, Any]] = dict,
                 clock: Callable[[], float] = time.monotonic,
                 on_reaped: Callable[[], None] = lambda: None,
                 operator: OperatorGate | None = None) -> None:
        self.report = report  # the process's state for the dashboard, in each heartbeat
        self.on_reaped = on_reaped  # what the worker held went back: forget it
        self.operator = operator or OperatorGate()  # learns from each round (relay.queue)
        self.config = config
        self.queue = queue
        self.metrics = metrics
        self.outage = outage
        self.circuits = circuits  # (app, open) for each app's circuit
        self.inflight = inflight
        self.clock = clock
        self.backlog = 0  # queue length as of the last round
        self.parked = 0  # what waits in this process's channels' lane lists, as of then
        self.backlog_shedding = Episode(
            f"backlog over RELAY_MAX_BACKLOG={config.max_backlog}: dropping the oldest")
        self.stale_shedding = Episode(
            f"dropping envelopes older than RELAY_MAX_AGE={config.max_age:g} s as stale")
        self._next_reap = 0.0

    def start(self, stopping: gevent.event.Event) -> list[gevent.Greenlet]:
        summary = Summary(self.metrics, self.queue, self.inflight, lambda: self.parked)
        return [
            gevent.spawn(self.every, stopping, self.config.heartbeat_ttl / 4, self.heartbeat),
            gevent.spawn(self.paced, stopping, self.maintain),
            gevent.spawn(self.every, stopping, SUMMARY_S, summary.tick),
        ]

    def every(self, stopping: gevent.event.Event, interval_s: float,
              action: Callable[[], Any]) -> None:
        while not stopping.wait(interval_s):
            try:
                action()
            except REDIS_ERRORS as exc:
                self.metrics.redis_errors.inc()
                self.outage.failed(exc)
            except Exception:
                log.exception("housekeeping step %s failed", getattr(action, "__name__", action))

    def paced(self, stopping: gevent.event.Event, action: Callable[[], float]) -> None:
        """Like `every`, but `action` says how long to wait before its next round."""
        interval_s = MAINTENANCE_S
        while not stopping.wait(interval_s):
            interval_s = IDLE_MAINTENANCE_S
            try:
                interval_s = action()
            except REDIS_ERRORS as exc:
                self.metrics.redis_errors.inc()
                self.outage.failed(exc)
            except Exception:
                log.exception("housekeeping step %s failed", getattr(action, "__name__", action))

    def heartbeat(self) -> None:
        if not self.queue.heartbeat(self.config.heartbeat_ttl, self.report()):
            # Frozen past the TTL (a paused VM, a stopped process): others recovered what it
            # held, so what it still sends may be sent twice, never lost.
            log.warning("this worker had been declared dead (missed heartbeats); "
                        "registered again")
            self.on_reaped()

    def maintain(self) -> float:
        """One round (one script while nothing needs recovering); the wait until the next:
        MAINTENANCE_S while there is a backlog, until the next retry is due if that is
        sooner than IDLE_MAINTENANCE_S, else IDLE_MAINTENANCE_S."""
        now = self.clock()
        reap = now >= self._next_reap
        if reap:
            self._next_reap = now + self.config.heartbeat_ttl / 2
        round_ = self.queue.maintain(self.config.max_backlog, reap)
        self.backlog = round_.length
        self.parked = round_.parked
        self.metrics.parked.set(round_.parked)
        for wid, n in round_.recovered.items():
            self.metrics.recovered.inc(n)
            # At-least-once: the dead worker may have had Pusher accept some of them just
            # before it died, without the ack reaching Redis; the operator must know.
            log.warning("worker %s missed its heartbeat: %d in-flight notification(s) "
                        "recovered, to be sent again in their channels' order; some may "
                        "already have been delivered", wid, n)
        if round_.dropped:
            self.metrics.shed.labels("backlog").inc(round_.dropped)
            self.backlog_shedding.dropped(round_.dropped)
        for episode in (self.backlog_shedding, self.stale_shedding):
            episode.maybe_end()
        for app, is_open in self.circuits():
            self.metrics.circuit_open.labels(app).set(1 if is_open else 0)
        return self.operator.after_round(
            next_round_s(round_.length + self.inflight(), round_.next_due_s))


def next_round_s(work: int, next_due_s: float | None) -> float:
    """How long housekeeping waits: short while there is work (a backlog or notifications in
    flight: at moderate rates a backlog is then seen as soon as before), long while there is
    none, and never past the next retry's due time (by more than MIN_WAIT_S)."""
    wait = MAINTENANCE_S if work else IDLE_MAINTENANCE_S
    if next_due_s is not None:
        wait = min(wait, max(next_due_s, MIN_WAIT_S))
    return wait


def per_interval(count: int, elapsed: float) -> str:
    """A rate that means something at low traffic: "2 in 10 s" below LOW_COUNT (where a
    per-second figure rounds to 0), "1,234/s" above it. Never negative: callers say the
    direction in words."""
    count = abs(count)
    if count < LOW_COUNT:
        return f"{count:,} in {elapsed:.0f} s"
    return f"{count / elapsed:,.0f}/s"


class Summary:
    """The periodic progress line: counts since the last line, backlog, rate and ETA."""

    def __init__(self, metrics: Metrics, queue: Any, inflight: Callable[[], int],
                 parked: Callable[[], int] = lambda: 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.parked = parked  # taken from the queue, waiting for this process: backlog too
        self.queue = queue  # anything with lengths()
        self.inflight = inflight
        self.clock = clock
        self.last = self._counts()
        self.last_at = clock()
        self.last_backlog: int | None = None

    def _counts(self) -> dict[str, int]:
        m = self.metrics
        return {k: round(v) for k, v in {
            "delivered": Metrics.total(m.delivered), "dead": Metrics.total(m.dead),
            "retried": Metrics.total(m.retried), "shed": Metrics.total(m.shed),
            "failed_calls": Metrics.total(m.calls) - Metrics.total(m.calls, status="2xx"),
            "errors": Metrics.total(m.redis_errors)}.items()}

    def tick(self) -> None:
        m = self.metrics
        lengths = self.queue.lengths()
        m.queue_length.set(lengths["queue"])
        m.dead_length.set(lengths["dead"])
        m.retry_length.set(lengths["retry"])
        now, counts = self.clock(), self._counts()
        delta = {k: counts[k] - self.last[k] for k in counts}
        elapsed = max(now - self.last_at, 1e-6)
        backlog = lengths["queue"] + self.parked()
        if any(delta.values()) or backlog or self.inflight():
            log.info("delivered %d (%s), dead-lettered %d, retried %d, shed %d, "
                     "failed Pusher calls %d, redis errors %d; %s", delta["delivered"],
                     per_interval(delta["delivered"], elapsed), delta["dead"], delta["retried"],
                     delta["shed"], delta["failed_calls"], delta["errors"],
                     self._progress(backlog, elapsed))
        self.last, self.last_at, self.last_backlog = counts, now, backlog

    def _progress(self, backlog: int, elapsed: float) -> str:
        if self.last_backlog is None or backlog == 0:
            return f"backlog {backlog:,}"
        change = self.last_backlog - backlog  # > 0: draining
        if change == 0:
            return f"backlog {backlog:,}, unchanged"
        if change < 0:
            return f"backlog {backlog:,}, growing {per_interval(change, elapsed)}"
        text = f"backlog {backlog:,}, draining {per_interval(change, elapsed)}"
        return f"{text}, ETA {backlog * elapsed / change:,.0f} s"
