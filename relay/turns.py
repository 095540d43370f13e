"""Fetching in turn, a round of greenlets in one Redis round trip (flat combining).

1. With per-channel order, greenlets fetch and take their tickets one at a time, in the order
   they asked (relay.ordering, point 1). Done one round trip each, that serialises the
   process's fetches: in a drain, each fetch waits for the one before it, and the event loop
   completes one fetch per pass while the pool queues for its turn. Measured over many
   channels, that alone cost about a quarter of the unordered drain's rate (73 % of it).
2. So the greenlet whose turn it is leads a **round**: it serves, in one call, its own request
   and those of every greenlet queued behind it at that moment, in the order they came, and
   hands each its result. Greenlets that come meanwhile queue for the next round, which the
   first of them leads. The results of one round, and the rounds, are in turn: the order of
   takes is the order greenlets asked, as with a lock handed on first come, first served.
3. A request that must go alone (a blocking pop: nothing in view) is a round of its own, and
   a round has at most `most` requests.
4. Killed while it waits (a shutdown), a greenlet leaves the queue; if its result had come,
   `drop(result)` gives it up (its ticket leaves the lanes); if it had been handed the lead,
   the next one leads. A leader killed mid-round fails the round's others with RoundLost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import gevent.event

Q = TypeVar("Q")
R = TypeVar("R")


class RoundLost(Exception):
    """The round's leader was killed before its call was answered: nothing came for this
    greenlet (what the call may have moved waits in its in-flight list)."""


class _Seat(Generic[Q, R]):
    __slots__ = ("request", "event", "result", "error", "served", "lead")

    def __init__(self, request: Q) -> None:
        self.request = request
        self.event = gevent.event.Event()
        self.result: R | None = None
        self.error: BaseException | None = None
        self.served = False
        self.lead = False

    def give(self, result: R) -> None:
        self.result, self.served = result, True
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error, self.served = error, True
        self.event.set()


class Turns(Generic[Q, R]):
    def __init__(self, serve: Callable[[list[Q]], Sequence[R]], alone: Callable[[Q], bool],
                 drop: Callable[[R], None], most: int = 20) -> None:
        """serve(requests) answers a round, one result per request in order; alone(request):
        it must be a round of its own; drop(result): a result whose greenlet was killed."""
        self._serve = serve
        self._alone = alone
        self._drop = drop
        self.most = most
        self._queue: deque[_Seat[Q, R]] = deque()
        self._leading = False  # a round is under way (then the queue waits for the next)

    def take_turn(self, request: Q) -> R:
        """This request's result, served in its turn (in a round this greenlet may lead)."""
        seat: _Seat[Q, R] = _Seat(request)
        self._queue.append(seat)
        if not self._leading:
            self._leading = True
            return self._lead()
        try:
            seat.event.wait()
        except BaseException:
            self._leave(seat)
            raise
        if seat.lead:
            return self._lead()
        if seat.error is not None:
            raise seat.error
        return seat.result  # type: ignore[return-value]

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _lead(self) -> R:
        """Serve a round: this greenlet's seat (at the front) and the ones queued behind it."""
        seats = [self._queue.popleft()]
        if not self._alone(seats[0].request):
            while (self._queue and len(seats) < self.most
                   and not self._alone(self._queue[0].request)):
                seats.append(self._queue.popleft())
        try:
            results = list(self._serve([s.request for s in seats]))
            if len(results) != len(seats):
                raise RuntimeError(f"a round of {len(seats)} got {len(results)} results")
        except BaseException as exc:
            lost = exc if isinstance(exc, Exception) else RoundLost()
            for seat in seats[1:]:
                seat.fail(lost)
            raise
        else:
            for seat, result in zip(seats[1:], results[1:], strict=True):
                seat.give(result)
            return results[0]
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._queue:
            head = self._queue[0]
            head.lead = True
            head.event.set()
        else:
            self._leading = False

    def _leave(self, seat: _Seat[Q, R]) -> None:
        if seat.lead:  # handed the lead, killed before taking it: pass it on
            self._queue.popleft()
            self._hand_over()
        elif seat.served:
            if seat.error is None:
                self._drop(seat.result)  # type: ignore[arg-type]
        else:
            self._queue.remove(seat)
