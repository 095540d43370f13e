"""A lease on one greenlet's in-flight list: fetch into it, then settle what was fetched.

1. `fetch` moves items from the queue into this greenlet's own list (see RedisQueue.fetch)
   and returns the exact bytes; every settle step then names those bytes.
2. `ack`, `requeue`, `dead`, `retry`: each removes the item from the list and puts it
   where it goes next, in one script (Sidekiq's UnitOfWork: acknowledge/requeue).
3. A settle step is retried through a Redis outage until it lands: giving up would leave a
   delivered notification in flight, to be sent again. A greenlet killed at shutdown stops
   retrying; what it held is returned by RedisQueue.release or recovered by another worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import gevent

from relay.history import Tally
from relay.queue import RedisQueue
from relay.redis_shared import REDIS_DOWN
from relay.retry import Outage

log = logging.getLogger(__name__)

T = TypeVar("T")


class Lease:
    def __init__(self, queue: RedisQueue, slot: int, outage: Outage,
                 on_redis_error: Callable[[], None],
                 sleep: Callable[[float], Any] = gevent.sleep,
                 tally: Tally | None = None) -> None:
        self.queue = queue
        self.tally = tally or Tally()
        self.slot = slot
        self.outage = outage
        self.on_redis_error = on_redis_error
        self.sleep = sleep
        # Fetch eagerly (a non-blocking batch first, adopting whatever the list already
        # holds)? Yes after a batch or an error; a lone item on a quiet queue takes one
        # blocking pop instead. See RedisQueue.fetch.
        self.eager = True

    def fetch(self, budget: int, block_s: float, backlog: bool, linger: float = 0.0
              ) -> list[bytes]:
        items = self.queue.fetch(self.slot, budget, block_s, self.eager or backlog, linger)
        self.eager = len(items) > 1
        return items

    @staticmethod
    def fetch_round(wants: Sequence[tuple[Lease, int]]) -> list[list[bytes]]:
        """Fetch for a round of leases of one queue at once (relay.turns): one round trip, no
        blocking, the queue's items handed out in this order."""
        batches = wants[0][0].queue.fetch_round([(lease.slot, budget) for lease, budget in wants])
        for (lease, _), items in zip(wants, batches, strict=True):
            lease.eager = len(items) > 1
        return batches

    # Each settle step carries the dashboard's figures gathered since the last one (taken
    # once, so a step retried through an outage carries them once; see history.Tally).

    def ack(self, raws: Sequence[bytes], stat: str = "delivered") -> int:
        extra = self.tally.take()
        return self._persist(lambda: self.queue.ack(self.slot, raws, stat, extra))

    def requeue(self, raws: Sequence[bytes]) -> int:
        extra = self.tally.take()
        return self._persist(lambda: self.queue.requeue(self.slot, raws, extra))

    def dead(self, raw: bytes, entry: dict[str, Any]) -> bool:
        extra = self.tally.take()
        return self._persist(lambda: self.queue.dead_letter(self.slot, raw, entry, extra))

    def retry(self, raw: bytes, wrapper: str, delay_s: float) -> bool:
        extra = self.tally.take()
        return self._persist(lambda: self.queue.retry_later(self.slot, raw, wrapper, delay_s,
                                                            extra))

    def _persist(self, step: Callable[[], T]) -> T:
        while True:
            try:
                result = step()
                self.outage.succeeded()
                return result
            except REDIS_DOWN as exc:
                self.on_redis_error()
                self.sleep(self.outage.failed(exc))
