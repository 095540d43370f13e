"""OpenTelemetry spans for relay's Pusher calls. Imported only when tracing is on, by
relay.tracing_switch, which also holds the API's shape and its no-op twin.

Follows the OpenTelemetry semantic conventions v1.44.0 as published (schema URL
https://opentelemetry.io/schemas/1.44.0): docs/messaging/messaging-spans.md ("Process span")
and docs/http/http-spans.md ("HTTP client span") in open-telemetry/semantic-conventions.

1. Set-up from the standard environment, as the SDK reads it by itself: `TracerProvider()`
   reads OTEL_TRACES_SAMPLER(_ARG) and OTEL_SPAN_*/OTEL_ATTRIBUTE_* limits, `Resource.create`
   OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, `OTLPSpanExporter()` OTEL_EXPORTER_OTLP_
   (TRACES_)ENDPOINT, _HEADERS, _TIMEOUT, _COMPRESSION, _CERTIFICATE, _CLIENT_KEY/_CERTIFICATE,
   and `BatchSpanProcessor` OTEL_BSP_*. relay adds defaults only: service.name `relay` where
   the SDK would say unknown_service, and service.version. The provider stays private (no
   global is set). Under gevent the batch processor's thread is a greenlet; the exporter
   sends through patched sockets, so exporting never blocks the loop on the network.
2. Per Pusher call, one CONSUMER span `process <queue>`: messaging.system `relay` (the
   conventions list no Redis-list system; like Sidekiq's and BullMQ's instrumentations, the
   value names the job system whose message format this is), messaging.operation.type and
   .name `process`, messaging.destination.name the queue, messaging.client.id the worker,
   messaging.batch.message_count only for a batch (the conventions: not on single-message
   operations), messaging.message.id for a single notification with an `id`. No server.*:
   under Sentinel or Cluster the broker has no one address; the HTTP child has Pusher's.
   It links to each notification's producer context (its traceparent/tracestate, the
   message creation context), the link carrying messaging.message.id when known.
   relay's own: relay.channels (distinct, in order), relay.attempt (1 + the most earlier
   attempts of its notifications), relay.message.age_seconds (one per notification with an
   enqueue time, in settle order: enqueued_at to the settle clock, what
   relay_delivery_age_seconds observes at the ack).
3. Its CLIENT child per HTTP request: `POST /apps/{app_id}/events` (url.template, as the
   conventions name a client span when the template is known), http.request.method,
   server.address, server.port, url.full (scheme, host, port and path only: the query is
   dropped whole, where the conventions would keep keys with REDACTED values, because all it
   holds is the signature), http.response.status_code, error.type (the status for >= 400, else the
   exception's class). 4xx and 5xx set the status to error, as the conventions say for
   client spans.
4. Retries: a retried notification's later calls link to the call that first carried it
   (`relay.link=first_attempt`; its context rides in the retry wrapper: `retry_traceparent`)
   and, when they carry that one notification (a retry goes alone), are also its children,
   so one trace shows every attempt and is sampled as one. The producer's context is linked
   at every attempt. relay.app names the app of RELAY_APPS when the notifications name one.
5. Failures: a dead letter is an event `relay.dead_letter` (error.type = its class,
   relay.reason, relay.attempts) and a retry an event `relay.retry`; the span's status is
   then error, with error.type the call's Failure kind (permanent, transient, systemic,
   rate_limited), else the dead letter's class (invalid, rejected, exhausted), `_OTHER`, or
   an escaping exception's class.
6. No secret reaches a span: no payload or data at all; texts (reasons, exception messages)
   pass `scrub`, which removes the Pusher secrets given and every `auth_*`/`body_md5`
   query parameter (a 401 body echoes the signed string).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from relay import __version__, wire
from relay.delivery import Failure
from relay.fate import Ack, DeadLetter, Fate, RetryLater
from relay.message import InvalidMessage, Notification

log = logging.getLogger(__name__)

SEMCONV_VERSION = "1.44.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
SYSTEM = "relay"
DEFAULT_SERVICE = "relay"
MAX_TEXT = 300  # characters of a reason or message kept on a span

MESSAGING_SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
BATCH_COUNT = "messaging.batch.message_count"
MESSAGE_ID = "messaging.message.id"
CLIENT_ID = "messaging.client.id"
ERROR_TYPE = "error.type"
OTHER = "_OTHER"
HTTP_METHOD = "http.request.method"
HTTP_METHOD_ORIGINAL = "http.request.method_original"
HTTP_STATUS = "http.response.status_code"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
URL_FULL = "url.full"
URL_TEMPLATE = "url.template"
CHANNELS = "relay.channels"
ATTEMPT = "relay.attempt"
AGES = "relay.message.age_seconds"
REASON = "relay.reason"
ATTEMPTS = "relay.attempts"
RETRY_DELAY = "relay.retry.delay_seconds"
APP = "relay.app"  # the Pusher app of RELAY_APPS, when the notifications name one
LINK_ROLE = "relay.link"  # on the link to a first attempt: "first_attempt"
DEAD_LETTER_EVENT = "relay.dead_letter"
RETRY_EVENT = "relay.retry"

# RFC 9110's methods, PATCH and QUERY: the conventions' "known" methods.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                           "TRACE", "PATCH", "QUERY"})
DEFAULT_PORTS = {"http": 80, "https": 443}
_APP_PATH = re.compile(r"\A/apps/[^/]+/")
# No word boundary before it: a reason may hold the signed string repr'd ("\\nauth_key=").
_SIGNED_QUERY = re.compile(r"(?:auth_[A-Za-z_]*|body_md5)(?:=[^&\s'\"\\]*)?")
ROOT = Context()  # an empty context: a span started in it is a root, whatever is current


def scrub(text: str, secrets: Sequence[str] = ()) -> str:
    """`text` fit for a span: the secrets and the signed query's parameters removed."""
    for secret in secrets:
        text = text.replace(secret, "[secret]")
    return _SIGNED_QUERY.sub("[signed query]", text)[:MAX_TEXT]


