"""relay.lanes as a pure structure: lanes in taking order, calls from their fronts."""

from __future__ import annotations

import random

import pytest

from relay.lanes import Entry, Lanes


def e(name: str, *keys: str, alone: bool = False) -> Entry:
    """An entry named `name` (its raw bytes) in the lanes `keys`; several keys go alone."""
    return Entry(name.encode(), name, keys, alone=alone or len(keys) > 1)


def names(call: list[Entry]) -> list[str]:
    return [x.item for x in call]


def test_a_lone_entry_is_a_call_at_once() -> None:
    lanes = Lanes()
    assert lanes.add([e("a0", "a")]) == 1
    call = lanes.next_call()
    assert names(call) == ["a0"]
    assert lanes.next_call() == []
    assert lanes.finish(call) == 0
    assert len(lanes) == 0 and lanes.keys() == []


def test_free_lanes_fill_one_call_together() -> None:
    """Many channels, none busy: up to a batch of their fronts goes in one call."""
    lanes = Lanes(batch=10)
    lanes.add([e(f"n{i}", f"c{i}") for i in range(12)])
    assert names(lanes.next_call()) == [f"n{i}" for i in range(10)]
    assert names(lanes.next_call()) == ["n10", "n11"]


def test_a_lane_goes_as_full_batches_one_call_at_a_time() -> None:
    lanes = Lanes(batch=10)
    lanes.add([e(f"a{i}", "a") for i in range(25)])
    first = lanes.next_call()
    assert names(first) == [f"a{i}" for i in range(10)]
    assert lanes.next_call() == []  # the lane is busy until its call is finished
    assert lanes.finish(first) == 1
    second = lanes.next_call()
    assert names(second) == [f"a{i}" for i in range(10, 20)]
    lanes.finish(second)
    assert names(lanes.next_call()) == [f"a{i}" for i in range(20, 25)]


def test_a_busy_lane_holds_back_only_itself() -> None:
    lanes = Lanes()
    lanes.add([e("a0", "a")])
    held = lanes.next_call()
    lanes.add([e("a1", "a"), e("b0", "b")])
    assert names(lanes.next_call()) == ["b0"]
    lanes.finish(held)
    assert names(lanes.next_call()) == ["a1"]


def test_an_envelope_waits_for_the_front_of_each_lane_and_holds_each() -> None:
    lanes = Lanes()
    lanes.add([e("b0", "b")])
    b0 = lanes.next_call()
    lanes.add([e("a1", "a"), e("ab", "a", "b"), e("a2", "a"), e("c3", "c")])
    # a1 and c3 go; the envelope waits for b; a2 may not pass the envelope on lane a
    a1c3 = lanes.next_call()
    assert names(a1c3) == ["a1", "c3"]
    assert lanes.next_call() == []
    lanes.finish(a1c3)
    assert lanes.next_call() == []  # b is still busy
    lanes.finish(b0)
    ab = lanes.next_call()
    assert names(ab) == ["ab"]
    assert lanes.next_call() == []  # a2 waits for the envelope, on lane a
    lanes.finish(ab)
    assert names(lanes.next_call()) == ["a2"]


def test_what_goes_alone_gets_a_call_of_its_own() -> None:
    """A call is one HTTP request: an envelope or a retry never rides in a batch."""
    lanes = Lanes()
    lanes.add([e("a0", "a"), e("r1", "b", alone=True), e("c2", "c"), e("de", "d", "e")])
    assert names(lanes.next_call()) == ["a0", "c2"]
    assert names(lanes.next_call()) == ["r1"]
    assert names(lanes.next_call()) == ["de"]


def test_a_run_stops_before_what_goes_alone() -> None:
    lanes = Lanes()
    lanes.add([e("a0", "a"), e("a1", "a"), e("r2", "a", alone=True), e("a3", "a")])
    first = lanes.next_call()
    assert names(first) == ["a0", "a1"]
    lanes.finish(first)
    retry = lanes.next_call()
    assert names(retry) == ["r2"]
    lanes.finish(retry)
    assert names(lanes.next_call()) == ["a3"]


def test_a_call_respects_a_smaller_limit() -> None:
    """A probe takes one notification; a small rate-limit burst caps the call."""
    lanes = Lanes(batch=10)
    lanes.add([e(f"a{i}", "a") for i in range(5)] + [e("b0", "b")])
    assert names(lanes.next_call(limit=1)) == ["a0"]
    assert names(lanes.next_call(limit=3)) == ["b0"]


