"""relay.history: the dashboard's time series, counted inside the settle scripts."""

from __future__ import annotations

import redis

from relay.history import (
    MINUTE_TTL_S,
    SECOND_TTL_S,
    WINDOWS,
    SeriesReader,
    Tally,
    bucket_index,
    bucket_key,
    percentile,
    read_series,
)
from relay.metrics import AGE_BUCKETS, CALL_BUCKETS
from relay.queue import Op, RedisQueue
from tests.support import wait_for


def registered(r: redis.Redis, name: str, worker_id: str) -> RedisQueue:
    q = RedisQueue(r, name, worker_id=worker_id)
    q.heartbeat(60)
    return q


def fetch_n(q: RedisQueue, n: int, tag: str) -> list[bytes]:
    # each tag its own channel: one worker's notifications are never another's to take
    raws = [f'{{"channel":"c{tag}","n":"{tag}{i}"}}'.encode() for i in range(n)]
    q.client.rpush(q.keys.queue, *raws)
    got = [raw for raw, _ in q.fetch(n).items]
    assert got == raws
    return got


def sums(r: redis.Redis, pattern: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for key in r.scan_iter(match=pattern):
        for field, value in r.hgetall(key).items():
            total[field.decode()] = total.get(field.decode(), 0) + int(value)
    return total


def redis_now(r: redis.Redis) -> float:
    seconds, micros = r.time()
    return seconds + micros / 1e6


# -- pure parts --------------------------------------------------------------------------------


def test_bucket_index_is_the_first_upper_bound_at_or_above() -> None:
    assert bucket_index(CALL_BUCKETS, 0.0) == 0
    assert bucket_index(CALL_BUCKETS, 0.005) == 0
    assert bucket_index(CALL_BUCKETS, 0.006) == 1
    assert bucket_index(CALL_BUCKETS, 99.0) == len(CALL_BUCKETS)  # +Inf


def test_percentile_reads_the_bucket_bounds() -> None:
    assert percentile({}, AGE_BUCKETS, 0.5) is None
    counts = {0: 98, 5: 1, 7: 1}  # 98 under 10 ms, one under 5 s, one under 60 s
    assert percentile(counts, AGE_BUCKETS, 0.5) == AGE_BUCKETS[0]
    assert percentile(counts, AGE_BUCKETS, 0.99) == AGE_BUCKETS[5]
    assert percentile(counts, AGE_BUCKETS, 1.0) == AGE_BUCKETS[7]
    assert percentile({len(AGE_BUCKETS): 3}, AGE_BUCKETS, 0.5) == AGE_BUCKETS[-1]


def test_tally_counts_calls_failures_and_latency_then_starts_afresh() -> None:
    tally = Tally()
    assert tally.take() == ""
    tally.call(200, 0.004)
    tally.call(500, 0.3)
    tally.call(None, 7.0)
    tally.age(0.2)
    fields = dict(pair.split("=") for pair in tally.take().split())
    assert fields == {"calls": "3", "failed": "2", "call:0": "1", "call:6": "1", "call:10": "1",
                      "age:3": "1"}
    assert tally.take() == ""


# -- in Redis ----------------------------------------------------------------------------------


def test_settle_scripts_count_into_second_and_minute_buckets(r: redis.Redis,
                                                             queue_name: str) -> None:
    q = registered(r, queue_name, "w1")
    got = fetch_n(q, 6, "a")
    assert q.settle([Op.ack(x) for x in got[:3]], "calls=1 call:2=1 age:1=3").landed == [True] * 3
    assert q.settle([Op.shed(got[3])]).landed == [True]
    assert q.settle([Op.dead(got[4], {"payload": "x", "error": "e"})]).landed == [True]
    assert q.settle([Op.retry(got[5], "wrapper", 30)], "calls=1 failed=1 call:9=1").landed == [True]
    want = {"delivered": 3, "shed": 1, "dead": 1, "retried": 1, "calls": 2, "failed": 1,
            "call:2": 1, "call:9": 1, "age:1": 3}
    assert sums(r, f"{queue_name}:history:s:*") == want
    assert sums(r, f"{queue_name}:history:m:*") == want


def test_a_replayed_settle_counts_nothing_twice(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name, "w1")
    got = fetch_n(q, 2, "a")
    assert q.settle([Op.ack(x) for x in got]).landed == [True, True]
    # a replay after a lost reply: removed nothing, counts nothing
    assert q.settle([Op.ack(x) for x in got]).landed == [False, False]
    assert q.settle([Op.put_back(x) for x in got]).landed == [False, False]
    assert sums(r, f"{queue_name}:history:s:*") == {"delivered": 2}


def test_requeue_and_trim_count_too(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name, "w1")
    got = fetch_n(q, 2, "a")
    assert q.settle([Op.put_back(x) for x in got], "calls=1 failed=1").landed == [True, True]
    r.rpush(queue_name, *[b"x"] * 5)
    assert q.trim(3) == 4
    assert sums(r, f"{queue_name}:history:s:*") == {"requeued": 2, "calls": 1, "failed": 1,
                                                    "shed": 4}


def test_buckets_expire_15_minutes_and_a_day_later(r: redis.Redis, queue_name: str) -> None:
    q = registered(r, queue_name, "w1")
    q.settle([Op.ack(x) for x in fetch_n(q, 1, "a")])
    [second] = list(r.scan_iter(match=f"{queue_name}:history:s:*"))
    [minute] = list(r.scan_iter(match=f"{queue_name}:history:m:*"))
    assert 900 < r.ttl(second) <= SECOND_TTL_S
    assert 86400 < r.ttl(minute) <= MINUTE_TTL_S
    # a bucket is a small hash, not a growing structure
    assert r.object("encoding", second) in (b"listpack", b"ziplist")


def test_every_process_adds_into_the_same_buckets(r: redis.Redis, queue_name: str) -> None:
    one = registered(r, queue_name, "host-a:1:aa")
    two = registered(r, queue_name, "host-b:2:bb")
    one.settle([Op.ack(x) for x in fetch_n(one, 4, "a")])
    two.settle([Op.ack(x) for x in fetch_n(two, 5, "b")])
    series = read_series(r, one.keys, "24h")
    assert series["totals"]["delivered"] == 9
    assert len(series["points"]) == 1440
    assert series["points"][-1]["delivered"] > 0  # the minute in progress, pro rata


def test_read_series_gives_rates_per_second_and_percentiles(r: redis.Redis,
                                                            queue_name: str) -> None:
    q = registered(r, queue_name, "w1")
    got = fetch_n(q, 3, "a")
    before = redis_now(r)
    q.settle([Op.ack(x) for x in got], "calls=1 call:3=1 age:0=2 age:6=1")
    settled = redis_now(r)
    # The seconds window leaves out the second in progress: wait until it is over.
    wait_for(lambda: redis_now(r) >= int(settled) + 1, 5, "the next second on Redis's clock")
    series = read_series(r, q.keys, "15m")
    assert len(series["points"]) == 900 and series["step_s"] == 1
    busy = [p for p in series["points"] if p["delivered"]]
    assert [p["delivered"] for p in busy] == [3.0]
    assert int(before) <= busy[0]["t"] <= int(settled)
    assert busy[0]["call_p50"] == CALL_BUCKETS[3]
    assert busy[0]["age_p50"] == AGE_BUCKETS[0] and busy[0]["age_p99"] == AGE_BUCKETS[6]
    assert series["totals"]["delivered"] == 3 and series["totals"]["calls"] == 1
    idle = [p for p in series["points"] if not p["delivered"]]
    assert all(p["age_p50"] is None for p in idle)


def test_the_reader_keeps_past_buckets_and_rereads_the_newest(r: redis.Redis,
                                                              queue_name: str) -> None:
    q = registered(r, queue_name, "w1")
    reader = SeriesReader(r, q.keys)
    first = reader.read("15m")
    assert first["totals"]["delivered"] == 0
    # A past second cannot change (scripts count into Redis's present): it is not read again.
    past = first["points"][-10]["t"]
    r.hset(bucket_key(q.keys, WINDOWS["15m"], past), "delivered", 5)
    q.settle([Op.ack(x) for x in fetch_n(q, 2, "a")])
    settled = redis_now(r)
    wait_for(lambda: redis_now(r) >= int(settled) + 1, 5, "the next second on Redis's clock")
    again = reader.read("15m")
    assert again["totals"]["delivered"] == 2
    assert read_series(r, q.keys, "15m")["totals"]["delivered"] == 7  # afresh: all of it
