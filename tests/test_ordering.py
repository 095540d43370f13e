"""relay.ordering: the per-channel lanes over the interleavings that matter, with greenlets.

A "batch" is what one worker greenlet took: it takes its ticket, then sends in its lanes'
turn through a Sender that records every call (and can hold a call until told to answer).
"""

from __future__ import annotations

import random

import gevent
import gevent.event
import pytest

from relay.ordering import NOT_SENT, OrderBook, Ticket
from relay.turns import Turns


class Note:
    def __init__(self, name: str, *channels: str, attempts: int = 0) -> None:
        self.name, self.channels, self.attempts = name, channels, attempts

    def __repr__(self) -> str:
        return self.name


class Sender:
    """Records each call (the names it carried, and whether it was a probe's); a name in
    `hold` makes its call wait until that event is set; a name in `fail` answers 'failed'."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.probes: list[bool] = []
        self.hold: dict[str, gevent.event.Event] = {}
        self.fail: set[str] = set()

    def __call__(self, notes: list[Note], probing: bool) -> list[str]:
        names = [n.name for n in notes]
        self.calls.append(names)
        self.probes.append(probing)
        for name in names:
            if name in self.hold:
                self.hold[name].wait()
        return [f"failed {n}" if n in self.fail else f"ok {n}" for n in names]


def batch(book: OrderBook, sender: Sender, notes: list[Note], send: list[Note] | None = None,
          probing: bool = False) -> gevent.Greenlet:
    """A worker greenlet's batch: take in turn, send `send` (default: all) in the lanes' turn,
    release however it ends."""
    ticket = book.take(notes)

    def run() -> list[object]:
        try:
            return book.send_in_turn(ticket, notes if send is None else send, sender, probing)
        finally:
            book.release(ticket)

    return gevent.spawn(run)


def settle() -> None:
    for _ in range(3):
        gevent.idle()
        gevent.sleep(0)


def test_a_lone_notification_goes_at_once_and_costs_no_event() -> None:
    book, sender = OrderBook(), Sender()
    ticket = book.take([Note("a0", "a")])
    assert book.send_in_turn(ticket, ticket_notes := [e.note for e in ticket.entries],
                             sender) == ["ok a0"]
    assert ticket_notes[0].name == "a0"
    assert ticket._event is None  # it never waited: the cheap path is the point
    assert sender.calls == [["a0"]] and book.channels_held == 0


def test_same_channel_waits_for_the_earlier_call_other_channels_do_not() -> None:
    book, sender = OrderBook(), Sender()
    sender.hold["a0"] = gevent.event.Event()
    first = batch(book, sender, [Note("a0", "a")])
    settle()
    second = batch(book, sender, [Note("a1", "a"), Note("b1", "b")])
    settle()
    assert sender.calls == [["a0"], ["b1"]]  # b did not wait for a; a1 did
    sender.hold["a0"].set()
    assert second.get(timeout=5) == ["ok a1", "ok b1"]
    assert sender.calls == [["a0"], ["b1"], ["a1"]]
    first.get(timeout=5)
    assert book.channels_held == 0


def test_a_lane_goes_as_full_batches_whoever_took_them() -> None:
    """Three batches, each a slice of channels a and b, behind a held call on each: once
    answered, each lane goes as one call carrying every batch's notes of that lane."""
    book, sender = OrderBook(), Sender()
    for name in ("a0", "b0"):
        sender.hold[name] = gevent.event.Event()
    batch(book, sender, [Note("a0", "a")])
    batch(book, sender, [Note("b0", "b")])
    settle()
    later = [batch(book, sender, [Note(f"a{i}", "a"), Note(f"b{i}", "b")]) for i in (1, 2, 3)]
    settle()
    assert sender.calls == [["a0"], ["b0"]]
    sender.hold["a0"].set()
    settle()
    assert sender.calls[2] == ["a1", "a2", "a3"]
    sender.hold["b0"].set()
    results = [g.get(timeout=5) for g in later]
    assert sender.calls[3] == ["b1", "b2", "b3"]
    assert results == [[f"ok a{i}", f"ok b{i}"] for i in (1, 2, 3)]
    assert book.channels_held == 0


