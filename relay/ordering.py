"""Per-channel order within one worker process: each channel has a lane, one call at a time.

Greenlets send concurrently, so without a rule a batch taken later can reach Pusher first, and
a subscriber sees "shipped" before "packed". The rule, and why it cannot deadlock:

1. **Lanes in taking order.** Greenlets fetch, parse and take their tickets in turn, in the
   order they asked (relay.turns: a round of them shares one fetch script, which hands the
   queue's items out in that order), so each notification joins the lane of each of its
   channels in exactly the order Redis handed it out. Turns are needed because the replies of
   concurrent fetches wake their greenlets in an order that has nothing to do with the order
   Redis served them.
2. **One call per lane at a time, from the front.** A call takes notifications from the front
   of lanes that have no call under way, and keeps the lane busy until Pusher has answered.
   A notification with several channels (an envelope) goes once it is at the front of each of
   its lanes and all of them are free. So a channel's calls reach Pusher one after the other,
   in lane order, and the oldest notification waiting is always at the front of its lanes:
   the waits form no cycle.
3. **Calls are shared out, not owned.** Any greenlet waiting for its own notifications sends
   whatever lane is ready, its own or another's: a call carries up to a batch of one lane's
   front (then of the next ready lanes, if there is room), whoever fetched them. So a backlog
   on a few channels goes out as one full batch per channel per round trip, side by side,
   instead of each greenlet's batch (a slice of every channel) waiting for the one before.
   The sender hands each result to the notification's own greenlet, which settles it in
   Redis (its in-flight list) as before.
4. **Removed whatever happens.** Sent, failed, dead-lettered, put back, or its greenlet
   killed: a notification leaves its lanes in a `finally`. A notification that failed goes to
   the retry set and its channel moves on (no head-of-line blocking); it comes back later
   behind what was taken meanwhile. The same holds for anything put back (a 429 pause, the
   circuit, a stop) or recovered from a dead worker. A sender killed mid-call answers its
   notifications HELD (not sent), so their greenlets put them back.
5. **Cheap.** A trickle notification finds its lane empty and goes at once: a few deque and
   set operations, an event only when a greenlet has to wait, no greenlet of its own, no
   Redis round trip.

Across processes nothing is ordered: two processes on one queue can interleave a channel
(see the README's delivery promise).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Generic, Protocol, TypeVar

import gevent.event


class HasChannels(Protocol):
    @property
    def channels(self) -> tuple[str, ...]: ...


N = TypeVar("N", bound=HasChannels)
R = TypeVar("R")

RESERVED, PENDING, INFLIGHT, DONE = range(4)
NOT_SENT = object()  # the result of a notification whose sender was killed before an answer


class Entry(Generic[N]):
    """One notification's place in its lanes."""

    __slots__ = ("note", "ticket", "state", "result")

    def __init__(self, note: N, ticket: Ticket[N]) -> None:
        self.note = note
        self.ticket = ticket
        self.state = RESERVED  # in its lanes, not sendable until its greenlet submits it
        self.result: object = None


class Ticket(Generic[N]):
    """One greenlet's batch: its notifications' entries, and how to wake that greenlet."""

    __slots__ = ("entries", "probing", "_event")

    def __init__(self) -> None:
        self.entries: list[Entry[N]] = []
        self.probing = False
        self._event: gevent.event.Event | None = None

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()


