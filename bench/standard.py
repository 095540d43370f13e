"""The standard drain: relay beside the plain gevent pool and the seed's 2011 script, one run.

1. A throwaway redis-server and the local Pusher-compatible server (never the Redis on 6379).
2. For each server delay (at once, 50 ms: Pusher's round trip) and each repeat, every side in
   turn (interleaved: A B C, C B A, ...): the side's process(es) start on an empty queue and
   wait in their blocking pop; then the backlog (COUNT classic notifications round-robin over
   CHANNELS channels) is pushed in a few big RPUSHes, and the drain is timed from the first
   push to the server's arrival time of the last event plus its delay (when that call ended).
   Every side is timed the same way, so the seed, which prints no ready line, is measured
   like the others.
3. Figures per run: events/s, CPU seconds per 10,000 of the side's processes and of Redis,
   the server's CPU share (near 1.0: the server, not the side, is the bottleneck), duplicates
   and events that arrived behind a later one of their channel. Medians per side, and the
   ratios of relay to the plain pool and to the seed.

Sides: `naive` (bench/naive.py: monkey-patched pool of 50, BLPOP + the pusher library, no
reliability), `seed` (../shared/peers/seed_em.rb: needs `apt-get install ruby
ruby-eventmachine ruby-em-http-request ruby-hiredis`), `relay` (python worker.py with its
defaults), `relay-apps` (the same server's app given as `default` in a RELAY_APPS file instead
of PUSHER_URL: the cost of the many-apps route for a single app), and relay variants given as
NAME:VAR=VALUE+VAR=VALUE (e.g. `p500:RELAY_PREFETCH=500`, `2procs:PROCS=2` for two worker
processes, `unordered:RELAY_CHANNEL_ORDER=false`, `APPS=1` for the RELAY_APPS file), and relay
as it was at a commit as NAME@COMMIT[:...] (e.g. `engine19@6866af1`: unpacked with `git
archive` under bench/results/, run with this interpreter).

Run: .venv/bin/python bench/standard.py [--count 20000] [--channels 100] [--delays 0,50]
     [--sides naive,seed,relay] [--repeats 3] [--busy]
`--busy` adds the busy-channel case: BUSY notifications on one channel queued ahead of 500
over 50 other channels, and reports when the others arrived (p50/p99 after the first push).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from measure import Child, ChildFailed, CpuSampler, percentile  # noqa: E402

from relay.pusher_server import LocalPusher  # noqa: E402
from relay.redis_server import RedisServer, free_port  # noqa: E402

QUEUE = "notifications"
SEED_SCRIPT = Path(os.environ.get("SEED_SCRIPT", "/work/shared/peers/seed_em.rb"))
PUSH_CHUNK = 2_000
POLL_S = 0.02
TIMEOUT_S = 300.0
SERVER_LOG = Path(__file__).resolve().parent / "results" / "standard_server.log"
# Commands a client sends itself (a round trip each; a pipeline's are counted one by one);
# every other command in the counts ran inside a script.
# (relay sends only scripts, its blocking pop and connection set-up; LPOP, TIME and the like
# appear only inside its scripts.)
TOP_LEVEL = ("evalsha", "eval", "blpop", "brpop", "blmove", "brpoplpush", "script|load",
             "ping", "hello", "client|setname", "client|setinfo", "select", "auth")
BENCH_COMMANDS = {"rpush", "info", "config|resetstat", "flushall"}
APPS_FILE = Path(__file__).resolve().parent / "results" / "standard_apps.toml"


@dataclass(frozen=True)
class Side:
    name: str
    kind: str  # naive, seed or relay
    env: dict[str, str] = field(default_factory=dict)
    procs: int = 1
    revision: str = ""  # relay as it was at this commit (git archive), "" for this checkout
    apps_file: bool = False  # the app as `default` in a RELAY_APPS file, not PUSHER_URL


def parse_side(text: str) -> Side:
    if text in ("naive", "seed", "relay"):
        return Side(text, text)
    if text == "relay-apps":
        return Side(text, "relay", apps_file=True)
    name, _, settings = text.partition(":")
    name, _, revision = name.partition("@")
    env = dict(kv.split("=", 1) for kv in settings.split("+") if kv)
    procs = int(env.pop("PROCS", "1"))
    apps_file = env.pop("APPS", "0") not in ("0", "")
    return Side(name, "relay", env, procs, revision, apps_file)



def checkout(revision: str) -> Path:
    """relay's files at `revision`, unpacked once under bench/results/ (`git archive`)."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    where = REPO / "bench" / "results" / f"relay-{commit[:12]}"
    if not (where / "worker.py").exists():
        where.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO,
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(where, filter="data")
    return where


