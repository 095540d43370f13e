"""Pusher calls, and the one place where an answer is classified.

1. The only module that imports `pusher`: the official library signs and validates, and a
   small backend (its `backend=` hook) sends through one keep-alive connection pool as large
   as the greenlet pool: geventhttpclient by default, urllib3 directly, or a requests.Session
   (PUSHER_HTTP_CLIENT); see GeventHttpBackend and Urllib3Backend for why.
2. `classify(answer)` maps an answer to a `Failure` kind, the one place for every server's
   dialect, by status code, never by message text (except Pusher's clock-skew 401):
   PERMANENT (this notification can never go: 400, 413, and 422, Laravel Reverb's
   validation answer), TRANSIENT (network, timeout, 5xx: retry it later), SYSTEMIC (401,
   403, 404: our account or setup, pause everything), RATE_LIMITED (429, and 503 with
   Retry-After, sockudo's backpressure: pause everything for Retry-After; 0 means no pause).
   An error body inside a 200 (soketi) is that error; a string `code` (sockudo's
   `rate_limited`...) is read by its `status`, or by its name.
3. `Delivery.send(notes)` sends one notification with `/events`, several single-channel ones
   with one `/batch_events`, and splits a refused batch (a permanent answer: 400, 413 for
   the request's size, 422) to find the culprit, so one bad event never dead-letters its
   neighbours, and a batch too large for the server is sent event by event. A retried
   notification (it failed before, perhaps in a batch with a bad neighbour) always goes
   alone, so it is never chained to that neighbour again.
4. `private-encrypted-*` data is encrypted per channel with the pusher library's own crypto
   module and the master key (PUSHER_ENCRYPTION_MASTER_KEY_BASE64), as its trigger and
   trigger_batch do; requests are built here, not by trigger(), because trigger() refuses
   data over 30 KB, which servers that allow RELAY_MAX_DATA_BYTES of 100 KB accept.
5. A 401 saying the timestamp expired is clock skew: logged with the offset measured from the
   server's Date header, and kept in `Delivery.clock_skew_s` for /healthz.
"""

from __future__ import annotations

import enum
import http.client
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import certifi
import geventhttpclient
import requests
import urllib3
from pusher.crypto import encrypt, is_encrypted_channel, parse_master_key
from pusher.http import POST, Request
from pusher.pusher_client import PusherClient
from pusher.util import validate_channel, validate_socket_id
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection

from relay import explain
from relay.config import PusherTarget
from relay.message import Notification

log = logging.getLogger(__name__)

MAX_BATCH = 10  # Pusher's batch_events limit
DEFAULT_RETRY_AFTER_S = 1.0
PERMANENT_STATUSES = frozenset({400, 413, 422})  # 422: Laravel Reverb's validation failure
PROBE_TIMEOUT_S = 1.0  # the once-per-outage look at what listens at the Pusher port
TIMESTAMP_EXPIRED = "timestamp expired"  # Pusher's 401 body when the clocks disagree > 600 s
# sockudo's error codes are names (crates/sockudo-server/src/http_handler/errors.rs)
NAMED_CODES = {
    "invalid_input": 400, "limit_exceeded": 400, "missing_channel_info": 400,
    "auth_failed": 401, "forbidden": 403, "app_not_found": 404, "not_found": 404,
    "payload_too_large": 413, "feature_disabled": 422, "rate_limited": 429,
    "backpressure": 503, "service_unavailable": 503,
}


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
    shared: int = 1  # how many notifications the failed call carried (a batch: several)


@dataclass(frozen=True)
class Answer:
    """What the backend returns instead of raising: the raw HTTP outcome."""

    status: int
    body: str
    retry_after: str | None = None
    date: str | None = None  # the server's clock, to measure skew


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else DEFAULT_RETRY_AFTER_S
    except ValueError:
        return DEFAULT_RETRY_AFTER_S  # an HTTP date: rare here; a short pause is safe


def _status_of(obj: dict[str, Any]) -> int:
    """The status an error body names: soketi's numeric code, sockudo's status or code name."""
    code, status = obj.get("code"), obj.get("status")
    for value in (code, status):
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    return NAMED_CODES.get(code, 500) if isinstance(code, str) else 500


def _body_error(body: str) -> tuple[int, str] | None:
    """An error inside a 200 (soketi): {"error": "...", "code": 4xx or a name}."""
    if '"error"' not in body:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "error" not in obj:
        return None
    return _status_of(obj), str(obj["error"])


