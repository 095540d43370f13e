"""relay.fate: every combination of notification, answer and gate, as one table."""

from __future__ import annotations

import itertools

import pytest

from relay.delivery import Failure, Kind
from relay.fate import (
    DELIVERED,
    UNSENT,
    Ack,
    DeadLetter,
    Gate,
    Policy,
    PutBack,
    RetryLater,
    Send,
    Shed,
    decide,
    is_suspect,
    verdict,
)
from relay.message import InvalidMessage, Notification

NOW = 1000.0
POLICY = Policy(max_attempts=3, retry_for_s=100.0, max_age_s=60.0, backoff=lambda n: n * 10.0)


def note(attempts: int = 0, first_failed_at: float | None = None,
         enqueued_at: float | None = None) -> Notification:
    return Notification(raw=b"r", payload="p", channels=("c",), event="e", data="{}",
                        attempts=attempts, first_failed_at=first_failed_at,
                        enqueued_at=enqueued_at)


ITEMS = {
    "invalid": InvalidMessage("not JSON"),
    "fresh": note(enqueued_at=NOW - 10),
    "classic": note(),  # no enqueued_at: never stale
    "stale": note(enqueued_at=NOW - 61),
    "retried": note(attempts=1, first_failed_at=NOW - 50),
    "last try": note(attempts=2, first_failed_at=NOW - 50),  # the 3rd failure is the last
    "too old": note(attempts=1, first_failed_at=NOW - 100),  # RELAY_RETRY_FOR reached
}
ANSWERS = {
    "unsent": UNSENT,
    "delivered": DELIVERED,
    "400": Failure(Kind.PERMANENT, "HTTP 400: bad", 400),
    "500": Failure(Kind.TRANSIENT, "HTTP 500: oops", 500),
    "403": Failure(Kind.SYSTEMIC, "HTTP 403: no", 403),
    "429": Failure(Kind.RATE_LIMITED, "HTTP 429: slow", 429, 2.0),
}

# (item, answer): (fate with the gate open, fate while it holds). Codes below.
TABLE = {
    ("invalid", "unsent"): ("dead invalid", "dead invalid"),
    ("invalid", "delivered"): ("dead invalid", "dead invalid"),
    ("invalid", "400"): ("dead invalid", "dead invalid"),
    ("invalid", "500"): ("dead invalid", "dead invalid"),
    ("invalid", "403"): ("dead invalid", "dead invalid"),
    ("invalid", "429"): ("dead invalid", "dead invalid"),
    ("fresh", "unsent"): ("send", "back"),
    ("fresh", "delivered"): ("ack", "ack"),
    ("fresh", "400"): ("dead rejected 1", "dead rejected 1"),
    ("fresh", "500"): ("retry 1 1000", "retry 1 1000"),
    ("fresh", "403"): ("retry 1 1000", "retry 1 1000"),
    ("fresh", "429"): ("back", "back"),
    ("classic", "unsent"): ("send", "back"),
    ("classic", "delivered"): ("ack", "ack"),
    ("classic", "400"): ("dead rejected 1", "dead rejected 1"),
    ("classic", "500"): ("retry 1 1000", "retry 1 1000"),
    ("classic", "403"): ("retry 1 1000", "retry 1 1000"),
    ("classic", "429"): ("back", "back"),
    ("stale", "unsent"): ("shed max_age", "shed max_age"),
    ("stale", "delivered"): ("ack", "ack"),
    ("stale", "400"): ("dead rejected 1", "dead rejected 1"),
    ("stale", "500"): ("retry 1 1000", "retry 1 1000"),
    ("stale", "403"): ("retry 1 1000", "retry 1 1000"),
    ("stale", "429"): ("back", "back"),
    ("retried", "unsent"): ("send", "back"),
    ("retried", "delivered"): ("ack", "ack"),
    ("retried", "400"): ("dead rejected 2", "dead rejected 2"),
    ("retried", "500"): ("retry 2 950", "retry 2 950"),
    ("retried", "403"): ("retry 2 950", "retry 2 950"),
    ("retried", "429"): ("back", "back"),
    ("last try", "unsent"): ("send", "back"),
    ("last try", "delivered"): ("ack", "ack"),
    ("last try", "400"): ("dead rejected 3", "dead rejected 3"),
    ("last try", "500"): ("dead exhausted 3", "dead exhausted 3"),
    ("last try", "403"): ("dead exhausted 3", "dead exhausted 3"),
    ("last try", "429"): ("back", "back"),
    ("too old", "unsent"): ("send", "back"),
    ("too old", "delivered"): ("ack", "ack"),
    ("too old", "400"): ("dead rejected 2", "dead rejected 2"),
    ("too old", "500"): ("dead exhausted 2", "dead exhausted 2"),
    ("too old", "403"): ("dead exhausted 2", "dead exhausted 2"),
    ("too old", "429"): ("back", "back"),
}