class Bench:
    def __init__(self, redis_server: RedisServer, pusher: LocalPusher, pool: int) -> None:
        self.redis_server = redis_server
        self.pusher = pusher
        self.pool = pool
        self.redis = redis.Redis.from_url(redis_server.url)

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RELAY_", "PUSHER_")) and k != "REDIS_URL"}
        env.update(REDIS_URL=self.redis_server.url, PUSHER_URL=self.pusher.url,
                   PYTHONUNBUFFERED="1", **extra)
        return env

    @contextmanager
    def side(self, side: Side) -> Iterator[list[Child]]:
        with ExitStack() as stack:
            children = [stack.enter_context(self._child(side, i)) for i in range(side.procs)]
            for child in children:
                if child.ready_marker:
                    child.wait_ready()
            self._wait_blocked(children, side.procs)
            yield children

    @contextmanager
    def _child(self, side: Side, index: int) -> Iterator[Child]:
        metrics_at = ""  # relay's: the calls' durations are read there
        if side.kind == "seed":
            target = urlsplit(self.pusher.url)
            env = self.env({"REDIS_LIST": QUEUE, "PUSHER_APP_ID": target.path.rsplit("/", 1)[1],
                            "PUSHER_KEY": target.username or "",
                            "PUSHER_SECRET": target.password or "",
                            "PUSHER_HOST": target.hostname or "",
                            "PUSHER_PORT": str(target.port)})
            command, marker = [shutil.which("ruby") or "ruby", str(SEED_SCRIPT)], ""
        elif side.kind == "naive":
            command = [sys.executable, "bench/naive.py", "--queue", QUEUE, "--pool",
                       str(self.pool), "--idle-exit", "600"]
            env, marker = self.env({}), "naive started:"
        else:
            metrics_at = f"127.0.0.1:{free_port()}"
            env = self.env({"RELAY_QUEUE": QUEUE, "RELAY_METRICS_ADDR": metrics_at,
                            "RELAY_POOL_SIZE": str(self.pool), **side.env})
            if side.apps_file:
                env["RELAY_APPS"] = self._apps_file()
                del env["PUSHER_URL"]
            command, marker = [sys.executable, "worker.py"], "started:"
        cwd = checkout(side.revision) if side.revision else REPO
        child = Child(f"{side.name}#{index}", command, env, str(cwd), marker or "\0")
        child.ready_marker = marker
        child.metrics_at = metrics_at  # type: ignore[attr-defined]
        try:
            yield child
        finally:
            child.stop()

    def _apps_file(self) -> str:
        """A RELAY_APPS file naming the local server's app `default` (it holds the secret)."""
        path = APPS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.pusher.apps_toml({"default": self.pusher.app_id}))
        path.chmod(0o600)
        return str(path)

    def _wait_blocked(self, children: list[Child], count: int) -> None:
        deadline = time.monotonic() + 30
        while int(self.redis.info("clients")["blocked_clients"]) < count:
            for child in children:
                child.check_alive()
            if time.monotonic() > deadline:
                raise ChildFailed("the side never blocked on the queue")
            time.sleep(POLL_S)
        time.sleep(0.3)  # the others' start-up settles

    def push(self, items: Sequence[str]) -> float:
        started = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(items), PUSH_CHUNK):
            pipe.rpush(QUEUE, *items[start:start + PUSH_CHUNK])
        pipe.execute()
        return started

    def wait_events(self, children: list[Child], count: int) -> bool:
        deadline = time.monotonic() + TIMEOUT_S
        while self.pusher.count()["events_total"] < count:
            for child in children:
                child.check_alive()
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def run(self, side: Side, items: list[str], delay_s: float) -> dict[str, Any]:
        self.redis.flushall()
        self.pusher.reset()
        if delay_s:
            self.pusher.set_mode(delay=delay_s)
        pids = {"server": self.pusher.pid, "redis": self.redis_server.proc.pid}
        with self.side(side) as children:
            pids.update({c.name: c.pid for c in children})
            self.redis.config_resetstat()
            with CpuSampler(pids) as cpu:
                began = self.push(items)
                complete = self.wait_events(children, len(items))
                time.sleep(0.1)
            commands = self.commands()
            calls = [call_seconds(c.metrics_at) for c in children if c.metrics_at]
            events = self.pusher.events()
        end = max(e["received_at"] for e in events) + delay_s if events else time.time()
        elapsed = end - began
        numbers = [json.loads(e["data"])["n"] for e in events]
        distinct = len(set(numbers))
        side_cpu = sum(cpu.used(c.name, began, end) for c in children)
        return {"side": side.name, "delay_ms": delay_s * 1000, "count": len(items),
                "complete": complete and distinct == len(items), "seconds": elapsed,
                "per_s": distinct / elapsed, "duplicates": len(numbers) - distinct,
                "behind": behind_a_later_one(events),
                "cpu_per_10k": side_cpu / max(distinct, 1) * 10_000,
                "redis_cpu_per_10k": cpu.used("redis", began, end) / max(distinct, 1) * 10_000,
                "server_share": cpu.used("server", began, end) / elapsed,
                "others": cpu.others(began, end) / elapsed,
                "requests": self.pusher.count()["requests_total"],
                "redis_calls_per_notification": {
                    name: calls / max(distinct, 1) for name, calls in commands.items()},
                "redis_top_level_per_notification":
                    sum(commands.get(c, 0) for c in TOP_LEVEL) / max(distinct, 1),
                "redis_all_per_notification": sum(commands.values()) / max(distinct, 1),
                **pool_use(calls, elapsed, self.pool)}

    def commands(self) -> dict[str, int]:
        """Redis commands the side ran since the reset, by name (scripts' own calls included,
        as Redis counts them); the bench's own RPUSH, INFO and CONFIG left out."""
        stats = self.redis.info("commandstats")
        calls = {key.removeprefix("cmdstat_"): int(value["calls"])
                 for key, value in stats.items()}
        return {name: n for name, n in calls.items() if name not in BENCH_COMMANDS}

    def busy(self, side: Side, busy_count: int, delay_s: float) -> dict[str, Any]:
        """BUSY on one channel ahead of 500 over 50 others: when do the others arrive?"""
        items = [json.dumps({"channel": "busy", "n": n}) for n in range(busy_count)]
        items += [json.dumps({"channel": f"other{n % 50}", "n": busy_count + n})
                  for n in range(500)]
        self.redis.flushall()
        self.pusher.reset()
        self.pusher.set_mode(delay=delay_s)
        with self.side(side) as children:
            began = self.push(items)
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                events = self.pusher.events()
                others = [e for e in events if e["channel"] != "busy"]
                if len(others) >= 500 or time.monotonic() > deadline:
                    break
                for child in children:
                    child.check_alive()
                time.sleep(0.2)
        after = sorted(e["received_at"] + delay_s - began for e in others)
        busy_events = [e for e in events if e["channel"] == "busy"]
        return {"side": side.name, "others_arrived": len(after),
                "others_p50_s": percentile(after, 50), "others_p99_s": percentile(after, 99),
                "busy_delivered_meanwhile": len(busy_events),
                "busy_behind": behind_a_later_one(busy_events)}


