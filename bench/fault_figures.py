"""Figures for two outages (a script, not a test): Pusher answering 503 for 10 s, and
redis-server killed and restarted mid-drain. For each: notifications lost (must be 0),
duplicates, calls made during the outage, and time from recovery to drained.

    .venv/bin/python bench/fault_figures.py [--count 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.pusher_server import LocalPusher  # noqa: E402
from relay.redis_server import RedisServer  # noqa: E402

QUEUE = "notifications"


def wait(cond: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def start_worker(redis_url: str, pusher: LocalPusher, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": redis_url, "PUSHER_URL": pusher.url,
           "RELAY_METRICS_ADDR": "off", "RELAY_POOL_SIZE": "50"}
    out = open(log, "wb")  # noqa: SIM115 - lives as long as the child
    proc = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT)
    wait(lambda: "started:" in log.read_text(errors="replace"), 30, "the worker to start")
    return proc


def preload(client: redis.Redis, count: int) -> None:
    client.rpush(QUEUE, *[json.dumps({"channel": "c", "n": i}) for i in range(count)])


def tally(pusher: LocalPusher, client: redis.Redis, count: int) -> dict[str, Any]:
    counts = Counter(json.loads(e["data"])["n"] for e in pusher.events())
    return {"lost": count - len(counts), "duplicates": sum(c - 1 for c in counts.values()),
            "dead": client.llen(f"{QUEUE}:dead"), "left_in_queue": client.llen(QUEUE)}


def drained(pusher: LocalPusher, count: int) -> bool:
    return pusher.count()["events_total"] >= count and len(
        {json.loads(e["data"])["n"] for e in pusher.events()}) == count


def finish(proc: subprocess.Popen[bytes], pusher: LocalPusher, client: redis.Redis,
           count: int, during: int) -> dict[str, Any]:
    """From the moment the outage ended: time to drained, then the tally; stop the worker."""
    recovered = time.monotonic()
    wait(lambda: drained(pusher, count), 300, "the drain after recovery")
    figures = {"calls_during_outage": during,
               "recovery_to_drained_s": round(time.monotonic() - recovered, 2),
               **tally(pusher, client, count)}
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return figures


def outage_503(count: int, tmp: Path) -> dict[str, Any]:
    with RedisServer() as rs, LocalPusher(stderr=subprocess.DEVNULL) as pusher:
        client = redis.Redis.from_url(rs.url)
        pusher.set_mode(delay=0.02)
        preload(client, count)
        proc = start_worker(rs.url, pusher, tmp / "w503.log")
        wait(lambda: pusher.count()["events_total"] >= count // 5, 60, "the drain")
        before = pusher.count()["requests_total"]
        pusher.set_mode(status=503)
        time.sleep(10)  # the outage itself: this is a figure, not a test
        during = pusher.count()["requests_total"] - before
        pusher.set_mode()
        return finish(proc, pusher, client, count, during)


def redis_restart(count: int, tmp: Path) -> dict[str, Any]:
    with RedisServer(appendonly=True) as rs, LocalPusher(stderr=subprocess.DEVNULL) as pusher:
        client = redis.Redis.from_url(rs.url)
        pusher.set_mode(delay=0.02)
        preload(client, count)
        log = tmp / "wredis.log"
        proc = start_worker(rs.url, pusher, log)
        wait(lambda: pusher.count()["events_total"] >= count // 5, 60, "the drain")
        before = pusher.count()["requests_total"]
        rs.kill()
        wait(lambda: "Redis unreachable" in log.read_text(errors="replace"), 30,
             "the worker to notice")
        time.sleep(3)  # keep Redis down a while
        during = pusher.count()["requests_total"] - before
        rs.start()
        return finish(proc, pusher, redis.Redis.from_url(rs.url), count, during)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    tmp = ROOT / "bench" / "results"
    tmp.mkdir(parents=True, exist_ok=True)
    for name, scenario in (("pusher 503 for 10 s", outage_503),
                           ("redis-server killed, down 3 s, restarted", redis_restart)):
        figures = scenario(args.count, tmp)
        print(f"{name} ({args.count} notifications, 50 greenlets, 20 ms a call):")
        for key, value in figures.items():
            print(f"  {key:24} {value}")


if __name__ == "__main__":
    main()
