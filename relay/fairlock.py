"""A lock handed to its waiters in the order they came, that a stop can open for everyone.

gevent's Semaphore lets the greenlet that just released it take it again before a waiter
wakes up; a greenlet that loops straight back to fetch would then keep the fetch (or the
blocking pop) to itself, and the others would never look at their own in-flight lists.
Used by relay.popper (the one blocking pop).
"""

from __future__ import annotations

from collections import deque

import gevent.event


class FairLock:
    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[gevent.event.Event] = deque()
        self.closed = False

    def acquire(self) -> None:
        """Returns holding the lock, or, once close() was called, without it: callers that
        close check their own flag after this returns."""
        if not self._held and not self._waiters:
            self._held = True
            return
        turn = gevent.event.Event()
        self._waiters.append(turn)
        try:
            turn.wait()
        except BaseException:  # killed while waiting (shutdown)
            if turn.is_set() and not self.closed:
                self.release()  # it had been handed over: pass it on
            elif turn in self._waiters:
                self._waiters.remove(turn)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # handed over: it stays held
        else:
            self._held = False

    def close(self) -> None:
        """Wake every waiter now (a stop): each returns from acquire and sees the stop."""
        self.closed = True
        waiters, self._waiters = list(self._waiters), deque()
        for turn in waiters:
            turn.set()

    @property
    def waiting(self) -> int:
        return len(self._waiters)
