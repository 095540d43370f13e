"""The dashboard's time series, kept in Redis so every process counts into it and any reads it.

1. Writing costs no round trip: the settle scripts in queue.py (ACK, DEAD, RETRY_LATER,
   REQUEUE, TRIM) add what they settled to `Q:history:s:<second>` and `Q:history:m:<minute>`
   on Redis's clock (see queue._TALLY). Every worker process on every host adds into the same
   hashes, so a bucket is the sum over all of them by construction.
2. `Tally` holds, per worker process, the figures that have no settle step of their own:
   Pusher calls, failed calls, and latency histogram buckets (call time, enqueue-to-delivery
   age). The next settle script carries them along as one "name=count ..." argument.
3. `SeriesReader` reads a window back in one pipelined round trip (plus one for Redis's
   clock), turns the histogram buckets into p50/p99, and keeps the buckets Redis's clock has
   left behind (they cannot change), so a refresh asks for the newest few only.

Each bucket hash holds a few dozen small integers; seconds live 16 minutes, minutes 25 hours.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from relay.metrics import AGE_BUCKETS, CALL_BUCKETS
from relay.queue import Keys

# The counts charted as rates (per second). `requeued` is stored too (put back untouched).
RATES = ("delivered", "failed", "retried", "dead", "shed")
SECOND_TTL_S = 960  # kept in step with queue._TALLY
MINUTE_TTL_S = 90000


@dataclass(frozen=True)
class Window:
    """A chart's span: `points` buckets of `step_s` seconds, stored under `suffix`."""

    suffix: str
    step_s: int
    points: int


WINDOWS = {"15m": Window("s", 1, 900), "24h": Window("m", 60, 1440)}


def bucket_index(bounds: Sequence[float], value: float) -> int:
    """The histogram bucket of `value`: the first upper bound >= value; len(bounds) is +Inf."""
    return bisect.bisect_left(bounds, value)


class Tally:
    """Per-process figures waiting for the next settle script to carry them to Redis.

    Greenlet-safe without a lock: nothing here yields. A figure counted after the last settle
    of a process that then stops is lost; the counts of settled notifications never are.
    """

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def call(self, status: int | None, seconds: float) -> None:
        """Delivery's on_call: one Pusher call, failed unless 2xx, and its duration."""
        self._counts["calls"] += 1
        if status is None or not 200 <= status < 300:
            self._counts["failed"] += 1
        self._counts[f"call:{bucket_index(CALL_BUCKETS, seconds)}"] += 1

    def age(self, seconds: float) -> None:
        """One delivered envelope's enqueue-to-delivery age."""
        self._counts[f"age:{bucket_index(AGE_BUCKETS, max(0.0, seconds))}"] += 1

    def take(self) -> str:
        """Everything counted so far, as the settle scripts' argument; starts afresh."""
        if not self._counts:
            return ""
        text = " ".join(f"{name}={n}" for name, n in self._counts.items())
        self._counts.clear()
        return text


def bucket_key(keys: Keys, window: Window, index: int, app: str | None = None) -> str:
    """A bucket of the whole queue, or of one Pusher app's (kept when several are configured:
    the settle script counts the call's app under `:app:NAME`). An app's buckets hold its
    notifications' counts only: calls and their latency are counted per process, not app."""
    prefix = keys.history if app is None else f"{keys.history}:app:{app}"
    return f"{prefix}:{window.suffix}:{index}"


