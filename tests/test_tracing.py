"""relay.tracing through its API, with the real SDK and OTLP/HTTP exporter sending to the
local receiver: the spans a Pusher call makes (names, kinds, parents, links, attributes,
events, status), retries joined into one trace, dead letters, no secret anywhere, the
standard OTEL_* variables, and the switch that keeps all of it unloaded when off.

The calls are driven by hand, as the engine will drive them, over real notifications:
written by relay.producer inside a real producer span, read back by relay.message.parse.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import relay
from relay import tracing, tracing_switch
from relay.config import PusherTarget
from relay.delivery import Delivery, Failure, Kind
from relay.fate import Ack, DeadLetter, PutBack, RetryLater
from relay.message import Notification, parse, retry_wrapper
from relay.producer import encode
from relay.pusher_server import LocalPusher
from tests.otlp_receiver import OtlpReceiver, Span
from tests.support import ROOT
from tests.trace_tree import dump, load, render

QUEUE = "notifications"
WORKER = "host-1:4242:ab12"
SECRET = "s3cr3t-never-in-a-span"
PUSHER = "http://127.0.0.1:4567"
MARKER = "PAYLOAD-MARKER-42"  # in every notification's data: never in a span


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver) -> pytest.MonkeyPatch:
    """Only the endpoint set, as an operator turning tracing on would."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    return monkeypatch


@pytest.fixture
def tracer(otel_env: pytest.MonkeyPatch) -> Iterator[tracing.Tracer]:
    started = tracing_switch.start(QUEUE, WORKER, secrets=[SECRET])
    assert isinstance(started, tracing.Tracer)
    yield started
    started.close()


@pytest.fixture
def shop(receiver: OtlpReceiver) -> Iterator[Any]:
    """The web app's own tracer (service `shop`), exporting to the same receiver."""
    provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=receiver.traces_url)))
    yield provider.get_tracer("shop")
    provider.shutdown()


def produced(shop: Any, *channels: str, n: int = 1, ident: str | None = None,
             age_s: float = 0.0) -> tuple[Notification, str]:
    """A notification the producer wrote inside a request span, as the worker parses it;
    and that span's traceparent."""
    with shop.start_as_current_span("POST /orders") as span:
        ctx = span.get_span_context()
        text = encode(list(channels), {"n": n, "secret_data": MARKER},
                      now=time.time() - age_s)
    if ident is not None:
        text = json.dumps({**json.loads(text), "id": ident})
    return parse(text.encode(), "hit"), tracing.traceparent_of(ctx)


def ids(traceparent: str) -> tuple[str, str]:
    """(trace id, span id) of a traceparent."""
    version, trace_id, span_id, flags = traceparent.split("-")
    return trace_id, span_id


def exported(tracer: tracing.Tracer, receiver: OtlpReceiver, count: int) -> list[Span]:
    assert tracer.flush()
    return receiver.wait_for_spans(lambda spans: len(relays(spans)) >= count,
                                   what=f"{count} relay spans")


def relays(spans: list[Span]) -> list[Span]:
    return [s for s in spans if s.resource.get("service.name") == "relay"]


