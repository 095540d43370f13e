"""soketi with two apps, a pusher-js subscriber on each: first the pusher library sends to each
app (the harness works), then relay with RELAY_APPS does, and each subscriber must get exactly
its own app's notifications.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pusher
import pytest
import redis

from relay import apps, config, launcher, producer
from relay.apps import load_apps
from relay.redis_server import RedisServer
from tests.soketi_support import Soketi, SoketiApp, Subscriber, install
from tests.support import wait_for

TENANT_A = SoketiApp("5101", "tenant-a-key", "tenant-a-secret")
TENANT_B = SoketiApp("5102", "tenant-b-key", "tenant-b-secret")
SHARED = "shared-room"  # the same channel name in both apps: they must stay apart
PRIVATE = "private-room"


@pytest.fixture(scope="module")
def soketi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Soketi]:
    install()
    with Soketi([TENANT_A, TENANT_B], tmp_path_factory.mktemp("soketi-apps")) as server:
        yield server


def library(server: Soketi, app: SoketiApp) -> pusher.Pusher:
    return pusher.Pusher(app_id=app.app_id, key=app.key, secret=app.secret, host="127.0.0.1",
                         port=server.port, ssl=False, timeout=5)


def test_each_subscriber_connects_with_its_apps_key_and_gets_only_its_events(
        soketi: Soketi, tmp_path: Path) -> None:
    subscribers = {app.app_id: Subscriber(soketi.port, [SHARED, PRIVATE],
                                          tmp_path / f"pusher-js-{app.app_id}.log", app)
                   for app in (TENANT_A, TENANT_B)}
    try:
        for subscriber in subscribers.values():
            subscriber.wait_ready()  # subscribed (private: signed with its app's secret)
        for app in (TENANT_A, TENANT_B):
            library(soketi, app).trigger([SHARED, PRIVATE], "note", {"for": app.app_id})
            library(soketi, app).trigger("#server-to-user-user-42", "dm", {"for": app.app_id})
        for app_id, subscriber in subscribers.items():
            wait_for(lambda s=subscriber: len(s.received()) >= 3, 30,
                     f"app {app_id}'s subscriber to get its 3 events")
        for app_id, subscriber in subscribers.items():
            mine = json.dumps({"for": app_id})
            assert subscriber.received() == sorted([
                (SHARED, "note", mine), (PRIVATE, "note", mine), ("user:user-42", "dm", mine)])
    finally:
        for subscriber in subscribers.values():
            subscriber.stop()


def test_an_app_soketi_does_not_have_is_refused(soketi: Soketi, tmp_path: Path) -> None:
    """The config file was read: soketi's default app (app-key) is gone."""
    stranger = SoketiApp("app-id", "app-key", "app-secret")
    subscriber = Subscriber(soketi.port, [SHARED], tmp_path / "stranger.log", stranger)
    try:
        errors = wait_for(lambda: [line for line in subscriber.lines() if "error" in line], 30,
                          "pusher-js to be refused")
    finally:
        subscriber.stop()
    assert errors[0]["code"] == 4001, errors  # Pusher's "application does not exist"


def test_a_relay_apps_file_for_the_two_apps(soketi: Soketi, tmp_path: Path) -> None:
    """What a RELAY_APPS test writes for this soketi, read back as relay reads it."""
    path = tmp_path / "apps.toml"
    path.write_text("".join(f'[apps.{name}]\nurl = "{app.pusher_url(soketi.port)}"\n'
                            for name, app in (("default", TENANT_A), ("tenant-b", TENANT_B))))
    path.chmod(0o600)
    apps = load_apps(str(path))
    assert {a.name: (a.pusher.app_id, a.pusher.key, a.pusher.port) for a in apps} == {
        "default": (TENANT_A.app_id, TENANT_A.key, soketi.port),
        "tenant-b": (TENANT_B.app_id, TENANT_B.key, soketi.port)}


def test_relay_routes_each_notification_to_its_own_apps_subscribers(
        soketi: Soketi, tmp_path: Path, r: redis.Redis, redis_server: RedisServer,
        queue_name: str) -> None:
    """Issue 23's end-to-end test: a worker with RELAY_APPS sends each notification to the app
    it names (none: `default`), so each pusher-js subscriber gets exactly its app's."""
    path = tmp_path / "apps.toml"
    path.write_text("".join(f'[apps.{name}]\nurl = "{app.pusher_url(soketi.port)}"\n'
                            for name, app in (("default", TENANT_A), ("tenant-b", TENANT_B))))
    path.chmod(0o600)
    subscribers = {app.app_id: Subscriber(soketi.port, [SHARED, PRIVATE],
                                          tmp_path / f"relay-js-{app.app_id}.log", app)
                   for app in (TENANT_A, TENANT_B)}
    try:
        for subscriber in subscribers.values():
            subscriber.wait_ready()
        for app, name in ((TENANT_A, None), (TENANT_B, "tenant-b")):
            for n in range(3):
                producer.notify([SHARED, PRIVATE], {"for": app.app_id, "n": n}, "note",
                                client=r, queue=queue_name, app=name)
            producer.notify("#server-to-user-user-42", {"for": app.app_id}, "dm", client=r,
                            queue=queue_name, app=name)
        r.rpush(queue_name, json.dumps({"channel": SHARED, "for": TENANT_A.app_id, "n": 3}))
        cfg = config.load(env={"REDIS_URL": redis_server.url, "RELAY_QUEUE": queue_name,
                               "RELAY_APPS": str(path), "RELAY_METRICS_ADDR": "off"})
        worker = launcher.assemble(cfg, apps.from_config(cfg), burst=True)
        try:
            assert worker.serve() == 0
        finally:
            launcher.close(worker)
        wanted = {TENANT_A.app_id: 8, TENANT_B.app_id: 7}
        for app_id, subscriber in subscribers.items():
            wait_for(lambda s=subscriber, n=wanted[app_id]: len(s.received()) >= n, 30,
                     f"app {app_id}'s subscriber to get its {wanted[app_id]} events")
        for app_id, subscriber in subscribers.items():
            got = [(channel, event, json.loads(data)) for channel, event, data
                   in subscriber.received()]
            assert {data["for"] for _, _, data in got} == {app_id}, got
            notes = sorted((c, d["n"]) for c, e, d in got if e in ("note", "hit"))
            expected = sorted((c, n) for c in (SHARED, PRIVATE) for n in range(3))
            if app_id == TENANT_A.app_id:
                expected = sorted([*expected, (SHARED, 3)])  # the classic one: default
            assert notes == expected
            assert [(c, e) for c, e, _ in got if e == "dm"] == [("user:user-42", "dm")]
        assert r.llen(f"{queue_name}:dead") == 0
    finally:
        for subscriber in subscribers.values():
            subscriber.stop()
