"""relay.delivery: the answer table, and real calls to the local Pusher-compatible server."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import certifi
import pytest
from gevent.server import StreamServer

from relay.config import PusherTarget, parse_pusher_url
from relay.delivery import (
    BACKENDS,
    DEFAULT_RETRY_AFTER_S,
    MAX_BATCH,
    Answer,
    Delivery,
    GeventHttpBackend,
    Kind,
    Urllib3Backend,
    classify,
)
from relay.message import Notification, parse
from relay.pusher_server import LocalPusher

# -- classify ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status,body", [
    (200, "{}"),
    (200, ""),
    (202, "{}"),
    (200, '{"ok":true}'),
    (200, '{"channels":{"a":{}}}'),
    (200, '"error" in some text that is not JSON'),
    (200, '["error"]'),
])
def test_success(status: int, body: str) -> None:
    assert classify(Answer(status, body)) is None


@pytest.mark.parametrize("answer,kind,status", [
    (Answer(400, "Invalid channel name"), Kind.PERMANENT, 400),
    (Answer(413, "Event data too large"), Kind.PERMANENT, 413),
    (Answer(401, "Invalid signature"), Kind.SYSTEMIC, 401),
    (Answer(403, "App disabled"), Kind.SYSTEMIC, 403),
    (Answer(404, "Not found"), Kind.SYSTEMIC, 404),
    (Answer(500, "oops"), Kind.TRANSIENT, 500),
    (Answer(502, "Bad Gateway"), Kind.TRANSIENT, 502),
    (Answer(503, "Service Unavailable"), Kind.TRANSIENT, 503),
    (Answer(504, ""), Kind.TRANSIENT, 504),
    # soketi puts its errors in a 200 (see relay.pusher_server's docstring)
    (Answer(200, '{"error":"Invalid signature","code":401}'), Kind.SYSTEMIC, 401),
    (Answer(200, '{"error":"The data content is too large","code":413}'), Kind.PERMANENT, 413),
    (Answer(200, '{"error":"Bad channel","code":400}'), Kind.PERMANENT, 400),
    (Answer(200, '{"error":"Too many requests","code":429}'), Kind.RATE_LIMITED, 429),
    (Answer(200, '{"error":"something"}'), Kind.TRANSIENT, 500),
    (Answer(200, '{"error":"something","code":"401"}'), Kind.TRANSIENT, 500),
])
def test_failure_kinds(answer: Answer, kind: Kind, status: int) -> None:
    failure = classify(answer)
    assert failure is not None
    assert (failure.kind, failure.status) == (kind, status)
    assert f"HTTP {status}" in failure.reason


def test_reason_is_short() -> None:
    failure = classify(Answer(500, "x" * 5000))
    assert failure is not None and len(failure.reason) < 300


@pytest.mark.parametrize("header,expected", [
    ("2", 2.0),
    ("0.5", 0.5),
    ("0", 0.0),
    ("-5", 0.0),
    (None, DEFAULT_RETRY_AFTER_S),
    ("", DEFAULT_RETRY_AFTER_S),
    ("soon", DEFAULT_RETRY_AFTER_S),
    ("Wed, 21 Oct 2015 07:28:00 GMT", DEFAULT_RETRY_AFTER_S),
])
def test_rate_limited_retry_after(header: str | None, expected: float) -> None:
    failure = classify(Answer(429, "Too Many Requests", header))
    assert failure is not None
    assert failure.kind is Kind.RATE_LIMITED
    assert failure.retry_after_s == expected


# -- against the local Pusher-compatible server ------------------------------------------------


def note(text: str) -> Notification:
    return parse(text.encode(), "hit")


@pytest.fixture(params=sorted(BACKENDS))
def http_client(request: pytest.FixtureRequest) -> str:
    """Every delivery test runs over every transport."""
    return request.param


@pytest.fixture
def target(pusher: LocalPusher) -> PusherTarget:
    return parse_pusher_url(pusher.url, 2.0)


@pytest.fixture
def calls() -> list[int | None]:
    return []


@pytest.fixture
def delivery(target: PusherTarget, calls: list[int | None],
             http_client: str) -> Iterator[Delivery]:
    d = Delivery(target, pool_size=4, on_call=lambda status, _s: calls.append(status),
                 http_client=http_client)
    yield d
    d.close()


def paths(pusher: LocalPusher) -> list[str]:
    return [r["path"].rsplit("/", 1)[1] for r in pusher.stats()["requests"]]


def test_single_classic_arrives_signed(pusher: LocalPusher, delivery: Delivery,
                                       calls: list[int | None]) -> None:
    assert delivery.send([note('{"channel":"site-42","title":"T\u00e9"}')]) == [None]
    (event,) = pusher.wait_for_events(1)
    assert (event["channel"], event["name"]) == ("site-42", "hit")
    assert json.loads(event["data"]) == {"title": "T\u00e9"}
    assert event["socket_id"] is None
    assert paths(pusher) == ["events"]
    assert calls == [200]  # the server checked the signature and accepted it


def test_batch_of_single_channel_notes_is_one_request(pusher: LocalPusher, delivery: Delivery,
                                                      calls: list[int | None]) -> None:
    notes = [note(f'{{"channel":"c-{i}","n":{i}}}') for i in range(3)]
    assert delivery.send(notes) == [None, None, None]
    events = pusher.wait_for_events(3)
    assert [(e["channel"], json.loads(e["data"])["n"]) for e in events] == [
        ("c-0", 0), ("c-1", 1), ("c-2", 2)]
    assert {e["path"] for e in events} == {"/apps/1/batch_events"}
    assert pusher.stats()["requests_total"] == 1
    assert calls == [200]


def test_more_than_a_batch_is_split_in_chunks(pusher: LocalPusher, delivery: Delivery) -> None:
    notes = [note(f'{{"channel":"c-{i}"}}') for i in range(MAX_BATCH + 3)]
    assert delivery.send(notes) == [None] * len(notes)
    assert [e["channel"] for e in pusher.wait_for_events(len(notes))] == [
        f"c-{i}" for i in range(len(notes))]
    assert paths(pusher) == ["batch_events", "batch_events"]


def test_multi_channel_note_uses_events_with_all_channels(pusher: LocalPusher,
                                                          delivery: Delivery) -> None:
    multi = note('{"relay":1,"channels":["a","b","c"],"event":"ev","data":"d"}')
    single = note('{"channel":"solo"}')
    assert delivery.send([multi, single]) == [None, None]
    events = pusher.wait_for_events(4)
    assert sorted(e["channel"] for e in events) == ["a", "b", "c", "solo"]
    assert {e["path"] for e in events if e["channel"] != "solo"} == {"/apps/1/events"}
    assert {e["name"] for e in events if e["channel"] != "solo"} == {"ev"}
    assert sorted(paths(pusher)) == ["events", "events"]  # the lone single one: no batch


def test_socket_id_is_passed(pusher: LocalPusher, delivery: Delivery) -> None:
    one = note('{"relay":1,"channels":["a"],"event":"ev","data":"1","socket_id":"123.456"}')
    two = note('{"relay":1,"channels":["b"],"event":"ev","data":"2","socket_id":"7.8"}')
    multi = note('{"relay":1,"channels":["c","d"],"event":"ev","data":"3","socket_id":"9.1"}')
    assert delivery.send([one, two, multi]) == [None, None, None]
    events = pusher.wait_for_events(4)
    assert {e["channel"]: e["socket_id"] for e in events} == {
        "a": "123.456", "b": "7.8", "c": "9.1", "d": "9.1"}


@pytest.mark.parametrize("status,kind", [
    (503, Kind.TRANSIENT), (500, Kind.TRANSIENT), (502, Kind.TRANSIENT),
    (401, Kind.SYSTEMIC), (403, Kind.SYSTEMIC), (404, Kind.SYSTEMIC),
])
def test_error_status_applies_to_every_note(pusher: LocalPusher, delivery: Delivery,
                                            calls: list[int | None], status: int,
                                            kind: Kind) -> None:
    pusher.set_mode(status=status)
    notes = [note('{"channel":"a"}'), note('{"channel":"b"}'),
             note('{"relay":1,"channels":["c","d"],"event":"e","data":"x"}')]
    results = delivery.send(notes)
    assert [(r.kind, r.status) for r in results if r is not None] == [(kind, status)] * 3
    assert calls == [status, status]  # one batch call, one multi-channel call
    assert pusher.events() == []


def test_429_pauses_with_retry_after(pusher: LocalPusher, delivery: Delivery) -> None:
    pusher.set_mode(status=429, retry_after="2")
    (failure,) = delivery.send([note('{"channel":"a"}')])
    assert failure is not None
    assert (failure.kind, failure.retry_after_s) == (Kind.RATE_LIMITED, 2.0)


def test_429_without_retry_after_uses_the_default(pusher: LocalPusher,
                                                  delivery: Delivery) -> None:
    pusher.set_mode(status=429)
    (failure,) = delivery.send([note('{"channel":"a"}')])
    assert failure is not None
    assert (failure.kind, failure.retry_after_s) == (Kind.RATE_LIMITED, DEFAULT_RETRY_AFTER_S)


def test_connection_reset_is_transient(pusher: LocalPusher, delivery: Delivery,
                                       calls: list[int | None]) -> None:
    pusher.set_mode(reset=True)
    results = delivery.send([note('{"channel":"a"}'), note('{"channel":"b"}')])
    assert [r.kind if r else None for r in results] == [Kind.TRANSIENT, Kind.TRANSIENT]
    assert results[0] is not None
    assert results[0].reason == (f"calling {pusher.host}:{pusher.port}: connection reset or "
                                 "closed by the server")
    assert results[0].status is None
    assert calls == [None]
    pusher.clear_mode()
    assert delivery.send([note('{"channel":"a"}')]) == [None]  # the session recovers


def test_hang_times_out_as_transient(pusher: LocalPusher, calls: list[int | None],
                                     http_client: str) -> None:
    target = parse_pusher_url(pusher.url, 0.5)
    d = Delivery(target, pool_size=4, on_call=lambda status, _s: calls.append(status),
                 http_client=http_client)
    pusher.set_mode(hang=True)
    started = time.monotonic()
    try:
        (failure,) = d.send([note('{"channel":"a"}')])
    finally:
        d.close()
        pusher.clear_mode()  # releases the hung request on the server
    elapsed = time.monotonic() - started
    assert failure is not None
    assert failure.kind is Kind.TRANSIENT
    where = f"{pusher.host}:{pusher.port}"
    assert failure.reason == f"calling {where}: timed out waiting for the answer"
    # At least the timeout; the server would hang forever, so returning at all is the timeout
    # working (no upper bound: a loaded machine stretches it).
    assert elapsed >= 0.4
    assert calls == [None]


def test_unreachable_server_is_transient(calls: list[int | None], http_client: str) -> None:
    # Port 9 (discard) on loopback: nothing listens there, so the connect is refused at once.
    d = Delivery(parse_pusher_url("http://k:s@127.0.0.1:9/apps/1", 1.0), pool_size=2,
                 http_client=http_client,
                 on_call=lambda status, _s: calls.append(status))
    try:
        (failure,) = d.send([note('{"channel":"a"}')])
    finally:
        d.close()
    assert failure is not None and failure.kind is Kind.TRANSIENT
    assert calls == [None]


def test_a_failed_call_names_its_app_when_several_are_configured(
        caplog: pytest.LogCaptureFixture) -> None:
    d = Delivery(parse_pusher_url("http://k:s@127.0.0.1:9/apps/1", 1.0), pool_size=2,
                 http_client="urllib3")
    d.app = "tenant-b"  # relay.routes sets it when several apps are configured
    try:
        d.send([note('{"channel":"a"}')])
    finally:
        d.close()
    [line] = [r.getMessage() for r in caplog.records if "Pusher call failed" in r.getMessage()]
    assert line.startswith("Pusher call failed (app tenant-b): calling 127.0.0.1:9: "), line


def test_bad_secret_with_soketi_errors_is_systemic(pusher: LocalPusher,
                                                   target: PusherTarget,
                                                   http_client: str) -> None:
    pusher.set_mode(soketi_errors=True)
    bad = PusherTarget(app_id=target.app_id, key=target.key, secret="wrong-secret",
                       host=target.host, port=target.port, ssl=False, timeout=2.0)
    d = Delivery(bad, pool_size=2, http_client=http_client)
    try:
        results = d.send([note('{"channel":"a"}'), note('{"channel":"b"}')])
    finally:
        d.close()
    assert [(r.kind, r.status) for r in results if r] == [(Kind.SYSTEMIC, 401)] * 2
    assert pusher.stats()["by_status"] == {"200": 1}  # the 401 really came as a 200
    assert pusher.events() == []


def test_bad_secret_is_systemic(pusher: LocalPusher, target: PusherTarget,
                                http_client: str) -> None:
    bad = PusherTarget(app_id=target.app_id, key=target.key, secret="wrong-secret",
                       host=target.host, port=target.port, ssl=False, timeout=2.0)
    d = Delivery(bad, pool_size=2, http_client=http_client)
    try:
        (failure,) = d.send([note('{"channel":"a"}')])
    finally:
        d.close()
    assert failure is not None and (failure.kind, failure.status) == (Kind.SYSTEMIC, 401)


def oversized(channel: str) -> Notification:
    # parse() would refuse it: build one the server refuses, to exercise the split.
    return Notification(raw=b"big", payload="big", channels=(channel,), event="hit",
                        data="x" * 10_241)


@pytest.mark.parametrize("soketi", [False, True])
def test_one_refused_event_in_a_batch_is_the_only_permanent_one(
        pusher: LocalPusher, delivery: Delivery, calls: list[int | None], soketi: bool) -> None:
    if soketi:
        pusher.set_mode(soketi_errors=True)
    notes = [note('{"channel":"a"}'), oversized("b"), note('{"channel":"c"}'),
             note('{"channel":"d"}')]
    results = delivery.send(notes)
    assert results[0] is None and results[2] is None and results[3] is None
    failure = results[1]
    assert failure is not None
    assert (failure.kind, failure.status) == (Kind.PERMANENT, 413)
    events = pusher.wait_for_events(3)
    assert sorted(e["channel"] for e in events) == ["a", "c", "d"]
    # one refused batch, then each alone to find the culprit
    assert paths(pusher) == ["batch_events"] + ["events"] * 4
    assert len(calls) == 5


def test_split_is_per_chunk(pusher: LocalPusher, delivery: Delivery) -> None:
    notes = [note(f'{{"channel":"c-{i}"}}') for i in range(MAX_BATCH)]
    notes.append(oversized("big"))
    notes.append(note('{"channel":"last"}'))
    results = delivery.send(notes)
    assert [i for i, r in enumerate(results) if r is not None] == [MAX_BATCH]
    assert len(pusher.wait_for_events(MAX_BATCH + 1)) == MAX_BATCH + 1
    # the first chunk went as one batch; only the second was split
    assert paths(pusher) == ["batch_events", "batch_events", "events", "events"]


def test_library_refusal_is_permanent_and_makes_no_call(pusher: LocalPusher,
                                                        delivery: Delivery,
                                                        calls: list[int | None]) -> None:
    bad = Notification(raw=b"x", payload="x", channels=("bad channel",), event="hit", data="{}")
    (failure,) = delivery.send([bad])
    assert failure is not None and failure.kind is Kind.PERMANENT
    assert calls == []
    assert pusher.stats()["requests_total"] == 0


def test_results_keep_the_order_of_the_input(pusher: LocalPusher, delivery: Delivery,
                                             calls: list[int | None]) -> None:
    multi = note('{"relay":1,"channels":["m1","m2"],"event":"e","data":"x"}')
    notes = [note('{"channel":"a"}'), multi, oversized("big"), note('{"channel":"b"}')]
    results = delivery.send(notes)
    assert [r.kind if r else None for r in results] == [None, None, Kind.PERMANENT, None]
    assert len(calls) == len(pusher.stats()["requests"])


def test_calls_follow_the_order_of_the_notes(pusher: LocalPusher, delivery: Delivery) -> None:
    """An envelope between one-channel notes is not overtaken by a batch taken after it."""
    notes = [note('{"channel":"a","n":0}'),
             note('{"relay":1,"channels":["a","b"],"event":"hit","data":{"n":1}}'),
             note('{"channel":"a","n":2}'), note('{"channel":"b","n":3}')]
    assert delivery.send(notes) == [None] * 4
    events = pusher.wait_for_events(5)
    assert [(e["channel"], json.loads(e["data"])["n"]) for e in events] == [
        ("a", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 3)]
    assert paths(pusher) == ["events", "events", "batch_events"]


# -- geventhttpclient: settings read once, like the other transports ---------------------------


def https_target() -> PusherTarget:
    return parse_pusher_url("https://k:s@api-eu.pusher.com/apps/1", 5.0)


def test_geventhttpclient_reads_proxy_and_ca_bundle_and_verifies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://user:p%40ss@127.0.0.1:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    d = Delivery(https_target(), pool_size=7, http_client="geventhttpclient")
    try:
        backend = d.client.http
        assert isinstance(backend, GeventHttpBackend)
        pool = backend.http._connection_pool
        assert (pool._connection_host, pool._connection_port) == ("127.0.0.1", 3128)
        assert (pool._request_host, pool._request_port) == ("api-eu.pusher.com", 443)
        assert pool.size == 7  # one keep-alive connection per greenlet
        assert pool.ssl_options["ca_certs"] == certifi.where()
        assert pool.ssl_context.verify_mode == ssl.CERT_REQUIRED
        assert pool.ssl_context.check_hostname
    finally:
        d.close()


def test_geventhttpclient_ignores_the_proxy_for_no_proxy_hosts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", "pusher.com")
    d = Delivery(https_target(), pool_size=2, http_client="geventhttpclient")
    try:
        assert d.client.http.http._connection_pool._connection_host == "api-eu.pusher.com"
    finally:
        d.close()


def test_geventhttpclient_falls_back_to_urllib3_for_an_https_proxy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "https://proxy.example:3128")
    d = Delivery(https_target(), pool_size=2, http_client="geventhttpclient")
    try:
        assert isinstance(d.client.http, Urllib3Backend)
    finally:
        d.close()


class ForwardProxy:
    """A minimal HTTP forward proxy: takes absolute-URI requests (what clients send to a
    proxy for an http:// target), forwards them in origin form, and counts them."""

    def __init__(self) -> None:
        self.forwarded: list[str] = []
        self.server = StreamServer(("127.0.0.1", 0), self.handle)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def handle(self, client: socket.socket, _address: object) -> None:
        upstream: socket.socket | None = None
        with client, client.makefile("rb") as reader:
            while True:
                line = reader.readline()
                if not line:
                    break
                method, target, version = line.decode("latin-1").split()
                head, length = [], 0
                while (header := reader.readline()) not in (b"\r\n", b""):
                    head.append(header)
                    name, _, value = header.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = reader.read(length)
                url = urlsplit(target)
                self.forwarded.append(f"{method} {url.scheme}://{url.netloc}")
                if upstream is None:
                    upstream = socket.create_connection((url.hostname, url.port))
                path = url.path + (f"?{url.query}" if url.query else "")
                upstream.sendall(f"{method} {path} {version}\r\n".encode("latin-1")
                                 + b"".join(head) + b"\r\n" + body)
                client.sendall(read_answer(upstream))
        if upstream is not None:
            upstream.close()

    def stop(self) -> None:
        self.server.stop()


def read_answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer with a Content-Length (what the local server sends)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


def test_delivery_goes_through_an_http_proxy(pusher: LocalPusher, target: PusherTarget,
                                             http_client: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = ForwardProxy()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "")
    d = Delivery(target, pool_size=2, http_client=http_client)
    try:
        assert d.send([note('{"channel":"a"}'), note('{"channel":"b"}')]) == [None, None]
        assert d.send([note('{"channel":"c"}')]) == [None]
    finally:
        d.close()
        proxy.stop()
    assert [e["channel"] for e in pusher.wait_for_events(3)] == ["a", "b", "c"]
    assert proxy.forwarded == [f"POST http://{target.host}:{target.port}"] * 2
