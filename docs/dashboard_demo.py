"""Real traffic for the dashboard, then a screenshot of it: how docs/dashboard.png was made.

    .venv/bin/python -m gevent.monkey docs/dashboard_demo.py [SECONDS] [PNG]

Starts a throwaway redis-server, the local Pusher-compatible server (20 ms a call), two
workers and `python worker.py dashboard`; pushes envelopes at a varying rate with a few
invalid ones, makes Pusher fail for a while (failed calls, retries), then opens the page in
headless Chromium and saves a full-page screenshot. Everything started here is stopped here.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gevent  # noqa: E402
import redis  # noqa: E402

from relay.producer import encode  # noqa: E402
from relay.pusher_server import LocalPusher  # noqa: E402
from relay.redis_server import RedisServer  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def spawn(env: dict[str, str], *args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "worker.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))


def push(r: redis.Redis, queue: str, seconds: float, pusher: LocalPusher,
         outage: bool = True) -> None:
    """Envelopes at 30 to 270 a second; Pusher answers 503 through the middle tenth."""
    started = time.time()
    n = 0
    was_failing = True
    while (elapsed := time.time() - started) < seconds:
        rate = 150 + 120 * math.sin(elapsed / 9)
        batch = [encode([f"site-{(n + i) % 50}"], {"title": "page view", "n": n + i}, "hit")
                 for i in range(int(rate / 10))]
        r.rpush(queue, *batch)
        n += len(batch)
        if n % 400 < len(batch):
            r.rpush(queue, '{"channel": "bad channel!", "title": "<script>alert(1)</script>"}')
        failing = outage and 0.45 < elapsed / seconds < 0.55
        if failing != was_failing:
            pusher.set_mode(status=503, delay=0.02) if failing else pusher.set_mode(delay=0.02)
            was_failing = failing
        time.sleep(0.1)


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 90
    png = sys.argv[2] if len(sys.argv) > 2 else str(ROOT / "docs" / "dashboard.png")
    logs = Path("/tmp/relay-dashboard-demo")
    logs.mkdir(exist_ok=True)
    with RedisServer() as rs, LocalPusher() as pusher:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "PUSHER_"))}
        env.update(REDIS_URL=rs.url, PUSHER_URL=pusher.url, RELAY_METRICS_ADDR="off",
                   RELAY_POOL_SIZE="20", RELAY_DASHBOARD_ADDR="127.0.0.1:0")
        procs = [spawn(env, log=logs / f"worker{i}.log") for i in range(2)]
        board = spawn(env, "dashboard", log=logs / "dashboard.log")
        try:
            while not (found := re.search(r"on (http://\S+/)", (logs / "dashboard.log")
                                          .read_text())):
                time.sleep(0.1)
            r = redis.Redis.from_url(rs.url)
            push(r, "notifications", seconds, pusher)
            # Traffic goes on while the picture is taken, so the page shows it flowing.
            more = gevent.spawn(push, r, "notifications", 60, pusher, False)
            from playwright.sync_api import sync_playwright

            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 1200})
                page.goto(found.group(1))
                page.wait_for_selector("body[data-refreshed]")
                gevent.sleep(5)  # a few refreshes: the trend needs two samples
                page.screenshot(path=png)
                browser.close()
            more.kill()
        finally:
            for proc in (*procs, board):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    sys.stdout.write(f"wrote {png}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