class OrderBook(Generic[N]):
    """The process's lanes: per channel, the notifications taken and not yet answered."""

    def __init__(self, batch: int = 10,
                 alone: Callable[[N], bool] = lambda note: len(note.channels) > 1) -> None:
        """batch: the most notifications a call carries; alone(note): it needs a call (one
        HTTP request) of its own, as Delivery.send would send it."""
        self.batch = batch
        self._alone = alone
        self._lanes: dict[str, deque[Entry[N]]] = {}  # per channel, in taking order
        self._ready: deque[str] = deque()  # lanes whose front may go now (checked again)
        self._queued: set[str] = set()  # what _ready holds

    def take(self, notes: Sequence[N]) -> Ticket[N]:
        """Each note's place at the back of its channels' lanes, held until it is submitted
        (send_in_turn) or released. Called in the order Redis handed the notes out."""
        ticket: Ticket[N] = Ticket()
        for note in notes:
            entry = Entry(note, ticket)
            ticket.entries.append(entry)
            for channel in dict.fromkeys(note.channels):
                self._lanes.setdefault(channel, deque()).append(entry)
        return ticket

    def send_in_turn(self, ticket: Ticket[N], notes: Sequence[N],
                     send: Callable[[list[N], bool], Sequence[R]], probing: bool = False
                     ) -> list[R | object]:
        """Send these notes (a subset of the ticket's, in order) in their lanes' turn; one
        result per note. This greenlet sends ready lanes (its own or others') until every one
        of its notes has an answer; send(notes, probing) makes one call."""
        wanted = {id(n) for n in notes}
        ticket.probing = probing
        mine: list[Entry[N]] = []
        for entry in ticket.entries:
            if id(entry.note) in wanted:
                entry.state = PENDING
                mine.append(entry)
        self._remove([e for e in ticket.entries if e.state == RESERVED])
        for entry in mine:
            self._check(entry.note.channels)
        try:
            while not all(e.state == DONE for e in mine):
                call = self._form(mine)
                if call:
                    self._send(call, send)
                    continue
                ticket._event = gevent.event.Event()
                try:
                    ticket._event.wait()
                finally:
                    ticket._event = None
        finally:
            self._handover()
        return [e.result for e in mine]

    def release(self, ticket: Ticket[N]) -> None:
        """The batch is over, however it ended: what of it was not sent leaves its lanes.
        (What another greenlet is sending for it finishes, and its answer is dropped.)"""
        self._remove([e for e in ticket.entries if e.state in (RESERVED, PENDING)])

    @property
    def channels_held(self) -> int:
        """Lanes with a notification in them, taken or under way (for tests and metrics)."""
        return len(self._lanes)

    # -- lanes -------------------------------------------------------------------------------

    def _front_goes(self, channel: str) -> Entry[N] | None:
        """The front of this lane, if it may be sent now. A call's notifications stay at the
        front of their lanes until it is answered, so a lane is busy when its front is."""
        lane = self._lanes.get(channel)
        if not lane or lane[0].state != PENDING:
            return None
        front = lane[0]
        for other in front.note.channels:
            if other != channel and self._lanes[other][0] is not front:
                return None
        return front

    def _check(self, channels: Sequence[str]) -> None:
        """Queue each of these lanes whose front may go now, and wake that front's greenlet."""
        for channel in channels:
            front = self._front_goes(channel)
            if front is not None:
                if channel not in self._queued:
                    self._queued.add(channel)
                    self._ready.append(channel)
                front.ticket._wake()

    def _form(self, mine: Sequence[Entry[N]] = ()) -> list[Entry[N]]:
        """One call, which is one HTTP request: the front runs of the sender's own ready lanes
        (so it seldom waits on another greenlet, nor wakes one), then of the oldest ready
        lanes while there is room; or one notification that goes alone (an envelope, a
        retry). Its notifications stay at the front of their lanes, so the lanes are busy
        until the answer. Lanes taken out of turn stay in the ready queue: popped later, a
        lane is checked again."""
        call: list[Entry[N]] = []
        for entry in mine:
            if entry.state == PENDING and self._front_goes(entry.note.channels[0]) is entry:
                if self._take_run(call, entry.note.channels[0], entry):
                    return call
                if len(call) >= self.batch:
                    return call
        passed: list[str] = []  # ready lanes whose front must go alone: for another call
        while self._ready and len(call) < self.batch:
            channel = self._ready.popleft()
            self._queued.discard(channel)
            front = self._front_goes(channel)
            if front is None:
                continue
            if self._alone(front.note) and call:
                passed.append(channel)
                continue
            if self._take_run(call, channel, front):
                break
        for channel in reversed(passed):
            self._queued.add(channel)
            self._ready.appendleft(channel)
            self._lanes[channel][0].ticket._wake()  # its own greenlet may send it meanwhile
        return call

    def _take_run(self, call: list[Entry[N]], channel: str, front: Entry[N]) -> bool:
        """Add the front run of this lane to the call; True when the call is full (the front
        goes alone: an envelope, a retry)."""
        if self._alone(front.note):
            if call:
                return False
            front.state = INFLIGHT
            call.append(front)
            return True
        run = [front]
        for entry in islice(self._lanes[channel], 1, self.batch - len(call)):
            if entry.state != PENDING or self._alone(entry.note):
                break
            run.append(entry)
        for entry in run:
            entry.state = INFLIGHT
        call.extend(run)
        return False

    def _send(self, call: list[Entry[N]], send: Callable[[list[N], bool], Sequence[R]]) -> None:
        results: Sequence[object] = ()
        try:
            results = send([e.note for e in call], any(e.ticket.probing for e in call))
        finally:
            touched: dict[str, None] = {}
            for i, entry in enumerate(call):
                entry.result = results[i] if i < len(results) else NOT_SENT
                entry.state = DONE
                touched.update(dict.fromkeys(entry.note.channels))
                self._drop(entry)
                if entry.ticket._event is not None:
                    entry.ticket._wake()
            self._check(list(touched))

    def _remove(self, entries: Sequence[Entry[N]]) -> None:
        touched: dict[str, None] = {}
        for entry in entries:
            entry.state = DONE
            self._drop(entry)
            touched.update(dict.fromkeys(entry.note.channels))
        self._check(list(touched))

    def _drop(self, entry: Entry[N]) -> None:
        for channel in dict.fromkeys(entry.note.channels):
            lane = self._lanes.get(channel)
            if lane is None:
                continue
            if lane[0] is entry:
                lane.popleft()
            else:
                try:
                    lane.remove(entry)
                except ValueError:
                    pass
            if not lane:
                del self._lanes[channel]

    def _handover(self) -> None:
        """Leaving with lanes still ready: wake the greenlets waiting at their fronts."""
        for channel in self._ready:
            lane = self._lanes.get(channel)
            if lane:
                lane[0].ticket._wake()
