"""TLS: TLS-only redis-servers with a CA and certificates made here by openssl. Delivery end
to end with a CA file, with a client certificate, and with ssl_cert_reqs=none; a wrong CA is
one clear outage line (REDIS_URL named, password hidden), retried, never a crash."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from relay import producer
from relay.redis_server import RedisServer
from tests.support import wait_for
from tests.topology import Certs, make_certs, require, tls_server

TOTAL = 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    require("openssl")
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls(certs: Certs) -> Iterator[RedisServer]:
    """Clients need not show a certificate."""
    server = tls_server(certs, auth_clients=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls(certs: Certs) -> Iterator[RedisServer]:
    """Clients must show a certificate signed by the CA."""
    server = tls_server(certs, auth_clients=True)
    yield server
    server.stop()


def _deliver_through(url: str, pusher, start_worker, queue_name: str, monkeypatch) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    p = producer.Producer(queue=queue_name)
    for i in range(TOTAL):
        p.notify("c", {"n": i})
    p.close()
    worker = start_worker(REDIS_URL=url)
    wait_for(lambda: {json.loads(e["data"])["n"] for e in pusher.events()} == set(range(TOTAL)),
             timeout=30, what="every notification delivered over TLS")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert "unreachable" not in worker.log(), worker.log()


def test_tls_with_a_ca_file(tls, certs, pusher, start_worker, queue_name, monkeypatch):
    url = f"rediss://127.0.0.1:{tls.port}/0?ssl_ca_certs={certs.ca}"
    _deliver_through(url, pusher, start_worker, queue_name, monkeypatch)


def test_tls_with_a_client_certificate(mtls, certs, pusher, start_worker, queue_name,
                                       monkeypatch):
    without = f"rediss://127.0.0.1:{mtls.port}/0?ssl_ca_certs={certs.ca}"
    with pytest.raises(redis.ConnectionError):  # the server insists on a certificate
        redis.Redis.from_url(without, socket_timeout=5).ping()
    url = f"{without}&ssl_certfile={certs.client_cert}&ssl_keyfile={certs.client_key}"
    _deliver_through(url, pusher, start_worker, queue_name, monkeypatch)


def test_tls_without_verification(tls, pusher, start_worker, queue_name, monkeypatch):
    url = f"rediss://127.0.0.1:{tls.port}/0?ssl_cert_reqs=none"
    _deliver_through(url, pusher, start_worker, queue_name, monkeypatch)


def test_wrong_ca_is_one_clear_line_and_retried(tls, certs, start_worker):
    secret = "pa55-not-for-logs"
    url = f"rediss://:{secret}@127.0.0.1:{tls.port}/0?ssl_ca_certs={certs.wrong_ca}"
    worker = start_worker(wait=False, REDIS_URL=url)
    wait_for(lambda: "Redis unreachable" in worker.log(), timeout=30,
             what="the outage line")
    server_log = Path(tls.dir, "redis.log")
    refused = lambda: server_log.read_text(errors="replace").count("unknown ca")  # noqa: E731
    seen = refused()
    wait_for(lambda: refused() >= seen + 3, timeout=30, what="the worker to retry")
    assert worker.alive, worker.log()
    log = worker.log()
    assert secret not in log
    lines = [line for line in log.splitlines() if "Redis unreachable" in line]
    assert len(lines) == 1, log
    assert f"REDIS_URL=rediss://***@127.0.0.1:{tls.port}/0" in lines[0]
    assert "certificate verify failed" in lines[0], lines[0]
    assert "Traceback" not in log
