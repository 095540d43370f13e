"""The worker process: a pool of greenlets, its lifecycle, and its shutdown.

1. Each of RELAY_POOL_SIZE greenlets holds a Lease on its own in-flight list and loops:
   wait for the gate (circuit, 429 pause, rate limit) -> fetch up to a batch -> parse ->
   send -> carry out each notification's fate, which relay.fate.decide chooses.
   With RELAY_CHANNEL_ORDER (the default), fetching and parsing happen in turn, a round of
   greenlets per Redis round trip (relay.turns), and end with a ticket (a place in each
   channel's lane); the send goes in the lanes' turn, in calls any waiting greenlet may
   carry (relay.ordering).
2. Housekeeping (heartbeat, due retries, reaping, trimming, the summary) runs beside them
   (relay.housekeeping); with `--burst` a watcher ends the run once nothing is left.
3. SIGTERM/SIGINT: gevent runs `stop` in a greenlet (never inside the signal handler), which
   logs once and sets a flag. Then: stop fetching -> wait up to PUSHER_TIMEOUT + 1 s for
   in-flight calls -> kill what is left -> return every in-flight item to the queue -> exit 0.
   It is worse to lose a notification than to send it twice.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import redis
from redis.exceptions import NoPermissionError

from relay import redis_url
from relay.carrier import Carrier, Item
from relay.circuit import Circuit
from relay.config import Config
from relay.connect import disconnect_all
from relay.delivery import MAX_BATCH, Delivery, Failure, goes_alone
from relay.fate import (
    DELIVERED,
    UNSENT,
    Fate,
    Gate,
    Policy,
    Send,
    Verdict,
    decide,
    verdict,
)
from relay.history import Tally
from relay.housekeeping import MAINTENANCE_S, Housekeeper
from relay.lease import Lease
from relay.message import InvalidMessage, Notification, parse
from relay.metrics import Metrics
from relay.ordering import NOT_SENT, OrderBook, Ticket
from relay.queue import RedisQueue, WorkerReaped
from relay.ratelimit import RateLimiter
from relay.redis_shared import BLOCK_S, REDIS_DOWN, REDIS_ERRORS
from relay.retry import Outage
from relay.turns import Turns

log = logging.getLogger(__name__)

# An answer meaning: not sent (the gate closed while it waited for its turn, or the greenlet
# sending its channel's call was killed): it goes back untouched.
HELD = NOT_SENT

SHUTDOWN_GRACE_S = 1.0
# While the circuit is open or paused, a greenlet looks again this often (another one's
# probe may have closed it meanwhile).
GATE_RECHECK_S = 1.0
# At most this many greenlets' fetches share one round trip (relay.turns): 200 items a script.
ROUND_MOST = 20


@dataclass
class Want:
    """A greenlet's request to fetch (relay.turns): how many, and whether a backlog is seen."""

    lease: Lease
    budget: int
    backlog: bool

    def alone(self) -> bool:
        """Nothing in view: this fetch may block in the pop, so it is a round of its own."""
        return not (self.lease.eager or self.backlog)


@dataclass
class Taken:
    """What a greenlet fetched, parsed, and its place in the lanes (with ordering)."""

    items: list[bytes]
    parsed: list[Item]
    ticket: Ticket[Notification] | None


