"""The worker's and admin commands' Redis client, for every form of REDIS_URL.

1. Standalone (`redis://`, `rediss://`, `unix://`): one `BlockingConnectionPool`.
2. Sentinel: redis-py's `Sentinel(...).master_for(...)`, whose pool asks the sentinels for
   the master before each new connection and drops connections to a demoted one. redis-py
   has no blocking pool for Sentinel, so `BlockingSentinelPool` puts the two together: the
   Sentinel pool's master tracking over the blocking pool's queue of connections.
3. Cluster: redis-py's `RedisCluster`, with a blocking pool per node.

Every form caps connections the same way: a greenlet that finds them all busy waits for
one instead of getting "Too many connections". redis-py's own retries are off (except the
cluster client's redirect handling) because the worker's backoff knows more.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import SentinelConnectionPool

from relay import explain, redis_url
from relay.retry import Outage

# Above the worker's blocking-pop wake-up (redis_shared.BLOCK_S, 3 s), so an idle pop is
# never a socket timeout; redis-py 8.1 would otherwise default it to 5 s anyway.
REDIS_SOCKET_TIMEOUT_S = 5.0
REDIS_CONNECT_TIMEOUT_S = 3.0
# The sentinels answer one small question; a dead one must not hold up the next.
SENTINEL_TIMEOUT_S = 1.0
HEALTH_CHECK_S = 30

Client = Any  # redis.Redis or redis.cluster.RedisCluster: the same commands for relay


class BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's master-following pool with the blocking pool's cap.

    SentinelConnectionPool supplies reset/owns_connection/get_master_address; the blocking
    pool supplies get_connection/release/make_connection over a bounded queue. A connection
    to a demoted master is not owned any more: release() closes it and frees its place.
    """


def _timeouts() -> dict[str, Any]:
    return {"socket_timeout": REDIS_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S}


def redis_client(url: str, max_connections: int, wait: bool = True) -> Client:
    """One client for the process with at most max_connections to each Redis node.

    Raises redis_url.RedisUrlError for a malformed URL (config.load has checked it already).
    Only the cluster client talks to Redis when it is built (it reads the slot map): with
    wait, it waits for a node to answer, as the worker does for any Redis at start; without
    (admin commands), a cluster nobody answers for is a redis.ConnectionError.
    """
    spec = redis_url.parse(url)
    if spec.kind == redis_url.SENTINEL:
        return _sentinel_client(spec, max_connections)
    if spec.kind == redis_url.CLUSTER:
        return _cluster_until_up(spec, max_connections, wait)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=None, retry=Retry(NoBackoff(), 0),
        health_check_interval=HEALTH_CHECK_S, **_timeouts())
    return redis.Redis(connection_pool=pool)


def _sentinel_client(spec: redis_url.RedisSpec, max_connections: int) -> redis.Redis:
    sentinels = redis_url.sentinel_for(spec, {"socket_timeout": SENTINEL_TIMEOUT_S,
                                              "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                                              "retry": Retry(NoBackoff(), 0)})
    return sentinels.master_for(
        spec.service, connection_pool_class=BlockingSentinelPool, db=spec.db,
        max_connections=max_connections, timeout=None, retry=Retry(NoBackoff(), 0),
        health_check_interval=HEALTH_CHECK_S, **_timeouts(), **spec.connection_kwargs())


def _cluster_until_up(spec: redis_url.RedisSpec, max_connections: int, wait: bool) -> Client:
    from redis.exceptions import RedisClusterException  # noqa: PLC0415

    outage = Outage("Redis", where=f" at REDIS_URL={redis_url.mask(spec.url)}")
    while True:
        try:
            client = _cluster_client(spec, max_connections)
            outage.succeeded()
            return client
        except (RedisClusterException, redis.RedisError) as exc:
            if not wait:
                raise redis.ConnectionError(f"no cluster node answers ({explain.reason(exc)})"
                                            ) from None
            time.sleep(outage.failed(exc))


def _cluster_client(spec: redis_url.RedisSpec, max_connections: int) -> Client:
    from redis.cluster import ClusterNode, RedisCluster  # noqa: PLC0415 - only for clusters

    (host, port), others = spec.hosts[0], spec.hosts[1:]
    scheme = "rediss" if spec.ssl else "redis"
    # With url=, RedisCluster builds each node's pool from connection_pool_class: the only
    # way to give the nodes a blocking pool. Credentials go as arguments, not in this URL.
    kwargs = spec.connection_kwargs()
    kwargs.pop("ssl", None)  # the rediss:// scheme says it
    return RedisCluster(
        url=f"{scheme}://{_host(host)}:{port}/0",
        startup_nodes=[ClusterNode(h, p) for h, p in others],
        connection_pool_class=redis.BlockingConnectionPool, max_connections=max_connections,
        timeout=None, **_timeouts(), **kwargs)


def disconnect_all(client: Client) -> None:
    """Close every pooled connection (a greenlet killed mid-command leaves one half-read).
    A cluster client has a pool per node and no `connection_pool` of its own."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pool.disconnect()
    else:
        client.disconnect_connection_pools()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
