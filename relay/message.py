"""Parse and validate what producers push: pure functions, no I/O.

1. A *classic* message is a JSON object with a `channel` key: the event is RELAY_EVENT and
   the data is the object without `channel`. Any object that has `channel` is classic, so
   a classic message can never be misread as an envelope, whatever else it carries.
2. An *envelope* has no `channel` key and carries `"relay": 1`, with `channels` (1 to 100),
   `event`, `data`, and optionally `socket_id`, `enqueued_at` (Unix seconds) and `id`.
3. A *retry wrapper* (`"relay": 1` with `payload`) is what the worker itself writes back when
   a notification waits for another attempt: it carries the original text and the attempt
   history, so dead letters always show what the producer pushed.
4. Everything Pusher would refuse (names, sizes) is refused here first, with a reason, so a
   bad notification is dead-lettered instead of failing a whole batch. `Limits` carries
   what depends on the deployment: the data limit (RELAY_MAX_DATA_BYTES) and whether
   `private-encrypted-` channels can be sent (a master key is set).
5. An encrypted channel's data limit applies to what is sent: the ciphertext's JSON, whose
   size follows from the plaintext's (NaCl secretbox adds 16 bytes, base64 4/3, the
   `{"nonce": ..., "ciphertext": ...}` wrapper a fixed amount). The pusher library sends one
   encrypted channel per call, so an encrypted channel must be a notification's only one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from secrets import token_hex
from typing import Any

from relay import rules
from relay.errors import RelayError

ENVELOPE_VERSION = 1


class InvalidMessage(RelayError, ValueError):
    """The notification can never be delivered; the text is the dead-letter reason."""


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


def encrypted_size(plain_bytes: int) -> int:
    """Bytes of the data the pusher library sends for `plain_bytes` of plaintext."""
    return _ENCRYPTED_WRAPPER + _NONCE_B64 + 4 * -(-(plain_bytes + _SECRETBOX_MAC) // 3)


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


def encode_data(data: Any) -> str:
    """Pusher wants data as a string: strings pass through, anything else becomes JSON."""
    if isinstance(data, str):
        return data
    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN or Infinity: Python reads them, browsers' JSON.parse does not
        raise InvalidMessage("data holds NaN or Infinity, which is not JSON") from None


def _check(problem: str | None) -> None:
    if problem is not None:
        raise InvalidMessage(problem)


def validate_channel(channel: Any, limits: Limits = DEFAULT_LIMITS) -> str:
    _check(rules.channel_problem(channel))
    if channel.startswith(rules.ENCRYPTED_PREFIX) and limits.encryption is False:
        raise InvalidMessage(f"{rules.ENCRYPTED_PREFIX}* channels need {ENCRYPTION_SETTING}")
    return channel


def _check_encrypted(channels: tuple[str, ...]) -> bool:
    """True when the notification goes to an encrypted channel (then its only one)."""
    encrypted = any(c.startswith(rules.ENCRYPTED_PREFIX) for c in channels)
    if encrypted and len(channels) > 1:
        raise InvalidMessage(f"a {rules.ENCRYPTED_PREFIX} channel must be the notification's "
                             "only channel (the pusher library sends one per call)")
    return encrypted


def _utf8_size(text: str, what: str) -> int:
    # JSON may carry a lone surrogate ("\ud800"): valid JSON, but no UTF-8 text can hold it.
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidMessage(f"{what} holds a lone surrogate, not valid Unicode") from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_event(event: Any) -> str:
    _check(rules.event_problem(event))
    _utf8_size(event, "event name")
    return event


def validate_data(data: str, limits: Limits = DEFAULT_LIMITS, encrypted: bool = False) -> str:
    size = _utf8_size(data, "data")
    if encrypted:
        sent = encrypted_size(size)
        if sent > limits.max_data_bytes:
            raise InvalidMessage(f"data is {size} bytes, {sent} once encrypted, over the limit "
                                 f"of {limits.max_data_bytes}")
    _check(rules.data_size_problem(size, limits.max_data_bytes))
    return data


def validate_socket_id(socket_id: Any) -> str | None:
    _check(rules.socket_id_problem(socket_id))
    return socket_id


def _decode(raw: bytes | str) -> tuple[str, dict[str, Any]]:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise InvalidMessage("not UTF-8 text") from None
    try:
        obj = json.loads(text)
    except ValueError:
        raise InvalidMessage("not JSON") from None
    except RecursionError:  # the decoder recurses per nesting level
        raise InvalidMessage("JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise InvalidMessage(f"not a JSON object (got {type(obj).__name__})")
    return text, obj


def _classic(raw: bytes, text: str, obj: dict[str, Any], event: str, limits: Limits
             ) -> Notification:
    channel = validate_channel(obj["channel"], limits)
    rest = {k: v for k, v in obj.items() if k != "channel"}
    data = validate_data(encode_data(rest), limits, _check_encrypted((channel,)))
    return Notification(raw=raw, payload=text, channels=(channel,), event=validate_event(event),
                        data=data)


def _channels(obj: dict[str, Any], limits: Limits) -> tuple[str, ...]:
    channels = obj.get("channels")
    if isinstance(channels, str):
        channels = [channels]
    if not isinstance(channels, list) or not channels:
        raise InvalidMessage("envelope needs channels: a non-empty list")
    if len(channels) > rules.MAX_CHANNELS:
        raise InvalidMessage(f"envelope has {len(channels)} channels, over {rules.MAX_CHANNELS}")
    return tuple(validate_channel(c, limits) for c in channels)


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessage(f"{name} must be a number of Unix seconds")
    return float(value)


def _envelope(raw: bytes, text: str, obj: dict[str, Any], limits: Limits) -> Notification:
    if "data" not in obj:
        raise InvalidMessage("envelope needs data")
    ident = obj.get("id")
    channels = _channels(obj, limits)
    return Notification(
        raw=raw,
        payload=text,
        channels=channels,
        event=validate_event(obj.get("event")),
        data=validate_data(encode_data(obj["data"]), limits, _check_encrypted(channels)),
        socket_id=validate_socket_id(obj.get("socket_id")),
        enqueued_at=_number(obj.get("enqueued_at"), "enqueued_at"),
        id=str(ident) if ident is not None else None,
    )


def parse(raw: bytes, default_event: str, limits: Limits = DEFAULT_LIMITS) -> Notification:
    """Turn one queue element into a Notification, or raise InvalidMessage with the reason."""
    text, obj = _decode(raw)
    if "channel" in obj:
        return _classic(raw, text, obj, default_event, limits)
    if obj.get("relay") != ENVELOPE_VERSION:
        raise InvalidMessage("no channel (neither a classic message nor a relay envelope)")
    if "payload" in obj:
        return _unwrap_retry(raw, obj, default_event, limits)
    return _envelope(raw, text, obj, limits)


def _unwrap_retry(raw: bytes, obj: dict[str, Any], default_event: str, limits: Limits
                  ) -> Notification:
    payload = obj["payload"]
    history = obj.get("retry") or {}
    attempts = history.get("attempts", 0) if isinstance(history, dict) else None
    if not isinstance(payload, str) or not isinstance(attempts, int) or attempts < 0:
        raise InvalidMessage("malformed retry wrapper")
    _utf8_size(payload, "retry payload")
    inner = parse(payload.encode("utf-8"), default_event, limits)
    if inner.payload != payload or inner.attempts:
        raise InvalidMessage("nested retry wrapper")
    return Notification(
        raw=raw, payload=payload, channels=inner.channels, event=inner.event, data=inner.data,
        socket_id=inner.socket_id, enqueued_at=inner.enqueued_at, id=inner.id,
        attempts=attempts,
        first_failed_at=_number(history.get("first_failed_at"), "first_failed_at"),
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


def envelope(channels: list[str], event: str, data: Any, socket_id: str | None = None,
             enqueued_at: float | None = None, ident: str | None = None) -> str:
    """Encode an envelope (the producer's format), validated so bad input fails at the source."""
    obj: dict[str, Any] = {"relay": ENVELOPE_VERSION, "channels": channels, "event": event,
                           "data": data}
    if socket_id is not None:
        obj["socket_id"] = socket_id
    if enqueued_at is not None:
        obj["enqueued_at"] = enqueued_at
    if ident is not None:
        obj["id"] = ident
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise InvalidMessage("data holds NaN or Infinity, which is not JSON") from None
    parse(text.encode("utf-8"), event)
    return text
