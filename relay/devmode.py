"""Development mode (`./dev`): the real worker against a local Pusher-compatible server.

1. Says so loudly, at WARNING level, so nobody mistakes it for a production worker.
2. Never takes from a queue it did not create unless told so: without REDIS_URL it starts an
   embedded redis-server on a free port (`relay.redis_server`), so a laptop needs nothing but
   `./dev`, and without RELAY_QUEUE it consumes a queue of its own, `relay-dev`. A shared
   Redis (say localhost:6379, where a real worker and app keep `notifications`) is used only
   when REDIS_URL names it, and its real queue only when RELAY_QUEUE names it too: what this
   mode takes is acked into the local server, so it would be lost to its users.
3. Starts `LocalPusher(print_events=True)`: every event the worker sends is logged.
4. Runs the unchanged `python worker.py` as a child with PUSHER_URL pointing at that server.
   The worker itself never falls back to a fake destination; only this module chooses one.
5. Logs how to push a test notification (redis-cli, or `relay.producer` from Python).
6. SIGINT/SIGTERM stop the worker first (SIGTERM, so it returns what is in flight while Redis
   is still up), then the local server, then the embedded Redis; the exit status is 0.
   `--push-demo` pushes one notification after start and `--exit-after-first` stops after
   the first event arrives: together they make a non-interactive end-to-end check.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import redis

from relay import logs
from relay.config import mask_url
from relay.producer import DEFAULT_QUEUE, Producer
from relay.pusher_server import LocalPusher
from relay.redis_server import RedisServer, answers

log = logging.getLogger("relay.devmode")

ROOT = Path(__file__).resolve().parent.parent
BANNER = "DEVELOPMENT MODE: notifications go to a local Pusher-compatible server, not to Pusher"
POLL_S = 0.1  # how often the main loop looks at the stop flag, the worker and the events
PING_TIMEOUT_S = 1.0
# Above the worker's own shutdown deadline (PUSHER_TIMEOUT 5 s + its grace periods).
WORKER_STOP_TIMEOUT_S = 15.0
# Credentials of other Pusher apps in the developer's environment must not leak into the
# child: PUSHER_URL wins over them anyway, dropping them makes that obvious.
PUSHER_CREDENTIALS = ("PUSHER_APP_ID", "PUSHER_KEY", "PUSHER_SECRET", "PUSHER_HOST",
                      "PUSHER_PORT", "PUSHER_SSL", "PUSHER_CLUSTER")
DEV_QUEUE = "relay-dev"  # not the production default: see point 2 above
DEMO_CHANNEL = "test"
DEMO_DATA = {"title": "hello from relay development mode", "url": "/"}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./dev", description="Run the worker against a local Pusher-compatible server.")
    parser.add_argument("--push-demo", action="store_true",
                        help="push one demo notification once everything runs")
    parser.add_argument("--exit-after-first", action="store_true",
                        help="stop everything after the first event arrives (exit 0)")
    return parser.parse_args(argv)


def redis_answers(url: str) -> bool:
    """True when the Redis at url replies to PING."""
    parts = urlsplit(url)
    if parts.scheme == "redis" and not parts.password:
        return answers(parts.hostname or "localhost", parts.port or 6379)
    try:
        client = redis.Redis.from_url(url, socket_timeout=PING_TIMEOUT_S,
                                      socket_connect_timeout=PING_TIMEOUT_S)
    except ValueError:
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class DevModeError(RuntimeError):
    """Development mode cannot start as configured (the message says what to change)."""


def _redis(stack: contextlib.ExitStack, url: str | None) -> str:
    """REDIS_URL's Redis when set (it must answer), else an embedded one stopped by the stack.

    No fallback either way: an unset REDIS_URL must not reach the default localhost:6379
    (a real queue may live there), and a set one that does not answer is a mistake to report,
    not to paper over with another Redis.
    """
    if url:
        if not redis_answers(url):
            raise DevModeError(f"no Redis answers at REDIS_URL={mask_url(url)}; unset "
                               "REDIS_URL to use an embedded one")
        log.info("using the Redis at %s (REDIS_URL)", mask_url(url))
        return url
    server = stack.enter_context(RedisServer())
    log.info("REDIS_URL is not set: started an embedded redis-server at %s", server.url)
    return server.url


def dev_queue(environ: Mapping[str, str]) -> str:
    """RELAY_QUEUE when set, else a queue of development mode's own (never the default)."""
    return environ.get("RELAY_QUEUE") or DEV_QUEUE


