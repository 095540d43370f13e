"""Benchmark: relay against the naive gevent loop, measured from the outside.

1. Starts its own throwaway redis-server and local Pusher-compatible server (never the Redis on
   6379), then for each scenario runs `python worker.py` or `bench/naive.py` as a child.
2. Times from the child's ready line ("started:" on stderr) to the server's arrival time of
   the last event (plus the server's delay, when the call really ends); CPU comes from
   /proc/PID/stat sampled every 20 ms, so it is read at that instant, not when the bench
   noticed; peak RSS is VmHWM. The local server's and Redis's CPU are reported too, so a
   saturated server shows up instead of passing for a slow worker.
3. Scenarios: drain0, drain50 (server answers after 50 ms), steady (500/s paced producer,
   latency = arrival - push time), ratelimit (two relays sharing RELAY_RATE_LIMIT=200,
   averaged over the 20 s from the first event), rss100k (relay draining 100,000),
   transport (relay's drain0 with PUSHER_HTTP_CLIENT=requests vs the default urllib3) and
   metrics (relay with the metrics endpoint on vs off); the last two interleave their
   repeats and report medians.
4. Prints a table, the ratios against the naive loop and the bars of issues 2, 4 and 5, and
   writes everything to bench/results/latest.json.

Run: .venv/bin/python bench/bench.py [--quick] [--scenarios drain0,steady] [--count N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import everyday  # noqa: E402
import report  # noqa: E402
from measure import (  # noqa: E402
    Child,
    ChildFailed,
    CpuSampler,
    busiest_second,
    event_data,
    peak_rss_mb,
    per_second,
    percentile,
    running,
)

from relay.pusher_server import LocalPusher  # noqa: E402
from relay.redis_server import RedisServer  # noqa: E402

QUEUE = "notifications"
SCENARIOS = ("drain0", "drain50", "steady", "ratelimit", "rss100k", "transport", "metrics",
             "everyday")
DEFAULT_SCENARIOS = SCENARIOS[:-1]  # everyday (issue 11) takes ~4 min per variant: on demand
SERVER_DELAY_S = 0.05
STEADY_RATE_PER_S = 500
SATURATED_AFTER_S = 1.0
RATE_LIMIT_PER_S = 200
RATE_BACKLOG = 10_000
PRELOAD_CHUNK = 1_000
QUEUE_POLL_S = 0.05  # LLEN is cheap: poll it while the backlog lasts
COUNT_POLL_S = 0.05  # so is the server's count endpoint, for the events still in flight
FIRST_EVENT_TIMEOUT_S = 30.0
TRANSPORTS = report.TRANSPORTS  # PUSHER_HTTP_CLIENT values the transport scenario compares
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
SERVER_LOG = RESULTS.parent / "pusher_server.log"


@dataclass(frozen=True)
class Plan:
    scenarios: tuple[str, ...]
    count: int
    pool: int
    rss_count: int
    steady_s: float
    rate_window_s: float
    metrics_repeats: int
    steady_rate: int
    transport_repeats: int
    everyday_variants: tuple[str, ...] = everyday.DEFAULT_VARIANTS
    everyday_repeats: int = 3
    everyday_s: float = 20.0  # each steady rate, and the idle window
    everyday_probes: int = everyday.QUIET_PROBES
    relay_env: tuple[tuple[str, str], ...] = ()  # --relay-env: for every relay child

    def timeout_s(self, count: int) -> float:
        return 60.0 + count / 100  # 100 events/s is far below anything worth measuring


@dataclass
class Drain:
    who: str
    delay_ms: float
    count: int
    delivered: int  # distinct notifications that reached the server
    duplicates: int
    complete: bool
    drain_s: float
    events_per_s: float
    cpu_s: float
    cpu_per_10k: float
    peak_rss_mb: float
    server_cpu_s: float
    server_core_share: float  # server CPU seconds per wall second: near 1.0 = saturated
    redis_cpu_s: float
    other_cores: float  # CPU used meanwhile by processes outside the bench, in cores
    requests: int


class Bench:
    """Owns the servers and runs one child at a time against them."""

    def __init__(self, plan: Plan, redis_server: RedisServer, pusher: LocalPusher) -> None:
        self.plan = plan
        self.redis_server = redis_server
        self.pusher = pusher
        self.redis = redis.Redis.from_url(redis_server.url)
        # The server's CPU is what tells us who is the bottleneck.
        self.server_pids = {"server": pusher.pid,
                            "redis": redis_server.proc.pid}  # type: ignore[union-attr]

    # -- set-up ------------------------------------------------------------------------------

    def prepare(self, delay_s: float = 0.0) -> None:
        self.redis.flushall()
        self.pusher.reset()
        if delay_s:
            self.pusher.set_mode(delay=delay_s)

    def preload(self, count: int) -> None:
        for start in range(0, count, PRELOAD_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for n in range(start, min(count, start + PRELOAD_CHUNK)):
                pipe.rpush(QUEUE, json.dumps({"channel": "bench", "n": n, "t": time.time()}))
            pipe.execute()

    def child_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RELAY_", "PUSHER_")) and k != "REDIS_URL"}
        env.update(REDIS_URL=self.redis_server.url, PUSHER_URL=self.pusher.url,
                   PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    @contextmanager
    def child(self, who: str, extra_env: Mapping[str, str] | None = None) -> Iterator[Child]:
        if who == "naive":
            command = [sys.executable, "bench/naive.py", "--queue", QUEUE,
                       "--pool", str(self.plan.pool), "--idle-exit", "60"]
            env = self.child_env(extra_env or {})
        else:
            command = [sys.executable, "worker.py"]
            env = self.child_env({"RELAY_QUEUE": QUEUE, "RELAY_POOL_SIZE": str(self.plan.pool),
                                  "RELAY_METRICS_ADDR": "off", "RELAY_LOG_LEVEL": "info",
                                  **dict(self.plan.relay_env), **(extra_env or {})})
        with running(who, command, env, str(REPO)) as child:
            yield child

    def sampler(self, *children: Child) -> CpuSampler:
        return CpuSampler({**self.server_pids, **{f"child{i}": c.pid
                                                  for i, c in enumerate(children)}})

    # -- waiting -----------------------------------------------------------------------------

    def wait_for_events(self, child: Child, count: int, timeout_s: float) -> bool:
        """True once the server recorded `count` events; False at the deadline."""
        deadline = time.monotonic() + timeout_s
        while self.redis.llen(QUEUE) > 0 and time.monotonic() < deadline:
            child.check_alive()
            time.sleep(QUEUE_POLL_S)
        while time.monotonic() < deadline:
            if self.pusher.count()["events_total"] >= count:
                return True
            child.check_alive()
            time.sleep(COUNT_POLL_S)
        return False

    def first_event_at(self, children: list[Child]) -> float:
        """The server's arrival time of the first event (the count is polled until there is one)."""
        deadline = time.monotonic() + FIRST_EVENT_TIMEOUT_S
        while self.pusher.count()["events_total"] == 0:
            if time.monotonic() >= deadline:
                raise ChildFailed(f"no event reached the server in {FIRST_EVENT_TIMEOUT_S:.0f} s")
            for child in children:
                child.check_alive()
            time.sleep(0.01)
        return min(e["received_at"] for e in self.pusher.events())

    # -- scenarios ---------------------------------------------------------------------------

    def drain(self, who: str, count: int, delay_s: float = 0.0,
              extra_env: Mapping[str, str] | None = None) -> Drain:
        self.prepare(delay_s)
        self.preload(count)
        with self.child(who, extra_env) as child, self.sampler(child) as cpu:
            ready_at = child.wait_ready()
            complete = self.wait_for_events(child, count, self.plan.timeout_s(count))
            rss = peak_rss_mb(child.pid)
        events = self.pusher.events()
        requests_total = self.pusher.count()["requests_total"]
        end = max((e["received_at"] for e in events), default=ready_at) + delay_s
        return drain_result(who, count, delay_s, events, requests_total, complete,
                            ready_at, end, cpu, rss)

    def steady(self, who: str) -> dict[str, Any]:
        self.prepare()
        with self.child(who) as child, self.sampler(child) as cpu:
            ready_at = child.wait_ready()
            pushed, late_ms = self.produce(self.plan.steady_rate, self.plan.steady_s)
            produced_at = time.time()
            complete = self.wait_for_events(child, pushed, self.plan.timeout_s(pushed))
        events = self.pusher.events()
        arrivals = [e["received_at"] for e in events]
        latencies = sorted((e["received_at"] - d["t"]) * 1000
                           for e, d in zip(events, event_data(events), strict=True))
        last = max(arrivals, default=produced_at)
        return {"who": who, "pushed": pushed, "delivered": len(events), "complete": complete,
                "rate_per_s": self.plan.steady_rate, "seconds": self.plan.steady_s,
                # still delivering a second after the producer stopped: it fell behind
                "saturated": last - produced_at > SATURATED_AFTER_S,
                "producer_max_late_ms": late_ms,
                "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                "max_ms": latencies[-1] if latencies else float("nan"),
                "catch_up_s": max(0.0, last - produced_at),
                "cpu_s": cpu.used("child0", ready_at, last),
                "server_cpu_s": cpu.used("server", ready_at, last),
                "redis_cpu_s": cpu.used("redis", ready_at, last),
                "other_cores": cpu.others(ready_at, last) / max(last - ready_at, 1e-9)}

    def produce(self, rate_per_s: float, seconds: float) -> tuple[int, float]:
        """Push one notification every 1/rate s, paced on perf_counter; returns (n, max lag)."""
        total, late = int(rate_per_s * seconds), 0.0
        start = time.perf_counter()
        for n in range(total):
            due = start + n / rate_per_s
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            late = max(late, time.perf_counter() - due)
            self.redis.rpush(QUEUE, json.dumps({"channel": "bench", "n": n, "t": time.time()}))
        return total, late * 1000

    def ratelimit(self) -> dict[str, Any]:
        """The issue's bar: 180-210/s on average over 20 s, counted from the first event.

        The window is [first arrival, first arrival + window) at the server, so the burst
        allowed at the start is inside it; the steady state (from the second second on) is
        reported beside it. The backlog outlasts the window, so both relays stay busy.
        """
        self.prepare()
        self.preload(RATE_BACKLOG)
        env = {"RELAY_RATE_LIMIT": str(RATE_LIMIT_PER_S)}
        window = self.plan.rate_window_s
        with ExitStack() as stack:
            children = [stack.enter_context(self.child("relay", env)) for _ in range(2)]
            cpu = stack.enter_context(self.sampler(*children))
            ready = max(c.wait_ready() for c in children)
            start = self.first_event_at(children)
            end = start + window
            time.sleep(max(0.0, end - time.time()) + 0.1)  # arrivals are stamped on receipt
            left = self.redis.llen(QUEUE)
            for child in children:
                child.check_alive()
        times = [e["received_at"] for e in self.pusher.events()]
        in_window = [t for t in times if start <= t < end]
        after_first = [t for t in in_window if t >= start + 1.0]
        return {"workers": 2, "limit": RATE_LIMIT_PER_S, "burst": RATE_LIMIT_PER_S,
                "window_s": window, "first_event_after_ready_s": start - ready,
                "delivered_total": len(times), "delivered_in_window": len(in_window),
                "average_per_s": len(in_window) / window,
                "average_after_first_s_per_s": len(after_first) / (window - 1.0),
                "busiest_second": busiest_second(times),
                "per_second": per_second(times, start, end), "backlog_left": left,
                "cpu_s": [cpu.used(f"child{i}", start, end) for i in range(2)],
                "redis_cpu_s": cpu.used("redis", start, end),
                "other_cores": cpu.others(start, end) / window}


