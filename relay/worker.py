"""The worker process: a pool of greenlets, its housekeeping, and its shutdown.

1. Each of RELAY_POOL_SIZE greenlets owns one in-flight slot and loops: wait for the gate
   (circuit, 429 pause, rate limit) -> fetch up to a batch -> parse -> send -> settle each
   notification (ack, dead-letter, retry later, or put back).
2. Housekeeping greenlets keep the heartbeat, move due retries back, recover the in-flight
   items of dead workers, trim an over-long backlog, and log a summary while there is work.
3. SIGTERM/SIGINT only set a flag. Then: stop fetching -> wait up to PUSHER_TIMEOUT + 1 s for
   in-flight calls -> kill what is left -> return every in-flight item to the queue -> exit 0.
   It is worse to lose a notification than to send it twice.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import redis

from relay.circuit import Circuit
from relay.config import Config
from relay.delivery import MAX_BATCH, Delivery, Failure, Kind
from relay.history import Tally
from relay.message import InvalidMessage, Notification, parse, payload_of, retry_wrapper
from relay.metrics import Metrics
from relay.queue import RedisQueue, WorkerReaped
from relay.ratelimit import RateLimiter
from relay.retry import Outage, compute_backoff, should_give_up

log = logging.getLogger(__name__)

# The blocking pop wakes up this often so a greenlet notices a stop request; it must stay
# under the Redis socket timeout (see cli.redis_client) or every idle pop would time out.
BLOCK_S = 1.0
MAINTENANCE_S = 0.5
SUMMARY_S = 10.0
SHUTDOWN_GRACE_S = 1.0
# Redis away (restarting, unreachable, loading its data): back off and try again.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


class Worker:
    def __init__(self, config: Config, queue: RedisQueue, delivery: Delivery,
                 metrics: Metrics, clock: Callable[[], float] = time.time,
                 tally: Tally | None = None) -> None:
        self.config = config
        # The dashboard's figures without a settle step of their own (Pusher calls, latency);
        # they ride on the next settle script (see history.py). cli feeds it Delivery's calls.
        self.tally = tally or Tally()
        self.queue = queue
        self.delivery = delivery
        self.metrics = metrics
        self.clock = clock
        self.circuit = Circuit()
        self.redis_outage = Outage("Redis")
        self.stopping = gevent.event.Event()
        self.pool = gevent.pool.Pool(config.pool_size)
        self.services: list[gevent.Greenlet] = []
        self.batch = MAX_BATCH
        self.limiter: RateLimiter | None = None
        if config.rate_limit > 0:
            self.limiter = RateLimiter(queue.client, queue.keys.ratelimit, config.rate_limit,
                                       config.rate_burst, sleep=gevent.sleep,
                                       lock=gevent.lock.Semaphore(),
                                       on_wait=metrics.rate_waits.inc)
            self.batch = min(MAX_BATCH, self.limiter.burst)
        self.inflight = 0
        self.busy = 0  # greenlets handling a batch now
        self.backlog_shedding = Episode(
            f"backlog over RELAY_MAX_BACKLOG={config.max_backlog}: dropping the oldest")
        self.stale_shedding = Episode(
            f"dropping envelopes older than RELAY_MAX_AGE={config.max_age:g} s as stale")
        self._next_reap = 0.0
        # Per slot: fetch eagerly (a non-blocking batch first, adopting whatever the slot list
        # already holds)? Yes after a batch, an error, or while there is a backlog; a lone
        # item on a quiet queue takes one blocking pop instead. See RedisQueue.fetch.
        self._eager = [True] * config.pool_size
        self.backlog = 0  # queue length as of the last housekeeping round
        metrics.pool_size.set(config.pool_size)

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until asked to stop; returns the exit status."""
        gevent.signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self.stop, "SIGINT")
        if not self._register():
            return 0
        log.info("worker %s started: %s", self.queue.worker_id, self.config.describe())
        for slot in range(self.config.pool_size):
            self.pool.spawn(self._slot_loop, slot)
        self.services = [
            gevent.spawn(self._every, self.config.heartbeat_ttl / 4, self._heartbeat),
            gevent.spawn(self._every, MAINTENANCE_S, self._maintain),
            gevent.spawn(self._every, SUMMARY_S, Summary(self).tick),
        ]
        self.stopping.wait()
        return self.shutdown()

    def stop(self, why: str = "stop requested") -> None:
        if not self.stopping.is_set():
            log.info("%s: finishing in-flight work, then exiting", why)
            self.stopping.set()

    def shutdown(self) -> int:
        deadline = self.config.pusher.timeout + SHUTDOWN_GRACE_S
        if not self.pool.join(timeout=deadline):
            log.warning("in-flight calls still running after %.1f s: cutting them off", deadline)
            self.pool.kill(timeout=SHUTDOWN_GRACE_S)
        gevent.killall(self.services, timeout=SHUTDOWN_GRACE_S)
        # A greenlet killed mid-command leaves its connection half-read: start afresh.
        self.queue.client.connection_pool.disconnect()
        try:
            returned = self.queue.release(self.config.pool_size)
        except redis.RedisError as exc:
            log.error("could not return in-flight items (%s): another worker recovers them "
                      "%.0f s after the last heartbeat", type(exc).__name__,
                      self.config.heartbeat_ttl)
            return 0
        if returned:
            self.metrics.requeued.inc(returned)
        log.info("stopped; %d in-flight notification(s) returned to the queue", returned)
        return 0

    def _register(self) -> bool:
        """Wait (with backoff, quietly) until Redis answers: start order must not matter."""
        while not self.stopping.is_set():
            try:
                self.queue.heartbeat(self.config.heartbeat_ttl, self.config.pool_size,
                                     self.report())
                self.redis_outage.succeeded()
                return True
            except redis.RedisError as exc:
                self.stopping.wait(self.redis_outage.failed(exc))
        return False

    # -- the greenlets ------------------------------------------------------------------------

    def _slot_loop(self, slot: int) -> None:
        while not self.stopping.is_set():
            try:
                self._step(slot)
            except REDIS_DOWN as exc:
                self.metrics.redis_errors.inc()
                self._eager[slot] = True  # a lost reply may have left items in the slot
                self.stopping.wait(self.redis_outage.failed(exc))
            except WorkerReaped:
                self._heartbeat()
            except Exception:
                log.exception("unexpected error in slot %d; going on after a pause", slot)
                self._eager[slot] = True  # what the slot held is picked up again
                self.stopping.wait(1.0)

    def _step(self, slot: int) -> None:
        wait = self.circuit.wait_s()
        if wait > 0:
            self.stopping.wait(min(wait, BLOCK_S))
            return
        probing = self.circuit.is_open
        budget = self._budget()
        eager = self._eager[slot] or self.backlog > 0
        items = self.queue.fetch(slot, budget, BLOCK_S, eager) if budget else []
        self.redis_outage.succeeded()
        self._eager[slot] = len(items) > 1
        if not items or (not probing and self.circuit.holding()):
            # Nothing came, or the gate closed while this greenlet was blocked in its pop:
            # hand back the items and the budget.
            if items:
                self.metrics.requeued.inc(self._persist(self.queue.requeue, slot, items))
            if probing:
                self.circuit.abandon_probe()
            self._reconcile(budget, 0)
            return
        self.inflight += len(items)
        self.busy += 1
        self.metrics.inflight.inc(len(items))
        try:
            self._handle(slot, items, budget)
        finally:
            self.inflight -= len(items)
            self.busy -= 1
            self.metrics.inflight.dec(len(items))
            if probing and self.circuit.probing:
                # The probe ended without a verdict (all invalid or stale, a 429, an error).
                self.circuit.abandon_probe()

    def _budget(self) -> int:
        """How many to fetch: a batch, or what the shared rate limit grants (waits for it)."""
        if self.limiter is None:
            return self.batch
        return self.limiter.take(self.batch, self.stopping.is_set)

    def _reconcile(self, budget: int, cost: int) -> None:
        """Settle the rate budget with what is really sent: one event per channel."""
        if self.limiter is None or cost == budget:
            return
        if cost < budget:
            self.limiter.refund(budget - cost)
        else:
            self.limiter.take_all(cost - budget, self.stopping.is_set)

    def _every(self, interval_s: float, action: Callable[[], Any]) -> None:
        while not self.stopping.wait(interval_s):
            try:
                action()
            except redis.RedisError as exc:
                self.metrics.redis_errors.inc()
                self.redis_outage.failed(exc)
            except Exception:
                log.exception("housekeeping step %s failed", getattr(action, "__name__", action))

    # -- one batch ---------------------------------------------------------------------------

    def _handle(self, slot: int, items: Sequence[bytes], budget: int) -> None:
        notes: list[Notification] = []
        stale: list[bytes] = []
        now = self.clock()
        for raw in items:
            try:
                note = parse(raw, self.config.event)
            except InvalidMessage as exc:
                self._dead(slot, raw, str(exc), "invalid", 0)
                continue
            if self._is_stale(note, now):
                stale.append(raw)
            else:
                notes.append(note)
        if stale:
            self._persist(self.queue.ack, slot, stale, "shed_max_age", self.tally.take())
            self.metrics.shed.labels("max_age").inc(len(stale))
            self.stale_shedding.dropped(len(stale))
        self._reconcile(budget, sum(n.cost for n in notes))
        if notes:
            self._settle(slot, notes, self.delivery.send(notes))

    def _is_stale(self, note: Notification, now: float) -> bool:
        max_age = self.config.max_age
        return bool(max_age) and note.enqueued_at is not None and now - note.enqueued_at > max_age

    def _settle(self, slot: int, notes: Sequence[Notification],
                results: Sequence[Failure | None]) -> None:
        delivered = [n for n, r in zip(notes, results, strict=True) if r is None]
        if delivered:
            self._count_delivered(delivered)
            self._persist(self.queue.ack, slot, [n.raw for n in delivered], "delivered",
                          self.tally.take())
        self._tell_circuit(bool(delivered), results)
        # With the circuit open the failure is Pusher's, not the notification's: no attempt
        # is counted, so a long outage dead-letters nothing.
        systemic = self.circuit.is_open
        putback: list[bytes] = []
        for note, failure in zip(notes, results, strict=True):
            if failure is None:
                continue
            if failure.kind is Kind.PERMANENT:
                self._dead(slot, note.raw, failure.reason, "rejected", note.attempts + 1,
                           note.id)
            elif failure.kind is Kind.TRANSIENT and not systemic:
                self._retry(slot, note, failure)
            else:
                putback.append(note.raw)
        if putback:
            self.metrics.requeued.inc(self._persist(self.queue.requeue, slot, putback,
                                                    self.tally.take()))

    def _tell_circuit(self, any_delivered: bool, results: Sequence[Failure | None]) -> None:
        failures = {f.kind: f for f in results if f is not None}
        if Kind.RATE_LIMITED in failures:
            self.circuit.pause(failures[Kind.RATE_LIMITED].retry_after_s or 1.0)
        if Kind.SYSTEMIC in failures:
            self.circuit.systemic(failures[Kind.SYSTEMIC].reason)
        elif any_delivered:
            self.circuit.succeeded()
        elif Kind.TRANSIENT in failures:
            self.circuit.transient(failures[Kind.TRANSIENT].reason)

    def _count_delivered(self, delivered: Sequence[Notification]) -> None:
        self.metrics.delivered.inc(len(delivered))
        now = self.clock()
        for note in delivered:
            if note.enqueued_at is not None:
                self.metrics.age_seconds.observe(max(0.0, now - note.enqueued_at))
                self.tally.age(now - note.enqueued_at)

    def _retry(self, slot: int, note: Notification, failure: Failure) -> None:
        attempts = note.attempts + 1
        now = self.clock()
        first = note.first_failed_at or now
        if should_give_up(attempts, first, now, self.config.max_attempts, self.config.retry_for):
            self._dead(slot, note.raw, f"gave up after {attempts} attempts: {failure.reason}",
                       "exhausted", attempts, note.id)
            return
        wrapper = retry_wrapper(note.payload, attempts, first, failure.reason)
        delay = compute_backoff(attempts)
        if self._persist(self.queue.retry_later, slot, note.raw, wrapper, delay,
                         self.tally.take()):
            self.metrics.retried.inc()
            log.debug("retry %d of a notification in %.1f s: %s", attempts, delay, failure.reason)

    def _dead(self, slot: int, raw: bytes, reason: str, error_class: str, attempts: int,
              ident: str | None = None) -> None:
        payload = payload_of(raw)
        entry = {"payload": payload, "error": reason, "error_class": error_class,
                 "failed_at": self.clock(), "attempts": attempts, "queue": self.config.queue,
                 "worker": self.queue.worker_id}
        if self._persist(self.queue.dead_letter, slot, raw, entry, self.tally.take()):
            self.metrics.dead.labels(error_class).inc()
            fields = {"error_class": error_class, "attempts": attempts}
            if ident is not None:
                fields["notification_id"] = ident
            log.warning("dead-lettered (%s): %s; payload starts %r", error_class, reason,
                        payload[:120], extra=fields)

    def _persist(self, step: Callable[..., Any], *args: Any) -> Any:
        """Run one settle step, retrying through a Redis outage until it lands.

        Giving up would leave a delivered notification in flight, to be sent again.
        """
        while True:
            try:
                result = step(*args)
                self.redis_outage.succeeded()
                return result
            except REDIS_DOWN as exc:
                self.metrics.redis_errors.inc()
                gevent.sleep(self.redis_outage.failed(exc))

    # -- housekeeping ------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """What the dashboard shows of this process; rides in the heartbeat's info JSON."""
        c, now = self.circuit, self.circuit.clock()
        return {"busy": self.busy, "inflight": self.inflight,
                "circuit": {"open": c.is_open, "reason": c.reason,
                            "next_probe_in_s": round(max(0.0, c.next_probe_at - now), 1)
                            if c.is_open else None},
                "paused_for_s": round(max(0.0, c.paused_until - now), 1),
                "rate_limit": {"per_s": self.config.rate_limit, "burst": self.config.rate_burst},
                "shedding": {"backlog": self.backlog_shedding.state(),
                             "max_age": self.stale_shedding.state()}}

    def _heartbeat(self) -> None:
        if not self.queue.heartbeat(self.config.heartbeat_ttl, self.config.pool_size,
                                    self.report()):
            # Frozen past the TTL (a paused VM, a stopped process): others recovered what it
            # held, so what it still sends may be sent twice, never lost.
            log.warning("this worker had been declared dead (missed heartbeats); "
                        "registered again")

    def _maintain(self) -> None:
        self.queue.promote_due()
        self.backlog = self.queue.length()
        now = time.monotonic()
        if now >= self._next_reap:
            self._next_reap = now + self.config.heartbeat_ttl / 2
            for wid, n in self.queue.reap_expired().items():
                self.metrics.recovered.inc(n)
                log.warning("worker %s missed its heartbeat: %d in-flight notification(s) "
                            "returned to the queue", wid, n)
        if self.config.max_backlog:
            self._trim()
        for episode in (self.backlog_shedding, self.stale_shedding):
            episode.maybe_end()
        self.metrics.circuit_open.set(1 if self.circuit.is_open else 0)

    def _trim(self) -> None:
        dropped = self.queue.trim(self.config.max_backlog)
        if dropped:
            self.metrics.shed.labels("backlog").inc(dropped)
            self.backlog_shedding.dropped(dropped)


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

    def state(self) -> dict[str, Any]:
        return {"active": self.last_at is not None, "dropped": self.total}

    def maybe_end(self) -> None:
        if self.last_at is not None and self.clock() - self.last_at > self.QUIET_S:
            log.info("shedding over: %d dropped (%s)", self.total, self.what)
            self.last_at = None