def one(spans: list[Span], name: str) -> Span:
    found = [s for s in relays(spans) if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def signed_url(path: str) -> str:
    """What the pusher library really requests: the signature in the query."""
    from pusher.http import POST, Request
    from pusher.pusher_client import PusherClient

    client = PusherClient(app_id="1", key="the-key", secret=SECRET, host="127.0.0.1",
                          port=4567, ssl=False)
    request = Request(client, POST, path, {"name": "e", "channels": ["c"], "data": "{}"})
    assert "auth_signature=" in request.url
    return request.url


# -- one call ---------------------------------------------------------------------------------


def test_a_batch_call_is_one_consumer_span_linked_to_each_producer_with_an_http_child(
        tracer: tracing.Tracer, receiver: OtlpReceiver, shop: Any) -> None:
    first, first_ctx = produced(shop, "site-1", n=1, age_s=2.0)
    second, second_ctx = produced(shop, "site-2", n=2, ident="order-7", age_s=1.0)
    classic = parse(json.dumps({"channel": "site-1", "secret_data": MARKER}).encode(), "hit")
    notes = [first, second, classic]
    now = time.time()
    with tracer.call(notes) as call:
        with call.http("POST", signed_url("/apps/1/batch_events")) as http:
            http.answered(200)
        for note in notes:
            call.settled(note, Ack(), now)

    spans = exported(tracer, receiver, 2)
    process = one(spans, f"process {QUEUE}")
    post = one(spans, "POST /apps/{app_id}/batch_events")
    assert (process.kind, process.parent_span_id) == ("CONSUMER", None)  # a root
    ages = process.attributes.pop("relay.message.age_seconds")
    assert process.attributes == {
        "messaging.system": "relay", "messaging.operation.type": "process",
        "messaging.operation.name": "process", "messaging.destination.name": QUEUE,
        "messaging.client.id": WORKER, "messaging.batch.message_count": 3,
        "relay.channels": ["site-1", "site-2"], "relay.attempt": 1}
    # the classic message has no enqueue time; the others waited as the histogram counts
    assert [round(a, 3) for a in ages] == [round(n.age_at(now) or 0, 3) for n in notes[:2]]
    assert 1.9 < ages[0] < 2.5 and 0.9 < ages[1] < 1.5
    assert [(lk.trace_id, lk.span_id, lk.attributes) for lk in process.links] == [
        (*ids(first_ctx), {}), (*ids(second_ctx), {"messaging.message.id": "order-7"})]
    assert process.status_code == "UNSET" and process.events == ()

    assert (post.kind, post.trace_id, post.parent_span_id) == (
        "CLIENT", process.trace_id, process.span_id)
    assert post.attributes == {
        "http.request.method": "POST", "server.address": "127.0.0.1", "server.port": 4567,
        "url.full": f"{PUSHER}/apps/1/batch_events",
        "url.template": "/apps/{app_id}/batch_events", "http.response.status_code": 200}
    assert post.status_code == "UNSET"
    assert process.start_ns <= post.start_ns <= post.end_ns <= process.end_ns

    assert process.scope == "relay" and process.schema_url.endswith("/schemas/1.44.0")
    assert process.resource["service.name"] == "relay"  # the default, no OTEL_SERVICE_NAME
    assert process.resource["service.version"] == tracing.__version__


def test_a_single_notification_names_its_id_and_is_no_batch(
        tracer: tracing.Tracer, receiver: OtlpReceiver, shop: Any) -> None:
    note, ctx = produced(shop, "a", "b", ident="order-9")
    with tracer.call([note]) as call:
        with call.http("POST", f"{PUSHER}/apps/1/events") as http:
            http.answered(200)
        call.settled(note, Ack(), time.time())
    process = one(exported(tracer, receiver, 2), f"process {QUEUE}")
    assert process.attributes["messaging.message.id"] == "order-9"
    assert "messaging.batch.message_count" not in process.attributes
    assert process.attributes["relay.channels"] == ["a", "b"]
    assert [lk.trace_id for lk in process.links] == [ctx.split("-")[1]]


@pytest.mark.parametrize(("status", "status_code"), [(200, "UNSET"), (202, "UNSET"),
                                                      (429, "ERROR"), (503, "ERROR")])
def test_the_http_span_follows_the_status_code(
        tracer: tracing.Tracer, receiver: OtlpReceiver, status: int, status_code: str) -> None:
    with tracer.call([]) as call, call.http("POST", f"{PUSHER}/apps/1/events") as http:
        http.answered(status)
    post = one(exported(tracer, receiver, 2), "POST /apps/{app_id}/events")
    assert post.attributes["http.response.status_code"] == status
    assert post.status_code == status_code
    assert post.attributes.get("error.type") == (None if status < 400 else str(status))


def test_a_network_error_is_the_http_spans_error_type_and_passes_through(
        tracer: tracing.Tracer, receiver: OtlpReceiver) -> None:
    with pytest.raises(ConnectionRefusedError), tracer.call([]) as call:
        with call.http("POST", f"{PUSHER}/apps/1/events"):
            raise ConnectionRefusedError(f"refused: {signed_url('/apps/1/events')}")
    spans = exported(tracer, receiver, 2)
    post = one(spans, "POST /apps/{app_id}/events")
    assert "http.response.status_code" not in post.attributes
    assert (post.attributes["error.type"], post.status_code) == ("ConnectionRefusedError",
                                                                 "ERROR")
    assert post.status_message.startswith("refused: http://127.0.0.1:4567/apps/1/events?")
    assert "auth_" not in post.status_message and SECRET not in post.status_message
    process = one(spans, f"process {QUEUE}")  # the exception left the call too
    assert (process.attributes["error.type"], process.status_code) == (
        "ConnectionRefusedError", "ERROR")


def test_a_library_exception_is_named_with_its_module(
        tracer: tracing.Tracer, receiver: OtlpReceiver) -> None:
    from relay.delivery import TransportError

    with tracer.call([]) as call:
        try:
            with call.http("POST", f"{PUSHER}/apps/1/events"):
                raise TransportError("proxy said no")
        except TransportError:
            pass
    post = one(exported(tracer, receiver, 2), "POST /apps/{app_id}/events")
    assert post.attributes["error.type"] == "relay.delivery.TransportError"


def test_an_unknown_method_and_a_url_outside_the_api(
        tracer: tracing.Tracer, receiver: OtlpReceiver) -> None:
    with tracer.call([]) as call:
        with call.http("PURGE", "https://user:pw@[::1]/cache?auth_key=k#frag"):
            pass
    other = one(exported(tracer, receiver, 2), "HTTP")
    assert other.attributes == {"http.request.method": "_OTHER",
                                "http.request.method_original": "PURGE",
                                "server.address": "::1", "server.port": 443,
                                "url.full": "https://[::1]/cache"}


# -- failures ---------------------------------------------------------------------------------


def test_a_dead_letter_is_an_event_and_the_calls_error(
        tracer: tracing.Tracer, receiver: OtlpReceiver, shop: Any) -> None:
    note, _ = produced(shop, "site-1", ident="order-3")
    failure = Failure(Kind.PERMANENT, "HTTP 400: Invalid JSON provided", 400)
    with tracer.call([note]) as call:
        with call.http("POST", f"{PUSHER}/apps/1/events") as http:
            http.answered(400)
        call.settled(note, DeadLetter("rejected", failure.reason, 1), time.time(), failure)
    spans = exported(tracer, receiver, 2)
    process = one(spans, f"process {QUEUE}")
    assert (process.status_code, process.status_message) == (
        "ERROR", "HTTP 400: Invalid JSON provided")
    assert process.attributes["error.type"] == "permanent"
    assert [(e.name, e.attributes) for e in process.events] == [(
        "relay.dead_letter", {"error.type": "rejected",
                              "relay.reason": "HTTP 400: Invalid JSON provided",
                              "relay.attempts": 1, "relay.channels": ["site-1"],
                              "messaging.message.id": "order-3"})]
    assert one(spans, "POST /apps/{app_id}/events").attributes["error.type"] == "400"


def test_in_a_batch_the_event_names_the_notification_and_the_others_still_count(
        tracer: tracing.Tracer, receiver: OtlpReceiver, shop: Any) -> None:
    good, _ = produced(shop, "ok", age_s=1.0)
    bad, _ = produced(shop, "bad", age_s=1.0)
    now = time.time()
    with tracer.call([good, bad]) as call:
        call.settled(good, Ack(), now)
        call.settled(bad, DeadLetter("exhausted", "gave up after 10 attempts: HTTP 503", 10),
                     now)
    process = one(exported(tracer, receiver, 1), f"process {QUEUE}")
    assert process.attributes["error.type"] == "exhausted"  # no Failure given: the class
    assert [e.attributes["relay.channels"] for e in process.events] == [["bad"]]
    assert len(process.attributes["relay.message.age_seconds"]) == 2


def test_a_put_back_without_a_failure_is_no_error(
        tracer: tracing.Tracer, receiver: OtlpReceiver, shop: Any) -> None:
    """Returned untouched (the gate closed before its turn): nothing failed."""
    note, _ = produced(shop, "c")
    with tracer.call([note]) as call:
        call.settled(note, PutBack(), time.time())
    process = one(exported(tracer, receiver, 1), f"process {QUEUE}")
    assert process.status_code == "UNSET" and "error.type" not in process.attributes


def test_a_429_is_the_calls_error_as_rate_limited(
        tracer: tracing.Tracer, receiver: OtlpReceiver, shop: Any) -> None:
    note, _ = produced(shop, "c")
    failure = Failure(Kind.RATE_LIMITED, "HTTP 429: slow down", 429, 1.0)
    with tracer.call([note]) as call:
        call.settled(note, PutBack(), time.time(), failure)
    process = one(exported(tracer, receiver, 1), f"process {QUEUE}")
    assert (process.status_code, process.attributes["error.type"]) == ("ERROR",
                                                                        "rate_limited")


def test_an_unparseable_notification_gets_a_span_linked_to_its_producer(
        tracer: tracing.Tracer, receiver: OtlpReceiver, shop: Any) -> None:
    note, ctx = produced(shop, "fine")
    broken = json.loads(note.payload)
    broken["channels"] = ["not a channel!"]
    tracer.invalid(json.dumps(broken).encode(), "invalid channel name 'not a channel!'")
    tracer.invalid(b"\xff not even JSON", "not UTF-8 text")
    spans = [s for s in exported(tracer, receiver, 2) if s.name == f"process {QUEUE}"]
    linked, unlinked = sorted(spans, key=lambda s: len(s.links), reverse=True)
    assert [lk.trace_id for lk in linked.links] == [ctx.split("-")[1]]
    assert unlinked.links == ()
    for span in spans:
        assert (span.status_code, span.attributes["error.type"]) == ("ERROR", "invalid")
        assert [e.name for e in span.events] == ["relay.dead_letter"]
    assert linked.status_message == "invalid channel name 'not a channel!'"


# -- retries ----------------------------------------------------------------------------------


def test_a_notification_failing_twice_then_delivered_is_one_trace_of_three_calls(
        tracer: tracing.Tracer, receiver: OtlpReceiver, shop: Any) -> None:
    """Each retry wrapper carries the first call's context; later calls are its children and
    link to it, and every call links to the producer."""
    note, producer_ctx = produced(shop, "site-1")
    contexts = []
    for attempt in (1, 2, 3):
        with tracer.call([note]) as call:
            with call.http("POST", f"{PUSHER}/apps/1/events") as http:
                http.answered(503 if attempt < 3 else 200)
            if attempt == 3:
                call.settled(note, Ack(), time.time())
                break
            failure = Failure(Kind.TRANSIENT, "HTTP 503: busy", 503)
            fate = RetryLater(attempt, time.time(), 0.5 * attempt, failure.reason)
            call.settled(note, fate, time.time(), failure)
            contexts.append(call.retry_traceparent(note))
            wrapper = retry_wrapper(note.payload, attempt, fate.first_failed_at, fate.reason,
                                    first_traceparent=contexts[-1])
        note = parse(wrapper.encode(), "hit")
        assert note.traceparent is not None and note.first_traceparent == contexts[0]

    assert contexts[0] == contexts[1]  # kept from attempt to attempt, never replaced
    spans = exported(tracer, receiver, 6)
    calls = sorted((s for s in relays(spans) if s.kind == "CONSUMER"),
                   key=lambda s: s.start_ns)
    first = calls[0]
    assert [c.attributes["relay.attempt"] for c in calls] == [1, 2, 3]
    assert {c.trace_id for c in calls} == {first.trace_id}  # one trace shows every attempt
    assert contexts[0].split("-")[1:3] == [first.trace_id, first.span_id]
    assert [c.parent_span_id for c in calls] == [None, first.span_id, first.span_id]
    # Every call links to the producer; later attempts also link to the first (the issue's
    # "link"), beside being its children (what puts them in one trace in every viewer).
    producer_trace = producer_ctx.split("-")[1]
    assert [lk.trace_id for lk in first.links] == [producer_trace]
    for call_span in calls[1:]:
        assert [(lk.trace_id, lk.attributes.get("relay.link")) for lk in call_span.links] == [
            (producer_trace, None), (first.trace_id, "first_attempt")]
    assert [[e.attributes["relay.attempts"] for e in c.events] for c in calls] == [
        [1], [2], []]
    assert [c.status_code for c in calls] == ["ERROR", "ERROR", "UNSET"]
    assert [c.attributes.get("error.type") for c in calls] == ["transient", "transient", None]
    posts = [s for s in relays(spans) if s.kind == "CLIENT"]
    assert sorted(p.parent_span_id for p in posts) == sorted(c.span_id for c in calls)


def test_a_batch_of_retried_notifications_links_to_each_first_call(
        tracer: tracing.Tracer, receiver: OtlpReceiver) -> None:
    """A span has one parent: should retries ever share a call, each first call is a link."""
    firsts = [f"00-{'a' * 31}{i}-{'b' * 15}{i}-01" for i in (1, 2)]
    notes = [parse(retry_wrapper('{"channel":"c"}', 1, 1.0, "e", first_traceparent=f).encode(),
                   "hit") for f in firsts]
    with tracer.call(notes):
        pass
    process = one(exported(tracer, receiver, 1), f"process {QUEUE}")
    assert process.parent_span_id is None and process.attributes["relay.attempt"] == 2
    assert [(f"00-{lk.trace_id}-{lk.span_id}-01", lk.attributes) for lk in process.links] == [
        (f, {"relay.link": "first_attempt"}) for f in firsts]


# -- secrets ----------------------------------------------------------------------------------


def test_no_secret_no_signed_query_and_no_payload_in_any_span(
        tracer: tracing.Tracer, receiver: OtlpReceiver, shop: Any) -> None:
    """A wrong secret against the local Pusher server: its real 401 body echoes the signed
    string (auth_key=...). Every text of every span is scanned."""
    with LocalPusher(key="the-key", secret="right-secret") as server:
        target = PusherTarget(app_id="1", key="the-key", secret=SECRET, host="127.0.0.1",
                              port=server.port, ssl=False, timeout=5.0)
        delivery = Delivery(target, pool_size=2, http_client="urllib3")
        note, _ = produced(shop, "site-1")
        with tracer.call([note]) as call:
            with call.http("POST", signed_url("/apps/1/events")) as http:
                (failure,) = delivery.send([note])
                http.answered(failure.status if failure else 200)
            assert failure is not None and "auth_key=the-key" in failure.reason  # the leak
            fate = DeadLetter("exhausted", f"gave up: {failure.reason} {SECRET}", 10)
            call.settled(note, fate, time.time(), failure)
        delivery.close()
    spans = relays(exported(tracer, receiver, 2))
    texts = [text for span in spans for text in span.strings()]
    assert any("Invalid signature" in t for t in texts)  # the reason itself is kept
    for forbidden in ("auth_", "body_md5", SECRET, "the-key", MARKER, "secret_data"):
        assert not [t for t in texts if forbidden in t], forbidden


def test_scrub() -> None:
    text = ("HTTP 401: expected HMAC of 'POST\\n/apps/1/events\\nauth_key=k&auth_timestamp=1"
            "&auth_version=1.0&body_md5=abc' with sec; url /x?auth_signature=f00&x=1")
    assert tracing.scrub(text, ["sec"]) == (
        "HTTP 401: expected HMAC of 'POST\\n/apps/1/events\\n[signed query]&[signed query]"
        "&[signed query]&[signed query]' with [secret]; url /x?[signed query]&x=1")
    assert len(tracing.scrub("x" * 1000)) == tracing.MAX_TEXT


# -- the standard environment -----------------------------------------------------------------


def test_the_standard_variables_work_as_users_expect(
        otel_env: pytest.MonkeyPatch, receiver: OtlpReceiver) -> None:
    otel_env.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.traces_url)
    otel_env.setenv("OTEL_SERVICE_NAME", "relay-eu")
    otel_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=prod,team=web")
    otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-api-key=collector-token")
    otel_env.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    started = tracing_switch.start(QUEUE, WORKER)
    with started.call([]):
        pass
    started.close()
    (span,) = receiver.wait_for_spans(1)
    assert span.resource["service.name"] == "relay-eu"
    assert span.resource["deployment.environment.name"] == "prod"
    assert span.resource["team"] == "web"
    (export,) = receiver.exports()
    assert export.headers["x-api-key"] == "collector-token" and export.encoding == "gzip"


