"""One rate limit for every worker on the queue: GCRA in a Redis script.

Key `Q:ratelimit` holds the theoretical arrival time (TAT) of the next event, in Redis
time, so every process on every host draws from the same budget and clocks need not agree.
With emission interval T = 1/rate and burst B, taking k events is allowed while
TAT + k*T - now <= B*T. Events are counted as Pusher counts messages: one per channel.

The engine takes budget when a call is about to go, for exactly the events that call sends
(`take_all`), so nothing is taken for notifications that never go; a call that cannot go
after all (a stop, a pause or an open circuit came while it waited) refunds it. The window
stays small while every app is rate-limited, so little waits in it for budget. Only one
greenlet per process waits on Redis at a time (the others wait on a local lock), and it
waits until its whole request is free, so a throttled worker makes a few calls a second
instead of polling. With RELAY_APPS every app but `default` has its own limiter and key,
`Q:ratelimit:<app>` (relay.routes).

Pusher counts messages when they arrive, a little after the budget was granted, so the
limiter keeps HEADROOM of the burst in reserve: the spread between grant and arrival must
not push Pusher's count for any one second over rate + burst.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import redis

log = logging.getLogger(__name__)

# KEYS: ratelimit key. ARGV: seconds per event, burst, how many to take (<= burst).
# Returns {taken (all or none), milliseconds until that many are free}.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local free = math.floor(burst - (tat - now) / interval + 1e-9)
if free < want then
  return {0, math.ceil((tat - (burst - want) * interval - now) * 1000)}
end
tat = tat + want * interval
redis.call('SET', KEYS[1], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
return {want, 0}
"""

# KEYS: ratelimit key. ARGV: seconds per event, events to give back.
REFUND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
tat = tat - tonumber(ARGV[2]) * tonumber(ARGV[1])
if tat <= now then redis.call('DEL', KEYS[1]) return 0 end
redis.call('SET', KEYS[1], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
return 1
"""

MIN_WAIT_S = 0.005
HEADROOM = 0.1  # of the burst, kept back for the spread between grant and arrival


class RateLimiter:
    """Shared events-per-second budget; `take` blocks (via `sleep`) until it gets some."""

    def __init__(self, client: redis.Redis, key: str, rate: float, burst: int,
                 sleep: Callable[[float], object],
                 lock: AbstractContextManager[Any] | None = None,
                 on_wait: Callable[[], object] = lambda: None) -> None:
        """on_wait is called each time a greenlet has to wait for budget (a metric)."""
        self.key = key
        self.interval = 1.0 / rate
        self.burst = max(1, int(burst * (1 - HEADROOM)))
        self.sleep = sleep
        self.lock = lock if lock is not None else nullcontext()
        self.on_wait = on_wait
        self._take = client.register_script(TAKE)
        self._refund = client.register_script(REFUND)

    def try_take(self, want: int) -> tuple[int, float]:
        """(events granted: `want` capped at the burst, or 0; seconds until they are free)."""
        taken, wait_ms = self._take(keys=[self.key],
                                    args=[self.interval, self.burst, min(want, self.burst)])
        return int(taken), max(MIN_WAIT_S, int(wait_ms) / 1000.0)

    def take(self, want: int, stop: Callable[[], bool] = lambda: False) -> int:
        """`want` events (capped at the burst); 0 only if `stop()` turned true meanwhile."""
        with self.lock:
            while not stop():
                taken, wait_s = self.try_take(want)
                if taken:
                    return taken
                self.on_wait()
                self.sleep(wait_s)
        return 0

    def take_all(self, want: int, stop: Callable[[], bool] = lambda: False) -> int:
        """Exactly `want` events, in burst-sized steps (a 100-channel trigger costs 100)."""
        got = 0
        while got < want:
            step = self.take(want - got, stop)
            if not step:
                break
            got += step
        return got

    def refund(self, unused: int) -> None:
        if unused > 0:
            self._refund(keys=[self.key], args=[self.interval, unused])
