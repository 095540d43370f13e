"""What several Redis-facing modules share, kept at the bottom so none imports another.

1. REDIS_DOWN: the errors that mean "Redis is away for now" (restarting, unreachable,
   loading, or a replica that a failover just demoted): back off and try again.
2. NOW_LUA: Redis's clock inside scripts, so hosts with skewed clocks agree on deadlines.
3. The timeouts of the blocking pop and of the client's sockets, which must fit together.
"""

from __future__ import annotations

import redis
import redis.exceptions

REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    # After a Sentinel failover the old master answers writes with READONLY until the
    # client follows the new one: a passing state, not a bug.
    redis.exceptions.ReadOnlyError,
    # A cluster between topologies: CLUSTERDOWN, TRYAGAIN, redirects left after the cluster
    # client's own retries, a slot no node serves yet.
    redis.exceptions.ClusterError, redis.exceptions.TryAgainError, redis.exceptions.AskError,
    redis.exceptions.RedisClusterException,
)
# Any failure of a Redis call: the cluster client's own errors do not derive from RedisError.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.RedisError,
                                              redis.exceptions.RedisClusterException)

NOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# How long the process's one blocking pop waits before it comes up for air (relay.window): a
# stop cuts it short, so it need not be short; each wake-up costs a round trip. It must stay
# under the socket timeout, with a margin for a loaded machine, or an idle pop would time out.
BLOCK_S = 3.0
# Above the blocking pop's wake-up, so an idle pop is never a socket timeout.
REDIS_SOCKET_TIMEOUT_S = BLOCK_S + 2.0
REDIS_CONNECT_TIMEOUT_S = 3.0