class Summary:
    """The periodic progress line: counts since the last line, backlog, rate and ETA."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.last = self._counts()
        self.last_at = time.monotonic()
        self.last_backlog: int | None = None

    def _counts(self) -> dict[str, float]:
        m = self.worker.metrics
        return {"delivered": Metrics.total(m.delivered), "dead": Metrics.total(m.dead),
                "retried": Metrics.total(m.retried), "shed": Metrics.total(m.shed),
                "failed_calls": Metrics.total(m.calls) - Metrics.total(m.calls, status="2xx"),
                "errors": Metrics.total(m.redis_errors)}

    def tick(self) -> None:
        m = self.worker.metrics
        lengths = self.worker.queue.lengths()
        m.queue_length.set(lengths["queue"])
        m.dead_length.set(lengths["dead"])
        m.retry_length.set(lengths["retry"])
        now, counts = time.monotonic(), self._counts()
        delta = {k: counts[k] - self.last[k] for k in counts}
        elapsed = max(now - self.last_at, 1e-6)
        backlog = lengths["queue"]
        if any(delta.values()) or backlog or self.worker.inflight:
            log.info("delivered %d (%.0f/s), dead-lettered %d, retried %d, shed %d, "
                     "failed Pusher calls %d, redis errors %d; %s", delta["delivered"],
                     delta["delivered"] / elapsed, delta["dead"], delta["retried"],
                     delta["shed"], delta["failed_calls"], delta["errors"],
                     self._progress(backlog, elapsed))
        self.last, self.last_at, self.last_backlog = counts, now, backlog

    def _progress(self, backlog: int, elapsed: float) -> str:
        if self.last_backlog is None or backlog == 0:
            return f"backlog {backlog:,}"
        change = (self.last_backlog - backlog) / elapsed
        if change > 0:
            return f"backlog {backlog:,}, draining {change:,.0f}/s, ETA {backlog / change:,.0f} s"
        return f"backlog {backlog:,}, growing {-change:,.0f}/s"
