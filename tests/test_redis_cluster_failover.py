"""A cluster node failing over: three masters and three replicas (appendonly). The master
that owns the queue's slot is SIGKILLed mid-drain; its replica is promoted; the worker rides
it out as one Redis outage. Nothing that reached the replica is lost; duplicates are
bounded by what the worker had in flight."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster

from relay.connect import redis_client
from relay.delivery import MAX_BATCH
from tests.support import all_delivered, events_total, wait_for
from tests.test_redis_cluster import CHANNELS, _admin, _inflight
from tests.topology import ClusterSet, require

POOL_SIZE = 10


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSet]:
    require("redis-cli", version=(7, 0))  # --cluster-port
    nodes = ClusterSet(replicas=1).start()
    yield nodes
    nodes.stop()


def _replicated(cluster: ClusterSet, master_port: int) -> bool:
    """Every write the master took is on its replica (offsets equal)."""
    master = cluster.node(master_port, decode_responses=True)
    try:
        info = master.info("replication")
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return bool(replicas) and all(
            int(r["offset"]) == int(info["master_repl_offset"]) for r in replicas)
    finally:
        master.close()


def _owner(cluster: ClusterSet, slot: int, asking: int) -> int:
    """The port of the master serving slot, as node `asking` sees it."""
    client = cluster.node(asking)
    try:
        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(master[1])
    finally:
        client.close()
    raise AssertionError(f"slot {slot} is served by no node")


def test_the_queue_master_killed_mid_drain_its_replica_takes_over(
        cluster, pusher, start_worker, queue_name) -> None:
    total = 1000
    rc = redis_client(cluster.url, 8)
    rc.rpush(queue_name, *[json.dumps({"channel": f"c{i % CHANNELS}", "n": i})
                           for i in range(total)])
    slot = rc.keyslot(queue_name)
    old = rc.get_node_from_key(queue_name).port
    wait_for(lambda: _replicated(cluster, old), timeout=30, what="the queue on the replica")
    pusher.set_mode(delay=0.2)  # 10 calls x 10 a call: at most ~500/s, a drain of seconds
    # The default heartbeat TTL (10 s) outlasts the failover, so the worker is never reaped
    # by its own reaper mid-outage: what comes back twice is only what was in flight.
    worker = start_worker(REDIS_URL=cluster.url, RELAY_POOL_SIZE=str(POOL_SIZE),
                          RELAY_HEARTBEAT_TTL="10")
    wait_for(lambda: events_total(pusher) >= total // 5, timeout=30, what="the drain under way")
    killed_at = time.time()
    cluster.by_port(old).kill()
    assert events_total(pusher) < total, "the master was killed mid-drain"
    survivor = next(n.port for n in cluster.nodes if n.port != old)
    wait_for(lambda: _owner(cluster, slot, survivor) != old, timeout=30,
             what="the replica promoted")
    new = _owner(cluster, slot, survivor)
    delivered = lambda: Counter(json.loads(e["data"])["n"] for e in pusher.events())  # noqa: E731
    wait_for(lambda: all_delivered(pusher, range(total)), timeout=60,
             what="every notification delivered after the failover")
    rc.close()
    rc = redis_client(f"redis+cluster://127.0.0.1:{new}", 8)
    wait_for(lambda: rc.llen(queue_name) == 0 and _inflight(rc, queue_name) == 0,
             timeout=30, what="queue and in-flight lists empty on the promoted replica")
    counts = delivered()
    times = sorted(e["received_at"] for e in pusher.events())
    around = [t for t in times if t > killed_at - 1.0]
    gap = max(b - a for a, b in zip(around, around[1:], strict=False))
    duplicates = sum(c - 1 for c in counts.values())
    sys.stderr.write(f"\ncluster failover: {gap:.1f} s without delivery, 0 of {total} lost, "
                     f"{duplicates} duplicates\n")
    assert set(counts) == set(range(total))
    assert duplicates <= POOL_SIZE * MAX_BATCH  # at most what was in flight
    assert rc.llen("{" + queue_name + "}:dead") == 0
    assert worker.alive, worker.log()
    log = worker.log()
    assert log.count("Redis unreachable") == 1, log  # one outage, logged once each way
    assert log.count("Redis reachable again") == 1, log
    assert "unexpected error" not in log and "Traceback" not in log, log
    stats = _admin(f"redis+cluster://127.0.0.1:{new}", queue_name, "stats", "--json")
    assert stats.returncode == 0, stats.stdout + stats.stderr
    assert json.loads(stats.stdout)["totals"]["delivered"] >= total
    assert isinstance(rc, RedisCluster)
    rc.close()
