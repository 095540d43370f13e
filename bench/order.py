"""Per-channel order as a subscriber sees it: how many notifications arrive behind a later one.

1. Starts its own redis-server (never 6379) and the local Pusher-compatible server, whose
   event records are in arrival order (an event is recorded when its call is answered, after
   the server's delay, as a subscriber would receive it).
2. Pushes notifications over a few channels, each carrying its per-channel sequence number
   (an envelope over two channels carries one per channel), and runs one or two
   `python worker.py` processes on the queue: a drain of a preloaded backlog, or a paced
   producer at a steady rate.
3. Counts, per channel, the events that arrived after an event of the same channel with a
   higher sequence number ("behind"), and prints them beside the throughput and the
   workers' CPU, for each server delay: at once, random 0-20 ms a call, 50 ms a call.

Run: .venv/bin/python bench/order.py [--count 5000] [--scenarios drain,steady] [--procs 1,2]
     [--worker-dir DIR]   (another checkout, e.g. the code before ordering, for a baseline)
     [--repeats N --pairs] (ordering off and on, interleaved: medians and their ratio)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from measure import Child, CpuSampler, running  # noqa: E402

from relay.pusher_server import LocalPusher  # noqa: E402
from relay.redis_server import RedisServer  # noqa: E402

QUEUE = "notifications"
CHANNELS = 5
# Server answers: at once, after a random 0-20 ms (calls overtake each other), after 50 ms.
DELAYS = {"0ms": {}, "0-20ms": {"delay_range": [0, 0.02]}, "50ms": {"delay": 0.05}}
SERVER_LOG = REPO / "bench" / "results" / "order_server.log"
POLL_S = 0.05


@dataclass
class Run:
    scenario: str
    delay: str
    procs: int
    pushed: int
    delivered: int
    duplicates: int
    behind: int
    behind_pct: float
    inversions: int
    seconds: float
    per_s: float
    cpu_s: float
    cpu_ms_per_note: float
    requests: int
    ordering: str = ""  # --pairs: "on" or "off"


def count_behind(events: Iterable[Mapping[str, Any]]) -> int:
    """Events that arrived after a later-pushed event of their channel (data carries `s`)."""
    highest: dict[str, int] = {}
    behind = 0
    for event in events:
        channel = event["channel"]
        seq = json.loads(event["data"])["s"][channel]
        if seq < highest.get(channel, -1):
            behind += 1
        else:
            highest[channel] = seq
    return behind


def count_inversions(events: Iterable[Mapping[str, Any]]) -> int:
    """Events whose sequence number is lower than that of the event just before them on
    their channel (each arrival out of place counted once, however far it fell behind)."""
    previous: dict[str, int] = {}
    out = 0
    for event in events:
        channel = event["channel"]
        seq = json.loads(event["data"])["s"][channel]
        out += seq < previous.get(channel, -1)
        previous[channel] = seq
    return out


def notifications(count: int, envelope_share: float, channels: int = CHANNELS, seed: int = 12
                  ) -> Iterator[str]:
    """`count` notifications over `channels` channels, a share of them two-channel envelopes."""
    rng = random.Random(seed)
    seqs = [0] * channels
    for _ in range(count):
        picked = rng.sample(range(channels), 2 if rng.random() < envelope_share else 1)
        stamp = {}
        for c in picked:
            stamp[f"ch{c}"] = seqs[c]
            seqs[c] += 1
        if len(picked) == 1:
            yield json.dumps({"channel": f"ch{picked[0]}", "s": stamp, "t": time.time()})
        else:
            yield json.dumps({"relay": 1, "channels": list(stamp), "event": "hit",
                              "data": {"s": stamp, "t": time.time()}})


def events_of(pushed: Sequence[str]) -> int:
    """How many events (one per channel) the pushed notifications make."""
    return sum(len(json.loads(p).get("channels", [1])) for p in pushed)


class OrderBench:
    def __init__(self, args: argparse.Namespace, redis_server: RedisServer,
                 pusher: LocalPusher) -> None:
        self.args = args
        self.redis_server = redis_server
        self.pusher = pusher
        self.redis = redis.Redis.from_url(redis_server.url)

    @contextmanager
    def workers(self, procs: int, extra: Mapping[str, str]) -> Iterator[list[Child]]:
        env = {"REDIS_URL": self.redis_server.url, "PUSHER_URL": self.pusher.url,
               "RELAY_QUEUE": QUEUE, "RELAY_METRICS_ADDR": "off", "PYTHONUNBUFFERED": "1",
               "PATH": "/usr/bin:/bin", **dict(self.args.env), **extra}
        with ExitStack() as stack:
            yield [stack.enter_context(running(f"relay{i}", [sys.executable, "worker.py"], env,
                                               str(self.args.worker_dir)))
                   for i in range(procs)]

    def prepare(self, delay: str) -> None:
        self.redis.flushall()
        self.pusher.reset()
        if DELAYS[delay]:
            self.pusher.set_mode(**DELAYS[delay])

    def wait_for(self, children: list[Child], events: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.pusher.count()["events_total"] < events and time.monotonic() < deadline:
            for child in children:
                child.check_alive()
            time.sleep(POLL_S)

    def run(self, scenario: str, delay: str, procs: int, ordering: str = "") -> Run:
        self.prepare(delay)
        count = self.args.count
        items = list(notifications(count, self.args.envelopes, self.args.channels))
        if scenario == "drain":
            self.redis.rpush(QUEUE, *items)
        extra = {"RELAY_CHANNEL_ORDER": "true" if ordering == "on" else "false"} if ordering else {}
        with self.workers(procs, extra) as children:
            pids = {f"w{i}": c.pid for i, c in enumerate(children)}
            with CpuSampler(pids) as cpu:
                start = max(c.wait_ready() for c in children)
                if scenario == "steady":
                    self.produce(items, self.args.rate)
                self.wait_for(children, events_of(items), 60 + count / 50)
                time.sleep(0.3)  # duplicates, if any, arrive in the same breath
        events = self.pusher.events()
        end = max((e["received_at"] for e in events), default=start)
        cpu_s = sum(cpu.used(name, start, end) for name in pids)
        distinct = len({(e["channel"], e["data"]) for e in events})
        behind = count_behind(events)
        seconds = max(end - start, 1e-9)
        return Run(scenario, delay, procs, count, distinct, len(events) - distinct, behind,
                   100.0 * behind / max(len(events), 1), count_inversions(events), seconds,
                   distinct / seconds, cpu_s, 1000 * cpu_s / max(count, 1),
                   self.pusher.count()["requests_total"], ordering)

    def produce(self, items: Sequence[str], rate: float) -> None:
        began = time.perf_counter()
        for n, item in enumerate(items):
            wait = began + n / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            self.redis.rpush(QUEUE, item)


def describe(run: Run) -> str:
    label = f"ordering {run.ordering:<3} " if run.ordering else ""
    return (f"{label}{run.scenario:<6} {run.delay:<7} procs {run.procs}: "
            f"{run.delivered:>6,} events "
            f"(dup {run.duplicates}), behind {run.behind:>5,} ({run.behind_pct:5.2f} %), "
            f"inversions {run.inversions:>5,}, "
            f"{run.per_s:8,.0f}/s over {run.seconds:6.2f} s, CPU {run.cpu_s:6.2f} s "
            f"({run.cpu_ms_per_note:.3f} ms/notification), {run.requests:,} calls")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--channels", type=int, default=CHANNELS)
    parser.add_argument("--rate", type=float, default=200.0, help="steady: notifications/s")
    parser.add_argument("--envelopes", type=float, default=0.1,
                        help="share of two-channel envelopes")
    parser.add_argument("--scenarios", default="drain,steady")
    parser.add_argument("--delays", default=",".join(DELAYS))
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--pairs", action="store_true",
                        help="each run twice, ordering off then on (RELAY_CHANNEL_ORDER), "
                             "interleaved; medians of each and their ratio")
    parser.add_argument("--worker-dir", type=Path, default=REPO,
                        help="the checkout whose worker.py runs (default: this one)")
    parser.add_argument("--env", action="append", default=[], type=lambda s: s.split("=", 1),
                        help="extra NAME=VALUE for the workers (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    return parser.parse_args(argv)


def print_medians(results: Sequence[Run]) -> None:
    print("medians:")
    keys = sorted({(r.scenario, r.delay, r.procs, r.ordering) for r in results})
    rate: dict[tuple[str, str, int, str], float] = {}
    for key in keys:
        same = [r for r in results if (r.scenario, r.delay, r.procs, r.ordering) == key]
        rate[key] = statistics.median(r.per_s for r in same)
        print(f"  {key}: behind {statistics.median(r.behind for r in same):,.0f}, "
              f"{rate[key]:,.0f}/s, "
              f"{statistics.median(r.cpu_ms_per_note for r in same):.3f} ms CPU/notification, "
              f"{statistics.median(r.requests for r in same):,.0f} calls")
    for scenario, delay, procs, ordering in keys:
        if ordering == "on":
            off = rate[(scenario, delay, procs, "off")]
            print(f"  {scenario} {delay} procs {procs}: ordering on / off = "
                  f"{100 * rate[(scenario, delay, procs, 'on')] / off:.0f} %")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    SERVER_LOG.parent.mkdir(parents=True, exist_ok=True)
    results: list[Run] = []
    with RedisServer() as redis_server, LocalPusher(stderr=SERVER_LOG) as pusher:
        bench = OrderBench(args, redis_server, pusher)
        for scenario in args.scenarios.split(","):
            for delay in args.delays.split(","):
                for procs in (int(p) for p in args.procs.split(",")):
                    for _ in range(args.repeats):
                        for ordering in ("off", "on") if args.pairs else ("",):
                            run = bench.run(scenario, delay, procs, ordering)
                            print(describe(run), flush=True)
                            results.append(run)
    if args.repeats > 1 or args.pairs:
        print_medians(results)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
