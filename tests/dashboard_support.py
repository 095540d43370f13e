"""Helpers for the dashboard's tests: `python worker.py dashboard` as a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from relay.redis_server import RedisServer
from tests.support import ROOT


def dashboard_cmd(redis_server: RedisServer, queue_name: str, log_path: Path,
                  **env: str) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "PUSHER_",
                                                                      "REDIS_"))}
    full.update(REDIS_URL=redis_server.url, RELAY_QUEUE=queue_name, **env)
    return subprocess.Popen([sys.executable, str(ROOT / "worker.py"), "dashboard"], cwd=ROOT,
                            env=full, stdout=subprocess.DEVNULL,
                            stderr=log_path.open("wb"))  # noqa: SIM115 - the child owns it


def listening_port(proc: subprocess.Popen, log_path: Path) -> int | None:
    """The port the OS gave the dashboard, from its start line."""
    if proc.poll() is not None:
        raise AssertionError(f"dashboard exited: {log_path.read_text()}")
    found = re.search(r"on http://[^ ]+:(\d+)/", log_path.read_text())
    return int(found.group(1)) if found else None
