"""Settling one call: every notification's fate persisted in one script, then counted.

1. `Settler.settle(fates)` turns the fates relay.fate decided for one call into the ops of
   one SETTLE script (relay.queue): acks, shedding, put-backs, retries and dead letters
   together, one round trip.
2. The script is retried through a Redis outage until it lands: giving up would leave a
   delivered notification in flight, to be sent again. A greenlet killed at shutdown stops
   retrying; what it held is returned by RedisQueue.release or recovered by another worker.
3. Each step is counted in the metrics once it landed (a replayed step counts nothing); a
   dead letter carries what the producer pushed, the reason and the attempts, and is logged
   once (with the notification's id when it has one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import gevent

from relay.apps import DEFAULT, UnknownApp
from relay.fate import Ack, DeadLetter, Fate, Later, RetryLater, Shed
from relay.history import Tally
from relay.housekeeping import Episode
from relay.message import InvalidMessage, Notification, payload_of, retry_wrapper
from relay.metrics import Metrics
from relay.queue import Op, RedisQueue, Settled
from relay.redis_shared import REDIS_DOWN
from relay.retry import Outage

log = logging.getLogger(__name__)

Item = Notification | InvalidMessage
Fated = tuple[bytes, Item, Fate, tuple[str, ...]]  # raw, parsed, fate, lane keys


def named_app(item: Item, app: str) -> str:
    """The app a dead letter names: the one the notification named, even one RELAY_APPS does
    not have (an unknown app, or one a reload removed), else the call's. The metrics keep the
    call's app: a label must not take whatever name a producer writes."""
    if isinstance(item, UnknownApp) and item.app is not None:
        return item.app
    if isinstance(item, Notification) and item.app is not None:
        return item.app
    return app


class Settler:
    def __init__(self, queue: RedisQueue, metrics: Metrics, outage: Outage, tally: Tally,
                 stale_shedding: Episode, queue_name: str,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Any] = gevent.sleep,
                 apps_apart: Callable[[], bool] = lambda: False) -> None:
        self.queue = queue
        # Several apps: Redis keeps each one's totals and history beside the whole queue's.
        self.apps_apart = apps_apart
        self.metrics = metrics
        self.outage = outage
        self.tally = tally
        self.stale_shedding = stale_shedding
        self.queue_name = queue_name
        self.clock = clock
        self.sleep = sleep

    def settle(self, fates: Sequence[Fated], app: str = DEFAULT) -> Settled:
        """Persist every fate of one call (retried through outages); `app`: the Pusher app
        the call went to (a call never mixes apps), counted per app beside the totals."""
        now = self.clock()
        ops = [self._op(raw, item, fate, keys, now, app) for raw, item, fate, keys in fates]
        # Counted before the script, so the ages ride on this very settle (history.Tally).
        delivered = [i for _, i, f, _ in fates
                     if isinstance(f, Ack) and isinstance(i, Notification)]
        self._ages(delivered, now)
        extra = self.tally.take()
        settled = self._persist(ops, extra, app if self.apps_apart() else "")
        self._count(fates, settled.landed, app)
        return settled

    def _op(self, raw: bytes, item: Item, fate: Fate, keys: tuple[str, ...], now: float,
            app: str) -> Op:
        if isinstance(fate, Ack):
            return Op.ack(raw, keys)
        if isinstance(fate, Shed):
            return Op.shed(raw, keys)
        if isinstance(fate, RetryLater) and isinstance(item, Notification):
            wrapper = retry_wrapper(item.payload, fate.attempts, fate.first_failed_at,
                                    fate.reason, first_traceparent=fate.first_traceparent)
            return Op.retry(raw, wrapper, fate.delay_s, keys)
        if isinstance(fate, Later) and isinstance(item, Notification):
            wrapper = retry_wrapper(item.payload, item.attempts, item.first_failed_at,
                                    fate.reason, first_traceparent=item.first_traceparent)
            return Op.later(raw, wrapper, fate.delay_s, keys)
        if isinstance(fate, DeadLetter):
            entry = {"payload": payload_of(raw), "error": fate.reason,
                     "error_class": fate.error_class, "failed_at": now,
                     "attempts": fate.attempts, "queue": self.queue_name,
                     "worker": self.queue.worker_id, "app": named_app(item, app)}
            return Op.dead(raw, entry, keys)
        # PutBack, and anything unexpected: back to the queue untouched. Fail safe: it is
        # worse to lose a notification than to send it twice.
        return Op.put_back(raw, keys)

    def _persist(self, ops: list[Op], extra: str, app: str) -> Settled:
        while True:
            try:
                result = self.queue.settle(ops, extra, app)
                self.outage.succeeded()
                return result
            except REDIS_DOWN as exc:
                self.metrics.redis_errors.inc()
                self.sleep(self.outage.failed(exc))

    def _ages(self, delivered: Sequence[Notification], now: float) -> None:
        for note in delivered:
            if note.enqueued_at is not None:
                self.metrics.age_seconds.observe(max(0.0, now - note.enqueued_at))
                self.tally.age(now - note.enqueued_at)

    def _count(self, fates: Sequence[Fated], landed: Sequence[bool], app: str) -> None:
        m = self.metrics
        delivered = shed = back = 0
        for (raw, item, fate, _), hit in zip(fates, landed, strict=True):
            if not hit:
                continue
            if isinstance(fate, Ack):
                delivered += 1
            elif isinstance(fate, Shed):
                shed += 1
            elif isinstance(fate, RetryLater) and isinstance(item, Notification):
                m.retried.labels(app).inc()
                log.debug("retry %d of a notification for app %s in %.1f s: %s",
                          fate.attempts, app, fate.delay_s, fate.reason)
            elif isinstance(fate, DeadLetter):
                self._dead_logged(raw, item, fate, app)
            else:
                back += 1
        if delivered:
            m.delivered.labels(app).inc(delivered)
        if shed:
            m.shed.labels("max_age").inc(shed)
            self.stale_shedding.dropped(shed)
        if back:
            m.requeued.inc(back)

    def _dead_logged(self, raw: bytes, item: Item, fate: DeadLetter, app: str) -> None:
        self.metrics.dead.labels(fate.error_class, app).inc()
        fields: dict[str, Any] = {"error_class": fate.error_class, "attempts": fate.attempts,
                                  "app": named_app(item, app)}
        if isinstance(item, Notification) and item.id is not None:
            fields["notification_id"] = item.id
        log.warning("dead-lettered (%s): %s; payload starts %r", fate.error_class, fate.reason,
                    payload_of(raw)[:120], extra=fields)


