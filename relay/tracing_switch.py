"""Whether the worker traces, the shape of the tracing API the engine calls, and its no-op twin.

1. `decide(environ)`: tracing is on when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
   OTEL_EXPORTER_OTLP_ENDPOINT is set, unless OTEL_SDK_DISABLED is true, OTEL_TRACES_EXPORTER
   names no `otlp` exporter, or the OTLP protocol asked for is not `http/protobuf` (the one
   relay ships). Off is the default and costs nothing: `start` then returns NO_TRACING
   without importing relay.tracing or the OpenTelemetry SDK.
2. `start(queue, worker_id, secrets)` gives the engine a `Tracer`: the real one
   (relay.tracing, imported here and only here) or NO_TRACING, whose methods do nothing, so
   the engine calls the same methods either way and never checks a flag. An endpoint set
   without the `otel` extra installed, or a setting relay cannot honour, is said once at
   start and tracing stays off: an OTEL_* variable set for a whole host must not stop relay.
3. The API, per Pusher call (see relay.tracing for the spans and attributes):

       with tracer.call(notes) as call:                   # the CONSUMER span, before the send
           with call.http("POST", url) as http:           # each HTTP request (Delivery._call)
               answer = send()
               http.answered(answer.status)               # an exception is recorded by exit
           call.settled(note, fate, now, failure)         # each notification, as it is settled
           wrapper = retry_wrapper(..., first_traceparent=call.retry_traceparent(note))
       tracer.invalid(raw, reason)                        # a notification that never parsed
       tracer.close()                                     # at exit: flush within a deadline

Standard library only, and relay's types for annotations: importing this module loads no
OpenTelemetry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from relay.delivery import Failure
    from relay.fate import Fate
    from relay.message import Notification

log = logging.getLogger(__name__)

ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
SUPPORTED_PROTOCOL = "http/protobuf"
EXTRA = "pip install 'pusher-relay[otel]' (or requirements-otel.lock)"
# Spans still queued at exit get this long to reach the collector: the worker's shutdown
# promise (PUSHER_TIMEOUT + a few seconds) must hold when the collector is slow or gone.
CLOSE_TIMEOUT_S = 2.0


def _first(environ: Mapping[str, str], names: Sequence[str]) -> tuple[str, str] | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def decide(environ: Mapping[str, str]) -> tuple[bool, str | None]:
    """(on, why not): the reason is for the log when the operator clearly asked for tracing
    (an endpoint is set) and relay cannot give it; None when off is simply the default."""
    endpoint = _first(environ, ENDPOINTS)
    if endpoint is None:
        return False, None
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False, None
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        names = {e.strip() for e in exporters.split(",")}
        if "otlp" not in names:
            why = (None if names == {"none"} else
                   f"OTEL_TRACES_EXPORTER={exporters}: relay exports OTLP only; tracing off")
            return False, why
    protocol = _first(environ, PROTOCOLS)
    if protocol is not None and protocol[1] != SUPPORTED_PROTOCOL:
        return False, (f"{protocol[0]}={protocol[1]}: relay exports OTLP over "
                       f"{SUPPORTED_PROTOCOL} only (the collector's port 4318); tracing off")
    return True, None


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    return decide(os.environ if environ is None else environ)[0]


class HttpTrace(Protocol):
    """One HTTP request to Pusher: a context manager around the request."""

    def __enter__(self) -> HttpTrace: ...

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def answered(self, status: int) -> None:
        """The response's status code (an exception instead is recorded on exit)."""


class CallTrace(Protocol):
    """One Pusher call (the notifications one greenlet sends and settles together)."""

    def __enter__(self) -> CallTrace: ...

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def http(self, method: str, url: str) -> HttpTrace:
        """A child span for one HTTP request; `url` without its query (it is dropped anyway:
        the signature is in it)."""

    def settled(self, note: Notification, fate: Fate, now: float,
                failure: Failure | None = None) -> None:
        """What became of one notification, with the clock the settle step used (its age is
        the age histogram's) and the call's Failure for it, if any."""

    def retry_traceparent(self, note: Notification) -> str | None:
        """The context a retry wrapper carries: the first call's, kept from attempt to
        attempt (with tracing off, whatever the notification already carried)."""


class Tracer(Protocol):
    def call(self, notes: Sequence[Notification]) -> CallTrace:
        """Start the span of one Pusher call carrying `notes`, in the call's order."""

    def invalid(self, raw: bytes, reason: str) -> None:
        """A notification dead-lettered before any call (it does not parse)."""

    def add_secrets(self, secrets: Sequence[str]) -> None:
        """More text never to show (the secrets of apps a RELAY_APPS reload added)."""

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Export what is queued and stop, within `timeout_s`."""


class _NoHttp:
    def __enter__(self) -> _NoHttp:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def answered(self, status: int) -> None:
        return None


class _NoCall:
    def __enter__(self) -> _NoCall:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def http(self, method: str, url: str) -> _NoHttp:
        return NO_HTTP

    def settled(self, note: Notification, fate: Fate, now: float,
                failure: Failure | None = None) -> None:
        return None

    def retry_traceparent(self, note: Notification) -> str | None:
        return note.first_traceparent


class NoTracer:
    """Tracing off: every method does nothing (a wrapper keeps the context it carried)."""

    def call(self, notes: Sequence[Notification]) -> _NoCall:
        return NO_CALL

    def invalid(self, raw: bytes, reason: str) -> None:
        return None

    def add_secrets(self, secrets: Sequence[str]) -> None:
        return None

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        return None


NO_HTTP = _NoHttp()
NO_CALL = _NoCall()
NO_TRACING = NoTracer()


def start(queue: str, worker_id: str, secrets: Sequence[str] = (),
          environ: Mapping[str, str] | None = None) -> Tracer:
    """The worker's tracer: NO_TRACING unless `decide` says on and the extra is installed.
    `secrets` (the Pusher secrets) are blanked out of any text a span records."""
    on, why = decide(os.environ if environ is None else environ)
    if why is not None:
        log.warning("tracing: %s", why)
    if not on:
        return NO_TRACING
    try:
        # Here only: with tracing off, nothing of it (or of the SDK) is ever loaded.
        from relay import tracing
    except ImportError as exc:
        if not (exc.name or "").startswith("opentelemetry"):
            raise  # relay's own bug, not a missing extra
        log.warning("tracing: an OTLP endpoint is set but the OpenTelemetry SDK is missing "
                    "(no module %s); %s to trace. Tracing off", exc.name, EXTRA)
        return NO_TRACING
    try:
        tracer: Tracer = tracing.start(queue, worker_id, secrets)
    except ValueError as exc:  # an OTEL_* value the SDK refuses (a compression, a number)
        log.error("tracing: cannot start (%s); tracing off", exc)
        return NO_TRACING
    return tracer
