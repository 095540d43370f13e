"""Redis Cluster: three masters joined by redis-cli; two workers, one SIGKILLed mid-drain;
the producer helper, `stats`, `enqueue` and `check` against the cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import gevent
import pytest
import redis
from redis.cluster import RedisCluster

from relay import producer
from relay.connect import redis_client
from relay.queue import Keys, RedisQueue
from tests.support import ROOT, all_delivered, events_total, wait_for
from tests.test_redis_acl import PRODUCER_PW, WORKER_PW, readme_rules
from tests.topology import ClusterSet, require

# A channel has one call in flight at a time: a hundred keep a worker's ten greenlets busy,
# and the local server's delay makes the drain last long enough to break something in it.
CHANNELS = 100


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSet]:
    require("redis-cli", version=(7, 0))  # --cluster-port
    nodes = ClusterSet().start()
    yield nodes
    nodes.stop()


@pytest.fixture
def rc(cluster: ClusterSet) -> Iterator[RedisCluster]:
    client = redis_client(cluster.url, 8)
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    client.close()


def _keys(rc: RedisCluster, pattern: str) -> list[bytes]:
    return list(rc.keys(pattern, target_nodes=RedisCluster.PRIMARIES))


def _inflight(rc: RedisCluster, queue: str) -> int:
    return sum(rc.llen(k) for k in _keys(rc, "{" + queue + "}:inflight:*"))


def _admin(url: str, queue: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"REDIS_URL": url, "RELAY_QUEUE": queue, "RELAY_METRICS_ADDR": "off",
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(ROOT / "worker.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_every_key_but_the_queue_hashes_to_the_queue_slot() -> None:
    keys = Keys("notifications", cluster=True)
    assert keys.dead == "{notifications}:dead"
    assert keys.inflight("w", 3) == "{notifications}:inflight:w:3"
    assert Keys("{app}.notifications", cluster=True).dead == "{app}.notifications:dead"
    assert Keys("notifications").dead == "notifications:dead"  # elsewhere: as before
    assert Keys("a{}b", cluster=True).dead == "{a{}b}:dead"  # `{}` is no hash tag


def test_two_workers_one_killed_mid_drain_nothing_lost(cluster, rc, pusher, start_worker,
                                                       queue_name, monkeypatch) -> None:
    total = 1000
    monkeypatch.setenv("REDIS_URL", cluster.url)
    client = producer.client_from_env()
    assert isinstance(client, RedisCluster)
    p = producer.Producer(client, queue_name)
    for i in range(total):
        p.notify(f"c{i % CHANNELS}", {"n": i})
    p.close()
    assert rc.llen(queue_name) == total
    pusher.set_mode(delay=0.2)  # 10 calls x 10 a call: at most ~500/s a worker
    first = start_worker(wait=False, REDIS_URL=cluster.url)
    second = start_worker(wait=False, REDIS_URL=cluster.url)
    first.wait_started()
    second.wait_started()
    wait_for(lambda: events_total(pusher) >= total // 5, timeout=30, what="the drain under way")
    first.kill()
    held = _inflight(rc, queue_name)
    assert events_total(pusher) < total, "killed mid-drain"
    wait_for(lambda: all_delivered(pusher, range(total)), timeout=60,
             what="every notification delivered at least once")
    wait_for(lambda: _inflight(rc, queue_name) == 0, what="in-flight lists empty")
    counts = Counter(json.loads(e["data"])["n"] for e in pusher.events())
    assert sum(c - 1 for c in counts.values()) <= held
    assert rc.llen(queue_name) == 0 and rc.llen("{" + queue_name + "}:dead") == 0
    assert held > 0, first.log()
    wait_for(lambda: "missed its heartbeat" in second.log(), timeout=15,
             what="the survivor's line about the reap")
    names = {k.decode() for k in _keys(rc, "*")}
    assert names and all(k.startswith("{" + queue_name + "}:") for k in names), names

    stats = _admin(cluster.url, queue_name, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    report = json.loads(stats.stdout)
    assert report["length"] == 0 and report["totals"]["delivered"] >= total
    assert [w["id"] for w in report["workers"]] == [RedisQueue(rc, queue_name).workers()[0]["id"]]
    rc.rpush("{" + queue_name + "}:dead", json.dumps({"payload": '{"channel":"c","n":-2}',
                                                      "error": "test", "failed_at": 0}))
    for args in (["dead", "list"], ["dead", "requeue", "--all"]):
        done = _admin(cluster.url, queue_name, *args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    wait_for(lambda: any(json.loads(e["data"])["n"] == -2 for e in pusher.events()),
             what="the requeued dead letter delivered")
    check = _admin(cluster.url, queue_name, "check")
    assert check.returncode == 0 and "1 live worker" in check.stdout, check.stdout
    enq = _admin(cluster.url, queue_name, "enqueue", "c", '{"n": -1}')
    assert enq.returncode == 0, enq.stdout + enq.stderr
    wait_for(lambda: any(json.loads(e["data"])["n"] == -1 for e in pusher.events()),
             what="the enqueued notification delivered")
    second.signal(signal.SIGTERM)
    assert second.wait() == 0, second.log()
    assert "stopped;" in second.log() and _inflight(rc, queue_name) == 0
    assert rc.zcard("{" + queue_name + "}:workers") == 0


def test_the_connection_cap_holds_on_each_cluster_node(cluster, rc) -> None:
    """Eight blocking pops on three connections: five wait, none fails, no fourth."""
    client = redis_client(cluster.url, 3)
    pops = [gevent.spawn(client.blpop, ["nothing-here"], 0.3) for _ in range(8)]
    gevent.joinall(pops, timeout=30, raise_error=True)
    assert all(p.successful() and p.value is None for p in pops)
    pool = client.get_node_from_key("nothing-here").redis_connection.connection_pool
    assert isinstance(pool, redis.BlockingConnectionPool) and pool.max_connections == 3
    assert len(pool._connections) <= 3
    client.close()


def _node_id(port: int) -> str:
    client = redis.Redis(port=port, decode_responses=True)
    try:
        return str(client.execute_command("CLUSTER", "MYID"))
    finally:
        client.close()


def _migrate_slot(slot: int, source: int, target: int) -> None:
    """Move one slot, its keys and all, the way redis-cli --cluster reshard does."""
    src, dst = redis.Redis(port=source), redis.Redis(port=target)
    src_id, dst_id = _node_id(source), _node_id(target)
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    for client in (dst, src):
        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    src.close()
    dst.close()


def test_the_queue_slot_migrating_mid_drain_loses_nothing(cluster, rc, pusher, start_worker,
                                                          queue_name) -> None:
    total = 1000
    rc.rpush(queue_name, *[json.dumps({"channel": f"c{i % CHANNELS}", "n": i})
                           for i in range(total)])
    pusher.set_mode(delay=0.2)
    worker = start_worker(REDIS_URL=cluster.url)
    wait_for(lambda: events_total(pusher) >= total // 5, timeout=30, what="the drain under way")
    slot = rc.keyslot(queue_name)
    source = rc.get_node_from_key(queue_name).port
    target = next(n.port for n in cluster.nodes if n.port != source)
    _migrate_slot(slot, source, target)
    assert events_total(pusher) < total, "the slot moved mid-drain"
    wait_for(lambda: all_delivered(pusher, range(total)), timeout=60,
             what="every notification delivered after the migration")
    wait_for(lambda: _inflight(rc, queue_name) == 0, what="in-flight lists empty")
    moved_to = redis.Redis(port=target)
    assert moved_to.zcard("{" + queue_name + "}:workers") == 1  # the worker followed
    moved_to.close()
    assert rc.llen(queue_name) == 0 and rc.llen("{" + queue_name + "}:dead") == 0
    assert worker.alive and "unexpected error" not in worker.log(), worker.log()


def test_the_readme_acl_users_on_the_cluster(cluster, rc, pusher, start_worker, queue_name,
                                             monkeypatch) -> None:
    rules = readme_rules(queue_name, cluster=True)
    for node in cluster.nodes:
        client = redis.Redis(port=node.port)
        for name, args in rules.items():
            client.execute_command("ACL", "SETUSER", name, *args)
        client.close()
    hosts = cluster.url.split("://", 1)[1]
    monkeypatch.setenv("REDIS_URL", f"redis+cluster://relay-producer:{PRODUCER_PW}@{hosts}")
    producer.notify("c", {"n": 1}, queue=queue_name)
    url = f"redis+cluster://relay-worker:{WORKER_PW}@{hosts}"
    worker = start_worker(REDIS_URL=url)
    wait_for(lambda: len(pusher.events()) == 1, timeout=30, what="delivery as the ACL user")
    stats = _admin(url, queue_name, "stats", "--json")
    assert stats.returncode == 0 and json.loads(stats.stdout)["totals"]["delivered"] == 1, \
        stats.stdout + stats.stderr
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert "NoPermission" not in worker.log() and WORKER_PW not in worker.log()
    for node in cluster.nodes:
        client = redis.Redis(port=node.port)
        client.execute_command("ACL", "DELUSER", *rules)
        client.close()
