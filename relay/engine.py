"""The engine: every pool greenlet takes, sends and settles; one call at a time each.

1. **Leader/followers.** Any greenlet of the pool may hold the process's fetch role (one at a
   time, so lanes get items in Redis's order). The one that holds it fills the window: without
   blocking while a backlog is in view, else in the process's one blocking pop. Then it hands
   the role back, wakes as many followers as lanes became ready, and sends a call like every
   other greenlet. So every greenlet does blocking Redis pops and plain synchronous Pusher
   calls, and the pool size caps the calls in flight (the user's design card).
2. **A call** is what `Lanes.next_call` forms from the fronts of lanes with no call in flight
   (relay.lanes): up to 10 notifications, or one that goes alone. The greenlet that formed
   it decides each notification's fate (relay.fate), sends what may go (relay.delivery),
   tells the circuit once for the call, settles every fate in one script (relay.settle) and
   frees the call's lanes. Nothing is handed to another greenlet.
3. **The window** (RELAY_PREFETCH) bounds what the process holds taken and not yet settled,
   apart from the pool size, which bounds the calls: a drain keeps the pool busy because the
   lanes hold the next calls while the current ones are answered (Kafka's accumulator).
4. **Fail safe.** A call that cannot be settled as decided goes back to the queue; if even
   that fails, the window forgets it and adopts it again from Redis at the next fetch. A
   greenlet never dies of an error: it logs, backs off and goes on (relay.process replaces
   one that ends anyway).
5. **Gates.** While the circuit is open nothing is fetched and what the window holds goes back
   to the queue; one greenlet at a time probes with one notification. A 429 pause holds every
   greenlet until it is over. The shared rate limit is taken for exactly what a call sends.
   An operator's pause (relay.pause) holds like an open circuit, without a probe; a quiet
   process stops fetching and sends what its window holds.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gevent
import gevent.event

from relay.circuit import Circuit
from relay.delivery import MAX_BATCH, Delivery, goes_alone
from relay.fate import (
    DELIVERED,
    UNSENT,
    Fate,
    Gate,
    Policy,
    PutBack,
    Send,
    Verdict,
    decide,
    verdict,
)
from relay.lanes import Entry, Lanes
from relay.message import InvalidMessage, Limits, Notification, parse
from relay.metrics import Metrics
from relay.pause import OperatorGate
from relay.queue import RedisQueue, WorkerReaped
from relay.ratelimit import RateLimiter
from relay.redis_shared import REDIS_DOWN, REDIS_ERRORS
from relay.retry import Outage
from relay.settle import Fated, Settler
from relay.window import PopCut, Window

log = logging.getLogger(__name__)

# While the gate holds (the circuit open, a 429 pause), a greenlet looks again this often:
# another greenlet's probe may have closed it meanwhile.
RECHECK_S = 1.0
# With nothing to do, a greenlet waits to be woken (work came, the fetch role is free); it also
# looks again this often: a safety net, not the way work is found.
IDLE_RECHECK_S = 5.0
# A window with at least this much room (and a backlog in view) is topped up before the next
# call: the lanes then hold the calls that follow while the current ones are answered.
REFILL_AT = MAX_BATCH
# An unexpected error in a greenlet: it goes on after this pause.
ERROR_PAUSE_S = 1.0


@dataclass(frozen=True)
class Settings:
    """What the engine needs of the configuration."""

    prefetch: int
    channel_order: bool
    event: str
    limits: Limits
    policy: Policy
    linger_s: float = 0.0


class Engine:
    def __init__(self, settings: Settings, queue: RedisQueue, delivery: Delivery,
                 settler: Settler, metrics: Metrics, outage: Outage,
                 stopping: gevent.event.Event, limiter: RateLimiter | None = None,
                 circuit: Circuit | None = None, clock: Callable[[], float] = time.time,
                 on_reaped: Callable[[], None] = lambda: None,
                 operator: OperatorGate | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.delivery = delivery
        self.settler = settler
        self.metrics = metrics
        self.outage = outage
        self.stopping = stopping
        self.limiter = limiter
        self.circuit = circuit or Circuit()
        self.operator = operator or OperatorGate()  # pause and quiet (relay.pause)
        self.clock = clock
        self.on_reaped = on_reaped  # re-register (the housekeeper's heartbeat)
        self.batch = MAX_BATCH if limiter is None else min(MAX_BATCH, limiter.burst)
        prefetch = settings.prefetch
        if limiter is not None:  # hold no more than a couple of seconds' worth of budget
            prefetch = min(prefetch, max(self.batch, 2 * limiter.burst))
        self.window = Window(queue, prefetch, settings.linger_s)
        self.lanes = Lanes(self.batch)
        self.fetching = False
        self.busy = 0  # greenlets in a call now
        self.last_success_at: float | None = None  # wall clock, for fate.is_suspect
        self._idle: deque[gevent.event.Event] = deque()
        self._own_keys = itertools.count()  # a lane of its own: ordering off, unreadable items

    # -- one pool greenlet -----------------------------------------------------------------------

    def serve(self) -> None:
        """A pool greenlet's life: until the stop, take a call, send it, settle it."""
        while not self.stopping.is_set():
            try:
                self._step()
            except PopCut:
                return
            except Exception as exc:  # every error is handled: none ends the greenlet
                self._recover(exc)

    def _recover(self, exc: Exception) -> None:
        """Back off from an error, and from an error met while handling it: the loop goes on."""
        try:
            if isinstance(exc, WorkerReaped):
                self.on_reaped()
            elif isinstance(exc, REDIS_DOWN):
                self.metrics.redis_errors.inc()
                self._wait(self.outage.failed(exc))
            else:
                log.error("unexpected error in a pool greenlet; it goes on after a pause",
                          exc_info=exc)
                self._wait(ERROR_PAUSE_S)
        except REDIS_DOWN as again:
            self.metrics.redis_errors.inc()
            self._wait(self.outage.failed(again))
        except Exception:
            log.exception("unexpected error while recovering from %s; going on after a pause",
                          type(exc).__name__)
            self._wait(ERROR_PAUSE_S)

    def _step(self) -> None:
        if self.operator.holding:  # paused: the operator gate wakes everybody at resume
            self._put_back_idle()
            self._wait(IDLE_RECHECK_S)
            return
        hold_s = self.circuit.wait_s()
        if hold_s > 0:
            if self.circuit.is_open:
                self._put_back_idle()
            self._wait(min(hold_s, RECHECK_S))
            return
        probing = self.circuit.is_open  # wait_s made this greenlet the probe
        if self._should_fetch(probing):
            self._fetch(1 if probing else self.window.room, may_block=not self.lanes.ready)
        call = self.lanes.next_call(1 if probing else None)
        if not call:
            if probing:
                self.circuit.abandon_probe()
            if not self._should_fetch(probing):
                self._wait(IDLE_RECHECK_S)
            return
        self._carry(call, probing)

    # -- the window ------------------------------------------------------------------------------

    def _should_fetch(self, probing: bool) -> bool:
        if self.fetching or self.window.closed or self.stopping.is_set() or \
                not self.operator.may_fetch:
            return False
        room = self.window.room
        if probing:
            return room > 0 and not self.lanes.ready
        if not self.lanes.ready:
            return room > 0
        return room >= REFILL_AT and (self.window.backlog or self.window.unpark)

    def _fetch(self, most: int, may_block: bool) -> None:
        """Hold the fetch role: take what fits, put it in the lanes, wake who can send it."""
        self.fetching = True
        try:
            taken = self.window.fetch(most, may_block)
        finally:
            self.fetching = False
            self._notify(1)  # the role is free again: a follower may lead the next fetch
        self.outage.succeeded()
        if taken:
            self.metrics.inflight.set(self.window.held)
            self._notify(self.lanes.add(self._entry(raw, keys) for raw, keys in taken))

    def _entry(self, raw: bytes, keys: tuple[str, ...]) -> Entry:
        """keys: the lane keys the fetch script read (relay.ownership), the ones its settling
        counts down; with ordering off, none, and each notification has a lane of its own."""
        try:
            note = parse(raw, self.settings.event, self.settings.limits)
        except InvalidMessage as exc:
            entry = Entry(raw, exc, (self._own_key(),), alone=True)
        else:
            entry = Entry(raw, note, keys or (self._own_key(),), alone=goes_alone(note))
        entry.extra = keys
        return entry

    def _own_key(self) -> str:
        return f"#{next(self._own_keys)}"  # "#" is never in a channel name

    def _put_back_idle(self) -> None:
        """The circuit is open, or delivery paused: what waits in the lanes goes back to the
        queue, in order."""
        idle = self.lanes.take_idle()
        if idle:
            self._settle_or_forget(idle, [(e.raw, e.item, PutBack(), e.extra) for e in idle])

    def reaped(self) -> None:
        """Another worker declared this one dead and returned its in-flight list to the queue:
        what the lanes hold is no longer this process's to send."""
        idle = self.lanes.take_idle()
        self.window.forget([e.raw for e in idle])
        self.window.resync = False  # the list was emptied: nothing to adopt
        if idle:
            log.warning("%d notification(s) this worker held had been returned to the queue "
                        "when it was declared dead; they will be taken again", len(idle))

    # -- one call --------------------------------------------------------------------------------

    def _carry(self, call: list[Entry], probing: bool) -> None:
        self.busy += 1
        try:
            try:
                fates = self._fates(call, probing)
            except Exception:
                log.exception("unexpected error while sending a call; its notifications go "
                              "back to the queue")
                fates = [(e.raw, e.item, PutBack(), e.extra) for e in call]
            self._settle_or_forget(call, fates)
        finally:
            self.busy -= 1
            if probing and self.circuit.probing:
                self.circuit.abandon_probe()  # ended without a verdict (nothing sent, a 429)
            if any(e.called for e in call):  # killed (a shutdown): the release returns them
                self.lanes.finish(call)

    def _fates(self, call: Sequence[Entry], probing: bool) -> list[Fated]:
        """Decide, send what may go, tell the circuit once: every entry's fate."""
        now = self.clock()
        gate = Gate(holding=not probing and self.circuit.holding())
        decided: dict[int, Fate] = {}
        to_send: list[Entry] = []
        for entry in call:
            fate = decide(entry.item, UNSENT, gate, now, self.settings.policy)
            if isinstance(fate, Send):
                to_send.append(entry)
            else:
                decided[id(entry)] = fate
        if to_send:
            decided.update(self._send(to_send, probing, gate))
        return [(e.raw, e.item, decided[id(e)], e.extra) for e in call]

    def _send(self, entries: Sequence[Entry], probing: bool, gate: Gate) -> dict[int, Fate]:
        notes: list[Notification] = [e.item for e in entries]
        cost = sum(n.cost for n in notes)
        if not self._budget(cost) or self.stopping.is_set() or self.operator.holding or (
                not probing and self.circuit.holding()):
            # The stop came, or a gate closed, while this call waited for budget.
            self._refund(cost)
            return {id(e): PutBack() for e in entries}
        answers = self.delivery.send(notes)
        now = self.clock()
        self._tell_circuit(verdict(notes, answers, self.last_success_at, now))
        policy = self.settings.policy
        return {id(e): decide(e.item, DELIVERED if a is None else a, gate, now, policy)
                for e, a in zip(entries, answers, strict=True)}

    def _budget(self, cost: int) -> bool:
        """The shared rate limit's budget for exactly what this call sends (waits for it)."""
        if self.limiter is None:
            return True
        return self.limiter.take_all(cost, self.stopping.is_set) >= cost

    def _refund(self, cost: int) -> None:
        if self.limiter is None:
            return
        try:
            self.limiter.refund(cost)
        except REDIS_ERRORS as exc:  # budget bookkeeping: never worth a notification
            log.warning("could not give back %d unused rate-limit events (%s)", cost,
                        type(exc).__name__)

    def _settle_or_forget(self, entries: Sequence[Entry], fates: list[Fated]) -> None:
        """Persist the fates (retried through outages), then free the lanes and the window.

        What goes back to the queue takes along what waits behind it in its lanes, in the same
        script: put back apart, the newer ones would land in front of the older. If settling
        fails otherwise, the window forgets them and adopts them again from the in-flight list
        at its next fetch: fail safe, they are sent again."""
        if any(isinstance(fate, PutBack) for _, _, fate, _ in fates):
            behind = self.lanes.take_behind(entries)
            fates = fates + [(e.raw, e.item, PutBack(), e.extra) for e in behind]
            entries = [*entries, *behind]
        try:
            settled = self.settler.settle(fates)
            self.window.backlog = settled.length > 0
            self.window.unpark = self.window.unpark or settled.parked > 0
        except Exception:
            self.window.resync = True
            raise
        finally:
            self.window.forget([e.raw for e in entries])
            self.metrics.inflight.set(self.window.held)
            called = [e for e in entries if e.called]
            if called:
                self._notify(self.lanes.finish(called))

    def _tell_circuit(self, news: Verdict) -> None:
        was_open = self.circuit.is_open
        if news.pause_s:  # Retry-After: 0 means no pause at all
            self.circuit.pause(news.pause_s, news.pause_why)
        if news.systemic is not None:
            self.circuit.systemic(news.systemic)
        elif news.delivered:
            self.last_success_at = self.clock()
            self.circuit.succeeded()
        elif news.transient is not None:
            self.circuit.transient(news.transient)
        if was_open and not self.circuit.is_open:
            self._notify(len(self._idle))  # closed again: everybody back to work

    # -- waiting ---------------------------------------------------------------------------------

    def _wait(self, timeout: float) -> None:
        """Wait until woken (work may be there) or the timeout; a stop wakes everybody."""
        if self.stopping.is_set():
            return
        woken = gevent.event.Event()
        self._idle.append(woken)
        try:
            woken.wait(timeout)
        finally:
            if not woken.is_set():
                try:
                    self._idle.remove(woken)
                except ValueError:
                    pass

    def _notify(self, n: int) -> None:
        while n > 0 and self._idle:
            self._idle.popleft().set()
            n -= 1

    def wake_all(self) -> None:
        self._notify(len(self._idle))

    def cut(self) -> None:
        """The stop: no fetch from now on, the blocking pop ends, every waiter wakes."""
        self.window.cut()
        self.wake_all()

    @property
    def held(self) -> int:
        return self.window.held

