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
        pass
    assert t._event is None  # noqa: SLF001 - the cheap path is the point


# -- the model check: every interleaving of a few tickets ---------------------------------------

CHANNEL_SETS = (("a",), ("b",), ("a", "b"))


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


def test_every_interleaving_of_four_tickets() -> None:
    count = 0
    for sets in itertools.product(CHANNEL_SETS, repeat=4):
        for sends in itertools.product((True, False), repeat=4):
            tickets = list(zip(sets, sends, strict=True))
            for order in schedules(tickets):
                run_schedule(tickets, order)
                count += 1
    assert count > 60_000  # the product really was walked


@pytest.mark.parametrize("seed", range(200))
def test_random_long_schedules(seed: int) -> None:
    """Longer runs: random channels over four names, a fifth of the calls put back unsent."""
    rng = random.Random(seed)
    book = OrderBook()
    open_tickets: list[tuple[int, Ticket, bool]] = []
    history: list[Ticket] = []
    for step in range(60):
        if rng.random() < 0.5 or not open_tickets:
            channels = rng.sample("abcd", rng.choice((1, 1, 1, 2, 3)))
            ticket = book.take(channels)
            history.append(ticket)
            open_tickets.append((step, ticket, rng.random() > 0.2))
            continue
        ready = [(s, t, sends) for s, t, sends in open_tickets if not sends or not t.blockers()]
        assert ready, "no ticket can move: a deadlock"
        entry = rng.choice(ready)
        _, ticket, sends = entry
        if sends:
            mine = history.index(ticket)
            for earlier in history[:mine]:
                if set(earlier.channels) & set(ticket.channels):
                    assert earlier.done
        book.release(ticket)
        open_tickets.remove(entry)
    for _, ticket, _ in open_tickets:
        book.release(ticket)
    assert book.channels_held == 0
