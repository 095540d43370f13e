"""The process's window on Redis: what it has taken from the queue and not yet settled.

1. Taken items sit in the process's one in-flight list (relay.queue) until a settle script
   removes them, so a kill -9 loses nothing: another worker returns the list to the queue
   once the heartbeat expires. Duplicates after a crash are bounded by the window's size,
   RELAY_PREFETCH.
2. One fetch at a time per process (the engine's leader holds the role), so the order in which
   items enter the lanes is the order Redis handed them out. A fetch either moves up to the
   window's room without blocking (a backlog is in view), or waits in one blocking pop for the
   first item of a quiet spell (BLMOVE; with RELAY_LINGER, it then waits that long and tops
   the batch up, so a moderate rate shares calls).
3. A reply lost on the wire may leave items in the list that the process never saw. After
   any failed fetch, the next one first reads the whole list and adopts what it does not know
   (`known` counts what the process holds), before taking anything new: nothing fetched later
   can overtake what the lost reply moved.
4. `cut()` ends a blocking pop at once (a stop), throwing PopCut into the greenlet waiting in
   it; redis-py drops the connection whose reply was cut off, and what the pop may have moved
   waits in the list for the shutdown to return it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import gevent

from relay.queue import RedisQueue
from relay.redis_shared import BLOCK_S

log = logging.getLogger(__name__)

# A non-blocking fetch moves at most this many items: a bounded script on Redis, and a bounded
# stretch of parsing in the greenlet that fetched, during which the others do not run.
FETCH_MOST = 100


class PopCut(Exception):
    """The worker is stopping: the blocking pop was cut short (or never began)."""


class Window:
    def __init__(self, queue: RedisQueue, prefetch: int, linger_s: float = 0.0,
                 sleep: Callable[[float], Any] = gevent.sleep) -> None:
        self.queue = queue
        self.prefetch = prefetch
        self.linger_s = linger_s
        self.sleep = sleep
        self.known: Counter[bytes] = Counter()  # what this process holds, by exact bytes
        self.held = 0  # sum of known: items taken and not yet settled or forgotten
        self.backlog = True  # the queue had items when last seen: fetch without blocking
        self.resync = False  # a reply may have been lost: read the whole list first
        self.closed = False
        self._popper: gevent.Greenlet | None = None

    @property
    def room(self) -> int:
        return max(0, self.prefetch - self.held)

    def fetch(self, most: int, may_block: bool) -> list[bytes]:
        """Items newly taken, in taking order (the caller holds the process's fetch role).

        Adopts first what a lost reply left in the list. Blocks (up to BLOCK_S, or until `cut`)
        only when no backlog is in view and `may_block`. Raises redis errors (the caller backs
        off) with `resync` set, and WorkerReaped when another worker reaped this one."""
        if self.closed:
            return []
        adopt, self.resync = self.resync, True  # stays set unless this fetch completes
        items = self._adopt() if adopt else []
        most = min(most - len(items), FETCH_MOST)
        if most > 0:
            if self.backlog or not may_block or items:
                taken, length = self.queue.fetch(most)
                self.backlog = length > 0
                items += taken
            else:
                items += self._pop(most)
        self.resync = False
        self._know(items)
        return items

    def _adopt(self) -> list[bytes]:
        """What the in-flight list holds that this process does not know about, in order."""
        found = self.queue.inflight_items()
        seen: Counter[bytes] = Counter()
        adopted = []
        for raw in found:
            seen[raw] += 1
            if seen[raw] > self.known[raw]:
                adopted.append(raw)
        if adopted:
            log.info("adopted %d notification(s) a lost Redis reply had left in flight",
                     len(adopted))
        self._resync_pending = False
        return adopted

    def _pop(self, most: int) -> list[bytes]:
        """The first item of a quiet spell and whatever else is there (one round trip), then,
        with linger, whatever came meanwhile."""
        self._popper = gevent.getcurrent()
        try:
            items, length = self.queue.pop(BLOCK_S, most)
            self.backlog = bool(length)
            if not items or self.linger_s <= 0 or len(items) >= most:
                return items
            self.sleep(self.linger_s)  # a stop cuts this short too (PopCut)
        finally:
            self._popper = None
        taken, length = self.queue.fetch(most - len(items))
        self.backlog = length > 0
        return items + taken

    def _know(self, items: Iterable[bytes]) -> None:
        for raw in items:
            self.known[raw] += 1
            self.held += 1

    def forget(self, raws: Sequence[bytes]) -> None:
        """These are settled (or no longer this process's): the window has room for them."""
        for raw in raws:
            n = self.known[raw]
            if n <= 1:
                self.known.pop(raw, None)
            else:
                self.known[raw] = n - 1
            self.held -= 1

    def cut(self) -> None:
        """Stop: no fetch begins from now on, and a blocking pop under way ends at once."""
        self.closed = True
        popper = self._popper
        if popper is not None:
            # Thrown from the hub: if the popper has left the pop by then, it is not thrown.
            gevent.get_hub().loop.run_callback(self._throw, popper)

    def _throw(self, popper: gevent.Greenlet) -> None:
        if self._popper is popper:
            popper.throw(PopCut)