def code(fate: object) -> str:
    """A fate in the table's words."""
    if isinstance(fate, DeadLetter):
        return " ".join(["dead", fate.error_class]
                        + ([str(fate.attempts)] if fate.error_class != "invalid" else []))
    if isinstance(fate, RetryLater):
        assert fate.delay_s == fate.attempts * 10.0  # the policy's backoff, for that attempt
        return f"retry {fate.attempts} {fate.first_failed_at:g}"
    if isinstance(fate, Shed):
        return f"shed {fate.policy}"
    return {Send: "send", Ack: "ack", PutBack: "back"}[type(fate)]


def test_the_table_covers_every_combination() -> None:
    assert set(TABLE) == set(itertools.product(ITEMS, ANSWERS))


@pytest.mark.parametrize(("item", "answer", "holding"),
                         list(itertools.product(ITEMS, ANSWERS, (False, True))))
def test_fate(item: str, answer: str, holding: bool) -> None:
    fate = decide(ITEMS[item], ANSWERS[answer], Gate(holding=holding), NOW, POLICY)
    assert code(fate) == TABLE[item, answer][holding]


def test_a_dead_letter_says_why() -> None:
    failure = ANSWERS["500"]
    fate = decide(ITEMS["last try"], failure, Gate(), NOW, POLICY)
    assert isinstance(fate, DeadLetter)
    assert fate.reason == "gave up after 3 attempts: HTTP 500: oops"
    assert decide(ITEMS["invalid"], UNSENT, Gate(), NOW, POLICY).reason == "not JSON"


def test_max_age_off_never_sheds() -> None:
    policy = Policy(max_attempts=3, retry_for_s=100.0, max_age_s=0.0)
    assert isinstance(decide(ITEMS["stale"], UNSENT, Gate(), NOW, policy), Send)


# -- what one send tells the circuit ------------------------------------------------------

OK = None
T500 = Failure(Kind.TRANSIENT, "HTTP 500", 500)
T500_BATCH = Failure(Kind.TRANSIENT, "HTTP 500", 500, shared=3)
S403 = Failure(Kind.SYSTEMIC, "HTTP 403", 403)
S403_BATCH = Failure(Kind.SYSTEMIC, "HTTP 403", 403, shared=3)
FRESH = note()
SUSPECT = note(attempts=1, first_failed_at=NOW - 30)  # failed before the last success
RECENT, LONG_AGO = NOW - 20, NOW - 3600


@pytest.mark.parametrize(("notes", "answers", "last_success", "expected"), [
    ([FRESH, FRESH], [OK, OK], None, (True, None, None, None)),
    ([FRESH], [T500], None, (False, None, None, "HTTP 500")),
    ([FRESH], [S403], RECENT, (False, None, "HTTP 403", None)),
    # some went through: the failures are about those notifications
    ([FRESH, FRESH], [OK, T500], None, (True, None, None, None)),
    ([FRESH, FRESH], [OK, S403], None, (True, None, None, None)),
    # a suspect's failure says nothing about Pusher
    ([SUSPECT], [T500], RECENT, (False, None, None, None)),
    ([SUSPECT], [S403], RECENT, (False, None, None, None)),
    ([SUSPECT], [S403], None, (False, None, "HTTP 403", None)),  # no success seen since
    # a failed batch while others went through lately: ambiguous, retried alone
    ([FRESH] * 3, [T500_BATCH] * 3, NOW - 1, (False, None, None, None)),
    ([FRESH] * 3, [S403_BATCH] * 3, NOW - 1, (False, None, None, None)),
    ([FRESH] * 3, [T500_BATCH] * 3, LONG_AGO, (False, None, None, "HTTP 500")),
    ([FRESH] * 3, [S403_BATCH] * 3, None, (False, None, "HTTP 403", None)),
    # 429: everybody pauses for Retry-After; 0 means not at all; none given means 1 s
    ([FRESH], [Failure(Kind.RATE_LIMITED, "429", 429, 0.0)], None, (False, 0.0, None, None)),
    ([FRESH], [Failure(Kind.RATE_LIMITED, "429", 429, None)], None, (False, 1.0, None, None)),
    ([FRESH], [Failure(Kind.PERMANENT, "400", 400)], None, (False, None, None, None)),
])
def test_verdict(notes, answers, last_success, expected) -> None:
    news = verdict(notes, answers, last_success, NOW)
    assert (news.delivered, news.pause_s, news.systemic, news.transient) == expected


@pytest.mark.parametrize("status", [429, 503])
def test_a_pause_says_which_answer_asked_for_it(status: int) -> None:
    """sockudo's backpressure is a 503 with Retry-After: the log must not call it a 429."""
    news = verdict([FRESH], [Failure(Kind.RATE_LIMITED, "slow", status, 2.0)], None, NOW)
    assert (news.pause_s, news.pause_why) == (2.0, f"HTTP {status}")


def test_suspect_needs_an_earlier_failure_and_a_later_success() -> None:
    assert not is_suspect(FRESH, NOW)
    assert not is_suspect(SUSPECT, None)
    assert not is_suspect(SUSPECT, NOW - 31)
    assert is_suspect(SUSPECT, NOW - 29)
