"""Parse and validate what the worker pops: pure functions, no I/O.

1. Classic messages and envelopes are read by relay.wire, the one parser the producer helper
   uses too (in syntax Python 2.7 reads), so an app refuses exactly what the worker would
   dead-letter. Everything Pusher would refuse (names, sizes) is refused there first, with a
   reason, so a bad notification is dead-lettered instead of failing a whole batch.
2. On top of that the worker applies the policies that depend on its own settings (here:
   encrypted channels) and builds a typed Notification.
3. A *retry wrapper* (`"relay": 1` with `payload`) is what the worker itself writes back when
   a notification waits for another attempt: it carries the original text and the attempt
   history, so dead letters always show what the producer pushed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from secrets import token_hex
from typing import Any

from relay import rules, wire
from relay.wire import ENVELOPE_VERSION, InvalidMessage, envelope

__all__ = ["ENVELOPE_VERSION", "InvalidMessage", "Notification", "envelope", "parse",
           "payload_of", "retry_wrapper"]


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

    @property
    def cost(self) -> int:
        """Messages Pusher counts for this notification: one per channel."""
        return len(self.channels)


def _policy(channels: tuple[str, ...]) -> tuple[str, ...]:
    """The worker's refusals beyond Pusher's format rules (relay.wire checks those)."""
    for channel in channels:
        if channel.startswith(rules.ENCRYPTED_PREFIX):
            raise InvalidMessage("encrypted channels are not supported")
    return channels


def _notification(raw: bytes, text: str, found: dict[str, Any]) -> Notification:
    _policy(found["channels"])
    return Notification(raw=raw, payload=text, **found)


def parse(raw: bytes, default_event: str) -> Notification:
    """Turn one queue element into a Notification, or raise InvalidMessage with the reason."""
    text, obj = wire.decode(raw)
    if wire.is_retry_wrapper(obj):
        return _unwrap_retry(raw, obj, default_event)
    return _notification(raw, text, wire.fields(obj, default_event))


def _unwrap_retry(raw: bytes, obj: dict[str, Any], default_event: str) -> Notification:
    payload = obj["payload"]
    history = obj.get("retry") or {}
    attempts = history.get("attempts", 0) if isinstance(history, dict) else None
    if not isinstance(payload, str) or not isinstance(attempts, int) or attempts < 0:
        raise InvalidMessage("malformed retry wrapper")
    wire.utf8_size(payload, "retry payload")
    inner = parse(payload.encode("utf-8"), default_event)
    if inner.payload != payload or inner.attempts:
        raise InvalidMessage("nested retry wrapper")
    return Notification(
        raw=raw, payload=payload, channels=inner.channels, event=inner.event, data=inner.data,
        socket_id=inner.socket_id, enqueued_at=inner.enqueued_at, id=inner.id,
        attempts=attempts,
        first_failed_at=wire.unix_seconds(history.get("first_failed_at"), "first_failed_at"),
    )


def retry_wrapper(payload: str, attempts: int, first_failed_at: float, last_error: str) -> str:
    """The queue element that carries a notification back for another attempt."""
    return json.dumps({
        "relay": ENVELOPE_VERSION,
        "payload": payload,
        "retry": {"attempts": attempts, "first_failed_at": first_failed_at,
                  "last_error": last_error},
        # A sorted set keeps one copy of equal members: the nonce keeps twins apart.
        "nonce": token_hex(6),
    }, separators=(",", ":"))


def payload_of(raw: bytes) -> str:
    """What the producer pushed, even for an element that does not parse (for dead letters)."""
    text = raw.decode("utf-8", errors="replace")
    if text.startswith('{"relay":1,"payload":'):
        try:
            inner = json.loads(text).get("payload")
        except (ValueError, RecursionError):
            return text
        if isinstance(inner, str) and _encodable(inner):
            return inner
    return text