def test_the_sampler_comes_from_the_environment_and_retries_follow_the_first_decision(
        otel_env: pytest.MonkeyPatch, receiver: OtlpReceiver) -> None:
    otel_env.setenv("OTEL_TRACES_SAMPLER", "always_off")
    started = tracing_switch.start(QUEUE, WORKER)
    note = parse(b'{"channel":"c"}', "hit")
    with started.call([note]) as call:
        first = call.retry_traceparent(note)
    assert first is not None and not int(first[-2:], 16) & 0x01  # unsampled, a context
    started.close()
    otel_env.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    again = tracing_switch.start(QUEUE, WORKER)
    retried = parse(retry_wrapper(note.payload, 1, 1.0, "e", first).encode(), "hit")
    with again.call([retried]):  # its parent was not sampled: neither is it
        pass
    with again.call([note]):  # a first attempt is sampled
        pass
    again.close()
    (span,) = receiver.wait_for_spans(1)
    assert span.parent_span_id is None and span.attributes["relay.attempt"] == 1


@pytest.mark.parametrize(("env", "on", "warned"), [
    ({}, False, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True, None),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "TRUE"}, False, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "false"}, True, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_EXPORTER": "none"}, False, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_EXPORTER": "console,otlp"},
     True, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_EXPORTER": "zipkin"},
     False, "OTLP only"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     False, "http/protobuf only"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, True, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, False, "http/protobuf only"),
])
def test_the_switch(env: dict[str, str], on: bool, warned: str | None) -> None:
    decided, why = tracing_switch.decide(env)
    assert decided is on
    assert (why is None) if warned is None else (why is not None and warned in why)


