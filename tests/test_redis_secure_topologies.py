"""TLS and passwords on the multi-host forms, against TLS-only servers started here.

1. `rediss+sentinel://` with ACL users: master, replica and three sentinels all TLS-only
   (replication and the sentinels' own links too); the master and the replica require a
   password and carry the README's ACL users; the sentinels require `sentinel_password`.
   The producer pushes as `relay-producer`, the worker delivers and `stats` reads as
   `relay-worker`, and neither password reaches a log line.
2. `rediss+cluster://`: three TLS-only masters (`tls-cluster yes`): the producer pushes, the
   worker delivers, `stats` reads.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import redis

from relay import producer
from relay.connect import redis_client
from tests.support import ROOT, wait_for
from tests.test_redis_acl import PRODUCER_PW, WORKER_PW, readme_rules
from tests.topology import SERVICE, Certs, ClusterSet, SentinelSet, make_certs, require

TOTAL = 20
ADMIN_PW = "adm1n-secret"  # the default user's, on the master and the replica
SENTINEL_PW = "s3ntinel-secret"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    require("openssl")
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_sentinels(certs: Certs) -> Iterator[SentinelSet]:
    require()
    deployment = SentinelSet(certs, password=ADMIN_PW, sentinel_password=SENTINEL_PW).start()
    yield deployment
    deployment.stop()


@pytest.fixture(scope="module")
def tls_cluster(certs: Certs) -> Iterator[ClusterSet]:
    require("redis-cli", version=(7, 0))  # --cluster-port
    nodes = ClusterSet(certs).start()
    yield nodes
    nodes.stop()


def _admin(url: str, queue: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"REDIS_URL": url, "RELAY_QUEUE": queue, "RELAY_METRICS_ADDR": "off",
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(ROOT / "worker.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def _delivered(pusher) -> set[int]:
    return {json.loads(e["data"])["n"] for e in pusher.events()}


def _sentinel_url(deployment: SentinelSet, certs: Certs, user: str, password: str) -> str:
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in deployment.sentinels)
    return (f"rediss+sentinel://{user}:{quote(password)}@{hosts}/{SERVICE}/0"
            f"?ssl_ca_certs={certs.ca}&sentinel_password={quote(SENTINEL_PW)}")


def test_tls_sentinel_with_acl_users(tls_sentinels, certs, pusher, start_worker, queue_name,
                                     monkeypatch) -> None:
    rules = readme_rules(queue_name)
    for server in (tls_sentinels.master, tls_sentinels.replica):  # ACLs are not replicated
        client = tls_sentinels.node(server)
        for name, args in rules.items():
            client.execute_command("ACL", "SETUSER", name, *args)
        client.close()
    monkeypatch.setenv("REDIS_URL", _sentinel_url(tls_sentinels, certs, "relay-producer",
                                                  PRODUCER_PW))
    p = producer.Producer(queue=queue_name)
    for i in range(TOTAL):
        p.notify("c", {"n": i})
    p.close()
    url = _sentinel_url(tls_sentinels, certs, "relay-worker", WORKER_PW)
    worker = start_worker(REDIS_URL=url)
    wait_for(lambda: _delivered(pusher) == set(range(TOTAL)), timeout=30,
             what="every notification delivered through TLS sentinels as the ACL user")
    stats = _admin(url, queue_name, "stats", "--json")
    assert stats.returncode == 0, stats.stdout + stats.stderr
    report = json.loads(stats.stdout)
    assert report["length"] == 0 and report["totals"]["delivered"] >= TOTAL, report
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    log = worker.log() + stats.stdout + stats.stderr
    for secret in (WORKER_PW, SENTINEL_PW, ADMIN_PW):
        assert secret not in log, log
    assert "unreachable" not in log and "Traceback" not in log, log


def test_a_wrong_sentinel_password_is_redis_away_without_the_password(
        tls_sentinels, certs, start_worker) -> None:
    url = _sentinel_url(tls_sentinels, certs, "relay-worker", WORKER_PW).replace(
        quote(SENTINEL_PW), "not-the-sentinel-pw")
    worker = start_worker(wait=False, REDIS_URL=url)
    wait_for(lambda: "Redis unreachable" in worker.log(), timeout=30, what="the outage line")
    assert worker.alive, worker.log()
    log = worker.log()
    assert "not-the-sentinel-pw" not in log and WORKER_PW not in log, log
    assert "sentinel_password=***" in log, log


def test_tls_cluster_end_to_end(tls_cluster, pusher, start_worker, queue_name,
                                monkeypatch) -> None:
    monkeypatch.setenv("REDIS_URL", tls_cluster.url)
    p = producer.Producer(queue=queue_name)
    for i in range(TOTAL):
        p.notify("c", {"n": i})
    p.close()
    worker = start_worker(REDIS_URL=tls_cluster.url)
    wait_for(lambda: _delivered(pusher) == set(range(TOTAL)), timeout=30,
             what="every notification delivered through the TLS cluster")
    stats = _admin(tls_cluster.url, queue_name, "stats", "--json")
    assert stats.returncode == 0, stats.stdout + stats.stderr
    report = json.loads(stats.stdout)
    assert report["length"] == 0 and report["totals"]["delivered"] >= TOTAL, report
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert "unreachable" not in worker.log() and "Traceback" not in worker.log(), worker.log()


def _connections_received(deployment: SentinelSet, n: int) -> int:
    client = deployment._sentinel(deployment.sentinels[n])
    try:
        return int(client.info("stats")["total_connections_received"])
    finally:
        client.close()


def test_one_refused_sentinel_is_asked_once_not_retried(tls_sentinels, certs) -> None:
    """redis-py retries a connection error 3 times with backoff by default (seconds per
    sentinel); the worker's own backoff is the only one. One master lookup with a wrong
    sentinel password: each sentinel sees one connection (and then our INFO's)."""
    url = _sentinel_url(tls_sentinels, certs, "relay-worker", WORKER_PW).replace(
        quote(SENTINEL_PW), "not-the-sentinel-pw")
    client = redis_client(url, 2)
    before = [_connections_received(tls_sentinels, n) for n in range(3)]
    with pytest.raises(redis.ConnectionError):
        client.ping()
    after = [_connections_received(tls_sentinels, n) for n in range(3)]
    assert [b - a for a, b in zip(before, after, strict=True)] == [2, 2, 2]
    client.close()