def classify(answer: Answer) -> Failure | None:
    """None for success; otherwise the Failure this answer means."""
    status, body = answer.status, answer.body
    if status in (200, 202):
        embedded = _body_error(body)
        if embedded is None:
            return None
        status, body = embedded
    reason = f"HTTP {status}: {body.strip()[:200]}"
    if status in PERMANENT_STATUSES:
        return Failure(Kind.PERMANENT, reason, status)
    if status == 401 and TIMESTAMP_EXPIRED in body.lower():
        return Failure(Kind.SYSTEMIC, f"clock skew: {reason}", status)
    if status in (401, 403, 404):
        return Failure(Kind.SYSTEMIC, reason, status)
    if status == 429 or (status == 503 and answer.retry_after is not None):
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
        return Answer(resp.status_code, resp.text, resp.headers.get("Retry-After"),
                      resp.headers.get("Date"))

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
        options: dict[str, Any] = {"maxsize": pool_size, "ca_certs": ca_bundle()}
        if proxy:
            # urllib3's ProxyManager opens its sockets without its own defaults (TCP_NODELAY):
            # through a proxy each kept-alive call would then wait ~40 ms for a delayed ACK.
            options["socket_options"] = HTTPConnection.default_socket_options
        self.manager = (urllib3.ProxyManager(proxy, **options) if proxy
                        else urllib3.PoolManager(**options))
        self.pool = self.manager.connection_from_url(base)
        # Through a proxy, an http:// target is asked for by its absolute URL (an https://
        # one goes through a CONNECT tunnel, in origin form).
        self.prefix = base if proxy and client.scheme == "http" else ""

    def send_request(self, request: Any) -> Answer:
        resp = self.pool.urlopen(request.method, self.prefix + request.signed_path,
                                 body=request.body, assert_same_host=False,
                                 headers=request.headers, retries=False, redirect=False,
                                 timeout=self.timeout)
        return Answer(resp.status, resp.data.decode("utf-8", "replace"),
                      resp.headers.get("Retry-After"), resp.headers.get("Date"))

    def close(self) -> None:
        self.manager.clear()


class TransportError(ConnectionError):
    """A geventhttpclient failure that it reports as something other than OSError (a failed
    proxy CONNECT, an unresolvable host, a malformed answer): a network error all the same."""


def _header(resp: Any, name: str) -> str | None:
    """geventhttpclient gives a list for a repeated header: the first one counts."""
    value = resp.get(name)
    return value[0] if isinstance(value, list) else value


class GeventHttpBackend:
    """The same hook on geventhttpclient: written for gevent, with a C (llhttp) parser for the
    answer, so a call costs less CPU than urllib3 over http.client (see README, "Speed").

    Settings read once, like the other backends: HTTPS_PROXY/HTTP_PROXY and NO_PROXY (an https
    target goes through a CONNECT tunnel, an http one to the proxy with the absolute URL),
    REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE or certifi's bundle; certificates and host names are
    always verified. Pooled connections are checked before reuse (a server may close an idle
    keep-alive), and a POST is never resent by the library itself. It cannot speak TLS to the
    proxy itself (an https:// proxy URL): `gevent_backend` then falls back to urllib3.
    """

    def __init__(self, client: Any, pool_size: int, proxy: str | None = None) -> None:
        self.client = client
        options: dict[str, Any] = {}
        if proxy:
            parts = urlsplit(proxy)
            options.update(proxy_host=parts.hostname, proxy_port=parts.port or 80,
                           proxy_user=unquote(parts.username) if parts.username else None,
                           proxy_password=unquote(parts.password) if parts.password else None)
        if client.ssl:
            options["ssl_options"] = {"ca_certs": ca_bundle()}
        self.http = geventhttpclient.HTTPClient(
            client.host, port=client.port, ssl=bool(client.ssl), concurrency=pool_size,
            connection_timeout=client.timeout, network_timeout=client.timeout, **options)

    def send_request(self, request: Any) -> Answer:
        try:
            resp = self.http.request(request.method, request.signed_path, body=request.body,
                                     headers=request.headers)
            try:
                body = resp.read()
            finally:
                resp.release()
        except (http.client.HTTPException, RuntimeError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return Answer(resp.status_code, body.decode("utf-8", "replace"),
                      _header(resp, "Retry-After"), _header(resp, "Date"))

    def close(self) -> None:
        self.http.close()


def gevent_backend(client: Any, pool_size: int) -> GeventHttpBackend | Urllib3Backend:
    """geventhttpclient, unless the proxy is one it cannot reach (then urllib3, said once)."""
    proxy = requests.utils.get_environ_proxies(client_base_url(client)).get(client.scheme)
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"
    if proxy and (urlsplit(proxy).scheme != "http" or not urlsplit(proxy).hostname):
        log.warning("PUSHER_HTTP_CLIENT=geventhttpclient cannot use the proxy %s (an http:// "
                    "proxy only); using urllib3 instead", urlsplit(proxy).scheme + "://...")
        return Urllib3Backend(client, pool_size)
    return GeventHttpBackend(client, pool_size, proxy)


def ca_bundle() -> str:
    return (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            or certifi.where())


class NoDelayAdapter(HTTPAdapter):
    """requests' adapter, with TCP_NODELAY on proxied connections too (see Urllib3Backend)."""

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs.setdefault("socket_options", HTTPConnection.default_socket_options)
        return super().proxy_manager_for(proxy, **proxy_kwargs)


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
    adapter = NoDelayAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# What a call can raise for the network, by transport: requests wraps urllib3's errors.
NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError,
                  http.client.HTTPException)