def test_a_value_the_sdk_refuses_leaves_tracing_off_and_says_so(
        otel_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Most bad OTEL_* values the SDK replaces by its default, with a warning of its own;
    the batch processor's sizes it refuses."""
    otel_env.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "-1")
    with caplog.at_level(logging.ERROR, "relay.tracing_switch"):
        assert tracing_switch.start(QUEUE, WORKER) is tracing_switch.NO_TRACING
    assert "tracing off" in caplog.text and "max_queue_size" in caplog.text


def test_without_the_extra_tracing_stays_off_and_says_what_to_install(
        otel_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    otel_env.delitem(sys.modules, "relay.tracing", raising=False)
    otel_env.delattr(relay, "tracing", raising=False)  # `from relay import` reads it first
    otel_env.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                     None)  # what a missing package looks like to an import
    with caplog.at_level(logging.WARNING, "relay.tracing_switch"):
        assert tracing_switch.start(QUEUE, WORKER) is tracing_switch.NO_TRACING
    assert "pusher-relay[otel]" in caplog.text


def test_the_no_op_twin_does_nothing_and_keeps_a_wrappers_context() -> None:
    off = tracing_switch.NO_TRACING
    first = f"00-{'a' * 32}-{'b' * 16}-01"
    kept = parse(retry_wrapper('{"channel":"c"}', 1, 1.0, "e", first).encode(), "hit")
    fresh = parse(b'{"channel":"c"}', "hit")
    with off.call([kept, fresh]) as call:
        with call.http("POST", "http://x/apps/1/events") as http:
            http.answered(500)
        call.settled(kept, Ack(), 0.0)
        assert (call.retry_traceparent(kept), call.retry_traceparent(fresh)) == (first, None)
    off.invalid(b"x", "e")
    off.close()


