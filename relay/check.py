"""`check`: the health of every live worker on the queue, one line each, for scripts and
container health checks.

1. The registry says who is alive (`Q:workers`, on Redis's clock); each worker's heartbeat
   info (`Q:workers:info`) says where it serves /healthz: `metrics_addr`, "HOST:PORT", or
   absent / "off". So a second process on port 9301 is checked without `--metrics-addr`.
2. Each advertised address gets one GET /healthz. A wildcard bind (0.0.0.0, ::) is asked on
   the worker's host; a loopback one on another host cannot be reached from here, and is
   said so rather than counted as down.
3. When no live worker advertises an address (workers older than `metrics_addr`, or metrics
   off everywhere), the check falls back to RELAY_METRICS_ADDR's /healthz, and with that off
   to "Redis answers and a live worker is registered".
Exit status: 0 when every worker asked answered healthy (and one is alive); 1 otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, TextIO

from relay.config import Config
from relay.queue import RedisQueue

EXIT_OK, EXIT_UNHEALTHY = 0, 1
HTTP_TIMEOUT_S = 5.0
WILDCARDS = ("", "0.0.0.0", "::", "*")


@dataclass(frozen=True)
class Verdict:
    """One worker's (or one address's) result: healthy, and the line that says it."""

    healthy: bool
    line: str


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def healthz(addr: str) -> Verdict:
    """GET http://addr/healthz: 200 is healthy; a 503 names the problems; no answer says why."""
    url = f"http://{addr}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            return Verdict(True, resp.read().decode())
    except urllib.error.HTTPError as exc:
        return Verdict(False, exc.read().decode())
    except OSError as exc:
        return Verdict(False, f"unhealthy: no answer from {url} ({exc})")


def where_to_ask(addr: str, host: str | None) -> str | None:
    """The address to reach a worker's /healthz from this host, or None when it listens on
    another host's loopback."""
    bind, _, port = addr.rpartition(":")
    bind = bind.strip("[]")
    here = host in (None, socket.gethostname())
    if bind in WILDCARDS:
        return f"127.0.0.1:{port}" if here else f"{host}:{port}"
    if is_loopback(bind) and not here:
        return None
    return addr


def _advertised(raw: bytes | None) -> dict[str, Any]:
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def check_worker(worker: dict[str, Any], info: dict[str, Any]) -> Verdict:
    label = f"worker {worker['id']}"
    addr = info.get("metrics_addr")
    if not addr or addr == "off":
        return Verdict(True, f"{label}: alive (heartbeat {worker['heartbeat_age_s']:.1f} s "
                             "ago); it publishes no metrics address, so no /healthz to ask")
    target = where_to_ask(str(addr), info.get("host"))
    if target is None:
        return Verdict(True, f"{label}: alive (heartbeat {worker['heartbeat_age_s']:.1f} s "
                             f"ago); /healthz on {addr} is loopback on host {info.get('host')}:"
                             " run check there")
    verdict = healthz(target)
    return Verdict(verdict.healthy, f"{label} at {target}: {verdict.line.strip()}")


def run(cfg: Config, queue: RedisQueue, out: TextIO) -> int:
    """Check every live worker of the queue; the exit status (module docstring)."""
    queue.client.ping()
    live = [w for w in queue.workers() if not w["expired"]]
    raws = queue.client.hmget(queue.keys.info, [w["id"] for w in live]) if live else []
    infos = [_advertised(raw) for raw in raws]
    if not any(info.get("metrics_addr") not in (None, "", "off") for info in infos):
        return _fallback(cfg, queue, len(live), out)
    verdicts = [check_worker(w, info) for w, info in zip(live, infos, strict=True)]
    for verdict in verdicts:
        out.write(verdict.line + "\n")
    healthy = sum(v.healthy for v in verdicts)
    out.write(f"{healthy} of {len(verdicts)} live worker(s) on {cfg.queue} healthy\n")
    return EXIT_OK if healthy == len(verdicts) else EXIT_UNHEALTHY


def _fallback(cfg: Config, queue: RedisQueue, alive: int, out: TextIO) -> int:
    """No worker says where its /healthz is: ask RELAY_METRICS_ADDR's, or count the live."""
    if cfg.metrics_addr != "off":
        verdict = healthz(cfg.metrics_addr)
        out.write(verdict.line.strip() + "\n")
        return EXIT_OK if verdict.healthy else EXIT_UNHEALTHY
    out.write(f"redis ok; {alive} live worker(s) on {cfg.queue}\n")
    return EXIT_OK if alive else EXIT_UNHEALTHY
