"""Measuring a child from the outside: its readiness, its CPU and memory, the server's records.

1. `Child` runs a command with its stderr read by a thread, which notes (wall clock) when the
   ready line appears and keeps the last lines for error messages; the pipe is always
   drained, so a chatty child never blocks on a full pipe.
2. `running()` is the context manager that starts a child and always ends it: SIGTERM, then
   SIGKILL if it has not exited in time.
3. `cpu_seconds` / `peak_rss_mb` read /proc; `CpuSampler` samples several processes every
   few milliseconds, so the CPU used up to an instant known only afterwards (the last
   event's arrival at the server) can be looked up instead of being read late.
4. Small pure helpers over the server's event records: arrival times, percentiles, and the
   busiest one-second window.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

CLOCK_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL_S = 0.02
STOP_TIMEOUT_S = 10.0  # relay exits within PUSHER_TIMEOUT (5 s) + a few seconds
TAIL_LINES = 30


# -- /proc ------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * CLOCK_TICK_S  # fields 14 and 15 of stat(5)


def system_busy_seconds() -> float:
    """CPU seconds every core spent on anything but idling and waiting for I/O, since boot."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = f.readline().split()[1:9]
    return sum(int(v) for v in (user, nice, system, irq, softirq, steal)) * CLOCK_TICK_S


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the resident set's high-water mark, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


class CpuSampler:
    """Samples the CPU seconds of named processes (and of the whole machine) in a thread.

    The machine-wide figure is there because other programs may share the cores: what
    they used during a run is reported beside it, so a noisy run can be told from a slow one.
    """

    def __init__(self, pids: Mapping[str, int], interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.pids = {**pids, "bench": os.getpid()}
        self.interval_s = interval_s
        self.times: list[float] = []
        self.values: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        now, values = time.time(), {}
        for name, pid in self.pids.items():
            try:
                values[name] = cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                values[name] = self.values[-1][name] if self.values else 0.0  # it has exited
        values["system"] = system_busy_seconds()
        self.times.append(now)
        self.values.append(values)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def at(self, name: str, when: float) -> float:
        """CPU seconds of `name` at the first sample taken at or after `when`."""
        i = min(bisect.bisect_left(self.times, when), len(self.times) - 1)
        return self.values[i][name]

    def used(self, name: str, start: float, end: float) -> float:
        return self.at(name, end) - self.at(name, start)

    def others(self, start: float, end: float) -> float:
        """CPU seconds used by processes this sampler does not watch."""
        ours = sum(self.used(name, start, end) for name in self.pids)
        return max(0.0, self.used("system", start, end) - ours)


# -- children ---------------------------------------------------------------------------------

class ChildFailed(RuntimeError):
    pass


class Child:
    """One subprocess whose stderr is watched for a ready line."""

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str], cwd: str,
                 ready_marker: str) -> None:
        self.name = name
        self.ready_marker = ready_marker
        self.ready_at: float | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._ready = threading.Event()
        self.proc = subprocess.Popen(list(command), env=dict(env), cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if self.ready_at is None and self.ready_marker in line:
                self.ready_at = time.time()
                self._ready.set()
            self.tail.append(line.rstrip())
        self._ready.set()  # EOF: wake a waiter, who sees ready_at is still None

    def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Wall-clock time of the ready line; ChildFailed if it exits or stays silent."""
        self._ready.wait(timeout_s)
        if self.ready_at is None:
            raise ChildFailed(f"{self.name} never became ready:\n{self.describe_tail()}")
        return self.ready_at

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ChildFailed(f"{self.name} exited with {self.proc.returncode}:\n"
                              f"{self.describe_tail()}")

    def describe_tail(self) -> str:
        return "\n".join(f"    {line}" for line in self.tail) or "    (no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=2)


@contextmanager
def running(name: str, command: Sequence[str], env: Mapping[str, str], cwd: str,
            ready_marker: str = "started:") -> Iterator[Child]:
    child = Child(name, command, env, cwd, ready_marker)
    try:
        yield child
    finally:
        child.stop()


# -- event records ----------------------------------------------------------------------------

def event_data(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [json.loads(e["data"]) for e in events]


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (p in 0..100)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def busiest_second(times: Sequence[float]) -> int:
    """The most events in any one-second window (sliding, not aligned to whole seconds)."""
    ordered, best, left = sorted(times), 0, 0
    for right, t in enumerate(ordered):
        while t - ordered[left] >= 1.0:
            left += 1
        best = max(best, right - left + 1)
    return best


def per_second(times: Sequence[float], start: float, end: float) -> list[int]:
    """Counts per whole second from start, for the events that arrived in [start, end)."""
    bins = [0] * max(1, round(end - start))
    for t in times:
        if start <= t < end:
            bins[min(int(t - start), len(bins) - 1)] += 1
    return bins
