"""A notification's fate, decided in one pure function; the worker only carries it out.

1. `decide(item, answer, gate, now, policy)` -> Send | Ack | RetryLater | DeadLetter |
   PutBack | Shed. `item` is a parsed Notification, or the InvalidMessage its parse raised;
   `answer` is UNSENT (before the call), DELIVERED, or the call's Failure.
2. `verdict(notes, answers, last_success_at)` -> what one send tells the circuit.
3. A *suspect* is a notification that failed before, after which another one went through
   (`first_failed_at` < the last success): its failure says something about itself, not
   about Pusher, so it neither opens the circuit nor counts toward opening it. Likewise a
   failed batch while others went through lately (RECENT_SUCCESS_S): any one of its
   notifications may be the cause, so each is retried alone and those answers decide. That
   is how a few notifications a server refuses cannot stall all the others.

No I/O and no clock of its own: the table test in tests/test_fate.py covers every case.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relay.delivery import Failure, Kind
from relay.message import InvalidMessage, Notification
from relay.retry import compute_backoff, should_give_up

RECENT_SUCCESS_S = 10.0


class Step(enum.Enum):
    UNSENT = "unsent"
    DELIVERED = "delivered"


UNSENT = Step.UNSENT
DELIVERED = Step.DELIVERED
Answer = Step | Failure


@dataclass(frozen=True)
class Send:
    """Go ahead: call Pusher."""


@dataclass(frozen=True)
class Ack:
    """Pusher accepted it: forget it."""


@dataclass(frozen=True)
class RetryLater:
    """Wait in the retry set, then go again (alone: see Delivery.send)."""

    attempts: int
    first_failed_at: float
    delay_s: float
    reason: str
    # The span context of the first call that carried it, for the wrapper (relay.tracing):
    # set by the engine once the call's span is known.
    first_traceparent: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    error_class: str  # invalid, rejected or exhausted
    reason: str
    attempts: int


@dataclass(frozen=True)
class PutBack:
    """Back to the queue untouched, no attempt counted (the gate closed, or a 429)."""


@dataclass(frozen=True)
class Later:
    """Set aside in the retry set for delay_s, no attempt counted: it was never sent (its
    app, one of several, is held by its circuit or a 429 pause; relay.engine)."""

    delay_s: float
    reason: str


@dataclass(frozen=True)
class Shed:
    policy: str  # the shed counter's label


Fate = Send | Ack | RetryLater | DeadLetter | PutBack | Shed | Later


@dataclass(frozen=True)
class Gate:
    """What decide needs to know of the circuit and the 429 pause."""

    holding: bool = False  # open, or paused: nobody but a probe may send


@dataclass(frozen=True)
class Policy:
    max_attempts: int
    retry_for_s: float
    max_age_s: float = 0.0
    backoff: Callable[[int], float] = compute_backoff


def decide(item: Notification | InvalidMessage, answer: Answer, gate: Gate, now: float,
           policy: Policy) -> Fate:
    """The fate of one notification at one step of its way."""
    if isinstance(item, InvalidMessage):
        return DeadLetter("invalid", str(item), 0)
    if answer is UNSENT:
        if _stale(item, now, policy.max_age_s):
            return Shed("max_age")
        return PutBack() if gate.holding else Send()
    if answer is DELIVERED:
        return Ack()
    assert isinstance(answer, Failure)
    if answer.kind is Kind.PERMANENT:
        return DeadLetter("rejected", answer.reason, item.attempts + 1)
    if answer.kind is Kind.RATE_LIMITED:
        return PutBack()  # the app's limit, not the notification's fault
    # Transient or systemic: an attempt either way. A systemic status (401, 403, 404) that
    # only some notifications get (a proxy or WAF in front of a self-hosted server) must
    # exhaust them too; during a real outage only the probes are sent, one at a time.
    attempts = item.attempts + 1
    first = item.first_failed_at if item.first_failed_at is not None else now
    if should_give_up(attempts, first, now, policy.max_attempts, policy.retry_for_s):
        return DeadLetter("exhausted", f"gave up after {attempts} attempts: {answer.reason}",
                          attempts)
    return RetryLater(attempts, first, policy.backoff(attempts), answer.reason)


def _stale(note: Notification, now: float, max_age_s: float) -> bool:
    return bool(max_age_s) and note.enqueued_at is not None and now - note.enqueued_at > max_age_s


def is_suspect(note: Notification, last_success_at: float | None) -> bool:
    """Failed before, and something else went through since: the fault is likely its own."""
    return (note.first_failed_at is not None and last_success_at is not None
            and last_success_at > note.first_failed_at)


@dataclass(frozen=True)
class Verdict:
    """What one send tells the circuit; every field None/False means nothing."""

    delivered: bool = False
    pause_s: float | None = None  # a 429: everybody waits this long (0: not at all)
    systemic: str | None = None  # open the circuit
    transient: str | None = None  # one more failure in a row
    pause_why: str = "HTTP 429"  # what asked for the pause (sockudo: 503 with Retry-After)


def verdict(notes: Sequence[Notification], answers: Sequence[Failure | None],
            last_success_at: float | None, now: float) -> Verdict:
    """Read one send's answers for the circuit, leaving out what is not Pusher's doing."""
    delivered = any(a is None for a in answers)
    recent = last_success_at is not None and now - last_success_at < RECENT_SUCCESS_S
    pause_s = systemic = transient = None
    pause_why = "HTTP 429"
    for note, answer in zip(notes, answers, strict=True):
        if answer is None:
            continue
        if answer.kind is Kind.RATE_LIMITED:
            ra = answer.retry_after_s
            pause_s = max(pause_s or 0.0, ra if ra is not None else 1.0)
            if answer.status is not None:
                pause_why = f"HTTP {answer.status}"
        elif (answer.kind is Kind.PERMANENT or is_suspect(note, last_success_at)
              or (answer.shared > 1 and recent)):
            continue
        elif answer.kind is Kind.SYSTEMIC:
            systemic = systemic or answer.reason
        else:
            transient = transient or answer.reason
    if delivered:
        # Others in the same send went through: the failures are about those notifications.
        systemic = transient = None
    return Verdict(delivered, pause_s, systemic, transient, pause_why)