def error_type(exc: BaseException) -> str:
    """An exception's class, fully qualified outside the builtins (the conventions' form)."""
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else (
        f"{kind.__module__}.{kind.__qualname__}")


def traceparent_of(context: trace.SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


class HttpSpan:
    """The CLIENT span of one HTTP request; the URL keeps no query, user or fragment."""

    def __init__(self, tracer: Tracer, parent: trace.Span, method: str, url: str) -> None:
        self.tracer = tracer
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        attributes: dict[str, Any] = {
            HTTP_METHOD: method if method in KNOWN_METHODS else OTHER,
            SERVER_ADDRESS: host, SERVER_PORT: port,
            URL_FULL: f"{parts.scheme}://{netloc}{parts.path}"}
        if method not in KNOWN_METHODS:
            attributes[HTTP_METHOD_ORIGINAL] = method
        name = method if method in KNOWN_METHODS else "HTTP"
        if _APP_PATH.match(parts.path):
            attributes[URL_TEMPLATE] = _APP_PATH.sub("/apps/{app_id}/", parts.path)
            name += " " + attributes[URL_TEMPLATE]
        self.span = tracer.otel.start_span(name, context=trace.set_span_in_context(parent),
                                           kind=SpanKind.CLIENT, attributes=attributes)

    def __enter__(self) -> HttpSpan:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.span.set_attribute(ERROR_TYPE, error_type(exc))
            self.span.set_status(Status(StatusCode.ERROR, self.tracer.scrub(str(exc))))
        self.span.end()

    def answered(self, status: int) -> None:
        self.span.set_attribute(HTTP_STATUS, status)
        if status >= 400:
            self.span.set_attribute(ERROR_TYPE, str(status))
            self.span.set_status(Status(StatusCode.ERROR))


class CallSpan:
    """The CONSUMER span of one Pusher call; ends on exit (an escaping exception is its error)."""

    def __init__(self, tracer: Tracer, notes: Sequence[Notification]) -> None:
        self.tracer = tracer
        links = [Link(ctx, {MESSAGE_ID: n.id} if n.id is not None else None)
                 for n in notes if (ctx := tracer.remote(n.traceparent, n.tracestate))]
        firsts = [ctx for n in notes if (ctx := tracer.remote(n.first_traceparent))]
        parent = ROOT
        if len(notes) == 1 and firsts:  # a later attempt: in the first one's trace, and linked
            parent = trace.set_span_in_context(trace.NonRecordingSpan(firsts[0]))
        links += [Link(ctx, {LINK_ROLE: "first_attempt"}) for ctx in firsts]
        attributes = dict(tracer.base)
        apps = {n.app for n in notes if n.app is not None}
        if apps:  # a call goes to one app (RELAY_APPS)
            attributes[APP] = apps.pop()
        attributes[CHANNELS] = list(dict.fromkeys(c for n in notes for c in n.channels))
        attributes[ATTEMPT] = 1 + max((n.attempts for n in notes), default=0)
        if len(notes) > 1:
            attributes[BATCH_COUNT] = len(notes)
        elif notes and notes[0].id is not None:
            attributes[MESSAGE_ID] = notes[0].id
        self.span = tracer.otel.start_span(tracer.name, context=parent, kind=SpanKind.CONSUMER,
                                           attributes=attributes, links=links)
        self.ages: list[float] = []
        self.error: tuple[str, str] | None = None  # (error.type, description): the first
        self.ended = False

    def __enter__(self) -> CallSpan:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.error = (error_type(exc), str(exc))
        self.end()

    def http(self, method: str, url: str) -> HttpSpan:
        return HttpSpan(self.tracer, self.span, method, url)

    def settled(self, note: Notification, fate: Fate, now: float,
                failure: Failure | None = None) -> None:
        if self.ended:
            return
        age = note.age_at(now)
        if age is not None:
            self.ages.append(age)
        if isinstance(fate, Ack):
            return
        if failure is not None:
            self._failed(failure.kind.value, failure.reason)
        if isinstance(fate, DeadLetter):
            self.span.add_event(DEAD_LETTER_EVENT, self._about(note, {
                ERROR_TYPE: fate.error_class, REASON: self.tracer.scrub(fate.reason),
                ATTEMPTS: fate.attempts}))
            self._failed(fate.error_class, fate.reason)
        elif isinstance(fate, RetryLater):
            self.span.add_event(RETRY_EVENT, self._about(note, {
                REASON: self.tracer.scrub(fate.reason), ATTEMPTS: fate.attempts,
                RETRY_DELAY: fate.delay_s}))
            self._failed(OTHER, fate.reason)

    def retry_traceparent(self, note: Notification) -> str | None:
        return note.first_traceparent or traceparent_of(self.span.get_span_context())

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.ages:
            self.span.set_attribute(AGES, self.ages)
        if self.error is not None:
            self.span.set_attribute(ERROR_TYPE, self.error[0])
            self.span.set_status(Status(StatusCode.ERROR, self.tracer.scrub(self.error[1])))
        self.span.end()

    def _failed(self, kind: str, reason: str) -> None:
        if self.error is None:
            self.error = (kind, reason)

    @staticmethod
    def _about(note: Notification, attributes: dict[str, Any]) -> dict[str, Any]:
        """An event's attributes, naming the notification it is about (a batch has several)."""
        attributes[CHANNELS] = list(note.channels)
        if note.id is not None:
            attributes[MESSAGE_ID] = note.id
        return attributes


class WatchedExporter(SpanExporter):
    """The OTLP exporter, its outages logged once when they start and once when they end."""

    def __init__(self, inner: SpanExporter, where: str) -> None:
        self.inner = inner
        self.where = where
        self.down_since: float | None = None
        self.dropped = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        if result is SpanExportResult.SUCCESS:
            if self.down_since is not None:
                log.warning("tracing: exporting to %s again after %.0f s (%d spans dropped)",
                            self.where, time.monotonic() - self.down_since, self.dropped)
                self.down_since, self.dropped = None, 0
        else:
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.error("tracing: cannot export spans to %s; dropping them until it answers",
                          self.where)
            self.dropped += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class Tracer:
    """The worker's tracer: makes the spans; `close` at exit."""

    def __init__(self, provider: TracerProvider, queue: str, worker_id: str,
                 secrets: Sequence[str] = ()) -> None:
        self.provider = provider
        self.otel = provider.get_tracer("relay", __version__, schema_url=SCHEMA_URL)
        self.name = f"process {queue}"
        self.base: dict[str, Any] = {
            MESSAGING_SYSTEM: SYSTEM, OPERATION_TYPE: "process", OPERATION_NAME: "process",
            DESTINATION: queue, CLIENT_ID: worker_id}
        self.secrets = tuple(s for s in secrets if s)

    def call(self, notes: Sequence[Notification]) -> CallSpan:
        return CallSpan(self, notes)

    def invalid(self, raw: bytes, reason: str) -> None:
        """A span for a notification dead-lettered unparsed, linked to its producer when its
        envelope still carries a valid context."""
        context = self.remote(*_trace_fields(raw))
        span = self.otel.start_span(self.name, context=ROOT, kind=SpanKind.CONSUMER,
                                    attributes=self.base,
                                    links=[Link(context)] if context else None)
        text = self.scrub(reason)
        span.add_event(DEAD_LETTER_EVENT, {ERROR_TYPE: "invalid", REASON: text})
        span.set_attribute(ERROR_TYPE, "invalid")
        span.set_status(Status(StatusCode.ERROR, text))
        span.end()

    @staticmethod
    def remote(traceparent: str | None, tracestate: str | None = None
               ) -> trace.SpanContext | None:
        """The span context a traceparent names (None for none). relay.wire validated it
        already, so it is read directly: W3C's propagator would check it all again, at
        a cost measured as most of a span's."""
        if traceparent is None:
            return None
        _version, trace_id, span_id, flags = traceparent.split("-")[:4]
        context = trace.SpanContext(
            int(trace_id, 16), int(span_id, 16), is_remote=True,
            trace_flags=trace.TraceFlags(int(flags, 16)),
            trace_state=trace.TraceState.from_header([tracestate]) if tracestate else None)
        return context if context.is_valid else None

    def add_secrets(self, secrets: Sequence[str]) -> None:
        self.secrets = tuple(dict.fromkeys((*self.secrets, *(s for s in secrets if s))))

    def scrub(self, text: str) -> str:
        return scrub(text, self.secrets)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export every span ended so far (tests; burst mode before it exits)."""
        return self.provider.force_flush(int(timeout_s * 1000))

    def close(self, timeout_s: float = 2.0) -> None:
        """Flush and shut down, giving up after `timeout_s` (a slow or absent collector must
        not hold the worker's exit); what is left then is dropped, and said."""
        closing = threading.Thread(target=self.provider.shutdown, name="relay-tracing-close",
                                   daemon=True)
        closing.start()
        closing.join(timeout_s)
        if closing.is_alive():
            log.warning("tracing: spans not all exported within %.1f s at exit; the rest are "
                        "dropped", timeout_s)


def _trace_fields(raw: bytes) -> tuple[str | None, str | None]:
    """An unparseable element's envelope trace context, if it has a valid one."""
    try:
        obj = wire.decode(raw)[1]
    except InvalidMessage:
        return None, None
    if "channel" in obj or obj.get("relay") != wire.ENVELOPE_VERSION:
        return None, None
    return wire.trace_context(obj.get("traceparent"), obj.get("tracestate"))


def endpoint() -> str:
    """Where spans go, as the exporter resolves it, without any user:password in it."""
    url = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip().rstrip("/") + "/v1/traces")
    parts = urlsplit(url)
    if parts.username or parts.password:
        url = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
    return url


def resource() -> Resource:
    """The SDK's resource from the environment, with relay's defaults where it has none."""
    found = Resource.create({})
    defaults: dict[str, str] = {}
    if str(found.attributes.get("service.name", "")).startswith("unknown_service"):
        defaults["service.name"] = DEFAULT_SERVICE
    if "service.version" not in found.attributes:
        defaults["service.version"] = __version__
    return found.merge(Resource(defaults)) if defaults else found


def start(queue: str, worker_id: str, secrets: Sequence[str] = ()) -> Tracer:
    """Tracing on: the provider, the OTLP/HTTP exporter and the batch processor, all from
    the OTEL_* environment. Raises ValueError for a value the SDK refuses."""
    provider = TracerProvider(resource=resource(), shutdown_on_exit=False)  # close() instead
    where = endpoint()
    provider.add_span_processor(BatchSpanProcessor(WatchedExporter(OTLPSpanExporter(), where)))
    log.info("tracing on: spans of queue %s to %s as service %s (sampler %s)", queue, where,
             provider.resource.attributes.get("service.name"),
             provider.sampler.get_description())
    return Tracer(provider, queue, worker_id, secrets)
