"""The queue element's wire format, classic and envelope: the one parser that both the
worker (through relay.message) and the producer helper inside web apps use, so an app
refuses exactly what the worker would dead-letter.

1. A *classic* message is a JSON object with a `channel` key: the event is RELAY_EVENT and
   the data is the object without `channel`. Any object that has `channel` is classic, so
   a classic message can never be misread as an envelope, whatever else it carries.
2. An *envelope* has no `channel` key and carries `"relay": 1`, with `channels` (1 to 100)
   and `data`, and optionally `event`, `socket_id`, `enqueued_at` (Unix seconds) and `id`.
   Without `event` it gets RELAY_EVENT, as a classic message does: so the producer can stamp
   `enqueued_at` on what would have been a classic message and the browser still receives
   the same event and data. (Workers before this rule dead-letter an envelope without one.)
   It may name an app (`app`, one of RELAY_APPS; none means `default`). The producer then
   writes `"relay": 2`: a worker older than RELAY_APPS refuses version 2 (dead letter, "no
   channel"), where it would have sent a version 1 to the default app, another tenant's.
   This worker reads `app` in either version.
   An envelope may also carry the W3C trace context of the request that pushed it:
   `traceparent` and `tracestate`.
3. `fields()` turns either into a plain dict of what Pusher needs, or raises InvalidMessage
   with the reason. Policies that depend on the worker's settings (encryption key) stay in
   relay.message; retry wrappers, which only the worker writes, too.
4. A malformed `traceparent` or `tracestate` is ignored, never dead-lettered: W3C Trace
   Context says a receiver ignores an invalid traceparent (and then the tracestate too), and
   telemetry must never cost a notification. `envelope()` leaves out what would be ignored.

Written in syntax that Python 2.7 and 3.6 read (no annotations, no f-strings, no `from
None`, no keyword-only arguments), importing only the standard library, relay.rules and
relay.errors: legacy apps import this module through relay.producer. Types are in comments.
"""

import json
import numbers
import re

from relay import rules
from relay.errors import RelayError

ENVELOPE_VERSION = 1
APP_ENVELOPE_VERSION = 2  # what the producer writes for an envelope naming an app
_VERSIONS = (ENVELOPE_VERSION, APP_ENVELOPE_VERSION)

try:  # Python 3.5+; Python 2's json decoder raises RuntimeError when nested too deeply
    _TOO_DEEP = RecursionError
except NameError:  # pragma: no cover - Python 2
    _TOO_DEEP = RuntimeError

_FAILED = object()  # marks a failed step, so the error is raised outside `except` (no chain)