def test_a_call_carries_at_most_a_batch_and_the_lane_keeps_its_order() -> None:
    book, sender = OrderBook(batch=10), Sender()
    sender.hold["x"] = gevent.event.Event()
    batch(book, sender, [Note("x", "a")])
    settle()
    backlog = [batch(book, sender, [Note(f"a{i}", "a") for i in range(j, j + 5)])
               for j in range(0, 25, 5)]
    settle()
    sender.hold["x"].set()
    gevent.joinall(backlog, timeout=5, raise_error=True)
    assert sender.calls[1:] == [[f"a{i}" for i in range(s, min(s + 10, 25))]
                                for s in (0, 10, 20)]


def test_free_lanes_fill_one_call_together() -> None:
    """Many channels, none busy: one batch is one call, as without ordering."""
    book, sender = OrderBook(), Sender()
    g = batch(book, sender, [Note(f"n{i}", f"c{i}") for i in range(10)])
    g.get(timeout=5)
    assert sender.calls == [[f"n{i}" for i in range(10)]]


def test_an_envelope_waits_for_the_front_of_each_lane_and_holds_each() -> None:
    book, sender = OrderBook(), Sender()
    sender.hold["b0"] = gevent.event.Event()
    batch(book, sender, [Note("b0", "b")])
    settle()
    g = batch(book, sender, [Note("a1", "a"), Note("ab", "a", "b"), Note("a2", "a"),
                             Note("c3", "c")])
    settle()
    # a1 and c3 go; the envelope waits for b; a2 may not pass the envelope on lane a
    assert sender.calls == [["b0"], ["a1", "c3"]]
    sender.hold["b0"].set()
    assert g.get(timeout=5) == ["ok a1", "ok ab", "ok a2", "ok c3"]
    assert sender.calls[2:] == [["ab"], ["a2"]]
    assert book.channels_held == 0


def test_what_goes_alone_gets_a_call_of_its_own() -> None:
    """A call is one HTTP request: an envelope or a retry never rides in a batch (Delivery
    would send it apart, and the batch's lanes would wait for both requests)."""
    book = OrderBook(alone=lambda n: len(n.channels) > 1 or n.attempts > 0)
    sender = Sender()
    batch(book, sender, [Note("a0", "a"), Note("r1", "b", attempts=1), Note("c2", "c"),
                         Note("ab", "a", "b")]).get(timeout=5)
    assert sender.calls == [["a0", "c2"], ["r1"], ["ab"]]


def test_a_failed_call_frees_its_lane_no_head_of_line_blocking() -> None:
    book, sender = OrderBook(), Sender()
    sender.fail.add("a0")
    sender.hold["a0"] = gevent.event.Event()
    first = batch(book, sender, [Note("a0", "a")])
    settle()
    later = batch(book, sender, [Note("a1", "a")])
    settle()
    sender.hold["a0"].set()
    assert first.get(timeout=5) == ["failed a0"]  # its greenlet sends it to the retry set
    assert later.get(timeout=5) == ["ok a1"]


def test_what_is_not_sent_leaves_its_lanes_at_once() -> None:
    """A batch sends only some of what it took (the rest was shed, invalid, or put back):
    those never hold up what was taken after them."""
    book, sender = OrderBook(), Sender()
    sender.hold["b0"] = gevent.event.Event()
    shed, kept = Note("a0", "a"), Note("b0", "b")
    first = batch(book, sender, [shed, kept], send=[kept])
    settle()
    later = batch(book, sender, [Note("a1", "a")])
    assert later.get(timeout=5) == ["ok a1"]  # a0 was never sent and is not waited for
    sender.hold["b0"].set()
    assert first.get(timeout=5) == ["ok b0"]
    assert book.channels_held == 0


def test_a_probe_is_marked_on_its_call() -> None:
    book, sender = OrderBook(), Sender()
    batch(book, sender, [Note("p", "a")], probing=True).get(timeout=5)
    batch(book, sender, [Note("q", "a")]).get(timeout=5)
    assert sender.probes == [True, False]