def worker_env(redis_url: str, pusher_url: str, queue: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PUSHER_CREDENTIALS}
    env.update(REDIS_URL=redis_url, PUSHER_URL=pusher_url, RELAY_QUEUE=queue)
    return env


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the worker did not stop within %.0f s: killing it",
                        WORKER_STOP_TIMEOUT_S)
            worker.kill()
            worker.wait()
    log.info("worker stopped (status %s)", worker.returncode)


def redis_cli(url: str) -> str:
    """The redis-cli command that reaches url (password masked)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"redis-cli -s {shlex.quote(parts.path)}"
    if parts.scheme != "redis" or parts.username or parts.password:
        return f"redis-cli -u {shlex.quote(mask_url(url))}"
    args = ["redis-cli"]
    if parts.hostname not in (None, "localhost", "127.0.0.1"):
        args += ["-h", parts.hostname]
    args += ["-p", str(parts.port or 6379)]
    db = parts.path.strip("/")
    if db not in ("", "0"):
        args += ["-n", db]
    return " ".join(args)


def _python() -> str:
    """This interpreter, relative to the working directory when inside it (.venv/bin/python)."""
    try:
        return str(Path(sys.executable).relative_to(Path.cwd()))
    except ValueError:
        return sys.executable


def usage(redis_url: str, queue: str) -> list[str]:
    classic = '{"channel":"test","title":"hello","url":"/"}'
    env = f"REDIS_URL={shlex.quote(mask_url(redis_url))}"
    if queue != DEFAULT_QUEUE:
        env += f" RELAY_QUEUE={shlex.quote(queue)}"
    code = 'from relay.producer import notify; notify("test", {"title": "hello", "url": "/"})'
    return [
        "push a test notification with:",
        f"  {redis_cli(redis_url)} RPUSH {shlex.quote(queue)} {shlex.quote(classic)}",
        "or from Python:",
        f"  {env} {_python()} -c {shlex.quote(code)}",
        "stop with Ctrl-C",
    ]


def _push_demo(redis_url: str, queue: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        text = Producer(client, queue).notify(DEMO_CHANNEL, DEMO_DATA)
    finally:
        client.close()
    log.info("pushed a demo notification: %s", text)


def _serve(stop: threading.Event, worker: subprocess.Popen[bytes], pusher: LocalPusher,
           exit_after_first: bool) -> int:
    """Wait for a signal, the worker's end or (if asked) the first event; the exit status."""
    while not stop.wait(POLL_S):
        status = worker.poll()
        if status is not None:
            log.error("the worker exited on its own with status %d", status)
            return status if status >= 0 else 1  # negative: killed by a signal
        if exit_after_first and pusher.count()["events_total"]:
            log.info("the first event arrived (--exit-after-first): stopping")
            return 0
    log.info("stop requested: stopping the worker, the local server and any embedded Redis")
    return 0


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    queue = dev_queue(os.environ)
    with contextlib.ExitStack() as stack:
        redis_url = _redis(stack, os.environ.get("REDIS_URL"))
        log.info("consuming the queue %s%s", queue,
                 " (RELAY_QUEUE)" if os.environ.get("RELAY_QUEUE") else
                 " (development mode's own; set RELAY_QUEUE to consume another)")
        pusher = stack.enter_context(
            LocalPusher(key="dev-key", secret="dev-secret", print_events=True))
        log.info("local Pusher-compatible server at %s (app_id %s, key %s)",
                 pusher.base_url, pusher.app_id, pusher.key)
        worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=ROOT,
                                  env=worker_env(redis_url, pusher.url, queue),
                                  stdin=subprocess.DEVNULL)
        stack.callback(_stop_worker, worker)
        for line in usage(redis_url, queue):
            log.info("%s", line)
        if args.push_demo:
            _push_demo(redis_url, queue)
        return _serve(stop, worker, pusher, args.exit_after_first)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logs.setup("info", "text")
    log.warning("=" * len(BANNER))
    log.warning("%s", BANNER)
    log.warning("=" * len(BANNER))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    try:
        return run(args, stop)
    except (OSError, RuntimeError, TimeoutError, redis.RedisError) as exc:  # DevModeError too
        log.error("development mode could not start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
