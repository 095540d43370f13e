"""Tracing end to end: a producer span in this process, the notification through Redis, a real
worker (`python worker.py`) exporting to the local OTLP receiver, and its spans linked back.
With tracing off, a real worker loads neither relay.tracing nor the SDK's tracing."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from relay.producer import Producer
from relay.pusher_server import LocalPusher
from tests.otlp_receiver import OtlpReceiver, Span
from tests.support import ROOT, WorkerProcess, dead, wait_for, wait_settled
from tests.trace_tree import render

# Runs worker.py as `python worker.py` does, then reports at exit what tracing it loaded.
REPORTING_WORKER = textwrap.dedent("""
    import atexit, json, os, runpy, sys

    def report():
        loaded = sorted(m for m in sys.modules if m == "relay.tracing"
                        or m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter")))
        with open(os.environ["MODULES_REPORT"], "w") as f:
            json.dump(loaded, f)

    atexit.register(report)
    sys.argv[0] = os.path.join(os.getcwd(), "worker.py")
    sys.path.insert(0, os.getcwd())
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers inherit this process's environment: no stray OTEL_* from the machine."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def traced(no_otel_env: None, receiver: OtlpReceiver) -> dict[str, str]:
    """What a worker needs to trace to the receiver, exporting promptly."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "relay-e2e"}


@pytest.fixture
def shop(receiver: OtlpReceiver) -> Iterator[Any]:
    provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=receiver.traces_url)))
    yield provider.get_tracer("shop")
    provider.shutdown()


def push_traced(shop: Any, r: redis.Redis, queue: str, channel: str, n: int = 1) -> str:
    """Push one envelope inside a request span; the span's trace id."""
    with shop.start_as_current_span("POST /orders") as span:
        Producer(r, queue).notify([channel], {"n": n})
    return f"{span.get_span_context().trace_id:032x}"


def relay_spans(receiver: OtlpReceiver) -> list[Span]:
    return [s for s in receiver.spans() if s.resource.get("service.name") == "relay-e2e"]


def calls_linked_to(receiver: OtlpReceiver, trace_id: str) -> list[Span]:
    return sorted((s for s in relay_spans(receiver) if s.kind == "CONSUMER"
                   and any(lk.trace_id == trace_id for lk in s.links)),
                  key=lambda s: s.start_ns)


def http_children(receiver: OtlpReceiver, span: Span) -> list[Span]:
    """The HTTP requests of a call (a first call also parents its retries' calls)."""
    return [s for s in relay_spans(receiver)
            if s.parent_span_id == span.span_id and s.kind == "CLIENT"]


def test_a_worker_with_tracing_off_loads_no_tracing(
        no_otel_env: None, r: redis.Redis, queue_name: str, tmp_path: Path,
        worker_env: dict[str, str], pusher: LocalPusher) -> None:
    """`--burst` on a queue with work in it: the whole delivery path runs, then the report."""
    script = tmp_path / "reporting_worker.py"
    script.write_text(REPORTING_WORKER)
    report = tmp_path / "modules.json"
    r.rpush(queue_name, json.dumps({"channel": "c", "n": 1}))
    worker = WorkerProcess({**worker_env, "MODULES_REPORT": str(report)},
                           tmp_path / "worker.log", ["--burst"], script=script)
    assert worker.wait() == 0, worker.log()
    assert len(pusher.events()) == 1
    assert json.loads(report.read_text()) == [], worker.log()


def test_a_worker_with_tracing_on_loads_it(
        traced: dict[str, str], r: redis.Redis, queue_name: str, tmp_path: Path,
        worker_env: dict[str, str], pusher: LocalPusher) -> None:
    script = tmp_path / "reporting_worker.py"
    script.write_text(REPORTING_WORKER)
    report = tmp_path / "modules.json"
    r.rpush(queue_name, json.dumps({"channel": "c", "n": 1}))
    worker = WorkerProcess({**worker_env, **traced, "MODULES_REPORT": str(report)},
                           tmp_path / "worker.log", ["--burst"], script=script)
    assert worker.wait() == 0, worker.log()
    assert "relay.tracing" in json.loads(report.read_text()), worker.log()


def test_a_producer_span_ends_as_a_linked_relay_span_with_an_http_child(
        traced: dict[str, str], receiver: OtlpReceiver, shop: Any, r: redis.Redis,
        queue_name: str, pusher: LocalPusher, start_worker: Callable[..., WorkerProcess]
        ) -> None:
    start_worker(**traced)
    trace_id = push_traced(shop, r, queue_name, "site-42")
    pusher.wait_for_events(1)
    (call,) = wait_for(lambda: calls_linked_to(receiver, trace_id), what="the relay span")
    assert call.name == f"process {queue_name}" and call.parent_span_id is None
    assert call.attributes["messaging.system"] == "relay"
    assert call.attributes["messaging.destination.name"] == queue_name
    assert call.attributes["relay.channels"] == ["site-42"]
    assert call.attributes["relay.attempt"] == 1
    assert len(call.attributes["relay.message.age_seconds"]) == 1
    (http,) = wait_for(lambda: http_children(receiver, call), what="the HTTP child")
    assert http.kind == "CLIENT" and http.name == "POST /apps/{app_id}/events"
    assert http.attributes["http.response.status_code"] == 200
    assert http.attributes["server.address"] == "127.0.0.1"
    assert http.attributes["server.port"] == pusher.port
    assert http.attributes["url.full"] == f"{pusher.base_url}/apps/{pusher.app_id}/events"


def test_failing_twice_then_delivered_is_three_calls_in_one_trace(
        traced: dict[str, str], receiver: OtlpReceiver, shop: Any, r: redis.Redis,
        queue_name: str, pusher: LocalPusher, start_worker: Callable[..., WorkerProcess]
        ) -> None:
    pusher.set_mode(status=503, fail_next=2)
    start_worker(**traced)
    trace_id = push_traced(shop, r, queue_name, "site-7")
    pusher.wait_for_events(1, timeout=30)
    calls = wait_for(lambda: (found := calls_linked_to(receiver, trace_id))
                     and len(found) == 3 and found, timeout=30, what="three linked calls")
    first = calls[0]
    assert [c.attributes["relay.attempt"] for c in calls] == [1, 2, 3]
    assert [c.parent_span_id for c in calls] == [None, first.span_id, first.span_id]
    assert {c.trace_id for c in calls} == {first.trace_id}
    assert [c.status_code for c in calls] == ["ERROR", "ERROR", "UNSET"]
    assert [[e.name for e in c.events] for c in calls] == [["relay.retry"], ["relay.retry"],
                                                           []]
    statuses = [[h.attributes.get("http.response.status_code")
                 for h in http_children(receiver, c)] for c in calls]
    assert statuses == [[503], [503], [200]]


def test_a_dead_letter_is_an_error_with_its_reason(
        traced: dict[str, str], receiver: OtlpReceiver, shop: Any, r: redis.Redis,
        queue_name: str, pusher: LocalPusher, start_worker: Callable[..., WorkerProcess]
        ) -> None:
    pusher.set_mode(status=400, status_channels=["refused"])
    start_worker(**traced)
    trace_id = push_traced(shop, r, queue_name, "refused")
    wait_for(lambda: dead(r, queue_name), what="the dead letter")
    (call,) = wait_for(lambda: [c for c in calls_linked_to(receiver, trace_id)
                                if c.status_code == "ERROR"], what="the failed call")
    (event,) = [e for e in call.events if e.name == "relay.dead_letter"]
    assert event.attributes["error.type"] == "rejected"
    assert event.attributes["relay.reason"].startswith("HTTP 400")
    assert call.status_message.startswith("HTTP 400")
    assert call.attributes["error.type"] == "permanent"


def test_no_secret_in_any_attribute(
        traced: dict[str, str], receiver: OtlpReceiver, shop: Any, r: redis.Redis,
        queue_name: str, pusher: LocalPusher, start_worker: Callable[..., WorkerProcess]
        ) -> None:
    """Deliveries, then a wrong secret (the 401 body echoes the signed string) until the
    notification is dead-lettered: every text of every span is scanned."""
    start_worker(**traced)
    push_traced(shop, r, queue_name, "ok")
    pusher.wait_for_events(1)
    wrong = pusher.url.replace(pusher.secret, "wrong-secret")
    start_worker(PUSHER_URL=wrong, RELAY_MAX_ATTEMPTS="2", RELAY_QUEUE=queue_name + "-b",
                 **traced)
    push_traced(shop, r, queue_name + "-b", "wrong")
    wait_for(lambda: dead(r, queue_name + "-b"), timeout=30, what="the 401 dead letter")
    wait_for(lambda: any("Invalid signature" in s.status_message
                         for s in relay_spans(receiver)), what="the 401's span")
    texts = [t for span in relay_spans(receiver) for t in span.strings()]
    for forbidden in ("auth_", "body_md5", pusher.secret, "wrong-secret", pusher.key, '"n"'):
        assert not [t for t in texts if forbidden in t], forbidden


def test_spans_are_exported_when_the_worker_stops(
        no_otel_env: None, receiver: OtlpReceiver, shop: Any, r: redis.Redis,
        queue_name: str, pusher: LocalPusher, start_worker: Callable[..., WorkerProcess]
        ) -> None:
    """A schedule far longer than the test: only the exit's close() can send the spans."""
    worker = start_worker(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                          OTEL_BSP_SCHEDULE_DELAY="600000", OTEL_SERVICE_NAME="relay-e2e")
    trace_id = push_traced(shop, r, queue_name, "c")
    pusher.wait_for_events(1)
    wait_settled(r, queue_name)
    assert calls_linked_to(receiver, trace_id) == []
    began = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert time.monotonic() - began < 10
    wait_for(lambda: calls_linked_to(receiver, trace_id), what="the span sent at exit")


def test_the_readme_example_trace(
        traced: dict[str, str], receiver: OtlpReceiver, shop: Any, r: redis.Redis,
        queue_name: str, pusher: LocalPusher, start_worker: Callable[..., WorkerProcess]
        ) -> None:
    """The trace the README shows: one retry, then delivered. Saved as JSON lines under
    .cache/ for `python -m tests.trace_tree FILE`."""
    from tests.trace_tree import dump

    pusher.set_mode(status=503, fail_next=1)
    start_worker(**traced)
    trace_id = push_traced(shop, r, queue_name, "site-42")
    wait_for(lambda: len(calls_linked_to(receiver, trace_id)) == 2, timeout=30,
             what="two calls")
    spans = receiver.wait_for_spans(lambda s: len([x for x in s if x.kind == "CLIENT"]) >= 2)
    text = render(spans)
    assert "↳ link to shop: POST /orders" in text and "└─ relay-e2e: process" in text, text
    (ROOT / ".cache").mkdir(exist_ok=True)
    dump(spans, ROOT / ".cache" / "readme-trace.jsonl")
