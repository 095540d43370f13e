"""The naive loop: the original 2011 script, written in today's Python. The benchmark's baseline.

1. Patches the standard library, then runs `--pool` greenlets that each loop on
   `BLPOP queue 1` and `pusher.Pusher(...).trigger(channel, "hit", data)` through one shared
   official client with its default requests backend.
2. No reliability on purpose: a popped notification is gone, whatever the trigger does.
3. Prints `naive started: ...` on stderr once the loop is about to run (the bench times from
   there), and exits 0 on SIGTERM/SIGINT or after the queue stayed empty for `--idle-exit` s.

Settings: `REDIS_URL`, `PUSHER_URL` (`http://KEY:SECRET@HOST:PORT/apps/APP_ID`) from the
environment; `--queue`, `--pool`, `--event`, `--idle-exit` as flags.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import unquote, urlsplit  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.pool  # noqa: E402
import pusher  # noqa: E402
import redis  # noqa: E402

POP_TIMEOUT_S = 1


def pusher_client(url: str) -> pusher.Pusher:
    """The official client built from a PUSHER_URL; pusher 3.3.4's from_url drops the port."""
    parts = urlsplit(url)
    return pusher.Pusher(
        app_id=parts.path.rstrip("/").rsplit("/", 1)[-1],
        key=unquote(parts.username or ""), secret=unquote(parts.password or ""),
        host=parts.hostname, port=parts.port, ssl=parts.scheme == "https")


class NaiveLoop:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.redis = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
        self.pusher = pusher_client(os.environ["PUSHER_URL"])
        self.stopping = gevent.event.Event()
        self.last_item_at = time.monotonic()

    def work(self) -> None:
        while not self.stopping.is_set():
            item = self.redis.blpop([self.args.queue], POP_TIMEOUT_S)
            if item is None:
                continue
            self.last_item_at = time.monotonic()
            self.send(json.loads(item[1]))

    def send(self, message: dict[str, Any]) -> None:
        channel = message.pop("channel")
        try:
            self.pusher.trigger(channel, self.args.event, message)
        except Exception as exc:  # the 2011 script would die here; we only say it was lost
            print(f"naive: lost a notification: {exc!r}", file=sys.stderr)

    def watch_idle(self) -> None:
        while not self.stopping.wait(0.5):
            if time.monotonic() - self.last_item_at > self.args.idle_exit:
                self.stopping.set()

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self.stopping.set)
        pool = gevent.pool.Pool(self.args.pool)
        print(f"naive started: pool={self.args.pool} queue={self.args.queue}",
              file=sys.stderr, flush=True)
        for _ in range(self.args.pool):
            pool.spawn(self.work)
        watcher = gevent.spawn(self.watch_idle)
        self.stopping.wait()
        pool.join(timeout=POP_TIMEOUT_S + 5)
        watcher.kill()
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", default="notifications")
    parser.add_argument("--pool", type=int, default=50)
    parser.add_argument("--event", default="hit")
    parser.add_argument("--idle-exit", type=float, default=30.0,
                        help="exit after the queue stayed empty this many seconds")
    return NaiveLoop(parser.parse_args()).run()


if __name__ == "__main__":
    raise SystemExit(main())
