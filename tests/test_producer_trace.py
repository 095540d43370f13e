"""relay.producer and OpenTelemetry: an envelope pushed inside an active span carries its W3C
context; a classic message never changes; an app without OpenTelemetry imports none of it;
a broken API never costs the notification. Spans come from the real SDK, kept local (no
global provider is set, so tests do not leak into each other)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from relay import producer
from relay.message import parse
from relay.producer import Producer, encode
from tests.support import ROOT


@pytest.fixture
def tracer() -> Iterator[trace.Tracer]:
    provider = TracerProvider()
    yield provider.get_tracer("test-app")
    provider.shutdown()


def traceparent_of(span: trace.Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def sampled(traceparent: str) -> bool:
    """The sampled bit (the SDK also sets W3C level 2's random-id bit: flags 03)."""
    return bool(int(traceparent.split("-")[3], 16) & 0x01)


def test_an_envelope_pushed_in_a_span_carries_its_context(
        r: redis.Redis, queue_name: str, tracer: trace.Tracer) -> None:
    with tracer.start_as_current_span("POST /orders") as span:
        text = Producer(r, queue_name).notify(["site-42"], {"n": 1})
    obj = json.loads(r.lrange(queue_name, 0, -1)[0])
    assert obj["traceparent"] == traceparent_of(span) and sampled(obj["traceparent"])
    assert "tracestate" not in obj  # none was set on the span
    note = parse(text.encode(), "hit")  # and the worker reads it back
    assert note.traceparent == traceparent_of(span) and note.tracestate is None


def test_the_tracestate_travels_too(tracer: trace.Tracer) -> None:
    upstream = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7,
                           is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED),
                           trace_state=TraceState([("rojo", "00f067aa0ba902b7"),
                                                   ("congo", "t61rcWkgMzE")]))
    parent = trace.set_span_in_context(NonRecordingSpan(upstream))
    with tracer.start_as_current_span("handler", context=parent) as span:
        obj = json.loads(encode(["c"], {"n": 1}, event="ev"))
    assert obj["traceparent"] == traceparent_of(span)
    assert obj["traceparent"].split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert obj["tracestate"] == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


def test_an_unsampled_span_is_still_propagated() -> None:
    """W3C: the context goes on whatever the sampling decision (flags 00)."""
    provider = TracerProvider(sampler=ALWAYS_OFF)
    try:
        with provider.get_tracer("t").start_as_current_span("quiet") as span:
            obj = json.loads(encode(["c"], {"n": 1}))
    finally:
        provider.shutdown()
    assert obj["traceparent"] == traceparent_of(span) and not sampled(obj["traceparent"])


def test_a_classic_message_never_changes_inside_a_span(tracer: trace.Tracer) -> None:
    outside = encode("site-42", {"title": "Home"}, classic=True)
    with tracer.start_as_current_span("GET /"):
        inside = encode("site-42", {"title": "Home"}, classic=True)
    assert inside == outside == '{"channel":"site-42","title":"Home"}'


def test_the_default_envelope_of_one_channel_carries_the_context(tracer: trace.Tracer) -> None:
    with tracer.start_as_current_span("GET /") as span:
        obj = json.loads(encode("site-42", {"title": "Home"}))
    assert obj["channels"] == ["site-42"] and obj["data"] == {"title": "Home"}
    assert obj["traceparent"].split("-")[1] == f"{span.get_span_context().trace_id:032x}"


def test_no_active_span_no_context(tracer: trace.Tracer) -> None:
    assert trace.get_current_span() is trace.INVALID_SPAN
    obj = json.loads(encode(["c"], {"n": 1}))
    assert "traceparent" not in obj and "tracestate" not in obj


class Broken:
    """An OpenTelemetry API that fails: the notification must go anyway."""

    def get_current_span(self) -> Any:
        raise RuntimeError("broken tracing")


def test_a_failing_api_carries_nothing_and_costs_nothing(
        monkeypatch: pytest.MonkeyPatch, r: redis.Redis, queue_name: str) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", Broken())
    text = Producer(r, queue_name).notify(["c"], {"n": 1})
    assert "traceparent" not in json.loads(text)
    assert r.llen(queue_name) == 1


def test_the_field_is_left_out_when_the_api_gives_a_malformed_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the app's OpenTelemetry produces, only what the worker accepts is written."""
    monkeypatch.setattr(producer, "_trace_context", lambda: ("00-XYZ-bad-01", "a=1"))
    obj = json.loads(encode(["c"], {"n": 1}))
    assert "traceparent" not in obj and "tracestate" not in obj


def test_the_producer_itself_imports_nothing_of_opentelemetry() -> None:
    """An app without OpenTelemetry must not load it through relay. (redis-py 8 looks for the
    OpenTelemetry SDK at `import redis` when it is installed, as it is here: so the check is
    that pushing an envelope adds no module, and that no propagator is loaded.)"""
    code = ("import sys, json; from relay.producer import encode; "
            "before = {m for m in sys.modules if m.startswith('opentelemetry')}; "
            "json.loads(encode(['a', 'b'], {'n': 1}, event='e')); "
            "after = {m for m in sys.modules if m.startswith('opentelemetry')}; "
            "print(json.dumps(sorted(after - before))); "
            "print('opentelemetry.trace.propagation.tracecontext' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "False"]