def call_seconds(metrics_at: str) -> tuple[float, float]:
    """(sum, count) of relay_pusher_call_duration_seconds, every app, from the child's
    /metrics: how long its Pusher calls took as the worker saw them."""
    with urllib.request.urlopen(f"http://{metrics_at}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("relay_pusher_call_duration_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("relay_pusher_call_duration_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def pool_use(calls: list[tuple[float, float]], elapsed: float, pool: int) -> dict[str, Any]:
    """The mean call as relay saw it (the server's delay, its own time, the wait for the event
    loop to resume the greenlet), and how full the pool kept itself: the calls' summed time
    over the pool's slot-seconds. relay's ceiling at that round trip is pool x 10 / mean."""
    total = sum(t for t, _ in calls)
    count = sum(n for _, n in calls)
    if not count:
        return {}
    return {"call_ms": total / count * 1000,
            "pool_busy": total / (elapsed * pool * len(calls))}


def behind_a_later_one(events: list[dict[str, Any]]) -> int:
    highest: dict[str, int] = {}
    late = 0
    for event in events:
        n = json.loads(event["data"])["n"]
        if n < highest.get(event["channel"], -1):
            late += 1
        else:
            highest[event["channel"]] = n
    return late


def items_for(count: int, channels: int) -> list[str]:
    return [json.dumps({"channel": f"site-{n % channels}", "n": n, "t": 0})
            for n in range(count)]


def show(run: dict[str, Any]) -> str:
    flag = "" if run["complete"] else "  INCOMPLETE"
    return (f"  {run['side']:<12} {run['delay_ms']:>3.0f} ms  {run['per_s']:>8,.0f}/s  "
            f"CPU {run['cpu_per_10k']:5.2f} s/10k  Redis {run['redis_cpu_per_10k']:4.2f} s/10k  "
            f"server {run['server_share']:.2f}  requests {run['requests']:>6,}  "
            f"dups {run['duplicates']}  behind {run['behind']}  others {run['others']:.2f}  "
            f"Redis cmds/notification {run['redis_top_level_per_notification']:.3f} sent, "
            f"{run['redis_all_per_notification']:.2f} with scripts' own"
            + (f"  call {run['call_ms']:.1f} ms, pool busy {run['pool_busy']:.0%}"
               if "call_ms" in run else "")
            + flag)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--delays", default="0,50", help="server delays in ms")
    parser.add_argument("--sides", default="naive,seed,relay")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool", type=int, default=50)
    parser.add_argument("--busy", type=int, default=0, metavar="BUSY",
                        help="also the busy-channel case with BUSY on one channel (e.g. 5000)")
    args = parser.parse_args(argv)
    sides = [parse_side(s) for s in args.sides.split(",") if s]
    if any(s.kind == "seed" for s in sides) and not shutil.which("ruby"):
        print("seed: skipped (no ruby: apt-get install ruby ruby-eventmachine "
              "ruby-em-http-request ruby-hiredis)")
        sides = [s for s in sides if s.kind != "seed"]
    delays = [float(d) / 1000 for d in args.delays.split(",")]
    items = items_for(args.count, args.channels)
    print(f"standard drain: {args.count:,} classic notifications over {args.channels} channels, "
          f"pool {args.pool}, {args.repeats} interleaved repeats, {os.cpu_count()} cores")
    results: dict[str, Any] = {"runs": [], "busy": []}
    SERVER_LOG.parent.mkdir(parents=True, exist_ok=True)
    with RedisServer() as redis_server, LocalPusher(stderr=SERVER_LOG) as pusher:
        bench = Bench(redis_server, pusher, args.pool)
        for delay in delays:
            for repeat in range(args.repeats):
                for side in sides if repeat % 2 == 0 else sides[::-1]:
                    run = bench.run(side, items, delay)
                    print(show(run), flush=True)
                    results["runs"].append(run)
        if args.busy:
            for side in sides:
                if side.kind == "relay":
                    busy = bench.busy(side, args.busy, 0.05)
                    print(f"  busy {side.name}: {busy}", flush=True)
                    results["busy"].append(busy)
    summarize(results["runs"], sides, delays)
    out = REPO / "bench" / "results" / "standard.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def summarize(runs: list[dict[str, Any]], sides: list[Side], delays: list[float]) -> None:
    print("\nmedians")
    for delay in delays:
        medians: dict[str, float] = {}
        for side in sides:
            mine = [r for r in runs if r["side"] == side.name and r["delay_ms"] == delay * 1000]
            if not mine:
                continue
            medians[side.name] = statistics.median(r["per_s"] for r in mine)
            cpu = statistics.median(r["cpu_per_10k"] for r in mine)
            print(f"  {delay * 1000:>3.0f} ms  {side.name:<12} {medians[side.name]:>8,.0f}/s  "
                  f"CPU {cpu:.2f} s/10k")
        for side in sides:
            if side.kind != "relay" or side.name not in medians:
                continue
            for other in ("naive", "seed"):
                if other in medians:
                    print(f"  {delay * 1000:>3.0f} ms  {side.name} / {other}: "
                          f"{medians[side.name] / medians[other]:.1f}x")


if __name__ == "__main__":
    raise SystemExit(main())
