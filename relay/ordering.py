"""Per-channel order within one worker process: a call waits for the earlier calls of its channels.

Greenlets send concurrently, so without a rule a call taken later can reach Pusher first, and
a subscriber sees "shipped" before "packed". The rule, and why it cannot deadlock:

1. **Tickets in taking order.** A greenlet fetches, parses and takes its ticket inside
   `OrderBook.taking()`, one greenlet at a time. So tickets are handed out in exactly the
   order Redis handed out the items (each greenlet takes a contiguous run of the queue).
   The lock is needed because the replies of concurrent fetches wake their greenlets in an
   order that has nothing to do with the order Redis served them.
2. **Waiting points backwards.** A ticket remembers, for each of its channels, the ticket
   taken last on that channel before it, and becomes the last one itself. Before sending,
   the greenlet waits until those earlier tickets are released. A ticket only ever waits for
   tickets taken before it, so the waits form no cycle: the oldest ticket never waits.
   Waiting on the last ticket of a channel is enough, because that one waited for its own
   predecessors before it could be released after sending.
3. **Released whatever happens.** Sent, failed, dead-lettered, put back, or its greenlet
   killed at shutdown: the ticket is released in a `finally`. A notification that failed
   goes to the retry set and its channel moves on (no head-of-line blocking); it comes back
   later with a new ticket, so it may arrive after later notifications of its channel. The
   same holds for anything put back (a 429 pause, the circuit, a stop) or recovered from a
   dead worker: it is taken again, later, with a new ticket, and nothing waits for it.
4. **Cheap.** A ticket costs a few dictionary operations per channel and an event object
   only when somebody has to wait for it; no greenlet of its own, no Redis round trip.

Across processes nothing is ordered: two processes on one queue can interleave a channel
(see the README's delivery promise).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import gevent.event
import gevent.lock


class Ticket:
    """One call's place in its channels' order; release it (OrderBook.release) when it is over."""

    __slots__ = ("channels", "_prev", "_done", "_event")

    def __init__(self, channels: tuple[str, ...], prev: dict[str, Ticket]) -> None:
        self.channels = channels
        # Per channel, the ticket taken last on it before this one. Kept when this ticket is
        # released before its turn came (put back unsent, or its greenlet killed while
        # waiting), so that whoever waits for it goes on waiting for them; forgotten once its
        # turn has come, since they were all released by then.
        self._prev = prev
        self._done = False
        self._event: gevent.event.Event | None = None

    @property
    def done(self) -> bool:
        return self._done

    def blockers(self) -> list[Ticket]:
        """The unreleased earlier tickets this one waits for: per channel, the newest one,
        looking through tickets that were released before their turn."""
        found: list[Ticket] = []
        for channel, earlier in self._prev.items():
            earlier = _unreleased(earlier, channel)
            if earlier is not None and earlier not in found:
                found.append(earlier)
        return found

    def wait(self) -> None:
        """Block until every earlier ticket sharing a channel with this one is released."""
        if self._prev:
            while blockers := self.blockers():
                for earlier in blockers:
                    if not earlier._done:
                        if earlier._event is None:
                            earlier._event = gevent.event.Event()
                        earlier._event.wait()
            self._prev = {}  # its turn has come: nothing later needs to look past it

    def _finish(self) -> None:
        self._done = True
        if self._event is not None:
            self._event.set()


def _unreleased(ticket: Ticket | None, channel: str) -> Ticket | None:
    """The newest unreleased ticket on `channel` from `ticket` back (None: all released)."""
    while ticket is not None and ticket._done:
        ticket = ticket._prev.get(channel)
    return ticket


class OrderBook:
    """The process's tickets: which call was taken last on each channel, still unreleased."""

    def __init__(self) -> None:
        self._taking = gevent.lock.Semaphore()
        self._last: dict[str, Ticket] = {}

    @contextmanager
    def taking(self) -> Iterator[None]:
        """Fetch and take() inside this, one greenlet at a time (see the module's point 1)."""
        with self._taking:
            yield

    def take(self, channels: Iterable[str]) -> Ticket:
        """A ticket after every ticket taken so far that shares one of these channels."""
        mine = tuple(dict.fromkeys(channels))
        last = self._last
        prev = {ch: last[ch] for ch in mine if ch in last}
        ticket = Ticket(mine, prev)
        for channel in mine:
            last[channel] = ticket
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The call is over (however it ended): its channels move on. Idempotent."""
        if ticket._done:
            return
        ticket._finish()
        last = self._last
        for channel in ticket.channels:
            if last.get(channel) is not ticket:
                continue
            # Released before its turn, it may still have unreleased elders on this channel:
            # the newest of them becomes the channel's last.
            elder = _unreleased(ticket._prev.get(channel), channel)
            if elder is None:
                del last[channel]
            else:
                last[channel] = elder

    @contextmanager
    def held(self, ticket: Ticket) -> Iterator[Ticket]:
        """Wait for the ticket's turn, and release it however the block ends."""
        try:
            ticket.wait()
            yield ticket
        finally:
            self.release(ticket)

    @property
    def channels_held(self) -> int:
        """Channels with an unreleased ticket (for tests and metrics)."""
        return len(self._last)
