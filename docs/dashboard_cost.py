"""What the dashboard costs Redis: the figures in the README's "Operator's page" section.

    .venv/bin/python -m gevent.monkey docs/dashboard_cost.py [WORKER_DIR]

1. A worker (from WORKER_DIR, default this checkout) idles 10 s, then delivers 2,000
   notifications; Redis's own command counts (INFO commandstats) give the commands it sent.
   Run it once with a checkout without the dashboard to compare: the history adds no command.
2. One page refresh (the three requests app.js makes every 2 s) against a queue with a full
   15-minute history: round trips counted at redis-py's socket, commands and Redis CPU time
   from INFO commandstats.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from redis.connection import Connection  # noqa: E402

from relay.dashboard.app import DashboardApp, DashboardServer  # noqa: E402
from relay.dashboard.security import Guard  # noqa: E402
from relay.pusher_server import LocalPusher  # noqa: E402
from relay.queue import RedisQueue  # noqa: E402
from relay.redis_server import RedisServer  # noqa: E402


def commandstats(r: redis.Redis) -> dict[str, tuple[int, int]]:
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for k, v in r.info("commandstats").items()}


def diff(after: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]
         ) -> dict[str, tuple[int, int]]:
    out = {}
    for k, (calls, usec) in after.items():
        c0, u0 = before.get(k, (0, 0))
        if calls - c0:
            out[k] = (calls - c0, usec - u0)
    return out


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def worker_cost(rs: RedisServer, pusher: LocalPusher, worker_dir: Path) -> None:
    r = redis.Redis.from_url(rs.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "PUSHER_"))}
    env.update(REDIS_URL=rs.url, PUSHER_URL=pusher.url, RELAY_METRICS_ADDR="off",
               RELAY_QUEUE="costq", RELAY_POOL_SIZE="10")
    proc = subprocess.Popen([sys.executable, "worker.py"], cwd=worker_dir, env=env,
                            stderr=subprocess.DEVNULL)
    try:
        while not r.zcard("costq:workers"):
            time.sleep(0.1)
        time.sleep(2)
        before = commandstats(r)
        time.sleep(10)
        idle = diff(commandstats(r), before)
        say(f"idle worker, 10 s: {sum(c for c, _ in idle.values()) - 2} commands "
            f"{ {k: c for k, (c, _) in idle.items() if k != 'info'} }")
        before = commandstats(r)
        r.rpush("costq", *[f'{{"channel":"c","n":{i}}}' for i in range(2000)])
        while int(r.hget("costq:stats", "delivered") or 0) < 2000:
            time.sleep(0.05)
        busy = diff(commandstats(r), before)
        say(f"2,000 delivered: evalsha {busy.get('evalsha', (0, 0))[0]}, "
            f"blmove {busy.get('blmove', (0, 0))[0]}, all {sum(c for c, _ in busy.values())}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


REFRESHES = 5


def refresh(port: int, window: str) -> None:
    """What app.js asks for every 2 s."""
    for path in ("/api/overview", f"/api/series?window={window}", "/api/dead"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}{path}").read()


def page_cost(rs: RedisServer) -> None:
    r = redis.Redis.from_url(rs.url)
    now = int(r.time()[0])
    pipe = r.pipeline(transaction=False)
    for s in range(now - 900, now):  # a full quarter hour of history, every field present
        key = f"pageq:history:s:{s}"
        pipe.hset(key, mapping={"delivered": 300, "failed": 1, "retried": 1, "dead": 1,
                                "shed": 1, "calls": 30, "call:3": 30, "age:1": 300})
        pipe.expire(key, 960)
    pipe.execute()
    r.rpush("pageq:dead", *[f'{{"payload":"p{i}","error":"e","failed_at":1}}'
                            for i in range(1000)])
    RedisQueue(r, "pageq", worker_id="w").heartbeat(10, {"busy": 3})
    trips = [0]
    original = Connection.send_packed_command

    def counted(self: Connection, *args: object, **kwargs: object) -> None:
        trips[0] += 1
        original(self, *args, **kwargs)

    server = DashboardServer("127.0.0.1:0", DashboardApp(RedisQueue(r, "pageq"), Guard(None)))
    server.start()
    Connection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        for window in ("15m", "24h"):
            refresh(server.port, window)  # the first opens the pool's connection
            before, trips[0] = commandstats(r), 0
            t0 = time.perf_counter()
            for _ in range(REFRESHES):
                refresh(server.port, window)
            took = (time.perf_counter() - t0) / REFRESHES
            spent = diff(commandstats(r), before)
            spent.pop("info", None)
            calls = sum(c for c, _ in spent.values()) / REFRESHES
            usec = sum(u for _, u in spent.values()) / REFRESHES
            say(f"one page refresh ({window} chart): {trips[0] / REFRESHES:g} round trips, "
                f"{calls:.0f} commands, "
                f"{usec / 1000:.1f} ms Redis CPU, {took * 1000:.0f} ms wall")
    finally:
        Connection.send_packed_command = original  # type: ignore[method-assign]
        server.stop()


def main() -> int:
    worker_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    with RedisServer() as rs, LocalPusher() as pusher:
        worker_cost(rs, pusher, worker_dir)
        page_cost(rs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