class Worker:
    def __init__(self, config: Config, queue: RedisQueue, delivery: Delivery,
                 metrics: Metrics, clock: Callable[[], float] = time.time,
                 burst: bool = False, tally: Tally | None = None) -> None:
        self.config = config
        # The dashboard's figures without a settle step of their own (Pusher calls, latency);
        # they ride on the next settle script (see history.py). cli feeds it Delivery's calls.
        self.tally = tally or Tally()
        self.queue = queue
        self.delivery = delivery
        self.metrics = metrics
        self.clock = clock
        self.burst = burst
        self.circuit = Circuit()
        self.order: OrderBook[Notification] | None = None
        self.turns: Turns[Want, Taken] | None = None
        if config.channel_order:
            self.order = OrderBook(MAX_BATCH, goes_alone)
            self.turns = Turns(self._fetch_round, Want.alone, self._drop, ROUND_MOST)
        self.redis_outage = Outage("Redis",
                                   where=f" at REDIS_URL={redis_url.mask(config.redis_url)}")
        self.stopping = gevent.event.Event()
        self.pool = gevent.pool.Pool(config.pool_size)
        self.services: list[gevent.Greenlet] = []
        self.policy = Policy(config.max_attempts, config.retry_for, config.max_age)
        self.last_success_at: float | None = None  # wall clock, for fate.is_suspect
        self.batch = MAX_BATCH
        self.limiter: RateLimiter | None = None
        if config.rate_limit > 0:
            self.limiter = RateLimiter(queue.client, queue.keys.ratelimit, config.rate_limit,
                                       config.rate_burst, sleep=gevent.sleep,
                                       lock=gevent.lock.Semaphore(),
                                       on_wait=metrics.rate_waits.inc)
            self.batch = min(MAX_BATCH, self.limiter.burst)
        self.inflight = 0
        self.busy = 0  # greenlets handling a batch now
        self.housekeeper = Housekeeper(config, queue, metrics, self.redis_outage,
                                       circuit_open=lambda: self.circuit.is_open,
                                       inflight=lambda: self.inflight, report=self.report)
        self.carrier = Carrier(config, queue.worker_id, metrics,
                               self.housekeeper.stale_shedding, clock, tally=self.tally)
        metrics.pool_size.set(config.pool_size)

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until asked to stop (or, in burst mode, until drained); the exit status."""
        gevent.signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self.stop, "SIGINT")
        # The effective configuration first: if Redis does not answer, the operator sees
        # what relay was told to use, then the outage line with the address and the reason.
        log.info("worker %s starting%s: %s", self.queue.worker_id,
                 " (burst: exits once drained)" if self.burst else "", self.config.describe())
        if not self._register():
            return 0
        log.info("worker %s started: registered in Redis, %d greenlets serving",
                 self.queue.worker_id, self.config.pool_size)
        for slot in range(self.config.pool_size):
            lease = Lease(self.queue, slot, self.redis_outage, self.metrics.redis_errors.inc,
                          tally=self.tally)
            self.pool.spawn(self._slot_loop, lease)
        self.services = self.housekeeper.start(self.stopping)
        if self.burst:
            self.services.append(gevent.spawn(
                self.housekeeper.every, self.stopping, MAINTENANCE_S, self._end_burst))
        self.stopping.wait()
        return self.shutdown()

    def stop(self, why: str = "stop requested") -> None:
        if not self.stopping.is_set():
            log.info("%s: finishing in-flight work, then exiting", why)
            self.stopping.set()
            self.queue.pops.close()  # the blocking pop ends now, not when it times out

    def _end_burst(self) -> None:
        """Burst: stop once the queue is empty, no retry is due and nothing is in flight."""
        if self.inflight == 0 and self.queue.idle(self.config.pool_size):
            self.stop("burst: queue drained, no retry due")

    def shutdown(self) -> int:
        deadline = self.config.pusher.timeout + SHUTDOWN_GRACE_S
        if not self.pool.join(timeout=deadline):
            log.warning("in-flight calls still running after %.1f s: cutting them off", deadline)
            self.pool.kill(timeout=SHUTDOWN_GRACE_S)
        gevent.killall(self.services, timeout=SHUTDOWN_GRACE_S)
        # A greenlet killed mid-command leaves its connection half-read: start afresh.
        disconnect_all(self.queue.client)
        try:
            returned = self.queue.release(self.config.pool_size)
        except redis.RedisError as exc:
            log.error("could not return in-flight items (%s): another worker recovers them "
                      "%.0f s after the last heartbeat", type(exc).__name__,
                      self.config.heartbeat_ttl)
            return 0
        if returned:
            self.metrics.requeued.inc(returned)
        log.info("stopped; %d in-flight notification(s) returned to the queue", returned)
        return 0

    def _register(self) -> bool:
        """Wait (with backoff, quietly) until Redis answers: start order must not matter."""
        while not self.stopping.is_set():
            try:
                self.queue.probe()  # an ACL user missing a right is refused here, at start
                self.queue.heartbeat(self.config.heartbeat_ttl, self.config.pool_size,
                                     self.report())
                self.redis_outage.succeeded()
                return True
            except NoPermissionError:
                raise  # no backoff cures it: the launcher reports it and exits 2
            except REDIS_ERRORS as exc:
                self.stopping.wait(self.redis_outage.failed(exc))
        return False

    def report(self) -> dict[str, Any]:
        """What the dashboard shows of this process; rides in the heartbeat's info JSON."""
        c, now = self.circuit, self.circuit.clock()
        house = self.housekeeper
        return {"busy": self.busy, "inflight": self.inflight,
                "circuit": {"open": c.is_open, "reason": c.reason,
                            "next_probe_in_s": round(max(0.0, c.next_probe_at - now), 1)
                            if c.is_open else None},
                "paused_for_s": round(max(0.0, c.paused_until - now), 1),
                "rate_limit": {"per_s": self.config.rate_limit, "burst": self.config.rate_burst},
                "shedding": {"backlog": house.backlog_shedding.state(),
                             "max_age": house.stale_shedding.state()}}

    def health(self) -> tuple[list[str], dict[str, Any]]:
        """Problems and facts for /healthz (relay.health adds the event loop's)."""
        problems: list[str] = []
        try:
            self.queue.client.ping()
            redis_state = "ok"
        except redis.RedisError as exc:
            redis_state = f"unreachable ({type(exc).__name__})"
            problems.append("redis")
        circuit = self.circuit
        if circuit.is_open:
            problems.append("circuit")
        skew = self.delivery.clock_skew_s
        if skew is not None:  # a timestamp-expired 401 since the last success
            problems.append("clock skew: server clock offset unknown (no Date header)"
                            if math.isnan(skew) else
                            f"clock skew: server clock off by {skew:+.0f} s")
        # The same counters as /metrics and the summary line: an error inside a 200 is failed.
        calls = Metrics.total(self.metrics.calls)
        return problems, {
            "worker": self.queue.worker_id, "redis": redis_state,
            "circuit": f"open: {circuit.reason}" if circuit.is_open else "closed",
            "pusher_calls": {"total": int(calls), "failed": int(
                calls - Metrics.total(self.metrics.calls, status="2xx"))},
            "inflight": self.inflight, "stopping": self.stopping.is_set()}

    # -- the greenlets ------------------------------------------------------------------------

    def _slot_loop(self, lease: Lease) -> None:
        while not self.stopping.is_set():
            try:
                self._step(lease)
            except REDIS_DOWN as exc:
                self.metrics.redis_errors.inc()
                lease.eager = True  # a lost reply may have left items in the slot
                self.stopping.wait(self.redis_outage.failed(exc))
            except WorkerReaped:
                self.housekeeper.heartbeat()
            except Exception:
                log.exception("unexpected error in slot %d; going on after a pause", lease.slot)
                lease.eager = True  # what the slot held is picked up again
                self.stopping.wait(1.0)

    def _step(self, lease: Lease) -> None:
        wait = self.circuit.wait_s()
        if wait > 0:
            self.stopping.wait(min(wait, GATE_RECHECK_S))
            return
        probing = self.circuit.is_open
        # A probe takes one notification: if Pusher still refuses, one attempt is spent.
        budget = self._budget(1 if probing else self.batch)
        want = Want(lease, budget, self.housekeeper.backlog > 0)
        if self.turns is None:
            taken = self._fetch_round([want])[0]
        else:
            taken = self.turns.take_turn(want)  # in turn, so tickets follow Redis's order
        try:
            self._carry(lease, taken.items, taken.parsed, probing, budget, taken.ticket)
        finally:
            self._drop(taken)

    def _fetch_round(self, wants: list[Want]) -> list[Taken]:
        """Fetch, parse and take tickets for a round of greenlets (relay.turns), in order: one
        alone may block in the pop; several share one non-blocking round trip."""
        # Greenlets queued for their turn when a stop came must not fetch, one after another.
        live = [] if self.stopping.is_set() else [w for w in wants if w.budget]
        batches: list[list[bytes]] = []
        if len(wants) == 1 and live:
            batches = [live[0].lease.fetch(live[0].budget, BLOCK_S, live[0].backlog,
                                           self.config.linger)]
        elif live:
            batches = Lease.fetch_round([(w.lease, w.budget) for w in live])
        if live:
            self.redis_outage.succeeded()
        fetched = {id(w): items for w, items in zip(live, batches, strict=True)}
        taken = []
        for want in wants:
            items = fetched.get(id(want), [])
            parsed = [self._parse(raw) for raw in items]
            ticket = None
            if self.order is not None and items:
                ticket = self.order.take([n for n in parsed if isinstance(n, Notification)])
            taken.append(Taken(items, parsed, ticket))
        return taken

    def _drop(self, taken: Taken) -> None:
        """The batch is over (or its greenlet was killed before it began): free its lanes."""
        if taken.ticket is not None:
            self.order.release(taken.ticket)  # type: ignore[union-attr]

    def _carry(self, lease: Lease, items: Sequence[bytes], parsed: Sequence[Item],
               probing: bool, budget: int, ticket: Ticket | None) -> None:
        self.inflight += len(items)
        self.busy += 1
        self.metrics.inflight.inc(len(items))
        try:
            # The gate may have closed while this greenlet was blocked in its pop.
            gate = Gate(holding=not probing and self.circuit.holding())
            self._handle(lease, items, parsed, gate, budget, ticket, probing)
        finally:
            self.inflight -= len(items)
            self.busy -= 1
            self.metrics.inflight.dec(len(items))
            if probing and self.circuit.probing:
                # The probe ended without a verdict (nothing sent, a suspect, a 429, an error).
                self.circuit.abandon_probe()

    def _budget(self, want: int) -> int:
        """How many to fetch: `want`, or what the shared rate limit grants (waits for it)."""
        if self.limiter is None:
            return want
        return self.limiter.take(want, self.stopping.is_set)

    def _reconcile(self, budget: int, cost: int) -> None:
        """Settle the rate budget with what is really sent: one event per channel."""
        if self.limiter is None or cost == budget:
            return
        if cost < budget:
            self.limiter.refund(budget - cost)
        else:
            self.limiter.take_all(cost - budget, self.stopping.is_set)

    # -- one batch ---------------------------------------------------------------------------

    def _handle(self, lease: Lease, raws: Sequence[bytes], items: Sequence[Item], gate: Gate,
                budget: int, ticket: Ticket | None, probing: bool = False) -> None:
        """Decide, send what may go (in its channels' turn), then carry out every fate."""
        now = self.clock()
        fates: list[tuple[bytes, Item, Fate]] = []
        to_send: list[Notification] = []
        for raw, item in zip(raws, items, strict=True):
            fate = decide(item, UNSENT, gate, now, self.policy)
            if isinstance(fate, Send) and isinstance(item, Notification):
                to_send.append(item)
            else:
                fates.append((raw, item, fate))
        self._reconcile(budget, sum(n.cost for n in to_send))
        if to_send:
            answers = self._send(to_send, ticket, probing)
            sent = [(n, a) for n, a in zip(to_send, answers, strict=True) if a is not HELD]
            now = self.clock()
            if sent:
                self._tell_circuit(verdict([n for n, _ in sent], [a for _, a in sent],
                                           self.last_success_at, now))
            held = Gate(holding=True)
            for note, answer in zip(to_send, answers, strict=True):
                if answer is HELD:
                    fate = decide(note, UNSENT, held, now, self.policy)
                else:
                    fate = decide(note, DELIVERED if answer is None else answer, gate, now,
                                  self.policy)
                fates.append((note.raw, note, fate))
            if self.limiter is not None and len(sent) < len(to_send):
                self.limiter.refund(sum(n.cost for n in to_send) - sum(n.cost for n, _ in sent))
        self.carrier.carry_out(lease, fates)

    def _send(self, notes: list[Notification], ticket: Ticket | None, probing: bool
              ) -> Sequence[Failure | None | object]:
        """Send now, or in the notes' channels' turn (this greenlet may carry other batches'
        notes in the same calls: relay.ordering). A call whose turn came while the gate was
        closing (the circuit opened, or a 429 paused everyone, meanwhile) is not sent: HELD,
        so its notes go back untouched, as they would had they been fetched a moment later."""
        if ticket is None:
            return self.delivery.send(notes)

        def send_call(call: list[Notification], probe: bool
                      ) -> Sequence[Failure | None | object]:
            if not probe and self.circuit.holding():
                return [HELD] * len(call)
            return self.delivery.send(call)

        return self.order.send_in_turn(  # type: ignore[union-attr]
            ticket, notes, send_call, probing)

    def _parse(self, raw: bytes) -> Item:
        try:
            return parse(raw, self.config.event, self.config.limits)
        except InvalidMessage as exc:
            return exc

    def _tell_circuit(self, news: Verdict) -> None:
        if news.pause_s:  # Retry-After: 0 means no pause at all
            self.circuit.pause(news.pause_s, news.pause_why)
        if news.systemic is not None:
            self.circuit.systemic(news.systemic)
        elif news.delivered:
            self.last_success_at = self.clock()
            self.circuit.succeeded()
        elif news.transient is not None:
            self.circuit.transient(news.transient)
