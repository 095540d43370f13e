"""Sentinel: a master and a replica (appendonly) and three sentinels. The master is SIGKILLed
mid-drain; the worker follows the promoted replica by itself. Lost and duplicated
notifications are counted and held to the bounds the README publishes."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator

import gevent
import pytest
import redis

from relay import producer
from relay.connect import BlockingSentinelPool, redis_client
from relay.delivery import MAX_BATCH
from tests.support import all_delivered, events_total, wait_for
from tests.topology import SentinelSet, require

POOL_SIZE = 10
# A channel has one call in flight at a time: a hundred keep the ten greenlets busy.
CHANNELS = 100


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSet]:
    """One deployment for the module (it takes seconds to settle); the failover test runs
    last and leaves the replica as master."""
    require()
    deployment = SentinelSet().start()
    yield deployment
    deployment.stop()


def test_the_connection_cap_holds_under_sentinel(sentinels: SentinelSet) -> None:
    client = redis_client(sentinels.url, 3)
    pool = client.connection_pool
    assert isinstance(pool, BlockingSentinelPool)
    # Eight blocking pops at once on three connections: five wait for a connection, none
    # fails with "Too many connections", and no fourth connection is ever made.
    pops = [gevent.spawn(client.blpop, ["nothing-here"], 0.3) for _ in range(8)]
    gevent.joinall(pops, timeout=30, raise_error=True)
    assert all(p.successful() and p.value is None for p in pops)
    assert len(pool._connections) <= 3
    assert client.connection_pool.get_master_address()[1] == sentinels.master_port()
    client.close()


def _push_until(stop: gevent.event.Event, client: redis.Redis, queue: str,
                acked: list[int]) -> None:
    """A web app pushing through the failover: what Redis acknowledged is in `acked`."""
    n = 100_000
    while not stop.is_set():
        try:
            client.rpush(queue, json.dumps({"channel": f"c{n % CHANNELS}", "n": n}))
            acked.append(n)
            n += 1
        except redis.RedisError:
            pass  # the app's retry; not acknowledged, so not counted
        stop.wait(0.01)


def test_master_killed_mid_drain_worker_follows_the_promoted_replica(
        sentinels: SentinelSet, pusher, start_worker, queue_name, monkeypatch) -> None:
    total = 1000
    monkeypatch.setenv("REDIS_URL", sentinels.url)
    p = producer.Producer(queue=queue_name)
    for i in range(total):
        p.notify(f"c{i % CHANNELS}", {"n": i})
    wait_for(sentinels.replicated, timeout=30, what="the replica to have it all before the kill")
    pusher.set_mode(delay=0.1)  # 10 calls x 10 a call: at most ~1000/s, a drain of seconds
    # The default heartbeat TTL (10 s) outlasts the failover, so the worker is never reaped
    # by its own reaper mid-outage: what comes back twice is only what was in flight.
    worker = start_worker(REDIS_URL=sentinels.url, RELAY_POOL_SIZE=str(POOL_SIZE),
                          RELAY_HEARTBEAT_TTL="10")
    stop, acked = gevent.event.Event(), []
    pushing = gevent.spawn(_push_until, stop, producer.client_from_env(), queue_name, acked)
    wait_for(lambda: events_total(pusher) >= total // 5, timeout=30,
             what="the drain under way")
    killed_at = time.time()
    sentinels.kill_master()
    delivered_by_the_kill = events_total(pusher)
    wait_for(sentinels.promoted, timeout=60, what="the sentinels to promote the replica")
    pushed_by_then = len(acked)
    wait_for(lambda: len(acked) > pushed_by_then + 10, timeout=60,
             what="the producer pushing to the new master")
    stop.set()
    pushing.join(timeout=10)
    wanted = set(range(total)) | set(acked)
    delivered = lambda: Counter(json.loads(e["data"])["n"] for e in pusher.events())  # noqa: E731
    wait_for(lambda: all_delivered(pusher, range(total)), timeout=60,
             what="every notification that reached the replica delivered")
    new_master = redis.Redis(port=sentinels.replica.port)
    wait_for(lambda: new_master.llen(queue_name) == 0 and not any(
        new_master.llen(k) for k in new_master.keys(f"{queue_name}:inflight:*")),
        what="queue and in-flight lists empty on the new master")
    counts = delivered()
    # Calls already under way when the master died still arrive just after; the gap that
    # counts is the longest one around the kill.
    times = sorted(e["received_at"] for e in pusher.events())
    around = [t for t in times if t > killed_at - 1.0]
    gap, gap_end = max((b - a, b) for a, b in zip(around, around[1:], strict=False))
    lost_pre = total - len(set(range(total)) & set(counts))
    lost_during = len(set(acked) - set(counts))
    duplicates = sum(c - 1 for n, c in counts.items() if n in wanted)
    sys.stderr.write(
        f"\nsentinel failover: {gap:.1f} s without delivery (ended "
        f"{gap_end - killed_at:.1f} s after the SIGKILL), "
        f"{lost_pre} of {total} queued before lost, {lost_during} of {len(acked)} pushed "
        f"during the failover lost, {duplicates} duplicates\n")
    assert delivered_by_the_kill < total, "the master was killed mid-drain"
    assert worker.alive, "the worker followed the failover without a restart"
    log = worker.log()
    assert log.count("Redis unreachable") == 1, log
    assert log.count("Redis reachable again") == 1, log
    assert "REDIS_URL=redis+sentinel://" in log
    assert lost_pre == 0  # replicated before the kill (offsets compared): never lost
    # Acknowledged by the master but not yet replicated when it died: the asynchronous
    # replication window, a few milliseconds of pushes at most.
    assert lost_during <= 5, (lost_during, len(acked))
    # What was in flight (each slot's batch) plus acks the replica had not seen yet.
    assert duplicates <= POOL_SIZE * MAX_BATCH, duplicates


def test_a_demoted_master_answering_readonly_is_redis_away(redis_server, r, pusher,
                                                            start_worker, queue_name) -> None:
    """What a client still talking to a demoted master sees: READONLY, UNBLOCKED for a blocked
    pop, or (a pop pipelined with its top-up) the connection closed by the server. Made here
    without sentinels by turning the worker's own server into a replica, then back."""
    require()
    from relay.redis_server import RedisServer

    worker = start_worker()
    with RedisServer() as other:
        r.replicaof("127.0.0.1", other.port)
        wait_for(lambda: "Redis unreachable" in worker.log(), timeout=30,
                 what="READONLY noticed as an outage")
        r.replicaof("NO", "ONE")
    r.rpush(queue_name, json.dumps({"channel": "c", "n": 1}))
    wait_for(lambda: len(pusher.events()) == 1, timeout=30, what="delivery once a master again")
    wait_for(lambda: "Redis reachable again" in worker.log(), timeout=30, what="recovery line")
    log = worker.log()
    assert worker.alive and log.count("Redis unreachable") == 1, log
    assert any(cause in log for cause in ("ReadOnlyError", "RedisDemoted",
                                          "Connection closed by server")), log
    assert "unexpected error" not in log, log