# W3C Trace Context (https://www.w3.org/TR/trace-context/, section 3): version-traceid-
# parentid-flags in lowercase hex. A version after 00 may carry more fields after a dash.
_TRACEPARENT = re.compile(r"\A([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16
# tracestate list members: key "=" value, keys simple or tenant@system (section 3.3.1).
_TRACESTATE_MEMBER = re.compile(
    r"\A(?:[a-z][_0-9a-z*/-]{0,255}|[a-z0-9][_0-9a-z*/-]{0,240}@[a-z][_0-9a-z*/-]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]\Z")
MAX_TRACESTATE_CHARS = 512  # what W3C asks every vendor to pass on at least; more is ignored
MAX_TRACESTATE_MEMBERS = 32


class InvalidMessage(RelayError, ValueError):
    """The notification can never be delivered; the text is the dead-letter reason."""


def _text(value):
    # type: (object) -> str
    """Python 2's json.dumps returns bytes when everything was ASCII: make it text."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


def dumps(obj):
    # type: (object) -> str
    """Compact JSON text, non-ASCII kept; ValueError for NaN/Infinity/cycles, TypeError for
    objects JSON cannot hold."""
    try:
        return _text(json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                                allow_nan=False))
    except UnicodeDecodeError:  # Python 2: UTF-8 byte strings mixed with unicode
        return _text(json.dumps(obj, separators=(",", ":"), allow_nan=False))


def encode_data(data):
    # type: (object) -> str
    """Pusher wants data as a string: strings pass through, anything else becomes JSON."""
    if isinstance(data, rules.TEXT_TYPES):
        return data
    try:
        return dumps(data)
    except ValueError:  # NaN or Infinity: Python reads them, browsers' JSON.parse does not
        pass
    raise InvalidMessage("data holds NaN or Infinity, which is not JSON")


def utf8_size(text, what):
    # type: (str, str) -> int
    """Bytes of `text` in UTF-8. JSON may carry a lone surrogate ("\\ud800"): valid JSON,
    but no UTF-8 text can hold it."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        pass
    raise InvalidMessage("%s holds a lone surrogate, not valid Unicode" % what)


def _check(problem):
    # type: (str | None) -> None
    if problem is not None:
        raise InvalidMessage(problem)


def check_channel(channel):
    # type: (object) -> str
    _check(rules.channel_problem(channel))
    return channel


def check_event(event):
    # type: (object) -> str
    _check(rules.event_problem(event))
    utf8_size(event, "event name")
    return event


def check_data(data, limit=rules.MAX_DATA_BYTES):
    # type: (str, int) -> str
    _check(rules.data_size_problem(utf8_size(data, "data"), limit))
    return data


def check_socket_id(socket_id):
    # type: (object) -> str | None
    _check(rules.socket_id_problem(socket_id))
    return socket_id


def check_app(app):
    # type: (object) -> str | None
    """An app name (None allowed: the default app)."""
    if app is not None:
        _check(rules.app_problem(app))
    return app


def unix_seconds(value, name):
    # type: (object, str) -> float | None
    """A number of Unix seconds (None allowed), as a float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidMessage("%s must be a number of Unix seconds" % name)
    return float(value)


def traceparent_problem(value):
    # type: (object) -> str | None
    """Why this traceparent is ignored, or None when it is valid."""
    if not isinstance(value, rules.TEXT_TYPES):
        return "traceparent must be a string"
    match = _TRACEPARENT.match(value)
    if match is None:
        return "traceparent is not version-traceid-parentid-flags in lowercase hex"
    version, trace_id, span_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return "traceparent has an invalid version or trailing data"
    if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return "traceparent has an all-zero id"
    return None


def tracestate_problem(value):
    # type: (object) -> str | None
    """Why this tracestate is ignored, or None when it is valid."""
    if not isinstance(value, rules.TEXT_TYPES):
        return "tracestate must be a string"
    if len(value) > MAX_TRACESTATE_CHARS:
        return "tracestate longer than %d characters" % MAX_TRACESTATE_CHARS
    members = [m.strip(" \t") for m in value.split(",")]
    members = [m for m in members if m]
    if len(members) > MAX_TRACESTATE_MEMBERS:
        return "tracestate has more than %d members" % MAX_TRACESTATE_MEMBERS
    keys = set()
    for member in members:
        if not _TRACESTATE_MEMBER.match(member):
            return "tracestate member %r is malformed" % (member[:40],)
        key = member.split("=", 1)[0]
        if key in keys:
            return "tracestate repeats the key %r" % (key,)
        keys.add(key)
    return None


def trace_context(traceparent, tracestate):
    # type: (object, object) -> tuple[str | None, str | None]
    """The trace context as the worker keeps it: a malformed traceparent is ignored with its
    tracestate (W3C: a receiver ignores an invalid traceparent), a malformed tracestate alone.
    """
    if traceparent is None or traceparent_problem(traceparent) is not None:
        return None, None
    if tracestate is None or tracestate_problem(tracestate) is not None:
        return traceparent, None
    return traceparent, tracestate


def decode(raw):
    # type: (bytes | str) -> tuple[str, dict]
    """The text and the JSON object of one queue element."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        text = _FAILED
    if text is _FAILED:
        raise InvalidMessage("not UTF-8 text")
    try:
        obj = json.loads(text)
    except ValueError:
        obj, reason = _FAILED, "not JSON"
    except _TOO_DEEP:  # the decoder recurses per nesting level
        obj, reason = _FAILED, "JSON nested too deeply"
    if obj is _FAILED:
        raise InvalidMessage(reason)
    if not isinstance(obj, dict):
        raise InvalidMessage("not a JSON object (got %s)" % type(obj).__name__)
    return text, obj


def is_retry_wrapper(obj):
    # type: (dict) -> bool
    """The worker's own retry wrapper (`"relay": 1` with `payload`), read by relay.message."""
    return "channel" not in obj and obj.get("relay") == ENVELOPE_VERSION and "payload" in obj


def _classic(obj, event, limit):
    # type: (dict, str, int) -> dict
    channel = check_channel(obj["channel"])
    rest = dict((k, v) for k, v in obj.items() if k != "channel")
    return {"channels": (channel,), "event": check_event(event),
            "data": check_data(encode_data(rest), limit)}


def _channels(obj):
    # type: (dict) -> tuple[str, ...]
    channels = obj.get("channels")
    if isinstance(channels, rules.TEXT_TYPES):
        channels = [channels]
    if not isinstance(channels, list) or not channels:
        raise InvalidMessage("envelope needs channels: a non-empty list")
    if len(channels) > rules.MAX_CHANNELS:
        raise InvalidMessage("envelope has %d channels, over %d"
                             % (len(channels), rules.MAX_CHANNELS))
    return tuple(check_channel(c) for c in channels)


def app_of(obj):
    # type: (dict) -> str | None
    """The app an envelope names, validated; None for the default app and for classic
    messages (always `default`: their `app` key, if any, is data)."""
    if "channel" in obj or obj.get("app") is None:
        return None
    app = check_app(obj["app"])
    return None if app == rules.DEFAULT_APP else app


def _envelope(obj, default_event, limit):
    # type: (dict, str, int) -> dict
    if "data" not in obj:
        raise InvalidMessage("envelope needs data")
    ident = obj.get("id")
    traceparent, tracestate = trace_context(obj.get("traceparent"), obj.get("tracestate"))
    return {
        "channels": _channels(obj),
        "event": check_event(obj["event"] if "event" in obj else default_event),
        "data": check_data(encode_data(obj["data"]), limit),
        "socket_id": check_socket_id(obj.get("socket_id")),
        "enqueued_at": unix_seconds(obj.get("enqueued_at"), "enqueued_at"),
        "app": app_of(obj),
        "id": u"%s" % (ident,) if ident is not None else None,
        "traceparent": traceparent,
        "tracestate": tracestate,
    }


def fields(obj, default_event, limit=rules.MAX_DATA_BYTES):
    # type: (dict, str, int) -> dict
    """What Pusher needs from a classic message or an envelope: `channels` (a tuple),
    `event`, `data` (a string), and for envelopes `socket_id`, `enqueued_at`, `id`, `app`
    (None for `default`), `traceparent` and `tracestate` (None when absent or ignored as
    malformed). Raises InvalidMessage with the reason for anything Pusher would refuse."""
    if "channel" in obj:
        return _classic(obj, default_event, limit)
    if obj.get("relay") not in _VERSIONS:
        raise InvalidMessage("no channel (neither a classic message nor a relay envelope)")
    if "payload" in obj:
        raise InvalidMessage("a retry wrapper, which only the worker writes")
    return _envelope(obj, default_event, limit)


def classic(channel, data, default_event, limit=rules.MAX_DATA_BYTES):
    # type: (str, dict, str, int) -> str
    """Encode a classic message, validated so bad input fails at the source."""
    obj = {"channel": channel}
    obj.update(data)
    text = dumps(obj)
    fields(decode(text)[1], default_event, limit)
    return text


# Stands in for the worker's RELAY_EVENT when an envelope without `event` is checked at the
# source: the worker validates its own setting at start.
_SOME_EVENT = "hit"


def envelope(channels, event, data, socket_id=None, enqueued_at=None, ident=None,
             limit=rules.MAX_DATA_BYTES, app=None, traceparent=None, tracestate=None):
    # type: (list[str], str | None, object, str | None, float | None, str | None, int, str | None, str | None, str | None) -> str  # noqa: E501
    """Encode an envelope, validated so bad input fails at the source; `event` None leaves
    it out (the worker's RELAY_EVENT); naming an app makes it version 2. A trace context the
    worker would ignore (malformed) is left out rather than refused: it costs nothing."""
    obj = {"relay": ENVELOPE_VERSION, "channels": channels}
    if event is not None:
        obj["event"] = event
    obj["data"] = data
    if app is not None:
        obj.update(relay=APP_ENVELOPE_VERSION, app=app)
    if socket_id is not None:
        obj["socket_id"] = socket_id
    if enqueued_at is not None:
        obj["enqueued_at"] = enqueued_at
    if ident is not None:
        obj["id"] = ident
    traceparent, tracestate = trace_context(traceparent, tracestate)
    if traceparent is not None:
        obj["traceparent"] = traceparent
    if tracestate is not None:
        obj["tracestate"] = tracestate
    try:
        text = dumps(obj)
    except ValueError:
        text = _FAILED
    if text is _FAILED:
        raise InvalidMessage("data holds NaN or Infinity, which is not JSON")
    fields(decode(text)[1], _SOME_EVENT, limit)
    return text