def test_take_idle_returns_what_no_call_holds_in_taking_order() -> None:
    lanes = Lanes()
    lanes.add([e("a0", "a"), e("b0", "b"), e("a1", "a"), e("ab", "a", "b"), e("c0", "c")])
    call = lanes.next_call(limit=1)
    assert names(call) == ["a0"]
    idle = lanes.take_idle()
    assert names(idle) == ["b0", "a1", "ab", "c0"]
    assert len(lanes) == 1
    assert lanes.next_call() == []
    lanes.finish(call)
    assert len(lanes) == 0 and lanes.keys() == []
    lanes.add([e("a2", "a")])
    assert names(lanes.next_call()) == ["a2"]


def test_held_counts_a_lanes_entries_in_calls_or_not() -> None:
    lanes = Lanes()
    lanes.add([e("a0", "a"), e("a1", "a"), e("ab", "a", "b")])
    lanes.next_call()
    assert lanes.held("a") == 3 and lanes.held("b") == 1 and lanes.held("z") == 0


class Run:
    """Drives Lanes as the engine does, and checks each call as it starts."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.lanes = Lanes(batch=4)
        self.taken = 0
        self.open: list[list[Entry]] = []
        self.sent: dict[str, list[int]] = {k: [] for k in "abcd"}
        self.busy: set[str] = set()

    def add(self) -> None:
        keys = self.rng.sample("abcd", self.rng.choice((1, 1, 1, 2)))
        entry = e(f"n{self.taken}", *keys, alone=self.rng.random() < 0.05)
        entry.extra = self.taken
        self.taken += 1
        self.lanes.add([entry])

    def call(self) -> None:
        call = self.lanes.next_call()
        keys = {k for x in call for k in x.keys}
        assert not keys & self.busy, "two calls at once on one lane"
        self.busy |= keys
        for x in call:
            for k in x.keys:
                self.sent[k].append(x.extra)
        if call:
            self.open.append(call)

    def finish(self, index: int) -> None:
        call = self.open.pop(index)
        self.busy -= {k for x in call for k in x.keys}
        self.lanes.finish(call)


@pytest.mark.parametrize("seed", range(40))
def test_random_runs_keep_every_lane_in_taking_order_and_end(seed: int) -> None:
    """Random entries over four lanes (some envelopes and retries), calls finished in a random
    order, now and then the idle ones taken out: every lane's calls come in taking order,
    never two calls at once on one lane, and everything ends."""
    rng = random.Random(seed)
    run = Run(rng)
    for step in range(400):
        action = rng.random()
        if action < 0.35 and step < 300:
            run.add()
        elif action < 0.7:
            run.call()
        elif action < 0.95 and run.open:
            run.finish(rng.randrange(len(run.open)))
        elif action >= 0.95:
            run.lanes.take_idle()  # they went back: never sent
    while run.open or len(run.lanes):
        while run.open:
            run.finish(0)
        run.call()
    for key, order in run.sent.items():
        assert order == sorted(order), f"lane {key} out of taking order: {order}"
    assert len(run.lanes) == 0 and run.lanes.keys() == []


def g(name: str, key: str, group: str) -> Entry:
    return Entry(name.encode(), name, (key,), alone=False, group=group)


def test_a_call_never_mixes_groups() -> None:
    """A call goes to one Pusher app: lanes of another app wait for a call of their own."""
    lanes = Lanes()
    lanes.add([g("a0", "a", "x"), g("b0", "b", "y"), g("c0", "c", "x"), g("d0", "d", "y")])
    assert names(lanes.next_call()) == ["a0", "c0"]
    assert names(lanes.next_call()) == ["b0", "d0"]


def test_unsend_puts_entries_back_at_the_front_of_their_lanes() -> None:
    lanes = Lanes()
    lanes.add([e(f"a{i}", "a") for i in range(3)])
    call = lanes.next_call()
    lanes.unsend(call[1:])  # a probe takes one
    assert lanes.next_call() == []  # lane a is still busy with a0
    lanes.finish(call[:1])
    assert names(lanes.next_call()) == ["a1", "a2"]


def test_take_group_sets_one_groups_waiting_entries_aside() -> None:
    lanes = Lanes()
    lanes.add([g("a0", "a", "x"), g("a1", "a", "x"), g("b0", "b", "y")])
    call = lanes.next_call(limit=1)
    assert names(call) == ["a0"]
    assert names(lanes.take_group("x")) == ["a1"]
    assert names(lanes.next_call()) == ["b0"]
    assert len(lanes) == 2


def test_a_skipped_group_stays_ready_for_a_later_call() -> None:
    """An app whose rate-limit budget a greenlet waits for: its lanes wait, the others go."""
    lanes = Lanes()
    lanes.add([g("a0", "a", "x"), g("b0", "b", "y"), g("c0", "c", "x")])
    assert names(lanes.next_call(skip={"x"})) == ["b0"]
    assert lanes.next_call(skip={"x"}) == []
    assert names(lanes.next_call()) == ["a0", "c0"]