# -- exporting: gevent, outages, exit ---------------------------------------------------------


def test_export_outages_are_logged_once_down_and_once_up(
        tracer: tracing.Tracer, receiver: OtlpReceiver,
        caplog: pytest.LogCaptureFixture) -> None:
    receiver.fail_next(400, 2)  # refused: dropped at once, no retry
    with caplog.at_level(logging.WARNING, "relay.tracing"):
        for _ in range(2):
            with tracer.call([]):
                pass
            tracer.flush()
        with tracer.call([]):
            pass
        tracer.flush()
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.tracing"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"tracing: cannot export spans to {receiver.traces_url}")
    assert "again" in lines[1] and "2 spans dropped" in lines[1]
    assert len(receiver.wait_for_spans(1)) == 1


def test_close_gives_up_on_a_collector_that_never_answers(
        otel_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The worker's exit must not wait for a hung collector: close() keeps its deadline."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # accepts connections (the backlog), never reads or answers
        otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT",
                        f"http://127.0.0.1:{hung.getsockname()[1]}")
        otel_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")
        started = tracing_switch.start(QUEUE, WORKER)
        with started.call([]):
            pass
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, "relay.tracing"):
            started.close(timeout_s=0.5)
        assert time.monotonic() - began < 5  # not the exporter's 30 s
    assert "not all exported within 0.5 s" in caplog.text


