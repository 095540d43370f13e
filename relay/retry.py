"""Retry policy: pure functions and a small outage tracker, so the rules test without Redis.

1. `compute_backoff` — exponential backoff with full jitter, capped: the delay before
   attempt n+1 of one notification.
2. `should_give_up` — the dead-letter rule: RELAY_MAX_ATTEMPTS or RELAY_RETRY_FOR reached.
3. `Outage` — one shared view of a dependency (Redis) being down: every greenlet backs off
   on the same growing delay, and the outage is logged once when it starts and once when
   it ends, not once per failed call.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from relay import explain

log = logging.getLogger(__name__)

BASE_DELAY_S = 1.0
MAX_DELAY_S = 60.0


def compute_backoff(attempts: int, base_s: float = BASE_DELAY_S, cap_s: float = MAX_DELAY_S,
                    rand: Callable[[], float] = random.random) -> float:
    """Delay after the `attempts`-th failure: uniform in [0, min(cap, base * 2**(n-1))].

    Full jitter spreads a burst of failures out, so retries after an outage do not arrive
    as one wave (AWS Architecture Blog, "Exponential Backoff And Jitter").
    """
    exponent = min(max(attempts, 1) - 1, 32)
    ceiling = min(cap_s, base_s * (2 ** exponent))
    return max(0.05, ceiling * rand())  # never zero: a retry is never a hot loop


def should_give_up(attempts: int, first_failed_at: float, now: float, max_attempts: int,
                   retry_for_s: float) -> bool:
    """True once `attempts` failures were made, or the first one is retry_for_s old."""
    return attempts >= max_attempts or now - first_failed_at >= retry_for_s


class Outage:
    """Shared backoff for one dependency; cheap to call on every success.

    After a restart, pooled connections to the old server fail once each; errors within
    FLAP_S of a recovery count as the same outage, so they neither log again nor log a
    second recovery.
    """

    FLAP_S = 5.0

    def __init__(self, name: str, base_s: float = 0.1, cap_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, where: str = "") -> None:
        self.name = name
        self.where = where  # e.g. " at REDIS_URL=..." (masked), for the outage line
        self.base_s = base_s
        self.cap_s = cap_s
        self.clock = clock
        self.failures = 0
        self.since: float | None = None
        self.announced = False
        self.recovered_at = float("-inf")

    def failed(self, error: BaseException) -> float:
        """Record a failed call; return how long the caller should wait before the next."""
        now = self.clock()
        if self.since is None:
            self.since = now
        # Announce at once, unless this may be the tail of the last outage (then only if it
        # lasts): a real outage is always logged, a flap after a restart is not.
        if not self.announced and (now - self.recovered_at > self.FLAP_S
                                   or now - self.since > self.FLAP_S):
            self.announced = True
            log.error("%s unreachable%s (%s); backing off and retrying", self.name,
                      self.where, explain.reason(error))
        self.failures += 1
        return min(self.cap_s, self.base_s * (2 ** min(self.failures - 1, 16)))

    def succeeded(self) -> None:
        if self.since is None:
            return
        now = self.clock()
        if self.announced:
            log.warning("%s reachable again after %.1f s", self.name, now - self.since)
            self.announced = False
            self.recovered_at = now
        self.since = None
        self.failures = 0
