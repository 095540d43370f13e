"""Delivery over HTTPS, the only way Pusher is reached in production: the CA bundle,
a refused certificate (nothing dead-lettered), keep-alive over TLS, and HTTPS_PROXY through
a CONNECT proxy; for both transports. The TLS front and the proxy are in tests/tls.py."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config import parse_pusher_url
from relay.delivery import Delivery, Kind
from relay.message import parse
from relay.pusher_server import LocalPusher
from tests.support import delivered, pending, push, wait_for, wait_settled
from tests.tls import HOST, Certs, ConnectProxy, TlsFront, make_certs

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                   "all_proxy", "NO_PROXY", "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


@pytest.fixture(params=["urllib3", "requests"])
def http_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy or CA setting from the machine running the tests leaks into these."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that did not sign the server's certificate."""
    return make_certs(tmp_path_factory.mktemp("other"), label="someone else").ca


@pytest.fixture
def front(certs: Certs, pusher: LocalPusher) -> Iterator[TlsFront]:
    with TlsFront(certs, pusher.port) as tls:
        yield tls  # type: ignore[misc]


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    with ConnectProxy() as p:
        yield p  # type: ignore[misc]


def https_url(pusher: LocalPusher, front: TlsFront) -> str:
    return f"https://{pusher.key}:{pusher.secret}@{HOST}:{front.port}/apps/{pusher.app_id}"


def delivery(pusher: LocalPusher, front: TlsFront, http_client: str,
             pool_size: int = 4) -> Delivery:
    return Delivery(parse_pusher_url(https_url(pusher, front), 5.0), pool_size=pool_size,
                    http_client=http_client)


def note(n: int, channels: tuple[str, ...] = ("c",)):  # type: ignore[no-untyped-def]
    if len(channels) == 1:
        return parse(json.dumps({"channel": channels[0], "n": n}).encode(), "hit")
    return parse(json.dumps({"relay": 1, "channels": list(channels), "event": "e",
                             "data": {"n": n}}).encode(), "hit")


# -- in process: the transports themselves ------------------------------------------------


def test_delivers_over_https_with_the_ca_bundle(clean_env, certs, front, pusher, http_client):
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(certs.ca))
    d = delivery(pusher, front, http_client)
    try:
        assert d.send([note(0)]) == [None]
        assert d.send([note(1), note(2)]) == [None, None]  # a batch too
    finally:
        d.close()
    assert sorted(delivered(pusher)) == [0, 1, 2]
    assert front.connections >= 1 and front.failed_handshakes == 0


def test_curl_ca_bundle_is_read_too(clean_env, certs, front, pusher, http_client):
    clean_env.setenv("CURL_CA_BUNDLE", str(certs.ca))
    d = delivery(pusher, front, http_client)
    try:
        assert d.send([note(0)]) == [None]
    finally:
        d.close()


@pytest.mark.parametrize("bundle", ["default", "other CA"])
def test_an_untrusted_certificate_is_refused_as_transient(clean_env, other_ca, front, pusher,
                                                          http_client, bundle):
    # By default (certifi) the test CA is unknown; a bundle of another CA does not know it
    # either. Either way the call fails as a network error: transient, never permanent,
    # so the worker retries it instead of dead-lettering it.
    if bundle == "other CA":
        clean_env.setenv("REQUESTS_CA_BUNDLE", str(other_ca))
    d = delivery(pusher, front, http_client)
    try:
        (failure,) = d.send([note(0)])
    finally:
        d.close()
    assert failure is not None and failure.kind is Kind.TRANSIENT, failure
    assert failure.reason.startswith(f"calling 127.0.0.1:{front.port}: TLS certificate not "
                                     "trusted ("), failure.reason
    assert pusher.events() == [] and pusher.stats()["requests_total"] == 0
    wait_for(lambda: front.failed_handshakes >= 1, what="the refused handshake")
    assert front.connections == 0


def test_keep_alive_over_tls(clean_env, certs, front, pusher, http_client):
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(certs.ca))
    d = delivery(pusher, front, http_client)
    try:
        for n in range(50):
            assert d.send([note(n)]) == [None]
    finally:
        d.close()
    assert len(delivered(pusher)) == 50
    # 50 calls, one after another: one TLS connection reused (a second is allowed should
    # the server close an idle one), not a handshake per call.
    assert 1 <= front.connections <= 2, front.connections