def drain_result(who: str, count: int, delay_s: float, events: list[dict[str, Any]],
                 requests_total: int, complete: bool, ready_at: float, end: float,
                 cpu: CpuSampler, rss: float) -> Drain:
    numbers = [d["n"] for d in event_data(events)]
    distinct = len(set(numbers))
    elapsed = max(end - ready_at, 1e-9)
    cpu_s = cpu.used("child0", ready_at, end)
    server_cpu = cpu.used("server", ready_at, end)
    return Drain(who=who, delay_ms=delay_s * 1000, count=count, delivered=distinct,
                 duplicates=len(numbers) - distinct, complete=complete and distinct >= count,
                 drain_s=elapsed, events_per_s=distinct / elapsed, cpu_s=cpu_s,
                 cpu_per_10k=cpu_s / max(distinct, 1) * 10_000, peak_rss_mb=rss,
                 server_cpu_s=server_cpu, server_core_share=server_cpu / elapsed,
                 redis_cpu_s=cpu.used("redis", ready_at, end),
                 other_cores=cpu.others(ready_at, end) / elapsed, requests=requests_total)


# -- scenario runners: each returns the JSON-able result of one scenario ------------------------

def describe(run: Drain) -> str:
    flag = "" if run.complete else f"  INCOMPLETE ({run.delivered}/{run.count})"
    return (f"  {run.who:<6} {run.delivered:>7,} events in {run.drain_s:7.2f} s = "
            f"{run.events_per_s:8,.0f}/s  CPU {run.cpu_s:6.2f} s ({run.cpu_per_10k:5.2f} s/10k)"
            f"  RSS {run.peak_rss_mb:5.1f} MB  server CPU {run.server_core_share:.2f}/s"
            f"  requests {run.requests:,}  others {run.other_cores:.2f} cores{flag}")


