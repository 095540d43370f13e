"""tests/otlp_receiver.py against the real OpenTelemetry SDK and OTLP/HTTP exporter: what a
span made here holds arrives decoded, compressed or not, and the receiver answers as a
collector would. The batch processor runs its own thread: under the suite's gevent patching
a greenlet, which must export by itself (no flush) while the test waits."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from gevent import monkey
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from tests.otlp_receiver import OtlpReceiver

UPSTREAM = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def provider_to(receiver: OtlpReceiver, processor: type = SimpleSpanProcessor,
                **exporter: object) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "receiver-test"}))
    span_exporter = OTLPSpanExporter(endpoint=receiver.traces_url, **exporter)  # type: ignore[arg-type]
    provider.add_span_processor(processor(span_exporter))
    return provider


def test_a_span_arrives_with_everything_it_holds(receiver: OtlpReceiver) -> None:
    provider = provider_to(receiver)
    tracer = provider.get_tracer("relay.tests", "9.9", schema_url="https://example/1.0")
    with tracer.start_as_current_span("parent", kind=SpanKind.SERVER) as parent:
        with tracer.start_as_current_span(
                "process q", kind=SpanKind.CONSUMER, links=[Link(UPSTREAM, {"i": 1})],
                attributes={"s": "text", "n": 7, "f": 0.25, "b": True,
                            "a": ["x", "y"], "fa": [1.5, 2.5]}) as child:
            child.add_event("relay.dead_letter", {"reason": "HTTP 400"})
            child.set_status(Status(StatusCode.ERROR, "refused"))
    provider.shutdown()

    spans = {s.name: s for s in receiver.wait_for_spans(2)}
    got, top = spans["process q"], spans["parent"]
    ctx = child.get_span_context()
    assert (got.trace_id, got.span_id) == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert got.parent_span_id == f"{parent.get_span_context().span_id:016x}"
    assert top.parent_span_id is None and top.kind == "SERVER"
    assert got.kind == "CONSUMER"
    assert got.attributes == {"s": "text", "n": 7, "f": 0.25, "b": True, "a": ["x", "y"],
                              "fa": [1.5, 2.5]}
    assert [(lk.trace_id, lk.span_id, lk.attributes) for lk in got.links] == [
        ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", {"i": 1})]
    assert [(e.name, e.attributes) for e in got.events] == [
        ("relay.dead_letter", {"reason": "HTTP 400"})]
    assert (got.status_code, got.status_message) == ("ERROR", "refused")
    assert top.status_code == "UNSET"
    assert got.resource["service.name"] == "receiver-test"
    assert (got.scope, got.scope_version, got.schema_url) == (
        "relay.tests", "9.9", "https://example/1.0")
    assert 0 <= got.duration_s < 60 and got.end_ns >= got.start_ns
    assert "HTTP 400" in got.strings() and "refused" in got.strings()


@pytest.mark.parametrize("compression", [Compression.Gzip, Compression.Deflate,
                                         Compression.NoCompression])
def test_compressed_exports_are_decoded(receiver: OtlpReceiver,
                                        compression: Compression) -> None:
    provider = provider_to(receiver, compression=compression,
                           headers={"x-tenant": "relay-tests"})
    with provider.get_tracer("t").start_as_current_span("compressed"):
        pass
    provider.shutdown()
    assert [s.name for s in receiver.wait_for_spans(1)] == ["compressed"]
    (export,) = receiver.exports()
    expected = {Compression.Gzip: "gzip", Compression.Deflate: "deflate"}.get(compression, "")
    assert export.encoding == expected
    assert export.headers["x-tenant"] == "relay-tests"
    assert export.headers["content-type"] == "application/x-protobuf"


def test_the_batch_processor_exports_by_itself_under_gevent(receiver: OtlpReceiver) -> None:
    """Its worker thread is a greenlet here: it must run while this greenlet waits."""
    assert monkey.is_module_patched("threading"), "run the tests under gevent.monkey"
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=receiver.traces_url), schedule_delay_millis=50))
    try:
        for n in range(3):
            with provider.get_tracer("t").start_as_current_span(f"batched {n}"):
                pass
        spans = receiver.wait_for_spans(3, what="the batch processor's own export")
        assert sorted(s.name for s in spans) == ["batched 0", "batched 1", "batched 2"]
    finally:
        provider.shutdown()


def test_a_failing_collector_is_retried_by_the_exporter(receiver: OtlpReceiver) -> None:
    receiver.fail_next(503)  # retryable: the exporter backs off once and sends again
    provider = provider_to(receiver, timeout=10)
    with provider.get_tracer("t").start_as_current_span("after a 503"):
        pass
    provider.shutdown()
    assert [s.name for s in receiver.wait_for_spans(1)] == ["after a 503"]


def test_a_refusal_keeps_nothing(receiver: OtlpReceiver) -> None:
    receiver.fail_next(400)  # not retryable: the batch is dropped, as a collector would
    provider = provider_to(receiver)
    with provider.get_tracer("t").start_as_current_span("refused"):
        pass
    with provider.get_tracer("t").start_as_current_span("accepted"):
        pass
    provider.shutdown()
    assert [s.name for s in receiver.wait_for_spans(1)] == ["accepted"]


@pytest.mark.parametrize(("path", "content_type", "status"), [
    ("/v1/traces", "application/json", 415),
    ("/v1/metrics", "application/x-protobuf", 404),
    ("/v1/traces", "application/x-protobuf", 400),  # not a protobuf request
])
def test_what_is_not_an_otlp_trace_export_is_refused(
        receiver: OtlpReceiver, path: str, content_type: str, status: int) -> None:
    request = urllib.request.Request(receiver.endpoint + path, data=b"\xff\xfe not protobuf",
                                     headers={"Content-Type": content_type}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == status
    assert receiver.spans() == []
