"""The producer side: what a web app calls to queue a notification. No gevent here.

1. `notify(channel, data)` pushes an *envelope* (`relay.wire.envelope`) stamped with
   `enqueued_at`, so the worker's age percentiles (the page's age chart, the
   `relay_delivery_age_seconds` histogram) and RELAY_MAX_AGE see every notification.
   Without `event=`, the envelope carries no event and the worker gives it its RELAY_EVENT,
   exactly as for a classic message; and the data of a dict is sent as the same JSON. So the
   browser receives the same event and data as from the classic `{"channel": ..., **data}`:
   only the queue element differs. RELAY_EVENT is the worker's setting: the producer does
   not read it (an explicit `Producer(default_event=...)` is written into each envelope).
   `app=` names one of the worker's RELAY_APPS to send it through (none: `default`); such
   an envelope carries `"relay": 2`, which workers older than RELAY_APPS refuse rather than
   send it to the default app (another tenant's).
2. `classic=True` keeps the shape older versions wrote: classic whenever it can say
   everything (one channel, a dict without a `channel` key, no event, no socket_id), an
   envelope with an explicit event (default_event, else the app's RELAY_EVENT, else "hit")
   otherwise. Use it while workers older than the optional envelope `event` still consume
   the queue: they dead-letter an envelope without one. It has no `enqueued_at` to stamp.
3. Everything is validated before the RPUSH with the worker's own parser (relay.wire), so
   bad input raises `InvalidMessage` in the app, where the bug is, and nothing is pushed.
   The data limit is the worker's RELAY_MAX_DATA_BYTES (argument, else the environment,
   else Pusher's 10,240 bytes), checked as the worker checks it: a bad value raises
   `relay.errors.SettingError` naming the setting when the Producer is made.
4. `Producer` keeps one Redis client for an app's lifetime; `notify()` is the one-off form
   that makes (and closes) a client from `REDIS_URL` on each call.
5. When the app has an active OpenTelemetry span, an envelope carries its W3C trace context
   (`traceparent`, `tracestate`), so the worker's spans link to the request that pushed it.
   A classic message (`classic=True`) never changes: its keys are its data. Without
   OpenTelemetry in the app, nothing is imported and nothing changes.

This module lives inside legacy apps: it runs unchanged on Python 2.7 and 3.6 to 3.13 with
the newest redis-py each supports, and imports only redis, the standard library and the
py2.7-readable relay.wire, relay.rules and relay.errors. So: no annotations (types are in
comments), no f-strings, no keyword-only arguments; and no gevent, so a plain WSGI or
Celery process can use it without anything being patched.
"""

import json
import os
import sys
import time

from relay import redis_url, rules, wire
from relay.errors import SettingError
from relay.wire import InvalidMessage

__all__ = ["InvalidMessage", "Producer", "SettingError", "client_from_env", "data_limit",
           "encode", "notify"]

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_QUEUE = "notifications"
DEFAULT_EVENT = "hit"
# A web request should fail fast rather than hang on a dead Redis.
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 3.0


def client_from_env():
    # type: () -> redis.Redis
    """A Redis client for REDIS_URL (default redis://localhost:6379/0), in any of its forms
    (standalone, TLS, unix socket, Sentinel, Cluster: see relay.redis_url). A malformed URL
    raises redis_url.RedisUrlError, whose text never shows the password."""
    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    return redis_url.plain_client(url, socket_timeout=SOCKET_TIMEOUT_S,
                                  socket_connect_timeout=CONNECT_TIMEOUT_S)


def data_limit(value=None):
    # type: (int | str | None) -> int
    """The data limit in bytes: `value`, else RELAY_MAX_DATA_BYTES from the environment
    (empty counts as unset, as for the worker), else Pusher's 10,240. Raises SettingError
    for what the worker would refuse to start with."""
    if value is None:
        value = (os.environ.get("RELAY_MAX_DATA_BYTES") or "").strip() or rules.MAX_DATA_BYTES
    shown = repr(value)
    if isinstance(value, rules.TEXT_TYPES):
        try:
            value = int(value)
        except ValueError:
            pass
    problem = rules.data_limit_problem(value)
    if problem is not None:
        raise SettingError("RELAY_MAX_DATA_BYTES: %s (got %s)" % (problem, shown))
    return value


def _is_classic(channels, data, event, socket_id):
    # type: (str | list[str], object, str | None, str | None) -> bool
    return (isinstance(channels, rules.TEXT_TYPES) and isinstance(data, dict)
            and "channel" not in data and event is None and socket_id is None)