def run_pair(bench: Bench, delay_s: float) -> dict[str, Any]:
    out = {}
    for who in ("naive", "relay"):
        run = bench.drain(who, bench.plan.count, delay_s)
        print(describe(run), flush=True)
        out[who] = asdict(run)
    return out


def run_steady(bench: Bench) -> dict[str, Any]:
    out = {}
    for who in ("naive", "relay"):
        r = bench.steady(who)
        print(f"  {who:<6} {r['delivered']:,}/{r['pushed']:,} at {r['rate_per_s']}/s: "
              f"p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  max {r['max_ms']:.1f} ms  "
              f"catch-up {r['catch_up_s']:.1f} s  CPU {r['cpu_s']:.2f} s  "
              f"(producer max lag {r['producer_max_late_ms']:.1f} ms, "
              f"others {r['other_cores']:.2f} cores)"
              + ("  SATURATED: fell behind the producer" if r["saturated"] else ""), flush=True)
        out[who] = r
    return out


def run_ratelimit(bench: Bench) -> dict[str, Any]:
    r = bench.ratelimit()
    print(f"  2 relays, RELAY_RATE_LIMIT={r['limit']}: {r['delivered_in_window']:,} events in "
          f"the {r['window_s']:.0f} s from the first event = {r['average_per_s']:.1f}/s, "
          f"busiest 1 s window {r['busiest_second']}, backlog left {r['backlog_left']:,}",
          flush=True)
    print(f"  steady state (after the first second): "
          f"{r['average_after_first_s_per_s']:.1f}/s; relay CPU "
          f"{' + '.join(f'{c:.2f}' for c in r['cpu_s'])} s; Redis CPU {r['redis_cpu_s']:.2f} s; "
          f"others {r['other_cores']:.2f} cores",
          flush=True)
    print(f"  per second: {r['per_second']}", flush=True)
    return r


