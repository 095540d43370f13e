"""One blocking pop per worker process at a time, and a stop that cuts it short at once.

1. Fifty greenlets each blocked in their own BLMOVE cost fifty Redis round trips every time
   the pops time out, on a queue where nothing happens (issue 11). So `PopGate.popping()`
   lets one greenlet into the blocking pop; the others wait on it here, in this process,
   without a Redis command, and take the pop in turn (first come, first served: every slot
   gets to pop, and so to adopt what a lost reply left in its list). A greenlet with a
   backlog in view never comes here: it tops up with the non-blocking fetch script.
2. So the one pop may block for seconds (redis_shared.BLOCK_S) instead of one: a stop must
   not wait for it. `close()` throws `PopCut` into the greenlet blocked in the pop, and into
   every waiter. What the pop moved already sits in the greenlet's own in-flight list, which
   the shutdown returns to the queue; redis-py drops a connection whose reply was cut off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import gevent

from relay.fairlock import FairLock

log = logging.getLogger(__name__)


class PopCut(Exception):
    """The worker is stopping: this greenlet's blocking pop was cut short (or never began)."""


class PopGate:
    """The process's single blocking pop: who holds it, who waits for it, and the stop."""

    def __init__(self) -> None:
        self._holder: gevent.Greenlet | None = None  # the greenlet in the pop, if any
        self._turns = FairLock()
        self.closed = False

    @contextmanager
    def popping(self) -> Iterator[None]:
        """Hold the pop for the `with` body; raises PopCut once the gate is closed."""
        if self.closed:
            raise PopCut
        self._turns.acquire()
        try:
            if self.closed:  # closed while this greenlet waited for its turn
                raise PopCut
            self._holder = gevent.getcurrent()
            try:
                yield
            finally:
                self._holder = None
        finally:
            self._turns.release()

    def close(self) -> None:
        """Stop: no pop begins from now on, and the one under way ends at once."""
        if self.closed:
            return
        self.closed = True
        holder = self._holder
        if holder is not None:
            # Thrown from the hub: if the holder has left the pop by then, it is not thrown.
            gevent.get_hub().loop.run_callback(self._cut, holder)
        self._turns.close()  # each waiter raises PopCut on waking (see popping)

    @property
    def waiting(self) -> int:
        return self._turns.waiting

    def _cut(self, holder: gevent.Greenlet) -> None:
        if self._holder is holder:
            holder.throw(PopCut)
