"""Everyday rates: relay beside the seed's EventMachine script, in one run, interleaved.

A web app's normal traffic is a trickle, not a backlog (issue 11), so this measures what a
trickle costs, always from outside the child:

1. One child per variant and repeat (the seed's `seed_em.rb`, relay as it was, relay with
   other transports/parsers), each going through four phases against the same Redis and
   local Pusher-compatible server: steady 100/s, steady 500/s (20 s each), idle (20 s, empty
   queue, defaults) and the first notification after a quiet spell (one push after 2 s of
   silence, a few times).
2. CPU is the child's own utime + stime (/proc, sampled by `measure.CpuSampler`), from the
   start of a phase to the server's arrival time of its last event. Latency is the server's
   arrival time minus the push time carried in the data.
3. Redis round trips are the top-level commands the child sent, read from MONITOR by a
   thread: lines marked `lua` are a script's own calls and are not round trips; the
   bench's own connections (named `bench`) are left out by address.
4. Variants run interleaved (A B C, C B A, A B C, ...) so that drift on a shared machine
   hits every side alike; the table shows medians over the repeats.

Run: .venv/bin/python bench/bench.py --scenarios everyday [--quick]
     [--everyday-variants seed,relay-baseline,relay] [--everyday-repeats 3]
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from measure import Child, ChildFailed, CpuSampler, event_data, percentile, running

REPO = Path(__file__).resolve().parent.parent
QUEUE = "notifications"
SEED_SCRIPT = Path(os.environ.get("SEED_SCRIPT", "/work/shared/peers/seed_em.rb"))
BENCH_CLIENT = "bench"  # CLIENT SETNAME of the bench's own connections: not counted
RATES = (100, 500)
QUIET_S = 2.0
QUIET_PROBES = 5
SETTLE_S = 1.0  # after the child is ready and blocked, before a phase starts
POLL_S = 0.01
DONE_TIMEOUT_S = 30.0
NEVER = "\0"  # the seed prints no ready line: readiness is its blocked pop

# Runs a worker with redis-py's pure-Python parser, as if hiredis were not installed:
# redis-py picks its parser when it is imported, from whether `import hiredis` works.
WITHOUT_HIREDIS = ("import runpy, sys; sys.modules['hiredis'] = None; "
                   "runpy.run_path('worker.py', run_name='__main__')")


# A variant's OTEL_EXPORTER_OTLP_ENDPOINT: the bench's own OTLP receiver (tests/otlp_receiver.py,
# started in this process at first use, so its CPU is not the child's).
OTLP = "{otlp}"


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "seed", "relay" or "floor"
    env: Mapping[str, str] = field(default_factory=dict)
    hiredis: bool = True
    about: str = ""


VARIANTS = {v.name: v for v in (
    Variant("seed", "seed", about="the 2011 EventMachine script (bench: ../shared/peers)"),
    Variant("relay-baseline", "relay", {"PUSHER_HTTP_CLIENT": "urllib3"}, hiredis=False,
            about="today's transport and parser: urllib3, redis-py's Python parser"),
    Variant("relay-hiredis", "relay", {"PUSHER_HTTP_CLIENT": "urllib3"},
            about="urllib3 with hiredis"),
    Variant("relay-ghc", "relay", {"PUSHER_HTTP_CLIENT": "geventhttpclient"}, hiredis=False,
            about="geventhttpclient, redis-py's Python parser"),
    Variant("relay-ghc-hiredis", "relay", {"PUSHER_HTTP_CLIENT": "geventhttpclient"},
            about="geventhttpclient with hiredis"),
    Variant("relay", "relay", about="relay's defaults with requirements.txt installed"),
    Variant("relay-unordered", "relay", {"RELAY_CHANNEL_ORDER": "false"},
            about="relay's defaults but RELAY_CHANNEL_ORDER=false"),
    Variant("relay-linger5", "relay", {"RELAY_LINGER": "0.005"},
            about="relay's defaults with RELAY_LINGER=0.005 (5 ms)"),
    Variant("relay-linger20", "relay", {"RELAY_LINGER": "0.02"},
            about="relay's defaults with RELAY_LINGER=0.02 (20 ms)"),
    Variant("relay-traced", "relay", {"OTEL_EXPORTER_OTLP_ENDPOINT": OTLP},
            about="relay's defaults, tracing on (every call sampled) to a local OTLP receiver"),
    Variant("relay-traced-1pct", "relay", {"OTEL_EXPORTER_OTLP_ENDPOINT": OTLP,
                                           "OTEL_TRACES_SAMPLER": "traceidratio",
                                           "OTEL_TRACES_SAMPLER_ARG": "0.01"},
            about="relay's defaults, tracing on, 1 % of calls sampled"),
    Variant("floor", "floor", about="bench/floor.py: one greenlet, BLMOVE + sign + POST + "
            "ack, on relay's stack; the least a reliable relay in Python does"),
    Variant("floor-noack", "floor", {"FLOOR_ARGS": "--no-ack"},
            about="bench/floor.py --no-ack: BLPOP + sign + POST, the seed's own work"),
)}
DEFAULT_VARIANTS = ("seed", "relay-baseline", "relay")


# -- Redis round trips ------------------------------------------------------------------------

class RoundTrips:
    """Every top-level command Redis receives, with its time and client address (MONITOR).

    A thread reads the raw MONITOR stream: `+1764170000.123456 [0 127.0.0.1:5555] "blmove" ...`;
    `[0 lua]` lines are commands a script ran inside Redis, not round trips.
    """

    def __init__(self, host: str, port: int) -> None:
        self.entries: list[tuple[float, str]] = []
        self._sock = socket.create_connection((host, port))
        self._sock.sendall(b"MONITOR\r\n")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self._sock.makefile("rb") as stream:
            try:
                for line in stream:
                    self._note(line)
            except OSError:
                pass  # closed by close()

    def _note(self, line: bytes) -> None:
        if not line.startswith(b"+") or b" [" not in line:
            return  # +OK
        stamp, rest = line[1:].split(b" ", 1)
        who = rest[1:rest.index(b"]")].split(b" ", 1)[-1]
        if who != b"lua":
            self.entries.append((float(stamp), who.decode()))

    def count(self, start: float, end: float, exclude: set[str]) -> int:
        return sum(1 for t, who in self.entries if start <= t < end and who not in exclude)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)


def bench_addresses(client: redis.Redis) -> set[str]:
    return {c["addr"] for c in client.client_list() if c.get("name") == BENCH_CLIENT}


# -- one child through the four phases ----------------------------------------------------------

@dataclass
class Phases:
    steady: dict[int, dict[str, float]] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)
    quiet: dict[str, float] = field(default_factory=dict)


class Everyday:
    def __init__(self, bench: Any, steady_s: float, idle_s: float, probes: int) -> None:
        self.bench = bench
        self.pusher = bench.pusher
        self.steady_s, self.idle_s, self.probes = steady_s, idle_s, probes
        self.redis = redis.Redis.from_url(bench.redis_server.url, client_name=BENCH_CLIENT)
        address = urlsplit(bench.redis_server.url)
        self.redis_at = (address.hostname or "127.0.0.1", address.port or 6379)
        self.receiver: Any = None

    def otlp_endpoint(self) -> str:
        if self.receiver is None:
            sys.path.insert(0, str(REPO))
            from tests.otlp_receiver import OtlpReceiver  # needs requirements-test.txt

            self.receiver = OtlpReceiver().__enter__()  # lives as long as the bench
        return str(self.receiver.endpoint)

    # -- children -----------------------------------------------------------------------------

    @contextmanager
    def child(self, variant: Variant) -> Iterator[Child]:
        if variant.kind == "seed":
            target = urlsplit(self.pusher.url)
            env = self.bench.child_env({
                "REDIS_LIST": QUEUE, "PUSHER_APP_ID": target.path.rsplit("/", 1)[1],
                "PUSHER_KEY": target.username or "", "PUSHER_SECRET": target.password or "",
                "PUSHER_HOST": target.hostname or "", "PUSHER_PORT": str(target.port)})
            command = [shutil.which("ruby") or "ruby", str(SEED_SCRIPT)]
            marker = NEVER
        elif variant.kind == "floor":
            env = self.bench.child_env({"RELAY_QUEUE": QUEUE})
            command = [sys.executable, "bench/floor.py", *variant.env.get("FLOOR_ARGS", "").split()]
            marker = "started:"
        else:
            extra = {k: self.otlp_endpoint() if v == OTLP else v for k, v in variant.env.items()}
            env = self.bench.child_env({"RELAY_QUEUE": QUEUE, "RELAY_METRICS_ADDR": "off",
                                        **extra})
            command = [sys.executable, "worker.py"] if variant.hiredis else \
                [sys.executable, "-c", WITHOUT_HIREDIS]
            marker = "started:"
        with running(variant.name, command, env, str(REPO), ready_marker=marker) as child:
            if marker != NEVER:
                child.wait_ready()
            self.wait_blocked(child)
            time.sleep(SETTLE_S)
            yield child

    def wait_blocked(self, child: Child) -> None:
        """Ready means at least one of its connections waits in a blocking pop."""
        deadline = time.monotonic() + DONE_TIMEOUT_S
        while int(self.redis.info("clients")["blocked_clients"]) < 1:
            child.check_alive()
            if time.monotonic() > deadline:
                raise ChildFailed(f"{child.name} never blocked on the queue")
            time.sleep(POLL_S)

    def wait_for(self, child: Child, count: int) -> None:
        deadline = time.monotonic() + DONE_TIMEOUT_S
        while self.pusher.count()["events_total"] < count:
            child.check_alive()
            if time.monotonic() > deadline:
                raise ChildFailed(f"{child.name}: only {self.pusher.count()} of {count} "
                                  f"events arrived")
            time.sleep(POLL_S * 5)

    def push(self, n: int) -> None:
        self.redis.rpush(QUEUE, json.dumps({"channel": "bench", "n": n, "t": time.time()}))

    # -- phases -------------------------------------------------------------------------------

    def run(self, variant: Variant) -> Phases:
        self.redis.delete(QUEUE)
        self.pusher.reset()
        out = Phases()
        monitor = RoundTrips(*self.redis_at)
        try:
            with self.child(variant) as child, CpuSampler({"child": child.pid}) as cpu:
                for rate in RATES:
                    out.steady[rate] = self.steady(child, cpu, monitor, rate)
                out.idle = self.idle(child, cpu, monitor)
                out.quiet = self.quiet(child)
                exclude = bench_addresses(self.redis)
                for phase in (*out.steady.values(), out.idle):
                    window = phase.pop("window")
                    phase["round_trips"] = monitor.count(*window, exclude)
                    phase["round_trips_per_unit"] = phase["round_trips"] / phase.pop("units")
        finally:
            monitor.close()
        return out

    def steady(self, child: Child, cpu: CpuSampler, monitor: RoundTrips,
               rate: int) -> dict[str, Any]:
        self.pusher.reset()
        total = int(rate * self.steady_s)
        start = time.time()
        began = time.perf_counter()
        for n in range(total):
            wait = began + n / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            self.push(n)
        self.wait_for(child, total)
        events = self.pusher.events()
        latencies = sorted((e["received_at"] - d["t"]) * 1000
                           for e, d in zip(events, event_data(events), strict=True))
        end = max(e["received_at"] for e in events)
        used = cpu.used("child", start, end)
        return {"pushed": total, "delivered": len(events),
                "cpu_ms_per_note": used / len(events) * 1000,
                "core_share": used / (end - start),
                "others_cores": cpu.others(start, end) / (end - start),
                "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                "window": (start, end + 0.001), "units": len(events)}

    def idle(self, child: Child, cpu: CpuSampler, monitor: RoundTrips) -> dict[str, Any]:
        time.sleep(SETTLE_S)
        start = time.time()
        time.sleep(self.idle_s)
        child.check_alive()
        end = time.time()
        return {"core_share_pct": cpu.used("child", start, end) / (end - start) * 100,
                "others_cores": cpu.others(start, end) / (end - start),
                "window": (start, end), "units": end - start}

    def quiet(self, child: Child) -> dict[str, Any]:
        latencies = []
        for n in range(self.probes):
            self.pusher.reset()
            time.sleep(QUIET_S)
            self.push(n)
            self.wait_for(child, 1)
            (event,) = self.pusher.events()
            latencies.append((event["received_at"] - json.loads(event["data"])["t"]) * 1000)
        return {"p50_ms": statistics.median(latencies), "max_ms": max(latencies)}


# -- the scenario -------------------------------------------------------------------------------

ROWS: Sequence[tuple[str, str, str]] = (
    # label, where in Phases, format
    ("CPU per notification at 100/s (ms)", "steady.100.cpu_ms_per_note", "{:.2f}"),
    ("CPU per notification at 500/s (ms)", "steady.500.cpu_ms_per_note", "{:.2f}"),
    ("latency p50 / p99 at 100/s (ms)", "steady.100.p50_ms|steady.100.p99_ms", "{:.1f}"),
    ("latency p50 / p99 at 500/s (ms)", "steady.500.p50_ms|steady.500.p99_ms", "{:.1f}"),
    ("Redis round trips per notification at 100/s", "steady.100.round_trips_per_unit",
     "{:.2f}"),
    ("Redis round trips per notification at 500/s", "steady.500.round_trips_per_unit",
     "{:.2f}"),
    ("idle: Redis round trips per second", "idle.round_trips_per_unit", "{:.1f}"),
    ("idle: share of one core (%)", "idle.core_share_pct", "{:.2f}"),
    ("first notification after 2 s quiet, p50 (ms)", "quiet.p50_ms", "{:.1f}"),
    # CPU the rest of the machine used meanwhile, the bench's Redis and server included
    # (2 cores: much above 0.3 and the figures are noisy)
    ("others on the machine at 500/s / idle (cores)",
     "steady.500.others_cores|idle.others_cores", "{:.2f}"),
)


def lookup(phases: dict[str, Any], path: str) -> float:
    node: Any = phases
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    return float(node)


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    paths = {p for _label, spec, _fmt in ROWS for p in spec.split("|")}
    return {p: statistics.median(lookup(r, p) for r in runs) for p in paths}


def table(names: Sequence[str], meds: Mapping[str, Mapping[str, float]], repeats: int) -> str:
    lines = [f"| medians of {repeats} | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for label, spec, fmt in ROWS:
        cells = [" / ".join(fmt.format(meds[n][p]) for p in spec.split("|")) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def as_dict(phases: Phases) -> dict[str, Any]:
    return {"steady": phases.steady, "idle": phases.idle, "quiet": phases.quiet}


def run(bench: Any, names: Sequence[str], repeats: int, steady_s: float, idle_s: float,
        probes: int) -> dict[str, Any]:
    everyday = Everyday(bench, steady_s, idle_s, probes)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            phases = as_dict(everyday.run(VARIANTS[name]))
            runs[name].append(phases)
            print(f"  {name:<15} #{i + 1} " + "  ".join(
                f"{label.split(' (')[0]}: "
                + "/".join(fmt.format(lookup(phases, p)) for p in spec.split("|"))
                for label, spec, fmt in ROWS), flush=True)
    meds = {n: medians(runs[n]) for n in names}
    rendered = table(names, meds, repeats)
    print(rendered, flush=True)
    return {"variants": {n: VARIANTS[n].about for n in names}, "runs": runs,
            "medians": meds, "table": rendered}
