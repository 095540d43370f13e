"""Shared test helpers: waiting on conditions, what Redis and the local server hold, and the
worker as a real subprocess. Each helper lives here once; test files import them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import redis

ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> Any:
    """Poll until condition() is truthy; fail with `what` after the deadline (no bare sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def push(r: redis.Redis, queue: str, count: int, channel: str = "c", key: str = "n",
         channels: int = 1) -> None:
    """`count` classic notifications numbered 0..count-1 in data[key]; with `channels` > 1
    spread round-robin over that many channels (`c0`, `c1`, ...), as a real drain is."""
    def name(i: int) -> str:
        return channel if channels == 1 else f"{channel}{i % channels}"

    r.rpush(queue, *[json.dumps({"channel": name(i), key: i}) for i in range(count)])


def delivered(pusher: Any, key: str = "n") -> Counter[Any]:
    """How often the local server received each notification (by its data[key])."""
    return Counter(json.loads(e["data"])[key] for e in pusher.events())


def events_total(pusher: Any) -> int:
    """Events the local server accepted so far, from its cheap counter: a wait that polls
    `events()` instead makes the server dump every event it holds, 50 times a second."""
    return int(pusher.count()["events_total"])


def all_delivered(pusher: Any, wanted: Collection[int], key: str = "n") -> bool:
    """Every notification in `wanted` arrived at least once (by data[key]). Fetches the
    event list only once the counter says enough arrived, so polling it stays cheap."""
    return events_total(pusher) >= len(wanted) and set(wanted) <= set(delivered(pusher, key))


def dead(r: redis.Redis, queue: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in r.lrange(f"{queue}:dead", 0, -1)]


def inflight_lists(r: redis.Redis, queue: str) -> dict[str, int]:
    """Every in-flight list of the queue with its length (for per-worker questions)."""
    return {k.decode(): r.llen(k) for k in r.keys(f"{queue}:inflight:*")}


def inflight(r: redis.Redis, queue: str) -> int:
    """Items in flight, all workers, read in one script (not KEYS then LLEN each)."""
    return pending(r, queue)["inflight"]


def worker_ids(r: redis.Redis, queue: str) -> list[str]:
    """Worker ids in the heartbeat registry."""
    return [w.decode() for w in r.zrange(f"{queue}:workers", 0, -1)]


# The queue, the retry set, every in-flight list and every lane list (what is parked for a
# channel's owner; an envelope over two channels counts twice) in ONE script: Redis runs it
# atomically,
# so no item can be between two of them (popped from one list, not yet in the next) while it
# counts. KEYS inside a script is not Cluster-friendly; tests run on a standalone server.
_PENDING = """
local inflight = 0
for _, key in ipairs(redis.call('KEYS', ARGV[1] .. ':inflight:*')) do
    inflight = inflight + redis.call('LLEN', key)
end
local parked = 0
for _, key in ipairs(redis.call('KEYS', ARGV[1] .. ':lane:*')) do
    parked = parked + redis.call('LLEN', key)
end
return {redis.call('LLEN', ARGV[1]), redis.call('ZCARD', ARGV[1] .. ':retry'), inflight,
        parked}
"""


def pending(r: redis.Redis, queue: str) -> dict[str, int]:
    """{queue, retry, inflight, parked}: what is still to do, counted atomically."""
    waiting, retry, held, parked = r.eval(_PENDING, 0, queue)
    return {"queue": waiting, "retry": retry, "inflight": held, "parked": parked}


def wait_settled(r: redis.Redis, queue: str, gone: Sequence[WorkerProcess] = (),
                 timeout: float = 30.0) -> None:
    """Wait until the dead workers in `gone` have left the registry (their lists were
    reaped), then until queue, retry set, in-flight and lane lists are empty at one instant.
    Checking them one by one races: the reap moves items back to the queue, and a greenlet
    moves them between lists, so separate reads can all see empty while work remains."""
    for proc in gone:
        wait_for(lambda p=proc: not any(p.pid_tag in w for w in worker_ids(r, queue)),
                 timeout, f"worker {proc.proc.pid} to leave the registry")
    last: dict[str, int] = {}

    def settled() -> bool:
        last.update(pending(r, queue))
        return not any(last.values())

    try:
        wait_for(settled, timeout, "queue, retry set and in-flight lists all empty")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still pending: {last}") from None


def metrics(port: int) -> dict[str, float]:
    """A worker's /metrics as {'name{label="v"}': value} (labels as Prometheus prints them)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    """A worker's /healthz: (HTTP status, JSON body), 503 included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class WorkerProcess:
    """`python worker.py` with the given settings, its log captured in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, args: list[str] | None = None,
                 script: Path = ROOT / "worker.py"):
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("RELAY_", "PUSHER_", "REDIS_"))}
        full_env.update(env)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen([sys.executable, str(script), *(args or [])],
                                     cwd=ROOT, env=full_env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout: float = 15.0) -> None:
        wait_for(lambda: "started:" in self.log() or self.proc.poll() is not None, timeout,
                 "the worker's start line")
        assert self.proc.poll() is None, f"worker exited early:\n{self.log()}"

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self._log.close()

    @property
    def pid_tag(self) -> str:
        """The `:pid:` part of this process's worker id, to find its Redis keys."""
        return f":{self.proc.pid}:"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def behind_a_later_one(events: list[dict[str, Any]], key: str = "s") -> list[dict[str, Any]]:
    """Events that arrived after an event of their channel pushed later.

    Each event's data carries `{key: {channel: sequence number}}` (an envelope over several
    channels carries one number per channel)."""
    import json

    highest: dict[str, int] = {}
    late = []
    for event in events:
        channel = event["channel"]
        seq = json.loads(event["data"])[key][channel]
        if seq < highest.get(channel, -1):
            late.append(event)
        else:
            highest[channel] = seq
    return late


def port_is_free(port: int) -> bool:
    """Nothing listens on this local port now (a port a test must name in advance)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def worker_processes(env: dict[str, str], logs: Path, name: str = "worker",
                     script: Path = ROOT / "worker.py") -> Iterator[Callable[..., WorkerProcess]]:
    """start(wait=True, args=None, **overrides): `worker.py` (or another version's `script`)
    with these settings plus overrides, its log under `logs`; every one killed at the end."""
    started: list[WorkerProcess] = []

    def start(wait: bool = True, args: list[str] | None = None, **overrides: str
              ) -> WorkerProcess:
        proc = WorkerProcess({**env, **overrides}, logs / f"{name}{len(started)}.log", args,
                             script=script)
        started.append(proc)
        if wait:
            proc.wait_started()
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()


@dataclass
class Running:
    """A worker serving in a greenlet of the test process (the engine tested in-process)."""
    worker: Any  # relay.process.Worker
    greenlet: gevent.Greenlet

    def stop(self, timeout: float = 15.0) -> int:
        self.worker.stop()
        return self.greenlet.get(timeout=timeout)

    def result(self, timeout: float = 60.0) -> int:
        """The exit status of a burst run."""
        return self.greenlet.get(timeout=timeout)


@contextmanager
def serving(env: dict[str, str]) -> Iterator[Callable[..., Running]]:
    """start(burst=False, **overrides): the worker the launcher builds from these settings,
    serving in a greenlet here; each stopped and closed at the end."""
    from relay import apps, config, launcher

    started: list[Running] = []

    def start(burst: bool = False, **overrides: str) -> Running:
        cfg = config.load(env={**env, **overrides})
        worker = launcher.assemble(cfg, apps.from_config(cfg), burst=burst)
        running = Running(worker, gevent.spawn(worker.serve))
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.worker.stop()
            running.greenlet.join(timeout=15)
            launcher.close(running.worker)