def _serialisable(data):
    # type: (object) -> None
    try:
        json.dumps(data, allow_nan=False)  # NaN/Infinity are not JSON to Pusher's clients
        return
    except (TypeError, ValueError) as exc:  # not serialisable, NaN, circular, bad bytes
        reason = "data is not JSON-serialisable: %s" % (exc,)
    raise InvalidMessage(reason)


def _trace_context():
    # type: () -> tuple[str | None, str | None]
    """(traceparent, tracestate) of the app's active span, or (None, None).

    Looked up only when the app has imported OpenTelemetry itself (no span can be active
    otherwise), so an app without it imports nothing. W3C's propagator, whatever the app's
    global one is: these envelope fields are W3C's. Any failure carries nothing: telemetry
    never costs a notification.
    """
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None, None
    carrier = {}  # type: dict[str, str]
    try:
        if not trace.get_current_span().get_span_context().is_valid:
            return None, None
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        TraceContextTextMapPropagator().inject(carrier)
    except Exception:  # an API too old, or broken: the notification goes without
        return None, None
    return carrier.get("traceparent"), carrier.get("tracestate")


def encode(channels, data, event=None, socket_id=None, default_event=None, now=None,
           limit=rules.MAX_DATA_BYTES, classic=False, app=None):
    # type: (str | list[str], object, str | None, str | None, str | None, float | None, int, bool, str | None) -> str  # noqa: E501
    """The queue element for this notification; raises InvalidMessage for bad input.

    An envelope stamped `now` (default: this host's clock); `event` None means
    `default_event`, and when that is None too, the worker's RELAY_EVENT. With `classic`,
    the old shapes (see the module's docstring). `app` names one of the worker's RELAY_APPS
    (None: `default`), which always makes an envelope."""
    _serialisable(data)
    if classic:
        default_event = default_event or DEFAULT_EVENT
        if app is None and _is_classic(channels, data, event, socket_id):
            return wire.classic(channels, data, default_event, limit)
    listed = [channels] if isinstance(channels, rules.TEXT_TYPES) else list(channels)
    traceparent, tracestate = _trace_context()
    return wire.envelope(listed, default_event if event is None else event, data, socket_id,
                         enqueued_at=time.time() if now is None else now, limit=limit, app=app,
                         traceparent=traceparent, tracestate=tracestate)


class Producer(object):
    """Pushes notifications for the worker; keep one per process (it holds a Redis pool)."""

    def __init__(self, client=None, queue=None, default_event=None, clock=time.time,
                 max_data_bytes=None, classic=False):
        # type: (redis.Redis | None, str | None, str | None, Callable[[], float], int | str | None, bool) -> None  # noqa: E501
        """max_data_bytes: the worker's RELAY_MAX_DATA_BYTES (default: the environment's);
        classic: write the old shapes (module docstring, 2)."""
        self.limit = data_limit(max_data_bytes)  # first: a bad setting opens no connection
        self.client = client if client is not None else client_from_env()
        self.queue = queue or os.environ.get("RELAY_QUEUE") or DEFAULT_QUEUE
        self.classic = classic
        if classic:  # as before: the app's RELAY_EVENT named the envelopes' event
            default_event = default_event or os.environ.get("RELAY_EVENT") or DEFAULT_EVENT
        self.default_event = default_event
        self.clock = clock

    def notify(self, channel_or_channels, data, event=None, socket_id=None, app=None):
        # type: (str | list[str], object, str | None, str | None, str | None) -> str
        """Queue one notification; returns the text pushed. Raises InvalidMessage first.
        `app` names one of the worker's RELAY_APPS (None: `default`)."""
        text = encode(channel_or_channels, data, event, socket_id,
                      default_event=self.default_event, now=self.clock(), limit=self.limit,
                      classic=self.classic, app=app)
        self.client.rpush(self.queue, text.encode("utf-8"))
        return text

    def close(self):
        # type: () -> None
        """Release the client's connections (redis-py before 4 has no Redis.close)."""
        close = getattr(self.client, "close", None)
        if close is not None:
            close()
        else:  # pragma: no cover - redis-py 3.x on Python 2.7
            self.client.connection_pool.disconnect()


def notify(channel_or_channels, data, event=None, socket_id=None, client=None, queue=None,
           max_data_bytes=None, classic=False, app=None):
    # type: (str | list[str], object, str | None, str | None, redis.Redis | None, str | None, int | str | None, bool, str | None) -> str  # noqa: E501
    """One-off `Producer(client, queue, ...).notify(...)`; a client made here is closed here."""
    producer = Producer(client, queue, max_data_bytes=max_data_bytes, classic=classic)
    try:
        return producer.notify(channel_or_channels, data, event, socket_id, app=app)
    finally:
        if client is None:
            producer.close()
