"""The W3C trace context an envelope carries (relay.wire, relay.message): what is valid, that
anything malformed is ignored and never costs the notification, that classic messages are
never read for it, and that retry wrappers keep it and the first attempt's context."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay import wire
from relay.message import Notification, envelope, parse, retry_wrapper

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{SPAN_ID}-01"
STATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


def env(**fields: Any) -> bytes:
    base: dict[str, Any] = {"relay": 1, "channels": ["c"], "event": "ev", "data": {"x": 1}}
    base.update(fields)
    return json.dumps(base).encode()


@pytest.mark.parametrize("value", [
    VALID,
    f"00-{TRACE_ID}-{SPAN_ID}-00",          # not sampled: still a context to link to
    f"01-{TRACE_ID}-{SPAN_ID}-09-future",   # a later version may add fields after a dash
    f"cc-{TRACE_ID}-{SPAN_ID}-ff",
])
def test_valid_traceparents(value: str) -> None:
    assert wire.traceparent_problem(value) is None


@pytest.mark.parametrize(("value", "why"), [
    (None, "string"),
    (123, "string"),
    ("", "lowercase hex"),
    (VALID.upper(), "lowercase hex"),
    (f"00-{TRACE_ID}-{SPAN_ID}-1", "lowercase hex"),            # flags: two digits
    (f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01", "lowercase hex"),      # trace id: 32 digits
    (f"00-{TRACE_ID}-{SPAN_ID}0-01", "lowercase hex"),          # span id: 16 digits
    (f"00-{TRACE_ID}-{SPAN_ID}-0g", "lowercase hex"),
    (f" {VALID}", "lowercase hex"),
    (f"{VALID}\n", "lowercase hex"),
    (f"0-{TRACE_ID}-{SPAN_ID}-01", "lowercase hex"),
    (f"00_{TRACE_ID}_{SPAN_ID}_01", "lowercase hex"),
    (f"ff-{TRACE_ID}-{SPAN_ID}-01", "version"),                 # ff is forbidden
    (f"{VALID}-extra", "version"),                              # 00 has exactly four fields
    (f"01-{TRACE_ID}-{SPAN_ID}-01extra", "lowercase hex"),      # more only after a dash
    (f"00-{'0' * 32}-{SPAN_ID}-01", "all-zero"),
    (f"00-{TRACE_ID}-{'0' * 16}-01", "all-zero"),
])
def test_invalid_traceparents(value: object, why: str) -> None:
    problem = wire.traceparent_problem(value)
    assert problem is not None and why in problem, problem


@pytest.mark.parametrize("value", [
    "", STATE, "a=1", "  a=1 ,\tb=2 ", "a=1,,b=2", "tenant@system=v", "k=" + "v" * 256,
    ",".join(f"k{i}=v" for i in range(32)), ",".join(f"k{i}=" + "x" * 124 for i in range(4)),
])
def test_valid_tracestates(value: str) -> None:
    assert wire.tracestate_problem(value) is None


@pytest.mark.parametrize(("value", "why"), [
    (["a=1"], "string"),
    ("a=" + "x" * 511, "longer than 512"),
    (",".join(f"k{i}=v" for i in range(33)), "more than 32"),
    ("A=1", "malformed"),             # keys are lowercase
    ("a", "malformed"),
    ("a=", "malformed"),              # a value has at least one character
    ("a=x,y", "malformed"),
    ("a=1=2", "malformed"),           # '=' is not a value character
    ("a=b\x7f", "malformed"),         # printable ASCII only
    ("a=\u00e9", "malformed"),
    ("k=" + "v" * 257, "malformed"),
    ("a=1,a=2", "repeats"),
])
def test_invalid_tracestates(value: object, why: str) -> None:
    problem = wire.tracestate_problem(value)
    assert problem is not None and why in problem, problem


def test_an_envelope_carries_its_trace_context() -> None:
    note = parse(env(traceparent=VALID, tracestate=STATE), "hit")
    assert (note.traceparent, note.tracestate, note.first_traceparent) == (VALID, STATE, None)
    assert parse(env(traceparent=VALID), "hit").tracestate is None
    assert (parse(env(), "hit").traceparent, parse(env(), "hit").tracestate) == (None, None)


@pytest.mark.parametrize("bad", ["garbage", VALID.upper(), 7, None, ["x"]])
def test_a_malformed_traceparent_is_ignored_with_its_tracestate_never_dead_lettered(
        bad: object) -> None:
    """W3C: a receiver ignores an invalid traceparent, and then the tracestate too."""
    note = parse(env(traceparent=bad, tracestate=STATE), "hit")
    assert (note.traceparent, note.tracestate) == (None, None)
    assert note.channels == ("c",) and json.loads(note.data) == {"x": 1}


def test_a_malformed_tracestate_alone_is_ignored() -> None:
    note = parse(env(traceparent=VALID, tracestate="NOT VALID"), "hit")
    assert (note.traceparent, note.tracestate) == (VALID, None)


def test_a_classic_message_is_never_read_for_trace_context() -> None:
    """Its keys are its data: a classic `traceparent` key goes to Pusher as data."""
    note = parse(json.dumps({"channel": "c", "traceparent": VALID}).encode(), "hit")
    assert note.traceparent is None
    assert json.loads(note.data) == {"traceparent": VALID}


def test_the_envelope_helper_writes_a_valid_context_and_leaves_out_a_malformed_one() -> None:
    text = envelope(["c"], "ev", {"x": 1}, traceparent=VALID, tracestate=STATE)
    assert {k: json.loads(text).get(k) for k in ("traceparent", "tracestate")} == {
        "traceparent": VALID, "tracestate": STATE}
    assert "traceparent" not in json.loads(envelope(["c"], "ev", 1, traceparent="bad",
                                                    tracestate=STATE))
    partial = json.loads(envelope(["c"], "ev", 1, traceparent=VALID, tracestate="B A D"))
    assert partial["traceparent"] == VALID and "tracestate" not in partial


def test_a_retry_keeps_the_producer_context_and_adds_the_first_calls() -> None:
    first = f"00-{'a' * 32}-{'b' * 16}-01"
    payload = env(traceparent=VALID, tracestate=STATE).decode()
    note = parse(retry_wrapper(payload, 2, 10.0, "HTTP 503", first_traceparent=first).encode(),
                 "hit")
    assert (note.traceparent, note.tracestate, note.first_traceparent) == (VALID, STATE, first)
    assert (note.attempts, note.first_failed_at, note.payload) == (2, 10.0, payload)


def test_a_wrapper_written_without_a_first_context_reads_as_before() -> None:
    """Wrappers written by workers before tracing (or with it off) hold no first context."""
    wrapper = retry_wrapper('{"channel":"c"}', 1, 1.0, "e")
    assert "first_traceparent" not in json.loads(wrapper)["retry"]
    assert parse(wrapper.encode(), "hit").first_traceparent is None
    old = '{"relay":1,"payload":"{\\"channel\\":\\"c\\"}","retry":{"attempts":1}}'
    assert parse(old.encode(), "hit").first_traceparent is None


def test_a_malformed_first_context_in_a_wrapper_is_ignored() -> None:
    wrapper = json.loads(retry_wrapper('{"channel":"c"}', 1, 1.0, "e"))
    wrapper["retry"]["first_traceparent"] = "nonsense"
    note = parse(json.dumps(wrapper).encode(), "hit")
    assert note.first_traceparent is None and note.attempts == 1


def test_age_is_the_histograms_never_negative_and_unknown_without_enqueued_at() -> None:
    note = Notification(raw=b"r", payload="p", channels=("c",), event="e", data="{}",
                        enqueued_at=100.0)
    assert note.age_at(102.5) == 2.5
    assert note.age_at(99.0) == 0.0  # the producer's clock ahead of ours
    assert Notification(raw=b"r", payload="p", channels=("c",), event="e",
                        data="{}").age_at(5.0) is None
