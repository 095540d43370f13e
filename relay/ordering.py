"""Per-channel order within one worker process: a call waits for earlier calls of its channels.

Greenlets send concurrently, so without a rule a batch taken later can reach Pusher first, and
a subscriber sees "shipped" before "packed". The rule, and why it cannot deadlock:

1. **Tickets in taking order.** A greenlet fetches, parses and takes its ticket inside
   `OrderBook.taking()`, one greenlet at a time and in the order they asked (a fair lock),
   so tickets are handed out in exactly the order Redis handed out the items (each greenlet
   takes a contiguous run of the queue). The lock is needed because the replies of
   concurrent fetches wake their greenlets in an order that has nothing to do with the
   order Redis served them. Only one blocking pop per process is then pending at a time.
2. **Per channel, waiting points backwards.** A ticket remembers, for each of its channels,
   the ticket taken last on that channel before it, and becomes the last one itself. A
   notification is sent once, on each of its channels, every earlier ticket has released
   that channel. A ticket only ever waits for tickets taken before it, so the waits form no
   cycle: the oldest ticket never waits.
3. **Channels are released one by one.** `send_in_turn` sends, in one call, every
   notification of the batch whose channels are free (keeping the batch's own order per
   channel), releases each channel that has nothing left in the batch, then waits for the
   rest and sends it in a second call. So a batch held up on one channel does not hold up
   its other channels, and long chains of waiting batches do not form across channels.
4. **Released whatever happens.** Sent, failed, dead-lettered, put back, or its greenlet
   killed at shutdown: the ticket is released in a `finally`. A notification that failed
   goes to the retry set and its channel moves on (no head-of-line blocking); it comes back
   later with a new ticket, so it may arrive after later notifications of its channel. The
   same holds for anything put back (a 429 pause, the circuit, a stop) or recovered from a
   dead worker: it is taken again, later, with a new ticket, and nothing waits for it. A
   ticket released before its turn passes its own wait on to whoever waited for it.
5. **Cheap.** A few dictionary and set operations per channel of a batch, an event object
   only when somebody has to wait, no greenlet of its own, no Redis round trip.

Across processes nothing is ordered: two processes on one queue can interleave a channel
(see the README's delivery promise).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar

import gevent.event


class HasChannels(Protocol):
    @property
    def channels(self) -> tuple[str, ...]: ...


N = TypeVar("N", bound=HasChannels)
R = TypeVar("R")


class Ticket:
    """One batch's place in its channels' order; the OrderBook releases it channel by channel."""

    __slots__ = ("channels", "_prev", "_open", "_event")

    def __init__(self, channels: tuple[str, ...], prev: dict[str, Ticket]) -> None:
        self.channels = channels
        # Per channel, the ticket taken last on it before this one. Forgotten once this
        # ticket's turn on the channel has come (all earlier ones had released it then);
        # kept while it has not, so that a ticket released before its turn (put back unsent,
        # or its greenlet killed while waiting) passes its wait on to whoever waits for it.
        self._prev = prev
        self._open = set(channels)  # channels not released yet
        self._event: gevent.event.Event | None = None  # pulsed whenever a channel is released

    @property
    def done(self) -> bool:
        return not self._open

    def blocker(self, channel: str) -> Ticket | None:
        """The newest earlier ticket still holding `channel` (None: this ticket's turn)."""
        earlier = _holder(self._prev.get(channel), channel)
        if earlier is None:
            self._prev.pop(channel, None)
        return earlier

    def blockers(self) -> list[Ticket]:
        """Every earlier ticket this one still waits for, on any channel."""
        found: list[Ticket] = []
        for channel in self.channels:
            earlier = self.blocker(channel)
            if earlier is not None and earlier not in found:
                found.append(earlier)
        return found

    def wait(self) -> None:
        """Block until this ticket's turn has come on every one of its channels."""
        while blockers := self.blockers():
            blockers[0]._wait_release()

    def _wait_release(self) -> None:
        """Block until this ticket releases one more channel."""
        if self._event is None:
            self._event = gevent.event.Event()
        self._event.wait()

    def _pulse(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()


def _holder(ticket: Ticket | None, channel: str) -> Ticket | None:
    """The newest ticket from `ticket` back that still holds `channel` (None: nobody)."""
    while ticket is not None and channel not in ticket._open:
        ticket = ticket._prev.get(channel)
    return ticket


class FairLock:
    """A lock handed to its waiters in the order they came.

    gevent's Semaphore lets the greenlet that just released it take it again before a waiter
    wakes up; a greenlet that loops straight back to fetch would then keep the fetch to
    itself, and the others would never look at their own in-flight lists.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[gevent.event.Event] = deque()

    def acquire(self) -> None:
        if not self._held and not self._waiters:
            self._held = True
            return
        turn = gevent.event.Event()
        self._waiters.append(turn)
        try:
            turn.wait()
        except BaseException:  # killed while waiting (shutdown)
            if turn.is_set():
                self.release()  # it had been handed over: pass it on
            else:
                self._waiters.remove(turn)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # handed over: it stays held
        else:
            self._held = False

    @property
    def waiting(self) -> int:
        return len(self._waiters)


class OrderBook:
    """The process's tickets: which batch was taken last on each channel, still unreleased."""

    def __init__(self) -> None:
        self._taking = FairLock()
        self._last: dict[str, Ticket] = {}

    @contextmanager
    def taking(self) -> Iterator[None]:
        """Fetch and take() inside this, one greenlet at a time in the order they came (see
        the module's point 1)."""
        self._taking.acquire()
        try:
            yield
        finally:
            self._taking.release()

    def take(self, channels: Iterable[str]) -> Ticket:
        """A ticket after every ticket taken so far that shares one of these channels."""
        mine = tuple(dict.fromkeys(channels))
        last = self._last
        ticket = Ticket(mine, {ch: last[ch] for ch in mine if ch in last})
        for channel in mine:
            last[channel] = ticket
        return ticket

    def release(self, ticket: Ticket, channels: Iterable[str] | None = None) -> None:
        """These channels (default: all) of the ticket are over, however they ended.

        Idempotent. A channel released before the ticket's turn on it leaves the channel to
        the newest earlier ticket that still holds it.
        """
        released = False
        last = self._last
        for channel in ticket.channels if channels is None else channels:
            if channel not in ticket._open:
                continue
            ticket._open.discard(channel)
            released = True
            if last.get(channel) is ticket:
                elder = _holder(ticket._prev.get(channel), channel)
                if elder is None:
                    del last[channel]
                else:
                    last[channel] = elder
        if released:
            ticket._pulse()

    def send_in_turn(self, ticket: Ticket, notes: Sequence[N],
                     send: Callable[[list[N]], Sequence[R]]) -> list[R]:
        """Send the notes in at most two calls that respect the order; release as they finish.

        First, in one `send`, every note whose channels are this ticket's turn and that no
        earlier note of the batch holds back on a shared channel; each channel with nothing
        left in the batch is released at once. Then, once the ticket's turn has come on
        every channel, the rest in a second `send`. Returns one result per note, in order.
        """
        now, later, held = [], [], set()
        for i, note in enumerate(notes):
            channels = note.channels
            if held.isdisjoint(channels) and all(ticket.blocker(c) is None for c in channels):
                now.append(i)
            else:
                later.append(i)
                held.update(channels)
        results: list[R | None] = [None] * len(notes)
        for part in (now, later):
            if not part:
                continue
            if part is later:
                ticket.wait()
            for i, result in zip(part, send([notes[i] for i in part]), strict=True):
                results[i] = result
            self.release(ticket, {c for i in part for c in notes[i].channels} - held)
            held = set()
        return results  # type: ignore[return-value]

    @contextmanager
    def held(self, ticket: Ticket) -> Iterator[Ticket]:
        """Release the whole ticket however the block ends (a failure, a kill, a put-back)."""
        try:
            yield ticket
        finally:
            self.release(ticket)

    @property
    def channels_held(self) -> int:
        """Channels with an unreleased ticket (for tests and metrics)."""
        return len(self._last)
