"""A local OTLP/HTTP trace receiver for tests: what a collector would get, decoded.

1. `OtlpReceiver` listens on a free loopback port and accepts `POST /v1/traces` with a
   protobuf `ExportTraceServiceRequest` (plain, gzip or deflate, as the exporter's
   OTEL_EXPORTER_OTLP_COMPRESSION says), decoded with `opentelemetry-proto`, the schema the
   real exporter encodes with. Anything else gets the status a collector would give.
2. Spans are kept as plain `Span` records (ids in hex, attributes as Python values) for tests
   to query; `wait_for_spans` waits on a condition with a deadline.
3. `fail_next(status, count)` answers the next exports with an error, as a collector that is
   down or overloaded would.

Threads serve the requests: under the suite's gevent patching they are greenlets, so the
receiver runs in the test process beside the exporter it receives from.
"""

from __future__ import annotations

import gzip
import http.server
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from tests.support import wait_for

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "": lambda body: body, "identity": lambda body: body,
    "gzip": gzip.decompress, "deflate": zlib.decompress}
_KINDS = {value: name.removeprefix("SPAN_KIND_") for name, value in ProtoSpan.SpanKind.items()}
_STATUS = {value: name.removeprefix("STATUS_CODE_") for name, value in Status.StatusCode.items()}


def value_of(value: AnyValue) -> Any:
    """An OTLP attribute value as the Python value it was made from."""
    which = value.WhichOneof("value")
    if which == "array_value":
        return [value_of(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return None if which is None else getattr(value, which)


def attributes_of(pairs: Sequence[KeyValue]) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in pairs}


@dataclass(frozen=True)
class Link:
    trace_id: str
    span_id: str
    trace_state: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Event:
    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Span:
    """One received span; ids are lowercase hex, `parent_span_id` None for a root."""

    name: str
    kind: str  # INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER (UNSPECIFIED if unset)
    trace_id: str
    span_id: str
    parent_span_id: str | None
    trace_state: str
    flags: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: tuple[Event, ...]
    links: tuple[Link, ...]
    status_code: str  # UNSET, OK, ERROR
    status_message: str
    resource: dict[str, Any] = field(repr=False)
    scope: str = ""
    scope_version: str = ""
    schema_url: str = ""

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    def strings(self) -> list[str]:
        """Every text this span holds (names, attribute keys and values, event and link
        attributes, status): what a scan for leaked secrets reads."""
        found = [self.name, self.status_message]
        for attrs in ([self.attributes] + [e.attributes for e in self.events]
                      + [lk.attributes for lk in self.links]):
            for key, value in attrs.items():
                found.append(key)
                found.extend(str(v) for v in (value if isinstance(value, list) else [value]))
        found.extend(e.name for e in self.events)
        return found


def decode(request: ExportTraceServiceRequest) -> list[Span]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes_of(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(Span(
                    name=s.name, kind=_KINDS.get(s.kind, str(s.kind)),
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex() or None, trace_state=s.trace_state,
                    flags=s.flags, start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano, attributes=attributes_of(s.attributes),
                    events=tuple(Event(e.name, e.time_unix_nano, attributes_of(e.attributes))
                                 for e in s.events),
                    links=tuple(Link(lk.trace_id.hex(), lk.span_id.hex(), lk.trace_state,
                                     attributes_of(lk.attributes)) for lk in s.links),
                    status_code=_STATUS.get(s.status.code, str(s.status.code)),
                    status_message=s.status.message, resource=resource,
                    scope=scope_spans.scope.name, scope_version=scope_spans.scope.version,
                    schema_url=scope_spans.schema_url))
    return spans


@dataclass(frozen=True)
class Export:
    """One export request as it arrived (for header and encoding checks)."""

    headers: dict[str, str]
    encoding: str
    span_count: int


class OtlpReceiver:
    """The receiver, as a context manager; `endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT
    takes, `traces_url` what OTEL_EXPORTER_OTLP_TRACES_ENDPOINT takes."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._lock = threading.Lock()
        self._spans: list[Span] = []
        self._exports: list[Export] = []
        self._failures: list[int] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                status, body = receiver._handle(self.path, dict(self.headers.items()),
                                                self.rfile.read(
                                                    int(self.headers.get("Content-Length", 0))))
                self.send_response(status)
                self.send_header("Content-Type", PROTOBUF)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                """Quiet: the tests read what arrived, not an access log."""

        self._server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        # A short poll: shutdown() waits for the loop to look at its flag.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name="otlp-receiver")

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def traces_url(self) -> str:
        return self.endpoint + TRACES_PATH

    def _handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if path != TRACES_PATH:
            return 404, b""
        lowered = {k.lower(): v for k, v in headers.items()}
        if lowered.get("content-type", "").split(";")[0].strip() != PROTOBUF:
            return 415, b""
        encoding = lowered.get("content-encoding", "").strip().lower()
        if encoding not in _DECOMPRESS:
            return 415, b""
        with self._lock:
            if self._failures:
                return self._failures.pop(0), b""
        try:
            request = ExportTraceServiceRequest.FromString(_DECOMPRESS[encoding](body))
        except (DecodeError, OSError, EOFError, zlib.error):
            return 400, b""
        spans = decode(request)
        with self._lock:
            self._spans.extend(spans)
            self._exports.append(Export(lowered, encoding, len(spans)))
        return 200, ExportTraceServiceResponse().SerializeToString()

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next `count` exports with `status` (a collector down or overloaded)."""
        with self._lock:
            self._failures.extend([status] * count)

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def exports(self) -> list[Export]:
        with self._lock:
            return list(self._exports)

    def reset(self) -> None:
        with self._lock:
            self._spans.clear()
            self._exports.clear()
            self._failures.clear()

    def wait_for_spans(self, condition: Callable[[list[Span]], bool] | int,
                       timeout: float = 10.0, what: str = "spans") -> list[Span]:
        """The spans once `condition(spans)` holds (an int: at least that many spans)."""
        check = ((lambda spans: len(spans) >= condition) if isinstance(condition, int)
                 else condition)
        found: list[Span] = []

        def arrived() -> bool:
            found[:] = self.spans()
            return check(found)

        wait_for(arrived, timeout, what)
        return found