# -- off costs nothing; on, in a gevent process, exports at exit ------------------------------


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


# What the worker process loads: entry point's patching, then everything the launcher uses.
WORKER_PROCESS = """
from gevent import monkey
monkey.patch_all()
import json, sys
import relay.cli, relay.launcher, relay.process
from relay import tracing_switch
tracer = tracing_switch.start("q", "w", ["secret"])
print(json.dumps({"tracer": type(tracer).__name__,
                  "loaded": sorted(m for m in sys.modules if m == "relay.tracing"
                                   or m.startswith(("opentelemetry.sdk.trace",
                                                    "opentelemetry.exporter")))}))
tracer.close()
"""


def test_tracing_off_loads_neither_the_spans_module_nor_the_sdks_tracing() -> None:
    done = _python(WORKER_PROCESS, {})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"tracer": "NoTracer", "loaded": []}
    disabled = _python(WORKER_PROCESS, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                                        "OTEL_SDK_DISABLED": "true"})
    assert json.loads(disabled.stdout) == {"tracer": "NoTracer", "loaded": []}


def test_tracing_on_loads_them(receiver: OtlpReceiver) -> None:
    """The other side of the test above, so that one can fail."""
    done = _python(WORKER_PROCESS, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tracer"] == "Tracer" and "relay.tracing" in report["loaded"]
    assert "opentelemetry.sdk.trace" in report["loaded"]


def test_a_gevent_process_exports_its_spans_when_it_closes(receiver: OtlpReceiver) -> None:
    """monkey.patch_all() first, as worker.py does: the batch processor's thread is then a
    greenlet, and close() at exit sends what is queued (no flush before it)."""
    code = """
from gevent import monkey
monkey.patch_all()
import threading, gevent
from relay import tracing_switch
from relay.message import parse
from relay.fate import Ack
tracer = tracing_switch.start("q", "w")
assert threading.Thread is not monkey.get_original("threading", "Thread")
note = parse(b'{"channel":"c"}', "hit")
for n in range(3):
    with tracer.call([note]) as call:
        with call.http("POST", "http://127.0.0.1:9/apps/1/events") as http:
            gevent.sleep(0.01)  # the HTTP request, cooperatively
            http.answered(200)
        call.settled(note, Ack(), 0.0)
tracer.close(timeout_s=10)
"""
    done = _python(code, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                          "OTEL_BSP_SCHEDULE_DELAY": "60000"})  # only close() can send them
    assert done.returncode == 0, done.stderr
    spans = receiver.wait_for_spans(6)
    assert sorted(s.kind for s in spans) == ["CLIENT"] * 3 + ["CONSUMER"] * 3


