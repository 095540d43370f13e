"""relay.turns: rounds of requests served in the order they came, and every way out of one."""

from __future__ import annotations

from collections.abc import Callable

import gevent
import gevent.event

from relay.turns import RoundLost, Turns


def settle() -> None:
    for _ in range(3):
        gevent.idle()
        gevent.sleep(0)


class Server:
    """serve() for Turns: records each round; a round may be held open or made to fail."""

    def __init__(self) -> None:
        self.rounds: list[list[str]] = []
        self.hold: gevent.event.Event | None = None  # the next round waits for it
        self.fail: dict[str, Exception] = {}  # the round this request leads raises it
        self.dropped: list[str] = []
        # run inside the call of the round that request leads, once it is let through
        self.during: dict[str, Callable[[], object]] = {}

    def serve(self, requests: list[str]) -> list[str]:
        self.rounds.append(list(requests))
        if self.hold is not None:
            hold, self.hold = self.hold, None
            hold.wait()
        if requests[0] in self.during:
            self.during.pop(requests[0])()
        if requests[0] in self.fail:
            raise self.fail.pop(requests[0])
        return [f"got {r}" for r in requests]

    def turns(self, most: int = 20) -> Turns[str, str]:
        return Turns(self.serve, alone=lambda r: r.startswith("alone"),
                     drop=self.dropped.append, most=most)


def held_round(server: Server, turns: Turns[str, str], first: str, behind: list[str]
               ) -> tuple[gevent.event.Event, gevent.Greenlet, list[gevent.Greenlet]]:
    """A round led by `first`, held open until the returned event is set, and greenlets
    queued behind it (in this order) for the next rounds."""
    gate = server.hold = gevent.event.Event()
    lead = gevent.spawn(turns.take_turn, first)
    settle()
    queued = [gevent.spawn(turns.take_turn, name) for name in behind]
    settle()
    return gate, lead, queued


def test_a_lone_request_is_served_at_once_by_its_own_greenlet() -> None:
    server = Server()
    turns = server.turns()
    assert turns.take_turn("a") == "got a"
    assert server.rounds == [["a"]] and turns.waiting == 0


def test_requests_that_queue_during_a_round_share_the_next_one_in_arrival_order() -> None:
    server = Server()
    turns = server.turns()
    gate, first, later = held_round(server, turns, "a", ["b", "c", "d"])
    assert turns.waiting == 3 and server.rounds == [["a"]]
    gate.set()
    assert [g.get(timeout=5) for g in (first, *later)] == ["got a", "got b", "got c", "got d"]
    assert server.rounds == [["a"], ["b", "c", "d"]]


def test_a_greedy_leader_coming_straight_back_queues_behind_the_others() -> None:
    """The leader loops back without yielding: the waiters' round still comes first."""
    server = Server()
    turns = server.turns()
    gate = server.hold = gevent.event.Event()
    order: list[str] = []

    def greedy() -> None:
        for i in range(3):
            order.append(turns.take_turn(f"greedy{i}"))

    g = gevent.spawn(greedy)
    settle()
    polite = [gevent.spawn(lambda n=n: order.append(turns.take_turn(n))) for n in ("p1", "p2")]
    settle()
    gate.set()
    gevent.joinall([g, *polite], timeout=5, raise_error=True)
    assert server.rounds == [["greedy0"], ["p1", "p2", "greedy1"], ["greedy2"]]
    assert order == ["got greedy0", "got p1", "got p2", "got greedy1", "got greedy2"]


def test_a_request_that_must_go_alone_is_a_round_of_its_own_and_rounds_are_capped() -> None:
    server = Server()
    turns = server.turns(most=2)
    names = ["first", "a", "b", "c", "alone1", "d", "alone2", "alone3"]
    gate, first, queued = held_round(server, turns, names[0], names[1:])
    greenlets = [first, *queued]
    gate.set()
    assert [g.get(timeout=5) for g in greenlets] == [f"got {n}" for n in names]
    assert server.rounds == [["first"], ["a", "b"], ["c"], ["alone1"], ["d"], ["alone2"],
                             ["alone3"]]


def test_a_failed_round_fails_each_of_its_requests_and_the_next_round_goes_on() -> None:
    server = Server()
    turns = server.turns()
    gate, first, round2 = held_round(server, turns, "a", ["b", "c"])
    server.fail["b"] = ConnectionError("redis went away")
    gate.set()
    assert first.get(timeout=5) == "got a"
    gevent.joinall(round2, timeout=5)
    assert all(isinstance(g.exception, ConnectionError) for g in round2)
    assert turns.take_turn("d") == "got d"  # free again
    assert server.dropped == []


def test_a_waiter_killed_in_the_queue_leaves_it() -> None:
    server = Server()
    turns = server.turns()
    gate, first, (doomed, after) = held_round(server, turns, "a", ["doomed", "b"])
    doomed.kill()
    gate.set()
    assert first.get(timeout=5) == "got a" and after.get(timeout=5) == "got b"
    assert server.rounds == [["a"], ["b"]] and server.dropped == []


def test_a_waiter_killed_once_served_gives_its_result_up() -> None:
    """Its result came (a ticket in the lanes) but it never ran again: drop() frees it."""
    server = Server()
    turns = server.turns()
    gate, first, (leader, doomed) = held_round(server, turns, "a", ["b", "doomed"])
    # The kill is scheduled inside round 2's call, so it lands after "doomed" is served and
    # before it wakes up.
    server.during["b"] = lambda: doomed.kill(block=False)
    gate.set()
    assert first.get(timeout=5) == "got a" and leader.get(timeout=5) == "got b"
    doomed.join(timeout=5)
    assert server.rounds == [["a"], ["b", "doomed"]]
    assert doomed.successful() and doomed.value is not None  # GreenletExit counts as success
    assert server.dropped == ["got doomed"]


def test_a_waiter_handed_the_lead_and_killed_passes_it_on() -> None:
    server = Server()
    turns = server.turns()
    gate, first, (doomed, after) = held_round(server, turns, "a", ["alone-doomed", "b"])
    server.during["a"] = lambda: doomed.kill(block=False)  # lands before it takes the lead
    gate.set()
    assert first.get(timeout=5) == "got a"
    assert after.get(timeout=5) == "got b"
    assert server.rounds == [["a"], ["b"]] and turns.waiting == 0 and server.dropped == []


def test_a_leader_killed_mid_round_fails_the_others_with_round_lost() -> None:
    server = Server()
    turns = server.turns()
    gate, first, (leader, other) = held_round(server, turns, "a", ["b", "c"])
    server.hold = gevent.event.Event()  # round 2 hangs until its leader is killed
    gate.set()
    assert first.get(timeout=5) == "got a"
    settle()
    assert server.rounds == [["a"], ["b", "c"]]
    later = gevent.spawn(turns.take_turn, "d")
    settle()
    leader.kill()
    other.join(timeout=5)
    assert isinstance(other.exception, RoundLost)
    assert later.get(timeout=5) == "got d"  # the lead passed on
    assert server.rounds == [["a"], ["b", "c"], ["d"]] and turns.waiting == 0
