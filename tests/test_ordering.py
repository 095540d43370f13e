"""relay.ordering: the per-channel rule over the interleavings that matter.

The model checks run the book without greenlets: "send" means a ticket's wait would return
now (no blockers), which is what the worker's greenlet does before it calls Pusher.
"""

from __future__ import annotations

import itertools
import random

import gevent
import gevent.event
import pytest

from relay.ordering import OrderBook, Ticket

# -- the rule, step by step ---------------------------------------------------------------------


def test_same_channel_in_consecutive_batches_waits_for_the_earlier() -> None:
    book = OrderBook()
    first, second = book.take(["a"]), book.take(["a", "a"])
    assert second.blockers() == [first]
    assert first.blockers() == []
    book.release(first)
    assert second.blockers() == []


def test_other_channels_do_not_wait() -> None:
    book = OrderBook()
    book.take(["a"])
    assert book.take(["b", "c"]).blockers() == []


def test_an_envelope_spanning_channels_waits_for_each_and_holds_each() -> None:
    book = OrderBook()
    a, b = book.take(["a"]), book.take(["b"])
    envelope = book.take(["a", "b"])
    assert set(map(id, envelope.blockers())) == {id(a), id(b)}
    later_b = book.take(["b"])
    assert later_b.blockers() == [envelope]
    book.release(b)
    assert envelope.blockers() == [a]
    assert later_b.blockers() == [envelope]  # b went first, but the envelope has not
    book.release(a)
    book.release(envelope)
    assert later_b.blockers() == []


def test_only_the_last_ticket_of_a_channel_is_waited_for() -> None:
    book = OrderBook()
    tickets = [book.take(["a"]) for _ in range(5)]
    assert [t.blockers() for t in tickets[1:]] == [[t] for t in tickets[:-1]]


def test_a_failed_call_releases_its_channel() -> None:
    """No head-of-line blocking: the retried notification comes back with a new ticket."""
    book = OrderBook()
    failed, later = book.take(["a"]), book.take(["a"])
    book.release(failed)  # sent, failed: the notification went to the retry set
    assert later.blockers() == []
    retried = book.take(["a"])  # due again, fetched again: behind what was taken meanwhile
    assert retried.blockers() == [later]


def test_put_back_before_its_turn_passes_its_wait_on() -> None:
    """Put back unsent (gate closed, stop): whoever waited for it still waits for its elders."""
    book = OrderBook()
    sending = book.take(["a"])
    put_back = book.take(["a"])
    later = book.take(["a"])
    book.release(put_back)
    assert later.blockers() == [sending]
    book.release(sending)
    assert later.blockers() == []


def test_a_probe_with_everything_else_released_goes_at_once() -> None:
    book = OrderBook()
    for t in [book.take(["a"]), book.take(["a", "b"])]:
        book.release(t)  # the circuit opened: everything was put back
    assert book.channels_held == 0
    probe = book.take(["a"])
    assert probe.blockers() == []


def test_release_is_idempotent_and_forgets_the_channel() -> None:
    book = OrderBook()
    t = book.take(["a", "b"])
    book.release(t)
    book.release(t)
    assert t.done and book.channels_held == 0


def test_release_of_an_older_ticket_keeps_the_newer_as_last() -> None:
    book = OrderBook()
    old, new = book.take(["a"]), book.take(["a"])
    book.release(old)
    assert book.channels_held == 1
    assert book.take(["a"]).blockers() == [new]


# -- with greenlets -----------------------------------------------------------------------------


class Call:
    """A greenlet that waits for its turn, 'sends' (logs), then holds until told to finish."""

    def __init__(self, book: OrderBook, name: str, channels: list[str], log: list[str]) -> None:
        self.ticket = book.take(channels)
        self.finish = gevent.event.Event()
        self.greenlet = gevent.spawn(self._run, book, name, log)

    def _run(self, book: OrderBook, name: str, log: list[str]) -> None:
        with book.held(self.ticket):
            self.ticket.wait()
            log.append(name)
            self.finish.wait()


def settle() -> None:
    gevent.idle()
    gevent.sleep(0)


def test_greenlets_send_in_taking_order_per_channel() -> None:
    book, log = OrderBook(), []
    calls = [Call(book, f"{i}{ch}", [ch], log) for i, ch in enumerate("abab")]
    settle()
    assert log == ["0a", "1b"]
    calls[1].finish.set()  # b's first is done: b's second goes; a's second still waits
    settle()
    assert log == ["0a", "1b", "3b"]
    calls[0].finish.set()
    settle()
    assert log == ["0a", "1b", "3b", "2a"]
    for c in calls:
        c.finish.set()
    gevent.joinall([c.greenlet for c in calls], timeout=5, raise_error=True)
    assert book.channels_held == 0


