"""Shared test helpers: waiting on conditions, and the worker as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


class WorkerProcess:
    """`python worker.py` with the given settings, its log captured in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, args: list[str] | None = None):
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("RELAY_", "PUSHER_", "REDIS_"))}
        full_env.update(env)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "worker.py"), *(args or [])],
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
