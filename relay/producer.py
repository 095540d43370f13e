"""The producer side: what a web app calls to queue a notification. No gevent here.

1. `notify(channel, data)` pushes the *classic* shape `{"channel": ..., **data}` whenever it
   can say everything (one channel, a dict without a `channel` key, the worker's default
   event, no socket_id), so the queue stays readable by older workers and tools.
2. Anything more (several channels, an event name, a socket_id to exclude the sender, data
   that is not a dict or has its own `channel` key) becomes an *envelope*
   (`relay.message.envelope`), stamped with `enqueued_at` for the worker's max-age policy.
3. Everything is validated before the RPUSH with the worker's own parser, so bad input
   raises `InvalidMessage` in the app, where the bug is, and nothing is pushed.
4. `Producer` keeps one Redis client for an app's lifetime; `notify()` is the one-off form
   that makes (and closes) a client from `REDIS_URL` on each call.

Imports only redis and relay modules that are gevent-free, so a plain WSGI or Celery
process can use it without gevent patching anything.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from relay import redis_url
from relay.message import InvalidMessage, envelope, parse

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_QUEUE = "notifications"
DEFAULT_EVENT = "hit"
# A web request should fail fast rather than hang on a dead Redis.
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 3.0

Channels = str | Sequence[str]


def client_from_env() -> redis.Redis:
    """A Redis client for REDIS_URL (default redis://localhost:6379/0), in any of its forms
    (standalone, TLS, unix socket, Sentinel, Cluster: see relay.redis_url). A malformed URL
    raises redis_url.RedisUrlError, whose text never shows the password."""
    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    return redis_url.plain_client(url, socket_timeout=SOCKET_TIMEOUT_S,
                                  socket_connect_timeout=CONNECT_TIMEOUT_S)


def _is_classic(channels: Channels, data: Any, event: str | None,
                socket_id: str | None) -> bool:
    return (isinstance(channels, str) and isinstance(data, dict) and "channel" not in data
            and event is None and socket_id is None)


def encode(channels: Channels, data: Any, event: str | None = None,
           socket_id: str | None = None, *, default_event: str = DEFAULT_EVENT,
           now: float | None = None) -> str:
    """The queue element for this notification; raises InvalidMessage for bad input."""
    try:
        json.dumps(data, allow_nan=False)  # NaN/Infinity are not JSON to Pusher's clients
        if _is_classic(channels, data, event, socket_id):
            text = json.dumps({"channel": channels, **data}, ensure_ascii=False,
                              separators=(",", ":"))
            parse(text.encode("utf-8"), default_event)  # validates channel and size
            return text
        listed = [channels] if isinstance(channels, str) else list(channels)
        return envelope(listed, default_event if event is None else event, data, socket_id,
                        enqueued_at=time.time() if now is None else now)
    except InvalidMessage:
        raise
    except (TypeError, ValueError) as exc:  # json.dumps: not serialisable, NaN, circular
        raise InvalidMessage(f"data is not JSON-serialisable: {exc}") from None


class Producer:
    """Pushes notifications for the worker; keep one per process (it holds a Redis pool)."""

    def __init__(self, client: redis.Redis | None = None, queue: str | None = None,
                 default_event: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client if client is not None else client_from_env()
        self.queue = queue or os.environ.get("RELAY_QUEUE") or DEFAULT_QUEUE
        self.default_event = default_event or os.environ.get("RELAY_EVENT") or DEFAULT_EVENT
        self.clock = clock

    def notify(self, channel_or_channels: Channels, data: Any, event: str | None = None,
               socket_id: str | None = None) -> str:
        """Queue one notification; returns the text pushed. Raises InvalidMessage first."""
        text = encode(channel_or_channels, data, event, socket_id,
                      default_event=self.default_event, now=self.clock())
        self.client.rpush(self.queue, text)
        return text

    def close(self) -> None:
        self.client.close()


def notify(channel_or_channels: Channels, data: Any, event: str | None = None,
           socket_id: str | None = None, *, client: redis.Redis | None = None,
           queue: str | None = None) -> str:
    """One-off `Producer(client, queue).notify(...)`; a client made here is closed here."""
    producer = Producer(client, queue)
    try:
        return producer.notify(channel_or_channels, data, event, socket_id)
    finally:
        if client is None:
            producer.close()