def run_rss(bench: Bench) -> dict[str, Any]:
    run = bench.drain("relay", bench.plan.rss_count)
    print(describe(run), flush=True)
    return {"relay": asdict(run)}


def interleaved(bench: Bench, name: str, variants: Mapping[str, Mapping[str, str]],
                repeats: int) -> dict[str, Any]:
    """Relay drain0 runs of each variant (extra env), interleaved A B, B A, A B, ... so that
    drift on the machine hits every side alike; medians of events/s and CPU s/10k per side."""
    labels = list(variants)
    out: dict[str, Any] = {label: [] for label in labels}
    for i in range(repeats):
        for label in labels if i % 2 == 0 else labels[::-1]:
            run = bench.drain("relay", bench.plan.count, extra_env=variants[label])
            print(f"  {name} {label:<8} #{i + 1}" + describe(run)[8:], flush=True)
            out[label].append(asdict(run))
    for label in labels:
        for field in ("events_per_s", "cpu_per_10k"):
            out[f"{label}_{field}"] = statistics.median(r[field] for r in out[label])
        print(f"  {name} {label:<8} median of {repeats}: {out[f'{label}_events_per_s']:,.0f}"
              f" events/s, {out[f'{label}_cpu_per_10k']:.2f} CPU s/10k", flush=True)
    return out


def run_transport(bench: Bench) -> dict[str, Any]:
    return interleaved(bench, "transport",
                       {t: {"PUSHER_HTTP_CLIENT": t} for t in TRANSPORTS},
                       bench.plan.transport_repeats)


def run_everyday(bench: Bench) -> dict[str, Any]:
    plan = bench.plan
    return everyday.run(bench, plan.everyday_variants, plan.everyday_repeats, plan.everyday_s,
                        plan.everyday_s, plan.everyday_probes)


