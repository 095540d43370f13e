"""The process's window on Redis: what it has taken from the queue and not yet settled.

1. Taken items sit in the process's one in-flight list (relay.queue) until a settle script
   removes them, so a kill -9 loses nothing: another worker returns the list to the queue
   once the heartbeat expires. Duplicates after a crash are bounded by the window's size,
   RELAY_PREFETCH.
2. One fetch at a time per process (the engine's leader holds the role), so the order in which
   items enter the lanes is the order Redis handed them out. A fetch either takes up to the
   window's room without blocking (a backlog, or parked notifications, in view), or first
   waits in one blocking pop for a quiet spell to end (with RELAY_LINGER, it then waits that
   long and tops the batch up, so a moderate rate shares calls). Every take goes through the
   fetch script, which reads the channels' owners (relay.ownership).
3. A reply lost on the wire may leave items in the list that the process never saw. After
   any failed fetch, the next one first reads the whole list and adopts what it does not know
   (`known` counts what the process holds), before taking anything new: nothing fetched later
   can overtake what the lost reply moved.
4. `cut()` ends a blocking pop at once (a stop), throwing PopCut into the greenlet waiting in
   it; redis-py drops the connection whose reply was cut off, and what the fetch behind the
   pop may have moved waits in the list for the shutdown to return it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import gevent

from relay.queue import RedisQueue, Taken
from relay.redis_shared import BLOCK_S

log = logging.getLogger(__name__)

# A non-blocking fetch moves at most this many items: a bounded script on Redis, and a bounded
# stretch of parsing in the greenlet that fetched, during which the others do not run.
FETCH_MOST = 250
# While the process owns channels, its blocking pop comes up this often, so that what another
# process hands over to it (relay.ownership) is not kept waiting for a whole BLOCK_S.
SHORT_BLOCK_S = 0.1


class PopCut(Exception):
    """The worker is stopping: the blocking pop was cut short (or never began)."""


Item = tuple[bytes, tuple[str, ...]]  # a taken item and its lane keys (relay.ownership)


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
        self.parked = 0  # keys of this process with parked items
        self.unpark = False  # some of them may move into the window now: fetch without blocking
        self.waiting = 0  # of those, how many wait for another owner (the next fetch looks)
        self.resync = False  # a reply may have been lost: read the whole list first
        # A fetch that could move nothing (all capped, an envelope waiting for its other owner,
        # the queue's head another worker's to claim): the next one waits until this (monotonic)
        self.idle_until = float("-inf")
        self.closed = False
        self._popper: gevent.Greenlet | None = None

    @property
    def room(self) -> int:
        return max(0, self.prefetch - self.held)

    @property
    def owes(self) -> bool:
        """The process owns channels (it holds their notifications, or parks some): a channel
        handed over to it must not wait for a long blocking pop to end."""
        return self.held > 0 or self.parked > 0

    @property
    def may_pop(self) -> bool:
        """Nothing in view to take without waiting: a blocking pop is the way. Not while this
        process parks anything: what its settling frees must not wait for a pop to end."""
        return not (self.backlog or self.unpark or self.parked)

    def fetch(self, most: int, may_block: bool) -> list[Item]:
        """Items newly taken, in taking order (the caller holds the process's fetch role).

        Adopts first what a lost reply left in the list. Blocks (up to BLOCK_S, SHORT_BLOCK_S
        while the process owns channels, or until `cut`) only when no backlog is in view and
        `may_block`. Raises redis errors (the caller backs off) with `resync` set, and
        WorkerReaped when another worker reaped this one."""
        if self.closed:
            return []
        adopt, self.resync = self.resync, True  # stays set unless this fetch completes
        items = self._adopt() if adopt else []
        most = min(most - len(items), FETCH_MOST)
        if most > 0:
            if may_block and self.may_pop and not items:
                items += self._pop(most)
            else:
                items += self._seen(self.queue.fetch(most), most)
                if not items and (self.backlog or self.parked):
                    # Something is in view that this fetch could not move: look again soon,
                    # not in a loop. (An empty queue is no reason to wait: a new item may
                    # come any moment, and the next fetch may wait for it in a pop.)
                    self.idle_until = time.monotonic() + SHORT_BLOCK_S
        self.resync = False
        self._know(raw for raw, _ in items)
        return items

    def _seen(self, taken: Taken, most: int) -> list[Item]:
        """What a fetch saw: a backlog; parked items, which may move again once it filled its
        room (what it left is capped, or waits for another owner, until a settle says)."""
        if taken.length is not None:
            self.backlog = taken.length > 0
        self.parked, self.waiting = taken.parked, taken.waiting
        self.unpark = taken.parked > 0 and len(taken.items) >= most
        return taken.items

    def _adopt(self) -> list[Item]:
        """What the in-flight list holds that this process does not know about, in order."""
        seen: Counter[bytes] = Counter()
        adopted = []
        for raw, keys in self.queue.inflight_items():
            seen[raw] += 1
            if seen[raw] > self.known[raw]:
                adopted.append((raw, keys))
        if adopted:
            log.info("adopted %d notification(s) a lost Redis reply had left in flight",
                     len(adopted))
        return adopted

    def _pop(self, most: int) -> list[Item]:
        """The first items of a quiet spell (one round trip), then, with linger, whatever came
        meanwhile."""
        self._popper = gevent.getcurrent()
        try:
            block_s = SHORT_BLOCK_S if self.owes else BLOCK_S
            items = self._seen(self.queue.pop(block_s, most), most)
            if not items or self.linger_s <= 0 or len(items) >= most:
                return items
            self.sleep(self.linger_s)  # a stop cuts this short too (PopCut)
        finally:
            self._popper = None
        return items + self._seen(self.queue.fetch(most - len(items)), most - len(items))

    def _know(self, raws: Iterable[bytes]) -> None:
        for raw in raws:
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
