"""The gate in front of Pusher: a circuit breaker plus a process-wide pause for 429s.

1. Closed: every greenlet may fetch and send.
2. Open (401, 403, 404, or a run of failures with no success between them: the fault is
   Pusher's or our credentials', never one notification's): nobody fetches; everything stays
   in Redis. One log line when it opens, one when it closes.
3. While open, one greenlet at a time is let through as a probe, at a growing interval
   (capped); its success closes the circuit, its failure reopens it for longer.
4. `pause(seconds)` (429 with Retry-After) holds every greenlet until the time has passed,
   because the limit applies to the whole app, not to one notification.

Pure logic with an injectable clock; the worker does the waiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

FIRST_PROBE_S = 1.0
MAX_PROBE_S = 300.0
FAILURES_TO_OPEN = 5
# A probe that never reports back (its fetch hit a Redis error, or everything it fetched was
# invalid or stale, so nothing was sent) must not hold the circuit open forever: after this
# long another greenlet may probe. Longer than any one fetch plus a batch of Pusher calls.
PROBE_LEASE_S = 60.0


class Circuit:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 first_probe_s: float = FIRST_PROBE_S, max_probe_s: float = MAX_PROBE_S,
                 failures_to_open: int = FAILURES_TO_OPEN,
                 probe_lease_s: float = PROBE_LEASE_S) -> None:
        self.clock = clock
        self.first_probe_s = first_probe_s
        self.max_probe_s = max_probe_s
        self.failures_to_open = failures_to_open
        self.probe_lease_s = probe_lease_s
        self.probe_started_at = 0.0
        self.reason: str | None = None
        self.opened_at = 0.0
        self.interval = first_probe_s
        self.next_probe_at = 0.0
        self.probing = False
        self.paused_until = 0.0
        self.failures = 0
        # The app's name in the log lines when several are configured (relay.routes sets it);
        # None with one app, whose lines read as before RELAY_APPS.
        self.app: str | None = None

    @property
    def _for_app(self) -> str:
        return "" if self.app is None else f" for app {self.app}"

    @property
    def is_open(self) -> bool:
        return self.reason is not None

    def holding(self) -> bool:
        """True while nobody but a probe may send (open, or paused by a 429)."""
        return self.reason is not None or self.clock() < self.paused_until

    def wait_s(self) -> float:
        """0 when the caller may go now (and, if open, it became the probe); else how long."""
        now = self.clock()
        if now < self.paused_until:
            return self.paused_until - now
        if self.reason is None:
            return 0.0
        if self.probing and now < self.probe_started_at + self.probe_lease_s:
            return min(self.interval, 1.0)
        if now >= self.next_probe_at:
            self.probing = True
            self.probe_started_at = now
            return 0.0
        return self.next_probe_at - now

    def succeeded(self) -> None:
        self.failures = 0
        self.probing = False
        if self.reason is not None:
            log.warning("circuit closed%s: Pusher accepts calls again (was open %.1f s: %s)",
                        self._for_app, self.clock() - self.opened_at, self.reason)
            self.reason = None
            self.interval = self.first_probe_s

    def systemic(self, reason: str) -> None:
        """A failure that is not the notification's fault: open (or keep open) the circuit."""
        now = self.clock()
        if self.reason is None:
            log.error("circuit open%s: %s; %s", self._for_app, reason,
                      "fetching stops, everything stays in Redis" if self.app is None else
                      "its notifications wait in the retry set while the other apps deliver")
            self.reason = reason
            self.opened_at = now
            self.interval = self.first_probe_s
        elif self.probing:
            self.interval = min(self.max_probe_s, self.interval * 2)
        self.probing = False
        self.next_probe_at = now + self.interval

    def transient(self, reason: str) -> None:
        """A failure that may be the notification's or Pusher's: a run of them opens."""
        self.failures += 1
        if self.reason is not None or self.failures >= self.failures_to_open:
            self.systemic(f"{self.failures} calls in a row failed, last: {reason}")

    def abandon_probe(self) -> None:
        """The probe found nothing to send; the next greenlet may probe."""
        self.probing = False

    def pause(self, seconds: float, why: str = "HTTP 429") -> None:
        """why: the answer that asked for it (a 429, or sockudo's 503 with Retry-After)."""
        until = self.clock() + seconds
        if until > self.paused_until:
            if self.clock() >= self.paused_until:
                log.warning("Pusher asked to slow down%s (%s): %s %.1f s", self._for_app, why,
                            "every greenlet waits" if self.app is None else
                            "its notifications wait", seconds)
            self.paused_until = until