def test_a_sender_killed_mid_call_answers_not_sent_and_frees_the_lanes() -> None:
    book, sender = OrderBook(), Sender()
    sender.hold["a1"] = gevent.event.Event()
    blocker = gevent.event.Event()
    sender.hold["a0"] = blocker
    first = batch(book, sender, [Note("a0", "a")])
    settle()
    waiting = batch(book, sender, [Note("a1", "a")])
    settle()
    blocker.set()
    settle()  # `first` got its answer and left; `waiting` now sends a1 itself and is held
    assert sender.calls == [["a0"], ["a1"]]
    waiting.kill()  # shutdown cut it off mid-call
    assert first.get(timeout=5) == ["ok a0"]
    after = batch(book, sender, [Note("a2", "a")])
    assert after.get(timeout=5) == ["ok a2"]
    assert book.channels_held == 0


def test_a_sender_killed_carrying_another_batch_answers_that_batch_not_sent() -> None:
    book, sender = OrderBook(), Sender()
    sender.hold["a0"] = gevent.event.Event()
    sender.hold["a1"] = gevent.event.Event()
    first = batch(book, sender, [Note("a0", "a")])
    settle()
    second = batch(book, sender, [Note("a1", "a")])
    settle()
    # a0 answered: `first` is done; a1's call is sent by whichever greenlet runs first
    sender.hold["a0"].set()
    settle()
    assert sender.calls == [["a0"], ["a1"]]
    if not first.ready():
        first.kill()  # `first` carries a1 for `second`
        assert second.get(timeout=5) == [NOT_SENT]
    else:
        second.kill()
    assert book.channels_held == 0


def test_a_waiter_killed_before_its_turn_lets_the_next_go_in_order() -> None:
    book, sender = OrderBook(), Sender()
    sender.hold["a0"] = gevent.event.Event()
    holder = batch(book, sender, [Note("a0", "a")])
    killed = batch(book, sender, [Note("a1", "a")])
    last = batch(book, sender, [Note("a2", "a")])
    settle()
    killed.kill()
    settle()
    assert sender.calls == [["a0"]]  # a2 still waits for a0, through the killed one
    sender.hold["a0"].set()
    assert last.get(timeout=5) == ["ok a2"]
    holder.get(timeout=5)
    assert sender.calls == [["a0"], ["a2"]]
    assert book.channels_held == 0


# -- the property: random batches, delays, failures, kills --------------------------------------


@pytest.mark.parametrize("seed", range(60))
def test_random_runs_keep_every_lane_in_taking_order_and_end(seed: int) -> None:
    """Random batches over four channels (some envelopes), some notes not sent, random call
    delays and a few greenlets killed: every call reaches the sender in each channel's
    taking order, nothing waits forever, and the lanes end empty."""
    rng = random.Random(seed)
    book = OrderBook(batch=4)
    taken: list[Note] = []
    arrived: list[Note] = []

    def send(notes: list[Note], probing: bool) -> list[str]:
        gevent.sleep(rng.choice((0, 0, 0.001, 0.003)))
        arrived.extend(notes)
        return ["ok"] * len(notes)

    def fetch_round(requests: list[list[Note]]) -> list[Ticket]:
        gevent.sleep(0)  # a fetch: others queue up meanwhile
        tickets = []
        for notes in requests:
            taken.extend(notes)
            tickets.append(book.take(notes))
        return tickets

    turns = Turns(fetch_round, alone=lambda notes: len(notes) == 6, drop=book.release, most=3)

    def one_batch() -> None:
        notes = [Note(f"n{len(taken) + i}", *rng.sample("abcd", rng.choice((1, 1, 1, 2))))
                 for i in range(rng.randint(1, 6))]
        ticket = turns.take_turn(notes)
        chosen = [n for n in notes if rng.random() < 0.9]
        try:
            gevent.sleep(rng.choice((0, 0, 0.001)))
            book.send_in_turn(ticket, chosen, send)
        finally:
            book.release(ticket)

    greenlets = [gevent.spawn_later(rng.random() * 0.02, one_batch) for _ in range(40)]
    gevent.sleep(0.01)
    for g in rng.sample(greenlets, 3):
        g.kill(block=False)
    gevent.joinall(greenlets, timeout=20)
    assert all(g.ready() for g in greenlets), "a greenlet waits forever"
    position = {id(n): i for i, n in enumerate(taken)}
    for channel in "abcd":
        seen = [position[id(n)] for n in arrived if channel in n.channels]
        assert seen == sorted(seen), f"channel {channel} out of taking order"
    assert len({id(n) for n in arrived}) == len(arrived), "a note was sent twice"
    assert book.channels_held == 0