def test_https_proxy_tunnels_through_connect(clean_env, certs, front, proxy, pusher,
                                            http_client):
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(certs.ca))
    clean_env.setenv("HTTPS_PROXY", proxy.url)
    d = delivery(pusher, front, http_client)
    try:
        for n in range(10):
            assert d.send([note(n)]) == [None]
    finally:
        d.close()
    assert sorted(delivered(pusher)) == list(range(10))
    # Every call went through the tunnel to the TLS front (none direct), kept alive.
    assert proxy.connects and set(proxy.connects) == {f"{HOST}:{front.port}"}
    assert len(proxy.connects) <= 2 and front.connections == len(proxy.connects)
    assert proxy.refused == []


def test_no_proxy_bypasses_the_proxy(clean_env, certs, front, proxy, pusher, http_client):
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(certs.ca))
    clean_env.setenv("HTTPS_PROXY", proxy.url)
    clean_env.setenv("NO_PROXY", HOST)
    d = delivery(pusher, front, http_client)
    try:
        assert d.send([note(0)]) == [None]
    finally:
        d.close()
    assert proxy.connects == [] and front.connections == 1


# -- the worker as a subprocess -----------------------------------------------------------


def worker_settings(pusher: LocalPusher, front: TlsFront, http_client: str, ca: Path,
                    proxy: str = "", **more: str) -> dict[str, str]:
    # Both spellings: an empty lowercase one would cancel the other (urllib's rule).
    return {"PUSHER_URL": https_url(pusher, front), "PUSHER_HTTP_CLIENT": http_client,
            "REQUESTS_CA_BUNDLE": str(ca), "CURL_CA_BUNDLE": "", "HTTPS_PROXY": proxy,
            "https_proxy": proxy, "NO_PROXY": "", "no_proxy": "", **more}


def test_worker_refused_certificate_dead_letters_nothing_then_delivers(
        r, pusher, front, certs, other_ca, start_worker, queue_name, http_client):
    total = 40
    push(r, queue_name, total)
    w = start_worker(**worker_settings(pusher, front, http_client, other_ca))
    wait_for(lambda: front.failed_handshakes >= 3, 30, "refused handshakes")
    wait_for(lambda: "circuit open" in w.log(), 30, "the circuit to open on the refusals")
    w.signal(signal.SIGTERM)
    assert w.wait(timeout=30) == 0
    left = pending(r, queue_name)
    # Nothing delivered, nothing dead-lettered, nothing lost: all waiting for a retry.
    assert pusher.stats()["requests_total"] == 0
    assert r.llen(f"{queue_name}:dead") == 0
    assert left["inflight"] == 0 and left["queue"] + left["retry"] == total, left
    # The operator fixes the CA bundle: everything goes, still nothing dead.
    start_worker(**worker_settings(pusher, front, http_client, certs.ca,
                                   RELAY_HEARTBEAT_TTL="2"))
    wait_for(lambda: set(delivered(pusher)) == set(range(total)), 90, "all delivered",
             interval=0.1)
    wait_settled(r, queue_name)
    assert r.llen(f"{queue_name}:dead") == 0


def test_worker_keeps_tls_connections_alive_through_the_proxy(
        r, pusher, front, certs, proxy, start_worker, queue_name, http_client):
    # Two-channel envelopes go one call each: 100 calls from two greenlets, side by side (each
    # envelope on channels of its own: one channel's calls would go one at a time).
    r.rpush(queue_name, *[json.dumps({"relay": 1, "channels": [f"a{n}", f"b{n}"], "event": "e",
                                      "data": {"n": n}}) for n in range(100)])
    start_worker(**worker_settings(pusher, front, http_client, certs.ca, proxy.url,
                                   RELAY_POOL_SIZE="2"))
    wait_for(lambda: len(pusher.events()) >= 200, 60, "200 events", interval=0.1)
    assert pusher.stats()["requests_total"] >= 100
    assert set(proxy.connects) == {f"{HOST}:{front.port}"}
    # At most one connection per greenlet (a spare for a closed idle one), not one per call.
    assert 1 <= front.connections <= 4, front.connections
    assert front.connections == len(proxy.connects)
    wait_settled(r, queue_name)
