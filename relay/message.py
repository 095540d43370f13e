"""Parse and validate what the worker pops: pure functions, no I/O.

1. Classic messages and envelopes are read by relay.wire, the one parser the producer helper
   uses too (in syntax Python 2.7 reads), so an app refuses exactly what the worker would
   dead-letter. Everything Pusher would refuse (names, sizes) is refused there first, with a
   reason, so a bad notification is dead-lettered instead of failing a whole batch.
2. On top of that the worker applies the policies that depend on its own settings, carried
   by `Limits`: the data limit (RELAY_MAX_DATA_BYTES) and whether `private-encrypted-`
   channels can be sent (a master key is set). An encrypted channel's limit applies to what
   is sent: the ciphertext's JSON, whose size follows from the plaintext's (NaCl secretbox
   adds 16 bytes, base64 4/3, the `{"nonce": ..., "ciphertext": ...}` wrapper a fixed
   amount). The pusher library sends one encrypted channel per call, so an encrypted
   channel must be a notification's only one.
3. An envelope may name an app (`app`, RELAY_APPS); `Notification.app` is None for the
   `default` app, whether named or not, so one app never has two keys. The data limit and
   the encryption policy are an app's own: `parse` takes the Limits, or a function giving
   an app's Limits (which raises InvalidMessage for an app it does not know).
4. A *retry wrapper* (`"relay": 1` with `payload`) is what the worker itself writes back when
   a notification waits for another attempt: it carries the original text and the attempt
   history, so dead letters always show what the producer pushed. With tracing on, the
   history also holds `first_traceparent`, the span context of the call that first carried
   the notification, so every later attempt joins that trace (relay.tracing); wrappers
   written without it read as before.
5. An envelope's `traceparent`/`tracestate` (the producer's W3C trace context) ride on the
   Notification unchanged through retries; a malformed one is ignored (relay.wire).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from secrets import token_hex
from typing import Any

from relay import rules, wire
from relay.wire import ENVELOPE_VERSION, InvalidMessage, envelope

__all__ = ["DEFAULT_LIMITS", "ENVELOPE_VERSION", "InvalidMessage", "Limits", "LimitsFor",
           "Notification", "encrypted_size", "envelope", "parse", "payload_of", "retry_wrapper"]

ENCRYPTION_SETTING = "PUSHER_ENCRYPTION_MASTER_KEY_BASE64"
_NONCE_B64 = 32  # base64 of NaCl's 24-byte nonce
_SECRETBOX_MAC = 16
_ENCRYPTED_WRAPPER = len('{"nonce": "", "ciphertext": ""}')  # pusher.crypto's json.dumps


@dataclass(frozen=True)
class Limits:
    """What a deployment accepts. encryption: True (a key is set), False (refuse encrypted
    channels, naming the setting) or None (unknown, as in the producer: accept them)."""

    max_data_bytes: int = rules.MAX_DATA_BYTES
    encryption: bool | None = None


DEFAULT_LIMITS = Limits()
# An app's Limits by its name (None: `default`); raises InvalidMessage for an unknown app.
LimitsFor = Callable[[str | None], Limits]


def encrypted_size(plain_bytes: int) -> int:
    """Bytes of the data the pusher library sends for `plain_bytes` of plaintext."""
    return _ENCRYPTED_WRAPPER + _NONCE_B64 + 4 * -(-(plain_bytes + _SECRETBOX_MAC) // 3)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Notification:
    """One parsed notification, ready for the Pusher API.

    `raw` is exactly what sits in Redis (needed to ack it); `payload` is what the producer
    pushed (differs from `raw` only for a retry wrapper).
    """

    raw: bytes
    payload: str
    channels: tuple[str, ...]
    event: str
    data: str
    socket_id: str | None = None
    enqueued_at: float | None = None
    attempts: int = 0
    first_failed_at: float | None = None
    id: str | None = None
    app: str | None = None  # None: the `default` app
    traceparent: str | None = None  # the producer's W3C trace context (envelopes only)
    tracestate: str | None = None
    first_traceparent: str | None = None  # the first call that carried it (retry wrappers)

    @property
    def cost(self) -> int:
        """Messages Pusher counts for this notification: one per channel."""
        return len(self.channels)

    def age_at(self, now: float) -> float | None:
        """Seconds since the producer enqueued it (never negative: clocks differ), or None
        when unknown; relay_delivery_age_seconds observes this at the ack, and so do spans."""
        if self.enqueued_at is None:
            return None
        return max(0.0, now - self.enqueued_at)


def _policy(found: dict[str, Any], limits: Limits) -> None:
    """The worker's refusals beyond Pusher's format rules (relay.wire checks those)."""
    channels = found["channels"]
    encrypted = [c for c in channels if c.startswith(rules.ENCRYPTED_PREFIX)]
    if not encrypted:
        return
    if limits.encryption is False:
        raise InvalidMessage(f"{rules.ENCRYPTED_PREFIX}* channels need {ENCRYPTION_SETTING}")
    if len(channels) > 1:
        raise InvalidMessage(f"a {rules.ENCRYPTED_PREFIX} channel must be the notification's "
                             "only channel (the pusher library sends one per call)")
    size = wire.utf8_size(found["data"], "data")
    sent = encrypted_size(size)
    if sent > limits.max_data_bytes:
        raise InvalidMessage(f"data is {size} bytes, {sent} once encrypted, over the limit "
                             f"of {limits.max_data_bytes}")


def _notification(raw: bytes, text: str, found: dict[str, Any], limits: Limits
                  ) -> Notification:
    _policy(found, limits)
    return Notification(raw=raw, payload=text, **found)


def parse(raw: bytes, default_event: str, limits: Limits | LimitsFor = DEFAULT_LIMITS
          ) -> Notification:
    """Turn one queue element into a Notification, or raise InvalidMessage with the reason.

    `limits` is one Limits for every notification, or a function giving the Limits of the
    app a notification names (an unknown app is its InvalidMessage: a dead letter)."""
    text, obj = wire.decode(raw)
    if wire.is_retry_wrapper(obj):
        return _unwrap_retry(raw, obj, default_event, limits)
    mine = limits if isinstance(limits, Limits) else limits(wire.app_of(obj))
    return _notification(raw, text, wire.fields(obj, default_event, mine.max_data_bytes), mine)


def _unwrap_retry(raw: bytes, obj: dict[str, Any], default_event: str,
                  limits: Limits | LimitsFor) -> Notification:
    payload = obj["payload"]
    history = obj.get("retry") or {}
    attempts = history.get("attempts", 0) if isinstance(history, dict) else None
    if not isinstance(payload, str) or not isinstance(attempts, int) or attempts < 0:
        raise InvalidMessage("malformed retry wrapper")
    wire.utf8_size(payload, "retry payload")
    inner = parse(payload.encode("utf-8"), default_event, limits)
    if inner.payload != payload or inner.attempts:
        raise InvalidMessage("nested retry wrapper")
    first_traceparent, _ = wire.trace_context(history.get("first_traceparent"), None)
    return replace(
        inner, raw=raw, attempts=attempts, first_traceparent=first_traceparent,
        first_failed_at=wire.unix_seconds(history.get("first_failed_at"), "first_failed_at"),
    )


def retry_wrapper(payload: str, attempts: int, first_failed_at: float, last_error: str,
                  first_traceparent: str | None = None) -> str:
    """The queue element that carries a notification back for another attempt.
    `first_traceparent`: the span context of the first call that carried it (tracing on)."""
    history: dict[str, Any] = {"attempts": attempts, "first_failed_at": first_failed_at,
                               "last_error": last_error}
    if first_traceparent is not None:
        history["first_traceparent"] = first_traceparent
    return json.dumps({
        "relay": ENVELOPE_VERSION,
        "payload": payload,
        "retry": history,
        # A sorted set keeps one copy of equal members: the nonce keeps twins apart.
        "nonce": token_hex(6),
    }, separators=(",", ":"))


def payload_of(raw: bytes) -> str:
    """What the producer pushed, even for an element that does not parse (for dead letters).

    A retry wrapper is recognised by its shape once parsed (`"relay": 1` with a string
    `payload`), never by how its text begins, so key order and spacing do not matter.
    """
    text = raw.decode("utf-8", errors="replace")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if isinstance(obj, dict) and "channel" not in obj and obj.get("relay") == ENVELOPE_VERSION:
        inner = obj.get("payload")
        if isinstance(inner, str) and _encodable(inner):
            return inner
    return text