def run_metrics(bench: Bench) -> dict[str, Any]:
    out = interleaved(bench, "metrics",
                      {"off": {"RELAY_METRICS_ADDR": "off"},
                       "on": {"RELAY_METRICS_ADDR": "127.0.0.1:0"}},
                      bench.plan.metrics_repeats)
    pairs = [on["cpu_per_10k"] / off["cpu_per_10k"]
             for on, off in zip(out["on"], out["off"], strict=True)]
    out["pair_ratios"] = pairs
    print(f"  metrics on/off CPU s/10k: ratio of medians "
          f"{out['on_cpu_per_10k'] / out['off_cpu_per_10k']:.3f}, median of the per-repeat "
          f"ratios {statistics.median(pairs):.3f} ({', '.join(f'{p:.3f}' for p in pairs)})",
          flush=True)
    return out


RUNNERS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "drain0": lambda b: run_pair(b, 0.0),
    "drain50": lambda b: run_pair(b, SERVER_DELAY_S),
    "steady": run_steady,
    "ratelimit": run_ratelimit,
    "rss100k": run_rss,
    "transport": run_transport,
    "metrics": run_metrics,
    "everyday": run_everyday,
}


# -- command line -------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=None,
                        help="notifications per drain run (default 20000, 3000 with --quick)")
    parser.add_argument("--pool", type=int, default=50, help="greenlets in both workers")
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                        help=f"comma list out of {','.join(SCENARIOS)} (default: all but "
                             "everyday)")
    parser.add_argument("--everyday-variants", default=",".join(everyday.DEFAULT_VARIANTS),
                        help=f"comma list out of {','.join(everyday.VARIANTS)}")
    parser.add_argument("--everyday-repeats", type=int, default=None,
                        help="interleaved repeats of the everyday scenario (default 3, 1 with "
                             "--quick)")
    parser.add_argument("--steady-rate", type=int, default=STEADY_RATE_PER_S,
                        help="notifications per second in the steady scenario")
    parser.add_argument("--quick", action="store_true", help="smaller counts: a smoke run")
    parser.add_argument("--relay-env", action="append", default=[], metavar="NAME=VALUE",
                        type=lambda text: tuple(text.split("=", 1)),
                        help="a setting for every relay child of the drain, steady and rate "
                             "scenarios, e.g. RELAY_CHANNEL_ORDER=false (repeatable)")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    unknown = set(args.everyday_variants.split(",")) - set(everyday.VARIANTS)
    if unknown:
        parser.error(f"unknown everyday variants: {', '.join(sorted(unknown))}")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    chosen = tuple(s for s in SCENARIOS if s in args.scenarios.split(","))
    variants = tuple(args.everyday_variants.split(","))
    relay_env = tuple(args.relay_env)
    if args.quick:
        return Plan(chosen, args.count or 3_000, args.pool, 20_000, 10.0, 10.0, 1,
                    args.steady_rate, 1, variants, args.everyday_repeats or 1, 5.0, 2, relay_env)
    return Plan(chosen, args.count or 20_000, args.pool, 100_000, 20.0, 20.0, 5, args.steady_rate,
                3, variants, args.everyday_repeats or 3, relay_env=relay_env)


@contextmanager
def local_pusher() -> Iterator[LocalPusher]:
    """The local server logs every mode change on stderr: keep that out of the report."""
    SERVER_LOG.parent.mkdir(parents=True, exist_ok=True)
    with LocalPusher(stderr=SERVER_LOG) as pusher:
        yield pusher


def run_all(plan: Plan) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with RedisServer() as redis_server, local_pusher() as pusher:
        bench = Bench(plan, redis_server, pusher)
        for name in plan.scenarios:
            print(f"== {name}", flush=True)
            started = time.monotonic()
            try:
                results[name] = RUNNERS[name](bench)
            except ChildFailed as exc:
                print(f"  FAILED: {exc}", flush=True)
                results[name] = {"error": str(exc)}
            print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so every child and server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = make_plan(parse_args(argv))
    began = time.time()
    results = run_all(plan)
    checked = report.verdicts(results)
    print(report.render(results, checked))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {"plan": asdict(plan), "started_at": began, "took_s": time.time() - began,
                "python": sys.version.split()[0], "cpus": os.cpu_count(),
                "results": results, "verdicts": checked}
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(REPO)} ({time.time() - began:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