def test_a_killed_holder_releases_its_ticket() -> None:
    book, log = OrderBook(), []
    holder = Call(book, "holder", ["a"], log)
    waiter = Call(book, "waiter", ["a"], log)
    settle()
    holder.greenlet.kill()  # shutdown cut it off mid-call
    settle()
    assert log == ["holder", "waiter"]
    waiter.finish.set()
    waiter.greenlet.join(timeout=5)
    assert book.channels_held == 0


def test_a_waiter_killed_while_waiting_does_not_let_the_next_overtake() -> None:
    book, log = OrderBook(), []
    holder = Call(book, "holder", ["a"], log)
    killed = Call(book, "killed", ["a"], log)
    last = Call(book, "last", ["a"], log)
    settle()
    killed.greenlet.kill()
    settle()
    assert log == ["holder"]  # "last" still waits for "holder", through the killed one
    holder.finish.set()
    settle()
    assert log == ["holder", "last"]
    last.finish.set()
    last.greenlet.join(timeout=5)
    assert book.channels_held == 0


def test_waiting_costs_no_event_when_nobody_waits() -> None:
    book = OrderBook()
    t = book.take(["a"])
    with book.held(t):
        t.wait()
    assert t._event is None  # the cheap path is the point


# -- send_in_turn: a batch, channel by channel ---------------------------------------------------


class Note:
    def __init__(self, name: str, *channels: str) -> None:
        self.name, self.channels = name, channels

    def __repr__(self) -> str:
        return self.name


