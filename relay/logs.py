"""Logging set-up: plain text by default, one JSON object per line for log shippers.

1. Fields passed with `extra={...}` travel as JSON keys (json format) or as `k=v` after the
   message (text format), so the same call serves both.
2. `RepeatFilter`: an identical warning or error repeated within REPEAT_WINDOW_S is logged
   once; the next time it gets through it says how many were held back.
3. `ProcessTag`: every line says which process wrote it (`[pid 4242]`, or the worker id once
   `set_worker` was told it), because supervisord's numprocs puts several workers on one
   stdout. No log call has to pass it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

_WORKER = "relay_worker"  # the record attribute ProcessTag sets
_WHO = "relay_who"  # what the text format shows: the worker id, else the pid
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", _WORKER, _WHO}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED}


def _worker(record: logging.LogRecord) -> str | None:
    return getattr(record, _WORKER, None)


class ProcessTag(logging.Filter):
    """Stamps each record with this process's worker id (None until `set_worker`); the
    formatters fall back to the pid, which the worker id also holds (host:pid:random)."""

    def __init__(self) -> None:
        super().__init__()
        self.worker_id: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        setattr(record, _WORKER, self.worker_id)
        return True


def set_worker(worker_id: str) -> None:
    """From now on, this process's lines name `worker_id` instead of its pid."""
    for handler in logging.getLogger().handlers:
        for found in handler.filters:
            if isinstance(found, ProcessTag):
                found.worker_id = worker_id


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(f"%(asctime)s [%({_WHO})s] %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        setattr(record, _WHO, _worker(record) or f"pid {record.process}")
        text = super().format(record)
        extra = _fields(record)
        if extra:
            text += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if _worker(record):
            obj["worker"] = _worker(record)
        obj.update(_fields(record))
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


REPEAT_WINDOW_S = 10.0


class RepeatFilter(logging.Filter):
    """Hold back identical warnings and errors within a window, then report the count."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self.seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        now = self.clock()
        last_at, held = self.seen.get(key, (float("-inf"), 0))
        if now - last_at < self.window_s:
            self.seen[key] = (last_at, held + 1)
            return False
        if held:
            record.repeated = held  # shown as a field: "repeated=N" or "repeated": N
        if len(self.seen) > 1000:
            self.seen.clear()
        self.seen[key] = (now, 0)
        return True


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send every log line to stderr (supervisord collects it) in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter())
    handler.addFilter(ProcessTag())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # urllib3 logs each new connection at debug level and each retry at warning; ours say it.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
