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
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import gevent
import gevent.event

from relay.apps import DEFAULT, UnknownApp
from relay.delivery import MAX_BATCH, goes_alone
from relay.fate import (
    DELIVERED,
    UNSENT,
    DeadLetter,
    Fate,
    Gate,
    Later,
    Policy,
    PutBack,
    RetryLater,
    Send,
    Verdict,
    decide,
    verdict,
)
from relay.lanes import Entry, Lanes
from relay.message import InvalidMessage, Notification, parse
from relay.metrics import Metrics
from relay.pause import OperatorGate
from relay.queue import RedisQueue, WorkerReaped
from relay.redis_shared import REDIS_DOWN, REDIS_ERRORS
from relay.retry import Outage
from relay.routes import Route, Routes
from relay.settle import Fated, Settler
from relay.tracing_switch import NO_TRACING, Tracer
from relay.window import SHORT_BLOCK_S, PopCut, Window

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
    policy: Policy
    linger_s: float = 0.0


class Engine:
    def __init__(self, settings: Settings, queue: RedisQueue, routes: Routes,
                 settler: Settler, metrics: Metrics, outage: Outage,
                 stopping: gevent.event.Event, clock: Callable[[], float] = time.time,
                 on_reaped: Callable[[], None] = lambda: None,
                 operator: OperatorGate | None = None, tracer: Tracer = NO_TRACING) -> None:
        self.settings = settings
        self.queue = queue
        self.routes = routes  # each app's delivery, circuit and rate limit (relay.routes)
        self.settler = settler
        self.metrics = metrics
        self.outage = outage
        self.stopping = stopping
        self.operator = operator or OperatorGate()  # pause and quiet (relay.pause)
        self.tracer = tracer  # spans per call when tracing is on (relay.tracing_switch)
        self.clock = clock
        self.on_reaped = on_reaped  # re-register (the housekeeper's heartbeat)
        prefetch = settings.prefetch
        limited = [r.limiter.burst for r in routes if r.limiter is not None]
        if limited and len(limited) == len(routes):
            # every app rate-limited: hold no more than a couple of seconds' worth of budget
            prefetch = min(prefetch, max(MAX_BATCH, 2 * sum(limited)))
        self.window = Window(queue, prefetch, settings.linger_s)
        self.lanes = Lanes(MAX_BATCH)
        self.fetching = False
        self.busy = 0  # greenlets in a call now
        self._idle: deque[gevent.event.Event] = deque()
        self._own_keys = itertools.count()  # a lane of its own: ordering off, unreadable items
        # Apps whose rate-limit budget a greenlet waits for now (several apps only): their next
        # calls are not formed meanwhile, so the other greenlets serve the other apps instead
        # of queueing behind the limiter.
        self._throttled: Counter[str] = Counter()

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
        """Back off from an error, and from an error met while handling it: the loop goes on.
        A backoff is a sleep only a stop cuts short: work arriving meanwhile must not wake a
        greenlet into the same failure (all of them would then spin through an outage)."""
        try:
            if isinstance(exc, WorkerReaped):
                self.on_reaped()
            elif isinstance(exc, REDIS_DOWN):
                self.metrics.redis_errors.inc()
                self.stopping.wait(self.outage.failed(exc))
            else:
                log.error("unexpected error in a pool greenlet; it goes on after a pause",
                          exc_info=exc)
                self.stopping.wait(ERROR_PAUSE_S)
        except REDIS_DOWN as again:
            self.metrics.redis_errors.inc()
            self.stopping.wait(self.outage.failed(again))
        except Exception:
            log.exception("unexpected error while recovering from %s; going on after a pause",
                          type(exc).__name__)
            self.stopping.wait(ERROR_PAUSE_S)

    def _step(self) -> None:
        """One turn: the operator's pause first; with one app, its gate (an open circuit
        stops the fetching and sends the window back to the queue, as everything must then
        wait in Redis); then fetch if it is time, form a call, pass it through its app's gate,
        carry it."""
        only = next(iter(self.routes)) if len(self.routes) == 1 else None
        probing = self._gates(only)
        if probing is None:
            return
        if self._should_fetch(probing):
            self._fetch(1 if probing else self.window.room, may_block=not self.lanes.ready)
        call = self.lanes.next_call(1 if probing else None, self._throttled)
        if not call:
            if probing and only is not None:
                only.circuit.abandon_probe()
            if not self._should_fetch(probing):
                self._wait(self._idle_for())
            return
        route = self.routes.get(call[0].group)
        if route is not None:
            if only is None:
                probing = self._app_gate(route, call)
                if probing is None:
                    return
            call = self._trim(call, 1 if probing else route.batch)
        self._carry(call, probing, route)

    def _app_gate(self, route: Route, call: list[Entry]) -> bool | None:
        """One app's gate of several: None when it holds (the call was set aside), else
        whether this greenlet is to probe its open circuit."""
        hold_s = route.circuit.wait_s()
        if hold_s > 0:
            self._set_aside(route, call, hold_s)
            return None
        return route.circuit.is_open

    def _trim(self, call: list[Entry], keep: int) -> list[Entry]:
        """A probe takes one; a small rate-limit burst fewer than a batch: the rest waits."""
        if len(call) > keep:
            self.lanes.unsend(call[keep:])
            return call[:keep]
        return call

    def _gates(self, only: Route | None) -> bool | None:
        """None while a gate holds (this greenlet waited a little), else whether this
        greenlet is to probe the one app's open circuit."""
        if self.operator.holding:  # paused: the operator gate wakes everybody at resume
            self._put_back_idle()
            self._wait(IDLE_RECHECK_S)
            return None
        return False if only is None else self._only_gate(only)

    def _only_gate(self, only: Route) -> bool | None:
        """The one app's gate: None while it holds (this greenlet waited a little), else
        whether this greenlet is to probe the open circuit."""
        hold_s = only.circuit.wait_s()
        if hold_s > 0:
            if only.circuit.is_open:
                self._put_back_idle()
            self._wait(min(hold_s, RECHECK_S))
            return None
        return only.circuit.is_open  # wait_s made this greenlet the probe

    def _set_aside(self, route: Route, call: list[Entry], hold_s: float) -> None:
        """One app of several is held (its circuit open, or a 429 pause): its calls and what
        of it waits in the lanes go to the retry set until the gate may open again, with no
        attempt counted, so the window stays free for the other apps."""
        entries = [*call, *self.lanes.take_group(route.name)]
        why = f"app {route.name} held: {route.circuit.reason or 'paused by a 429'}"
        # What can never be sent (unreadable, an unknown app: grouped with `default`) is
        # dead-lettered now; set aside, it would come straight back from the queue.
        fates: list[Fated] = [
            (e.raw, e.item, Later(hold_s, why) if isinstance(e.item, Notification)
             else DeadLetter("invalid", str(e.item), 0), e.extra) for e in entries]
        self._settle_or_forget(entries, fates, route)

    # -- the window ------------------------------------------------------------------------------

    def _should_fetch(self, probing: bool) -> bool:
        if self.fetching or self.window.closed or self.stopping.is_set() or \
                not self.operator.may_fetch:
            return False
        window = self.window
        room = window.room
        if probing:
            return room > 0 and not self.lanes.ready
        if time.monotonic() < window.idle_until and not window.unpark:
            return False  # the last fetch could move nothing: look again soon, not in a loop
        if not self.lanes.ready:
            return room > 0
        return room >= REFILL_AT and (window.backlog or window.unpark)

    def _idle_for(self) -> float:
        """How long a greenlet with nothing to do waits unless woken: until the fetch may look
        again (parked items, a fetch that found nothing to move), else the safety net."""
        if self.window.parked:
            return SHORT_BLOCK_S
        return min(IDLE_RECHECK_S, max(0.0, self.window.idle_until - time.monotonic()) or
                   IDLE_RECHECK_S)

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
            note = parse(raw, self.settings.event, self.routes.apps.limits_for)
        except InvalidMessage as exc:  # an unknown app too: dead-lettered, naming the known
            entry = Entry(raw, exc, (self._own_key(),), alone=True, group=DEFAULT)
        else:
            entry = Entry(raw, note, keys or (self._own_key(),), alone=goes_alone(note),
                          group=note.app or DEFAULT)
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

    def _carry(self, call: list[Entry], probing: bool, route: Route | None) -> None:
        """route: the app the call goes to; None when that app is gone (a reload removed
        it) or the call holds only what cannot be sent."""
        self.busy += 1
        if route is not None:
            route.calls += 1
        try:
            try:
                fates = self._fates(call, probing, route)
            except Exception:
                log.exception("unexpected error while sending a call; its notifications go "
                              "back to the queue")
                fates = [(e.raw, e.item, PutBack(), e.extra) for e in call]
            if not any(isinstance(fate, PutBack) for _, _, fate, _ in fates):
                # The answers are in: the lanes' next calls go while this one is persisted
                # (a put back keeps them, as what waits behind it goes back with it).
                self._notify(self.lanes.finish(call))
            self._settle_or_forget(call, fates, route)
        finally:
            self.busy -= 1
            if route is not None:
                route.calls -= 1
                if probing and route.circuit.probing:
                    route.circuit.abandon_probe()  # no verdict (nothing sent, a 429)
                route.close_if_idle()
            if any(e.called for e in call):  # killed (a shutdown): the release returns them
                self.lanes.finish(call)

    def _fates(self, call: Sequence[Entry], probing: bool, route: Route | None
               ) -> list[Fated]:
        """Decide, send what may go, tell the circuit once: every entry's fate."""
        now = self.clock()
        gate = Gate(holding=route is not None and not probing and route.circuit.holding())
        decided: dict[int, Fate] = {}
        to_send: list[Entry] = []
        for entry in call:
            fate = decide(entry.item, UNSENT, gate, now, self.settings.policy)
            if isinstance(fate, Send):
                to_send.append(entry)
            else:
                decided[id(entry)] = fate
                if isinstance(entry.item, InvalidMessage):
                    self.tracer.invalid(entry.raw, str(entry.item))
        if to_send and route is None:  # its app was removed by a reload meanwhile
            known = self.routes.apps.by_name
            decided.update({id(e): DeadLetter("invalid", str(UnknownApp(e.group, known)), 0)
                            for e in to_send})
        elif to_send:
            decided.update(self._send(to_send, probing, gate, route))
        return [(e.raw, e.item, decided[id(e)], e.extra) for e in call]

    def _send(self, entries: Sequence[Entry], probing: bool, gate: Gate, route: Route
              ) -> dict[int, Fate]:
        notes: list[Notification] = [e.item for e in entries]
        cost = sum(n.cost for n in notes)
        if not self._budget(route, cost) or self.stopping.is_set() or self.operator.holding or (
                not probing and route.circuit.holding()):
            # The stop came, or a gate closed, while this call waited for budget.
            self._refund(route, cost)
            return {id(e): PutBack() for e in entries}
        policy = self.settings.policy
        fates: dict[int, Fate] = {}
        with self.tracer.call(notes) as trace:
            answers = route.delivery.send(notes, trace)
            now = self.clock()
            self._tell_circuit(route, verdict(notes, answers, route.last_success_at, now))
            for entry, answer in zip(entries, answers, strict=True):
                note = entry.item
                fate = decide(note, DELIVERED if answer is None else answer, gate, now, policy)
                if isinstance(fate, RetryLater):  # its next attempts join the first's trace
                    fate = replace(fate, first_traceparent=trace.retry_traceparent(note))
                trace.settled(note, fate, now, answer)
                fates[id(entry)] = fate
        return fates

    def _budget(self, route: Route, cost: int) -> bool:
        """The app's shared rate limit: budget for exactly what this call sends (waits)."""
        if route.limiter is None:
            return True
        if len(self.routes) == 1:  # nothing else to do meanwhile: every greenlet may wait
            return route.limiter.take_all(cost, self.stopping.is_set) >= cost
        self._throttled[route.name] += 1
        try:
            return route.limiter.take_all(cost, self.stopping.is_set) >= cost
        finally:
            self._throttled[route.name] -= 1
            if not self._throttled[route.name]:
                del self._throttled[route.name]
            self._notify(1)  # the app's next call may be formed again

    def _refund(self, route: Route, cost: int) -> None:
        if route.limiter is None:
            return
        try:
            route.limiter.refund(cost)
        except REDIS_ERRORS as exc:  # budget bookkeeping: never worth a notification
            log.warning("could not give back %d unused rate-limit events%s (%s)", cost,
                        route.where, type(exc).__name__)

    def _settle_or_forget(self, entries: Sequence[Entry], fates: list[Fated],
                          route: Route | None = None) -> None:
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
            settled = self.settler.settle(fates, route.name if route is not None else DEFAULT)
            self.window.backlog = settled.length > 0
            if settled.parked:  # what this call freed may let parked ones in: fetch soon
                self.window.unpark = True
                self._notify(1)
        except Exception:
            self.window.resync = True
            raise
        finally:
            self.window.forget([e.raw for e in entries])
            self.metrics.inflight.set(self.window.held)
            called = [e for e in entries if e.called]
            if called:
                self._notify(self.lanes.finish(called))

    def _tell_circuit(self, route: Route, news: Verdict) -> None:
        circuit = route.circuit
        was_open = circuit.is_open
        if news.pause_s:  # Retry-After: 0 means no pause at all
            circuit.pause(news.pause_s, news.pause_why)
        if news.systemic is not None:
            circuit.systemic(news.systemic)
        elif news.delivered:
            route.last_success_at = self.clock()
            circuit.succeeded()
        elif news.transient is not None:
            circuit.transient(news.transient)
        if was_open != circuit.is_open:  # the gauge now, not at the next housekeeping round
            self.metrics.circuit_open.labels(route.name).set(int(circuit.is_open))
        if was_open and not circuit.is_open:
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