def percentile(counts: Mapping[int, int], bounds: Sequence[float], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile; None without samples.

    Beyond the last bound the answer is the last bound (the page says "over")."""
    total = sum(counts.values())
    if not total:
        return None
    rank = math.ceil(q * total)
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            return float(bounds[min(index, len(bounds) - 1)])
    return float(bounds[-1])


def _histogram(raw: Mapping[str, int], prefix: str) -> dict[int, int]:
    return {int(name[len(prefix):]): n for name, n in raw.items() if name.startswith(prefix)}


def summarize(raw: Mapping[str, int], seconds: float) -> dict[str, Any]:
    """One bucket (or a sum of buckets) as rates per second and latency percentiles."""
    point: dict[str, Any] = {name: raw.get(name, 0) / seconds for name in RATES}
    ages, calls = _histogram(raw, "age:"), _histogram(raw, "call:")
    point["age_p50"] = percentile(ages, AGE_BUCKETS, 0.5)
    point["age_p99"] = percentile(ages, AGE_BUCKETS, 0.99)
    point["call_p50"] = percentile(calls, CALL_BUCKETS, 0.5)
    point["call_p99"] = percentile(calls, CALL_BUCKETS, 0.99)
    return point


def _decode(raw: Mapping[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


class SeriesReader:
    """Reads windows back, keeping the buckets that can no longer change.

    A settle script counts into the bucket of the Redis time at which it runs, and scripts
    run one at a time: once Redis's clock has left a bucket, nothing adds to it again. So a
    page refreshing every 2 s asks Redis for the last few buckets, not for 900 or 1,440.
    (The two latest are always read again, in case Redis's clock was stepped.)
    """

    REREAD = 2

    def __init__(self, client: redis.Redis, keys: Keys,
                 now: Callable[[], float] | None = None) -> None:
        """now: Redis's clock (RedisQueue.now, which also works on a cluster)."""
        self.now = now or (lambda: _redis_time(client))
        self.client = client
        self.keys = keys
        self._final: dict[tuple[str, str | None], dict[int, dict[str, int]]] = {}

    def read(self, name: str, app: str | None = None) -> dict[str, Any]:
        """The window `name` ("15m" or "24h"): one point a bucket, oldest first, and totals;
        of the whole queue, or of one app's notifications (`app`, see bucket_key).

        The bucket in progress is left out of the seconds (it is still filling) and shown
        pro rata among the minutes."""
        window = WINDOWS[name]
        now = self.now()
        last = int(now) // window.step_s
        if window.step_s == 1:
            last -= 1
        first = last - window.points + 1
        final = self._final.setdefault((name, app), {})
        for index in [i for i in final if i < first]:
            del final[index]
        wanted = [i for i in range(first, last + 1)
                  if i not in final or i > last - self.REREAD]
        pipe = self.client.pipeline(transaction=False)
        for index in wanted:
            pipe.hgetall(bucket_key(self.keys, window, index, app))
        for index, raw in zip(wanted, pipe.execute(), strict=True):
            final[index] = _decode(raw)
        buckets = [final[i] for i in range(first, last + 1)]
        return _series(name, window, now, first, buckets)


def _redis_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def read_series(client: redis.Redis, keys: Keys, name: str) -> dict[str, Any]:
    """One window read afresh (see SeriesReader)."""
    return SeriesReader(client, keys).read(name)


def _series(name: str, window: Window, now: float, first: int,
            buckets: list[dict[str, int]]) -> dict[str, Any]:
    points, total = [], Counter[str]()
    for offset, raw in enumerate(buckets):
        start = (first + offset) * window.step_s
        span = min(window.step_s, max(1.0, now - start))
        points.append({"t": start, **summarize(raw, span)})
        total.update(raw)
    span_s = max(1.0, min(window.points * window.step_s, now - first * window.step_s))
    return {"window": name, "step_s": window.step_s, "now": now, "points": points,
            "totals": {k: total.get(k, 0) for k in (*RATES, "calls", "requeued")},
            "summary": summarize(total, span_s)}


OUTFLOW = ("delivered", "dead", "shed", "retried")  # what leaves the queue for good or a while


def recent_rates(client: redis.Redis, keys: Keys, now: float, span_s: int = 10
                 ) -> dict[str, float]:
    """Per second over the last span_s full seconds, for each of OUTFLOW (one pipeline)."""
    window = WINDOWS["15m"]
    pipe = client.pipeline(transaction=False)
    for index in range(int(now) - span_s, int(now)):
        pipe.hmget(bucket_key(keys, window, index), *OUTFLOW)
    sums = [sum(int(row[i] or 0) for row in pipe.execute()) for i in range(len(OUTFLOW))]
    return {name: total / span_s for name, total in zip(OUTFLOW, sums, strict=True)}


def recent_rate(client: redis.Redis, keys: Keys, now: float, span_s: int = 10) -> float:
    """Notifications leaving the queue per second over the last span_s full seconds."""
    return sum(recent_rates(client, keys, now, span_s).values())