# -- the rendering the README shows -----------------------------------------------------------


def test_a_trace_renders_as_a_text_tree(
        tracer: tracing.Tracer, receiver: OtlpReceiver, shop: Any, tmp_path: Path) -> None:
    note, _ = produced(shop, "site-42", age_s=0.5)
    for attempt in (1, 2):
        with tracer.call([note]) as call:
            with call.http("POST", f"{PUSHER}/apps/1/events") as http:
                http.answered(503 if attempt == 1 else 200)
            if attempt == 1:
                failure = Failure(Kind.TRANSIENT, "HTTP 503: busy", 503)
                call.settled(note, RetryLater(1, time.time(), 1.0, failure.reason),
                             time.time(), failure)
                note = parse(retry_wrapper(note.payload, 1, 1.0, failure.reason,
                                           call.retry_traceparent(note)).encode(), "hit")
            else:
                call.settled(note, Ack(), time.time())
    exported(tracer, receiver, 4)
    spans = receiver.wait_for_spans(5)  # the shop's request span too
    text = render(spans)
    lines = text.splitlines()
    assert [ln.split("…")[0][:5] for ln in lines if ln.startswith("trace")] == ["trace"] * 2
    assert any("shop: POST /orders [INTERNAL]" in ln for ln in lines), text
    process_lines = [ln for ln in lines if f"relay: process {QUEUE} [CONSUMER]" in ln]
    assert len(process_lines) == 2 and "└─" in process_lines[1], text
    assert "ERROR: HTTP 503: busy" in process_lines[0]
    assert sum("↳ link to shop: POST /orders in trace" in ln for ln in lines) == 2, text
    assert sum("• relay.retry" in ln for ln in lines) == 1, text
    assert sum("POST /apps/{app_id}/events [CLIENT]" in ln for ln in lines) == 2, text
    dump(spans, tmp_path / "spans.jsonl")  # saved, rendered later the same
    assert render(load(tmp_path / "spans.jsonl")) == text
