"""relay.explain: real failed calls (refused, TLS mismatches, untrusted certificate, silent
server, Redis away) reduced to one line naming where and why, with secrets masked."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
import redis
import requests
import urllib3
from gevent.server import StreamServer

from relay import explain

SECRET = "s3cr3t-value"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    crt, key = where / "server.crt", where / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def _serve(handle: object, **tls: str) -> Iterator[int]:
    server = StreamServer(("127.0.0.1", 0), handle, **tls)
    server.start()
    try:
        yield server.server_port
    finally:
        server.stop(timeout=1)


def _http_200(sock: socket.socket, _addr: object) -> None:
    sock.recv(65536)
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")


def _silent(sock: socket.socket, _addr: object) -> None:
    gevent.sleep(5)


@pytest.fixture
def plain_http() -> Iterator[int]:
    yield from _serve(_http_200)


@pytest.fixture
def tls_http(cert: tuple[Path, Path]) -> Iterator[int]:
    yield from _serve(_http_200, certfile=str(cert[0]), keyfile=str(cert[1]))


@pytest.fixture
def silent() -> Iterator[int]:
    yield from _serve(_silent)


def _urllib3_error(url: str, **pool: object) -> BaseException:
    http = urllib3.PoolManager(**pool)
    with pytest.raises(Exception) as caught:
        http.request("POST", url, body=b"{}", retries=False,
                     timeout=urllib3.Timeout(connect=1, read=0.5))
    return caught.value


def _requests_error(url: str, **kwargs: object) -> BaseException:
    with pytest.raises(requests.RequestException) as caught:
        requests.post(url, data=b"{}", timeout=(1, 0.5), **kwargs)
    return caught.value


@pytest.mark.parametrize("call", [_urllib3_error, _requests_error])
def test_refused_names_the_address_and_says_refused(call: object) -> None:
    port = _free_port()
    exc = call(f"http://127.0.0.1:{port}/apps/1/events")  # type: ignore[operator]
    line = explain.network_error(exc, f"127.0.0.1:{port}")
    assert line == f"calling 127.0.0.1:{port}: connection refused (nothing listening there?)"
    assert not explain.may_be_scheme_mismatch(exc)  # nothing listens: no probe


@pytest.mark.parametrize("call", [_urllib3_error, _requests_error])
def test_tls_client_against_plain_http_fails_the_handshake(call: object, plain_http: int
                                                          ) -> None:
    exc = call(f"https://127.0.0.1:{plain_http}/apps/1/events")  # type: ignore[operator]
    assert "TLS handshake failed" in explain.network_error(exc, "x")
    assert explain.may_be_scheme_mismatch(exc)


def test_probe_tells_plain_http_from_tls_from_nothing(plain_http: int, tls_http: int,
                                                      silent: int) -> None:
    assert explain.probe("127.0.0.1", plain_http) == "plain-http"
    assert explain.probe("127.0.0.1", tls_http) == "tls"
    assert explain.probe("127.0.0.1", silent, timeout_s=0.2) is None
    assert explain.probe("127.0.0.1", _free_port()) is None


def test_tls_hint_names_pusher_ssl_only_on_a_mismatch() -> None:
    hint = explain.tls_hint(True, "plain-http", "127.0.0.1:6001")
    assert hint is not None and "PUSHER_SSL=false" in hint and "127.0.0.1:6001" in hint
    hint = explain.tls_hint(False, "tls", "h:443")
    assert hint is not None and "PUSHER_SSL=true" in hint
    assert explain.tls_hint(True, "tls", "h:443") is None
    assert explain.tls_hint(False, "plain-http", "h:80") is None
    assert explain.tls_hint(True, None, "h:80") is None


def test_untrusted_certificate_says_so(tls_http: int) -> None:
    exc = _urllib3_error(f"https://127.0.0.1:{tls_http}/", cert_reqs="CERT_REQUIRED",
                         ca_certs=ssl.get_default_verify_paths().cafile)
    assert "TLS certificate not trusted" in explain.network_error(exc, "x")
    assert not explain.may_be_scheme_mismatch(exc)  # the server did speak TLS


@pytest.mark.parametrize("call", [_urllib3_error, _requests_error])
def test_silent_server_is_a_read_timeout(call: object, silent: int) -> None:
    exc = call(f"http://127.0.0.1:{silent}/")  # type: ignore[operator]
    assert explain.network_error(exc, "h:1") == "calling h:1: timed out waiting for the answer"
    assert explain.may_be_scheme_mismatch(exc)  # how soketi meets a TLS client


def test_dns_failure_is_named() -> None:
    exc = urllib3.exceptions.NameResolutionError("nohost.invalid", None,  # type: ignore[arg-type]
                                                 socket.gaierror(-2, "Name or service not known"))
    assert "DNS lookup failed" in explain.network_error(exc, "nohost.invalid:443")
    assert not explain.may_be_scheme_mismatch(exc)


def test_redis_error_names_address_and_reason_without_secret() -> None:
    port = _free_port()
    url = f"redis://user:{SECRET}@127.0.0.1:{port}/0"
    with pytest.raises(redis.ConnectionError) as caught:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    line = explain.redis_error(caught.value, f"redis://***@127.0.0.1:{port}/0")
    assert f"127.0.0.1:{port}" in line and "refused" in line.lower(), line
    assert SECRET not in line


def test_secrets_inside_exception_text_are_masked() -> None:
    exc = RuntimeError(f"could not reach https://key:{SECRET}@h.example/apps/1")
    assert SECRET not in explain.network_error(exc, "h.example:443")
    assert SECRET not in explain.redis_error(exc, "somewhere")