BACKENDS: dict[str, Callable[[Any, int], Any]] = {
    "urllib3": Urllib3Backend, "requests": RequestsBackend, "geventhttpclient": gevent_backend}


def client_base_url(client: Any) -> str:
    return f"{client.scheme}://{client.host}:{client.port}"


def goes_alone(note: Notification) -> bool:
    """Sent in a call of its own (never in a batch): an envelope with several channels, or a
    retried notification (so a suspect never fails a whole batch)."""
    return len(note.channels) > 1 or bool(note.attempts)


class HttpSpan(Protocol):
    def __enter__(self) -> HttpSpan: ...

    def __exit__(self, *exc: object) -> None: ...

    def answered(self, status: int) -> None: ...


class Spans(Protocol):
    """What Delivery needs of a call's span (relay.tracing_switch.CallTrace): one child per
    HTTP request. Declared here, so delivery imports nothing of tracing."""

    def http(self, method: str, url: str) -> HttpSpan: ...


class _NoSpan:
    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def answered(self, status: int) -> None:
        return None

    def http(self, method: str, url: str) -> _NoSpan:
        return self


NO_SPANS = _NoSpan()


class Delivery:
    """One Pusher client for the process; safe to share between greenlets."""

    def __init__(self, target: PusherTarget, pool_size: int,
                 on_call: Callable[[int | None, float], None] | None = None,
                 http_client: str = "geventhttpclient") -> None:
        """on_call(status, seconds) observes every HTTP call: the status of the outcome acted
        on (an error inside a 200 counts as its code), None for a network error."""
        self.on_call = on_call
        # PusherClient is the part of pusher.Pusher that triggers (Pusher would also build
        # an authentication client, with a second connection pool we never use).
        self.client = PusherClient(
            app_id=target.app_id, key=target.key, secret=target.secret, host=target.host,
            port=target.port, ssl=target.ssl, timeout=target.timeout,
            encryption_master_key_base64=target.encryption_master_key_base64,
            backend=BACKENDS[http_client], pool_size=pool_size)
        self.master_key = parse_master_key(None, target.encryption_master_key_base64)
        self.base_url = client_base_url(self.client)  # for the HTTP spans (no credentials)
        self.network_down = False  # a network failure since the last success: probed once
        # The app's name in failure log lines when several are configured (relay.routes).
        self.app: str | None = None
        self.clock_skew_s: float | None = None
        """Server clock minus ours, set by a timestamp-expired 401 (nan: no Date header),
        None again after a success: what /healthz reports."""

    def send(self, notes: Sequence[Notification], trace: Spans = NO_SPANS
             ) -> list[Failure | None]:
        """Deliver in the given order; one result per notification (None = Pusher accepted it).

        Consecutive one-channel notifications that are not retries share batch calls; the
        rest go alone through /events (an envelope with several channels, and a retried
        notification, so that a suspect never fails a whole batch). Calls follow the
        notifications' order, so a channel's notifications leave in the order they were
        taken (see relay.lanes). `trace`: the call's span (relay.tracing_switch), given
        each HTTP request; passed down, never kept, as every greenlet shares this Delivery.
        """
        results: list[Failure | None] = []
        run: list[Notification] = []
        for note in notes:
            if not goes_alone(note):
                run.append(note)
                continue
            results.extend(self._run(run, trace))
            run = []
            results.append(self._single(note, trace))
        results.extend(self._run(run, trace))
        return results

    def _run(self, notes: Sequence[Notification], trace: Spans) -> list[Failure | None]:
        if len(notes) > 1:
            return self._batch(notes, trace)
        return [self._single(n, trace) for n in notes]

    def _single(self, note: Notification, trace: Spans) -> Failure | None:
        return self._call(lambda: self.client.http.send_request(self._trigger(note)),
                          trace, "events")

    def _trigger(self, note: Notification) -> Request:
        """What PusherClient.trigger builds, without its 30 KB cap (see the docstring)."""
        channels = [validate_channel(c) for c in note.channels]
        params = {"name": note.event, "channels": channels,
                  "data": self._data(channels[0], note.data)}
        if note.socket_id:
            params["socket_id"] = validate_socket_id(note.socket_id)
        return Request(self.client, POST, f"/apps/{self.client.app_id}/events", params)

    def _data(self, channel: str, data: str) -> str:
        """Encrypted as the library does it for a private-encrypted- channel, else as is."""
        if not is_encrypted_channel(channel):
            return data
        return json.dumps(encrypt(channel, data, self.master_key), ensure_ascii=False)

    def _batch(self, notes: Sequence[Notification], trace: Spans
               ) -> list[Failure | None]:
        results: list[Failure | None] = []
        for start in range(0, len(notes), MAX_BATCH):
            chunk = notes[start:start + MAX_BATCH]
            failure = self._call(lambda chunk=chunk: self.client.trigger_batch(
                [self._event(n) for n in chunk], True), trace, "batch_events")
            if failure is not None and failure.kind is Kind.PERMANENT:
                # One bad event, or a request too large (413), refuses the whole batch:
                # send each alone, so only what can never go is dead-lettered.
                results.extend(self._single(n, trace) for n in chunk)
            else:
                shared = None if failure is None else replace(failure, shared=len(chunk))
                results.extend([shared] * len(chunk))
        return results

    def _event(self, note: Notification) -> dict[str, str]:
        channel = note.channels[0]
        event = {"channel": channel, "name": note.event, "data": self._data(channel, note.data)}
        if note.socket_id:
            event["socket_id"] = note.socket_id
        return event

    def _call(self, send: Callable[[], Answer], trace: Spans = NO_SPANS,
              endpoint: str = "events") -> Failure | None:
        started = time.monotonic()
        try:
            # Inside the try: the HTTP span sees a network error before it is handled here.
            with trace.http(POST, f"{self.base_url}/apps/{self.client.app_id}/{endpoint}") as http:
                answer = send()
                http.answered(answer.status)
        except NETWORK_ERRORS as exc:
            self._observe(None, started)
            return Failure(Kind.TRANSIENT, self._network_failure(exc))
        except (ValueError, TypeError) as exc:  # the library's own validation
            return Failure(Kind.PERMANENT, f"refused by the pusher library: {exc}"[:300])
        failure = classify(answer)
        # Counted by the outcome acted on: an error inside a 200 (soketi) is that error.
        self._observe(answer.status if failure is None or failure.status is None
                      else failure.status, started)
        if failure is None:
            self.clock_skew_s = None
            self.network_down = False
        elif failure.reason.startswith("clock skew"):
            self._clock_skew(answer.date)
        return failure

    def _network_failure(self, exc: BaseException) -> str:
        """The reason naming host:port and the cause; the first failure after a success is
        logged, and the server is probed once for the PUSHER_SSL mistake (TLS spoken to a
        plain-HTTP port, or the reverse), which otherwise looks like a timeout or a reset."""
        host, port = self.client.host, int(self.client.port)
        reason = explain.network_error(exc, f"{host}:{port}")
        if not self.network_down:
            self.network_down = True
            log.warning("Pusher call failed%s: %s", self._where, reason)
            if explain.may_be_scheme_mismatch(exc):
                found = explain.probe(host, port, min(PROBE_TIMEOUT_S, self.client.timeout))
                hint = explain.tls_hint(self.client.ssl, found, f"{host}:{port}")
                if hint is not None:
                    log.error("%s", hint)
        return reason

    def _clock_skew(self, date: str | None) -> None:
        try:
            offset = parsedate_to_datetime(date).timestamp() - time.time() if date else math.nan
        except (TypeError, ValueError):
            offset = math.nan
        if self.clock_skew_s is None:
            log.error("clock skew%s: the server refused our timestamp as expired; its clock "
                      "is %+.0f s from this host's (Pusher allows 600 s): fix this host's clock "
                      "(NTP)", self._where, offset)
        self.clock_skew_s = offset

    @property
    def _where(self) -> str:
        return "" if self.app is None else f" (app {self.app})"

    def _observe(self, status: int | None, started: float) -> None:
        if self.on_call is not None:
            self.on_call(status, time.monotonic() - started)

    def close(self) -> None:
        self.client.http.close()

