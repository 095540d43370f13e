"""Pusher calls, and the one place where an answer is classified.

1. The only module that imports `pusher`: the official library signs and validates, and a
   small backend (its `backend=` hook) sends through one keep-alive connection pool as large
   as the greenlet pool: urllib3 directly by default, or a requests.Session
   (RELAY_HTTP_CLIENT=requests); see Urllib3Backend for why.
2. `classify(status, body, retry_after)` maps an answer to a `Failure` kind by status code,
   never by message text: PERMANENT (this notification can never go: 400, 413),
   TRANSIENT (network, timeout, 5xx: retry it later), SYSTEMIC (401, 403, 404: our account or
   setup, pause everything), RATE_LIMITED (429: pause everything, honour Retry-After).
   A 200 whose JSON body carries an error (soketi answers some errors that way) is that error.
3. `Delivery.send(notes)` sends one notification with `trigger`, several single-channel ones
   with one `trigger_batch`, and splits a refused batch to find the culprit, so one bad event
   never dead-letters its neighbours.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import certifi
import requests
import urllib3
from pusher.pusher_client import PusherClient
from requests.adapters import HTTPAdapter

from relay.config import PusherTarget
from relay.message import Notification

log = logging.getLogger(__name__)

MAX_BATCH = 10  # Pusher's batch_events limit
DEFAULT_RETRY_AFTER_S = 1.0


class Kind(enum.Enum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    SYSTEMIC = "systemic"
    RATE_LIMITED = "rate_limited"


@dataclass(frozen=True)
class Failure:
    kind: Kind
    reason: str
    status: int | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Answer:
    """What the backend returns instead of raising: the raw HTTP outcome."""

    status: int
    body: str
    retry_after: str | None = None


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else DEFAULT_RETRY_AFTER_S
    except ValueError:
        return DEFAULT_RETRY_AFTER_S  # an HTTP date: rare here; a short pause is safe


def _body_error(body: str) -> tuple[int, str] | None:
    """soketi-style errors inside a 200: {"error": "...", "code": 4xx}."""
    if '"error"' not in body:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "error" not in obj:
        return None
    code = obj.get("code")
    return (code if isinstance(code, int) else 500), str(obj["error"])


def classify(answer: Answer) -> Failure | None:
    """None for success; otherwise the Failure this answer means."""
    status, body = answer.status, answer.body
    if status in (200, 202):
        embedded = _body_error(body)
        if embedded is None:
            return None
        status, body = embedded
    reason = f"HTTP {status}: {body.strip()[:200]}"
    if status in (400, 413):
        return Failure(Kind.PERMANENT, reason, status)
    if status in (401, 403, 404):
        return Failure(Kind.SYSTEMIC, reason, status)
    if status == 429:
        return Failure(Kind.RATE_LIMITED, reason, status, _retry_after(answer.retry_after))
    return Failure(Kind.TRANSIENT, reason, status)


class RequestsBackend:
    """pusher's backend hook over one requests.Session; returns the Answer, never raises for
    an HTTP status."""

    def __init__(self, client: Any, pool_size: int) -> None:
        self.client = client
        self.session = make_session(pool_size, client_base_url(client))

    def send_request(self, request: Any) -> Answer:
        resp = self.session.request(request.method, request.url, headers=request.headers,
                                    data=request.body, timeout=self.client.timeout)
        return Answer(resp.status_code, resp.text, resp.headers.get("Retry-After"))

    def close(self) -> None:
        self.session.close()


class Urllib3Backend:
    """The same hook straight on urllib3 (what requests runs on): about a third less CPU per
    call, since requests re-merges settings, cookies and hooks for every request."""

    def __init__(self, client: Any, pool_size: int) -> None:
        self.client = client
        self.timeout = urllib3.Timeout(connect=client.timeout, read=client.timeout)
        base = client_base_url(client)
        proxy = requests.utils.get_environ_proxies(base).get(client.scheme)
        ca_certs = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
                    or certifi.where())
        options = {"maxsize": pool_size, "ca_certs": ca_certs}
        self.manager = (urllib3.ProxyManager(proxy, **options) if proxy
                        else urllib3.PoolManager(**options))
        self.pool = self.manager.connection_from_url(base)

    def send_request(self, request: Any) -> Answer:
        resp = self.pool.urlopen(request.method, request.signed_path, body=request.body,
                                 headers=request.headers, retries=False, redirect=False,
                                 timeout=self.timeout)
        return Answer(resp.status, resp.data.decode("utf-8", "replace"),
                      resp.headers.get("Retry-After"))

    def close(self) -> None:
        self.manager.clear()


def make_session(pool_size: int, base_url: str) -> requests.Session:
    """Keep-alive pool as large as the greenlet pool; proxy and CA settings read once.

    requests re-reads proxy variables from the environment on every call (trust_env), a
    large share of a call's CPU; reading them here once keeps HTTPS_PROXY, NO_PROXY and
    REQUESTS_CA_BUNDLE working at no per-call cost.
    """
    session = requests.Session()
    session.trust_env = False
    session.proxies = requests.utils.get_environ_proxies(base_url)
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if ca_bundle:
        session.verify = ca_bundle
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# What a call can raise for the network, by transport: requests wraps urllib3's errors.
NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)

BACKENDS: dict[str, type[RequestsBackend] | type[Urllib3Backend]] = {
    "urllib3": Urllib3Backend, "requests": RequestsBackend}


def client_base_url(client: Any) -> str:
    return f"{client.scheme}://{client.host}:{client.port}"


class Delivery:
    """One Pusher client for the process; safe to share between greenlets."""

    def __init__(self, target: PusherTarget, pool_size: int,
                 on_call: Callable[[int | None, float], None] | None = None,
                 http_client: str = "urllib3") -> None:
        """on_call(status or None for a network error, seconds) observes every HTTP call."""
        self.on_call = on_call
        # PusherClient is the part of pusher.Pusher that triggers (Pusher would also build
        # an authentication client, with a second connection pool we never use).
        self.client = PusherClient(
            app_id=target.app_id, key=target.key, secret=target.secret, host=target.host,
            port=target.port, ssl=target.ssl, timeout=target.timeout,
            backend=BACKENDS[http_client], pool_size=pool_size)
        self.calls = 0

    def send(self, notes: Sequence[Notification]) -> list[Failure | None]:
        """Deliver in the given order; one result per notification (None = Pusher accepted it).

        Consecutive one-channel notifications share batch calls; an envelope with several
        channels goes alone through `trigger`. Calls follow the notifications' order, so a
        channel's notifications leave in the order they were taken (see ordering.py).
        """
        results: list[Failure | None] = []
        run: list[Notification] = []
        for note in notes:
            if len(note.channels) == 1:
                run.append(note)
                continue
            results.extend(self._run(run))
            run = []
            results.append(self._single(note))
        results.extend(self._run(run))
        return results

    def _run(self, notes: Sequence[Notification]) -> list[Failure | None]:
        if len(notes) > 1:
            return self._batch(notes)
        return [self._single(n) for n in notes]

    def _single(self, note: Notification) -> Failure | None:
        return self._call(self.client.trigger, list(note.channels), note.event, note.data,
                          note.socket_id)

    def _batch(self, notes: Sequence[Notification]) -> list[Failure | None]:
        results: list[Failure | None] = []
        for start in range(0, len(notes), MAX_BATCH):
            chunk = notes[start:start + MAX_BATCH]
            events = [_event(n) for n in chunk]
            failure = self._call(self.client.trigger_batch, events, True)
            if failure is not None and failure.kind is Kind.PERMANENT:
                # One bad event refuses the whole batch: find it by sending each alone.
                results.extend(self._single(n) for n in chunk)
            else:
                results.extend([failure] * len(chunk))
        return results

    def _call(self, method: Any, *args: Any) -> Failure | None:
        self.calls += 1
        started = time.monotonic()
        try:
            answer = method(*args)
        except NETWORK_ERRORS as exc:
            self._observe(None, started)
            return Failure(Kind.TRANSIENT, f"network: {type(exc).__name__}")
        except (ValueError, TypeError) as exc:  # the library's own validation
            return Failure(Kind.PERMANENT, f"refused by the pusher library: {exc}"[:300])
        self._observe(answer.status, started)
        return classify(answer)

    def _observe(self, status: int | None, started: float) -> None:
        if self.on_call is not None:
            self.on_call(status, time.monotonic() - started)

    def close(self) -> None:
        self.client.http.close()


def _event(note: Notification) -> dict[str, str]:
    event = {"channel": note.channels[0], "name": note.event, "data": note.data}
    if note.socket_id:
        event["socket_id"] = note.socket_id
    return event
