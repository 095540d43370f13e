"""Where a trickle's CPU goes: py-spy samples relay while a producer pushes at a steady rate.

1. Starts the bench's throwaway Redis and local Pusher-compatible server, and relay as one of
   the `everyday` variants (so the profile is of the same process the table measures).
2. Pushes RATE/s for SECONDS while `py-spy record --format raw` samples the worker (active
   samples only: the idle waits are not CPU).
3. Prints the share of samples per top-level area (the outermost frame of a recognisable
   library) and the hottest functions by their own samples. The raw collapsed stacks stay in
   bench/results/ for a flame graph (`py-spy` prints the command).

py-spy is a tool, not a dependency: `.venv/bin/pip install py-spy`. It needs ptrace (root, or
CAP_SYS_PTRACE in a container).

Run: .venv/bin/python bench/profile_trickle.py [--variant relay] [--rate 100] [--seconds 20]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

import everyday

from bench import RESULTS, Bench, local_pusher, make_plan, parse_args
from relay.redis_server import RedisServer

# A sample belongs to the first area, in this order, that has a frame in its stack: a socket
# read under urllib3 is the HTTP client's, a reply parsed under redis-py is redis-py's, the
# pusher library's signing is its own, the hub's loop and switches are gevent's.
AREAS = (
    ("http client: urllib3", "(urllib3/"), ("http client: http.client", "(http/client.py"),
    ("http client: geventhttpclient", "(geventhttpclient/"),
    ("http client: requests", "(requests/"), ("redis-py", "(redis/"),
    ("pusher library (sign, json)", "(pusher/"), ("gevent hub and sockets", "(gevent/"),
    ("relay", "(relay/"),
)
TOP = 25
IDLE_THREAD = "acquire_with_timeout (gevent/_threading.py"


def area_of(stack: list[str]) -> str:
    for name, marker in AREAS:
        if any(marker in frame for frame in stack):
            return name
    return "other"


def summarise(raw: Path) -> str:
    areas: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        stack = stack_text.split(";")
        if IDLE_THREAD in stack[-1]:
            idle += count  # gevent's native helper thread waiting on a lock: not the hub
            continue
        total += count
        areas[area_of(stack)] += count
        own[stack[-1] if stack else "?"] += count
    lines = [f"{total} samples ({idle} more of a helper thread waiting, left out)", "",
             "by area (the first of these in the stack):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in areas.most_common()]
    lines += ["", f"top {TOP} functions by own samples:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(TOP)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="relay", choices=sorted(everyday.VARIANTS))
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    raw = RESULTS.parent / f"profile-{args.variant}-{args.rate}.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    with RedisServer() as redis_server, local_pusher() as pusher:
        bench = Bench(make_plan(parse_args([])), redis_server, pusher)
        day = everyday.Everyday(bench, args.seconds, 0, 0)
        with day.child(everyday.VARIANTS[args.variant]) as child:
            record = subprocess.Popen([spy, "record", "--format", "raw", "--rate", "200",
                                       "--duration", str(int(args.seconds)), "--output",
                                       str(raw), "--pid", str(child.pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
            total, began = int(args.rate * args.seconds), time.perf_counter()
            for n in range(total):
                wait = began + n / args.rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                day.push(n)
            _, err = record.communicate(timeout=60)
            if record.returncode != 0:
                print(f"py-spy failed: {err.strip()}", file=sys.stderr)
                return 1
    print(f"{args.variant} at {args.rate}/s for {args.seconds:.0f} s (raw stacks: {raw})")
    print(summarise(raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
