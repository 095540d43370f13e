"""soketi end to end: relay delivers classic, envelope, encrypted and user notifications
into a real soketi, and a real pusher-js client receives what a browser would.

soketi, Node 18 and pusher-js come from npm (see tests/soketi_support.py, which also starts
soketi with its apps in a config file and runs the pusher-js subscriber).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from relay import config
from relay.producer import Producer
from relay.redis_server import RedisServer
from tests.soketi_support import Soketi, SoketiApp, Subscriber, install
from tests.support import WorkerProcess, wait_for

APP = SoketiApp("4242", "relay-key", "relay-secret")
APP_ID, APP_KEY, APP_SECRET = APP.app_id, APP.key, APP.secret
MASTER_KEY = base64.b64encode(hashlib.sha256(b"relay soketi test key").digest()).decode()
PUBLIC, PRIVATE, ENCRYPTED = "soketi-public", "private-soketi", "private-encrypted-soketi"
USER_ID = "user-42"
QUEUE = "soketi-e2e"
ENCRYPTION_SETTING = "PUSHER_ENCRYPTION_MASTER_KEY_BASE64"


@pytest.fixture(scope="module")
def soketi_install() -> Path:
    return install()


@pytest.fixture(scope="module")
def soketi(soketi_install: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[int]:
    """A soketi on free loopback ports with one app (user authentication on); its port."""
    with Soketi([APP], tmp_path_factory.mktemp("soketi")) as server:
        yield server.port


def subscribe(port: int, channels: list[str], log_path: Path) -> Subscriber:
    return Subscriber(port, channels, log_path, APP, USER_ID, MASTER_KEY)


def _relay_encrypts() -> bool:
    """Whether this relay has the encryption setting (added with issue 10 section 4)."""
    return any(setting.env == ENCRYPTION_SETTING for setting in config.SETTINGS)


def _as_received(data: Any) -> str:
    return json.dumps(data, sort_keys=True)


def test_pusher_js_receives_all_four_kinds_through_soketi(
        soketi: int, redis_server: RedisServer, tmp_path: Path) -> None:
    subscriber = subscribe(soketi, [PUBLIC, PRIVATE, ENCRYPTED], tmp_path / "pusher-js.log")
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

    subscriber = subscribe(soketi, [ENCRYPTED], tmp_path / "pusher-js.log")
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
