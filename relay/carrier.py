"""Carrying out the fates relay.fate decided for one batch, on a greenlet's Lease.

1. Acks, shedding and put-backs go in one script each; retries and dead letters one by one.
2. Each step is counted in the metrics once it landed (a replayed step counts nothing).
3. A dead letter carries what the producer pushed, the reason and the attempts, and is
   logged once (with the notification's id when it has one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from relay.config import Config
from relay.fate import Ack, DeadLetter, Fate, PutBack, RetryLater, Shed
from relay.history import Tally
from relay.housekeeping import Episode
from relay.lease import Lease
from relay.message import InvalidMessage, Notification, payload_of, retry_wrapper
from relay.metrics import Metrics

log = logging.getLogger(__name__)

Item = Notification | InvalidMessage


class Carrier:
    def __init__(self, config: Config, worker_id: str, metrics: Metrics,
                 stale_shedding: Episode, clock: Callable[[], float] = time.time,
                 tally: Tally | None = None) -> None:
        self.tally = tally or Tally()
        self.queue_name = config.queue
        self.worker_id = worker_id
        self.metrics = metrics
        self.stale_shedding = stale_shedding
        self.clock = clock

    def carry_out(self, lease: Lease, fates: Sequence[tuple[bytes, Item, Fate]]) -> None:
        """Acks, shedding and put-backs go in one script each; the rest one by one."""
        acked = [(raw, item) for raw, item, f in fates if isinstance(f, Ack)]
        if acked:
            # Counted first, so the ages ride on this very ack (history.Tally).
            self._count_delivered([i for _, i in acked if isinstance(i, Notification)])
            lease.ack([raw for raw, _ in acked])
        shed = [raw for raw, _, f in fates if isinstance(f, Shed)]
        if shed:
            lease.ack(shed, "shed_max_age")
            self.metrics.shed.labels("max_age").inc(len(shed))
            self.stale_shedding.dropped(len(shed))
        back = [raw for raw, _, f in fates if isinstance(f, PutBack)]
        if back:
            self.metrics.requeued.inc(lease.requeue(back))
        for raw, item, fate in fates:
            if isinstance(fate, RetryLater) and isinstance(item, Notification):
                self._retry(lease, item, fate)
            elif isinstance(fate, DeadLetter):
                self._dead(lease, raw, item, fate)

    def _count_delivered(self, delivered: Sequence[Notification]) -> None:
        self.metrics.delivered.inc(len(delivered))
        now = self.clock()
        for note in delivered:
            if note.enqueued_at is not None:
                self.metrics.age_seconds.observe(max(0.0, now - note.enqueued_at))
                self.tally.age(now - note.enqueued_at)

    def _retry(self, lease: Lease, note: Notification, fate: RetryLater) -> None:
        wrapper = retry_wrapper(note.payload, fate.attempts, fate.first_failed_at, fate.reason)
        if lease.retry(note.raw, wrapper, fate.delay_s):
            self.metrics.retried.inc()
            log.debug("retry %d of a notification in %.1f s: %s", fate.attempts, fate.delay_s,
                      fate.reason)

    def _dead(self, lease: Lease, raw: bytes, item: Item, fate: DeadLetter) -> None:
        payload = payload_of(raw)
        entry = {"payload": payload, "error": fate.reason, "error_class": fate.error_class,
                 "failed_at": self.clock(), "attempts": fate.attempts,
                 "queue": self.queue_name, "worker": self.worker_id}
        if lease.dead(raw, entry):
            self.metrics.dead.labels(fate.error_class).inc()
            fields: dict[str, Any] = {"error_class": fate.error_class,
                                      "attempts": fate.attempts}
            if isinstance(item, Notification) and item.id is not None:
                fields["notification_id"] = item.id
            log.warning("dead-lettered (%s): %s; payload starts %r", fate.error_class,
                        fate.reason, payload[:120], extra=fields)

