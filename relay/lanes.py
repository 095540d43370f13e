"""The window's notifications in per-channel lanes, and the calls formed from their fronts.

A pure structure: no I/O, no gevent, no clock. The engine adds what it fetched, in taking
order, asks for the next call, and finishes the call once it is settled.

1. **A lane per key, in taking order.** A notification joins the lane of each of its keys
   (its channels; with ordering off, a key of its own). Nothing enters a lane out of order:
   the window adds a fetch's items in the order Redis handed them out, one fetch at a time.
2. **One call per lane at a time, from the front** (Kafka's one request in flight per
   partition). A call holds the fronts it took until it is finished, so a lane is busy
   exactly while its front is in a call, and a channel's calls reach Pusher one after the
   other.
   An entry with several keys (an envelope) goes once it is at the front of all its lanes
   and none of them is busy; the oldest entry waiting is always at the front of its lanes,
   so the waits form no cycle.
3. **A call** is up to `batch` entries of one group (a call goes to one Pusher app): the front
   run of one ready lane, then of the next ready lanes of its group while there is room,
   oldest ready lane first; or one entry that goes alone (an envelope, a retried
   notification, something that cannot be sent at all).
4. `finish(call)` removes the call's entries and frees their lanes; `take_idle()` removes
   every entry that is not in a call (a stop, the circuit opening, a pause).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Iterable, Sequence
from typing import Any


class Entry:
    """One taken notification (or an unreadable item) in the window."""

    __slots__ = ("raw", "item", "keys", "alone", "called", "seq", "extra", "group")

    def __init__(self, raw: bytes, item: Any, keys: Sequence[str], alone: bool,
                 group: str = "") -> None:
        self.raw = raw  # exactly what sits in Redis: every settle step names these bytes
        self.item = item  # the parsed Notification, or the InvalidMessage its parse raised
        self.keys = tuple(dict.fromkeys(keys))  # its lanes, each once
        self.alone = alone  # needs a call of its own
        self.called = False  # in a call now
        self.seq = 0  # taking order, set by Lanes.add
        self.extra: Any = None  # what the window keeps beside it (ownership: its channels)
        self.group = group  # a call never mixes groups (the Pusher app it goes to)

    def __repr__(self) -> str:
        return f"Entry({self.raw[:40]!r}, keys={self.keys}, called={self.called})"


class Lanes:
    def __init__(self, batch: int = 10) -> None:
        self.batch = batch
        self._lanes: dict[str, deque[Entry]] = {}
        self._ready: deque[str] = deque()  # lanes whose front may go (checked again on use)
        self._queued: set[str] = set()  # what _ready holds
        self.count = 0  # entries held, in calls or not
        self._taken = 0  # entries ever added: each one's seq

    def __len__(self) -> int:
        return self.count

    @property
    def ready(self) -> int:
        """Lanes queued as ready: an upper bound on the calls that could start now."""
        return len(self._ready)

    def add(self, entries: Iterable[Entry]) -> int:
        """Append entries at the back of their lanes; returns how many lanes became ready."""
        before = len(self._ready)
        for entry in entries:
            self.count += 1
            self._taken += 1
            entry.seq = self._taken
            for key in entry.keys:
                lane = self._lanes.get(key)
                if lane is None:
                    self._lanes[key] = deque((entry,))
                else:
                    lane.append(entry)
            self._check(entry.keys)
        return len(self._ready) - before

    def next_call(self, limit: int | None = None, skip: Container[str] = ()) -> list[Entry]:
        """The next call (empty: nothing may go now). Its entries are marked called, which
        keeps their lanes busy until `finish`. Lanes whose front is of a group in `skip` stay
        ready for a later call (an app whose rate-limit budget a greenlet already waits for)."""
        room = self.batch if limit is None else min(limit, self.batch)
        call: list[Entry] = []
        passed: list[str] = []  # ready lanes left for the next call (alone, or another group)
        while self._ready and len(call) < room:
            key = self._ready.popleft()
            self._queued.discard(key)
            front = self._front_goes(key)
            if front is None:
                continue
            if front.group in skip or (call and (front.alone or front.group != call[0].group)):
                passed.append(key)
                continue
            run = [front] if front.alone else self._front_run(key, room - len(call))
            for entry in run:
                entry.called = True
            call.extend(run)
            if front.alone:
                break
        for key in reversed(passed):
            self._queued.add(key)
            self._ready.appendleft(key)
        return call

    def _front_run(self, key: str, most: int) -> list[Entry]:
        """The lane's front and the entries right behind it that may share its call: up to
        `most`, stopping before anything that goes alone or has lanes of its own."""
        run: list[Entry] = []
        for entry in self._lanes[key]:
            if len(run) >= most or (run and (entry.alone or len(entry.keys) > 1)):
                break
            run.append(entry)
        return run

    def finish(self, call: Sequence[Entry]) -> int:
        """The call is over (settled, or given up): its entries leave their lanes and the
        lanes are free again. Returns how many lanes became ready."""
        before = len(self._ready)
        for entry in call:
            entry.called = False
        touched = self._remove(call)
        self._check(touched)
        return len(self._ready) - before

    def unsend(self, entries: Sequence[Entry]) -> None:
        """These entries of a call just formed will not go in it (a probe takes one): back to
        waiting at the fronts of their lanes."""
        for entry in entries:
            entry.called = False
        self._check(dict.fromkeys(k for e in entries for k in e.keys))

    def take_group(self, group: str) -> list[Entry]:
        """Remove and return the entries of one group not in a call, in taking order (an
        app's gate closed: they are set aside until it opens)."""
        taken = sorted({id(e): e for lane in self._lanes.values() for e in lane
                        if not e.called and e.group == group}.values(), key=lambda e: e.seq)
        self._check(self._remove(taken))
        return taken

    def take_idle(self) -> list[Entry]:
        """Remove and return every entry not in a call, in taking order. For the circuit
        opening, a pause, or the worker being declared dead: they go back (or are given up)."""
        idle: dict[int, Entry] = {}
        for key in list(self._lanes):
            lane = self._lanes[key]
            keep = deque(e for e in lane if e.called)
            for entry in lane:
                if not entry.called:
                    idle.setdefault(id(entry), entry)
            if keep:
                self._lanes[key] = keep
            else:
                del self._lanes[key]
        self.count -= len(idle)
        self._ready.clear()  # every lane left has its front in a call
        self._queued.clear()
        return sorted(idle.values(), key=lambda e: e.seq)

    def take_behind(self, entries: Sequence[Entry]) -> list[Entry]:
        """Remove and return the entries not in a call that wait behind these in their lanes
        (and behind those in theirs), in taking order. What goes back to the queue takes its
        followers along, so the queue gets a lane back in its order, not split in two."""
        behind: dict[int, Entry] = {}
        lanes = list(dict.fromkeys(k for x in entries for k in x.keys))
        while lanes:
            key = lanes.pop()
            for entry in self._lanes.get(key, ()):
                if not entry.called and id(entry) not in behind:
                    behind[id(entry)] = entry
                    lanes.extend(k for k in entry.keys if k != key)
        taken = sorted(behind.values(), key=lambda x: x.seq)
        self._check(self._remove(taken))
        return taken

    def held(self, key: str) -> int:
        """Entries in this lane, in a call or not."""
        lane = self._lanes.get(key)
        return len(lane) if lane else 0

    def keys(self) -> list[str]:
        return list(self._lanes)

    # -- inside ------------------------------------------------------------------------------

    def _front_goes(self, key: str) -> Entry | None:
        """The front of this lane if it may go now: not in a call, and at the front of each of
        its lanes. (A call holds the fronts of the lanes it took from, so a lane is busy
        exactly when its front is in a call.)"""
        lane = self._lanes.get(key)
        if not lane:
            return None
        front = lane[0]
        if front.called:
            return None
        for other in front.keys:
            if other != key and self._lanes[other][0] is not front:
                return None
        return front

    def _check(self, keys: Iterable[str]) -> None:
        for key in keys:
            if key not in self._queued and self._front_goes(key) is not None:
                self._queued.add(key)
                self._ready.append(key)

    def _remove(self, entries: Iterable[Entry]) -> list[str]:
        touched: dict[str, None] = {}
        for entry in entries:
            self.count -= 1
            for key in entry.keys:
                touched[key] = None
                lane = self._lanes.get(key)
                if lane is None:
                    continue
                if lane[0] is entry:
                    lane.popleft()
                else:
                    lane.remove(entry)
                if not lane:
                    del self._lanes[key]
        return list(touched)