class Sender:
    """Records each call (the names it carried); `hold` makes calls block until released."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.hold: dict[str, gevent.event.Event] = {}

    def __call__(self, notes: list[Note]) -> list[str]:
        names = [n.name for n in notes]
        self.calls.append(names)
        for name in names:
            if name in self.hold:
                self.hold[name].wait()
        return [f"ok {n}" for n in names]


def batch(book: OrderBook, sender: Sender, notes: list[Note]) -> gevent.Greenlet:
    ticket = book.take(c for n in notes for c in n.channels)

    def run() -> list[str]:
        with book.held(ticket):
            return book.send_in_turn(ticket, notes, sender)

    return gevent.spawn(run)


def test_a_batch_sends_its_free_channels_first_and_the_rest_in_turn() -> None:
    book, sender = OrderBook(), Sender()
    sender.hold["a0"] = gevent.event.Event()
    first = batch(book, sender, [Note("a0", "a")])
    settle()
    second = batch(book, sender, [Note("a1", "a"), Note("b1", "b"), Note("c1", "c")])
    settle()
    assert sender.calls == [["a0"], ["b1", "c1"]]  # b and c did not wait for a
    third = batch(book, sender, [Note("b2", "b")])
    settle()
    assert sender.calls[-1] == ["b2"]  # b was released by the second batch already
    sender.hold["a0"].set()
    assert second.get(timeout=5) == ["ok a1", "ok b1", "ok c1"]
    assert sender.calls == [["a0"], ["b1", "c1"], ["b2"], ["a1"]]
    gevent.joinall([first, third], timeout=5, raise_error=True)
    assert book.channels_held == 0


def test_a_batch_keeps_its_own_order_behind_a_held_envelope() -> None:
    """a2 may not pass the envelope (a, b) that waits for b; c3 may."""
    book, sender = OrderBook(), Sender()
    sender.hold["b0"] = gevent.event.Event()
    batch(book, sender, [Note("b0", "b")])
    settle()
    g = batch(book, sender, [Note("a1", "a"), Note("ab", "a", "b"), Note("a2", "a"),
                             Note("c3", "c")])
    settle()
    assert sender.calls == [["b0"], ["a1", "c3"]]
    sender.hold["b0"].set()
    g.get(timeout=5)
    assert sender.calls == [["b0"], ["a1", "c3"], ["ab", "a2"]]


def test_a_failed_send_releases_the_channel_too() -> None:
    book = OrderBook()
    failing = book.take(["a"])
    with book.held(failing):
        assert book.send_in_turn(failing, [Note("x", "a")], lambda ns: ["503"]) == ["503"]
    later = book.take(["a"])
    assert later.blockers() == []


def test_a_greenlet_killed_mid_send_releases_every_channel() -> None:
    book, sender = OrderBook(), Sender()
    sender.hold["a0"] = gevent.event.Event()
    g = batch(book, sender, [Note("a0", "a"), Note("b0", "b")])
    settle()
    waiting = batch(book, sender, [Note("a1", "a")])
    settle()
    g.kill()
    assert waiting.get(timeout=5) == ["ok a1"]
    assert book.channels_held == 0


# -- the model check: every interleaving of a few tickets ---------------------------------------

CHANNEL_SETS = (("a",), ("b",), ("a", "b"), ("b", "c"))


def run_schedule(tickets: list[tuple[tuple[str, ...], bool]], order: list[tuple[str, int]]
                 ) -> None:
    """Replay takes and ends; assert that every send respects the order, and that the oldest
    unreleased ticket that is to be sent could always go (so no wait is ever stuck)."""
    book = OrderBook()
    taken: list[Ticket] = []
    for action, i in order:
        if action == "take":
            taken.append(book.take(tickets[i][0]))
            continue
        ticket, sends = taken[i], tickets[i][1]
        if sends:
            assert ticket.blockers() == [], "a send would wait: the schedule is not possible"
            for j, earlier in enumerate(taken[:i]):
                if set(earlier.channels) & set(ticket.channels):
                    assert earlier.done, f"ticket {i} sent before earlier ticket {j}"
            ticket.wait()  # returns at once
        book.release(ticket)
        unreleased = [t for t in taken if not t.done]
        if unreleased:
            assert unreleased[0].blockers() == []
    assert book.channels_held == 0


def schedules(tickets: list[tuple[tuple[str, ...], bool]]):
    """Every order of takes (in ticket order) and ends (each after its take) in which every
    send happens when its wait would return."""
    n = len(tickets)

    def extend(prefix: list[tuple[str, int]], taken: int, ended: frozenset[int]):
        if taken == n and len(ended) == n:
            yield prefix
            return
        if taken < n:
            yield from extend(prefix + [("take", taken)], taken + 1, ended)
        for i in range(taken):
            if i in ended:
                continue
            if tickets[i][1] and any(j not in ended and set(tickets[j][0]) & set(tickets[i][0])
                                     for j in range(i)):
                continue  # it would still be waiting
            yield from extend(prefix + [("end", i)], taken, ended | {i})

    yield from extend([], 0, frozenset())


def test_every_interleaving_of_three_tickets() -> None:
    count = 0
    for sets in itertools.product(CHANNEL_SETS, repeat=3):
        for sends in itertools.product((True, False), repeat=3):
            tickets = list(zip(sets, sends, strict=True))
            for order in schedules(tickets):
                run_schedule(tickets, order)
                count += 1
    assert count > 5_000  # the product really was walked


@pytest.mark.parametrize("seed", range(200))
def test_random_long_schedules_channel_by_channel(seed: int) -> None:
    """Longer runs over four channels: each step takes a ticket, sends one channel of a ticket
    whose turn on it has come, or releases a channel early (put back, killed)."""
    rng = random.Random(seed)
    book = OrderBook()
    history: list[Ticket] = []
    for _ in range(80):
        open_ = [(t, c) for t in history for c in t.channels if c in t._open]
        if rng.random() < 0.4 or not open_:
            history.append(book.take(rng.sample("abcd", rng.choice((1, 1, 2, 3)))))
            continue
        ready = [(t, c) for t, c in open_ if t.blocker(c) is None]
        assert ready, "no channel of any ticket can move: a deadlock"
        if rng.random() < 0.2:
            ticket, channel = rng.choice(open_)  # put back or killed, whatever its turn
        else:
            ticket, channel = rng.choice(ready)  # sent on this channel
            for earlier in history[:history.index(ticket)]:
                assert channel not in earlier._open, "sent before an earlier ticket"
        book.release(ticket, [channel])
    for ticket in history:
        book.release(ticket)
    assert book.channels_held == 0


# -- the fetch lock -----------------------------------------------------------------------------


def test_taking_is_handed_on_in_arrival_order_even_to_a_greedy_holder() -> None:
    """The holder loops straight back without yielding: the waiters still get their turn."""
    book, turns = OrderBook(), []

    def greedy() -> None:
        for _ in range(3):
            with book.taking():
                turns.append("greedy")
                gevent.sleep(0)  # a fetch: the others queue up meanwhile

    def polite(name: str) -> None:
        with book.taking():
            turns.append(name)

    g = [gevent.spawn(greedy), gevent.spawn(polite, "p1"), gevent.spawn(polite, "p2")]
    gevent.joinall(g, timeout=5, raise_error=True)
    assert turns == ["greedy", "p1", "p2", "greedy", "greedy"]


def test_a_waiter_killed_in_the_queue_passes_the_turn_on() -> None:
    book, turns = OrderBook(), []
    release = gevent.event.Event()

    def holder() -> None:
        with book.taking():
            release.wait()

    def waiter(name: str) -> None:
        with book.taking():
            turns.append(name)

    h = gevent.spawn(holder)
    settle()
    doomed, next_one = gevent.spawn(waiter, "doomed"), gevent.spawn(waiter, "next")
    settle()
    doomed.kill()
    release.set()
    gevent.joinall([h, next_one], timeout=5, raise_error=True)
    assert turns == ["next"]
    with book.taking():  # free again
        pass
