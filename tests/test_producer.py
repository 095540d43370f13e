"""relay.producer: the shapes it writes, validation before the push, no gevent, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis

from relay.message import InvalidMessage, parse
from relay.producer import Producer, notify
from relay.pusher_server import LocalPusher
from relay.rules import MAX_DATA_BYTES
from tests.support import ROOT, WorkerProcess


def popped(r: redis.Redis, queue: str) -> list[str]:
    return [item.decode() for item in r.lrange(queue, 0, -1)]


def test_classic_shape_when_it_can(r: redis.Redis, queue_name: str) -> None:
    text = notify("site-42", {"title": "Hi", "url": "/a"}, client=r, queue=queue_name)
    assert json.loads(text) == {"channel": "site-42", "title": "Hi", "url": "/a"}
    assert popped(r, queue_name) == [text]
    n = parse(text.encode(), "hit")
    assert (n.channels, n.event, json.loads(n.data)) == (("site-42",), "hit",
                                                          {"title": "Hi", "url": "/a"})


@pytest.mark.parametrize(("channels", "data", "event", "socket_id"), [
    (["a", "b"], {"x": 1}, None, None),            # a list, even of one, is an envelope
    (["a"], {"x": 1}, None, None),
    ("a", {"x": 1}, "order-paid", None),            # an event name
    ("a", {"x": 1}, None, "123.456"),               # a sender to exclude
    ("a", "plain text", None, None),                # data not a dict
    ("a", [1, 2], None, None),
    ("a", {"channel": "inner", "x": 1}, None, None),  # data with its own channel key
])
def test_envelope_when_classic_cannot_say_it(
        r: redis.Redis, queue_name: str, channels: Any, data: Any, event: str | None,
        socket_id: str | None) -> None:
    text = notify(channels, data, event, socket_id, client=r, queue=queue_name)
    assert popped(r, queue_name) == [text]
    obj = json.loads(text)
    assert obj["relay"] == 1 and "channel" not in obj
    assert isinstance(obj["enqueued_at"], float)
    n = parse(text.encode(), "ignored-for-envelopes")
    expected_channels = (channels,) if isinstance(channels, str) else tuple(channels)
    assert n.channels == expected_channels
    assert n.event == (event or "hit")
    assert n.data == (data if isinstance(data, str) else json.dumps(data, separators=(",", ":")))
    assert n.socket_id == socket_id


def test_envelope_default_event_comes_from_relay_event(
        r: redis.Redis, queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_EVENT", "ping")
    text = notify(["a", "b"], {"x": 1}, client=r, queue=queue_name)
    assert parse(text.encode(), "hit").event == "ping"


def test_environment_gives_redis_url_and_queue(
        r: redis.Redis, redis_server: Any, queue_name: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("RELAY_QUEUE", queue_name)
    text = notify("a", {"x": 1})
    assert popped(r, queue_name) == [text]


def test_producer_keeps_its_client_and_settings(r: redis.Redis, queue_name: str) -> None:
    producer = Producer(r, queue_name, default_event="tick", clock=lambda: 1234.5)
    first = producer.notify("a", {"n": 1})
    second = producer.notify(["a"], {"n": 2})
    assert popped(r, queue_name) == [first, second]
    assert json.loads(second)["event"] == "tick"
    assert json.loads(second)["enqueued_at"] == 1234.5


@pytest.mark.parametrize(("channels", "data", "event", "socket_id"), [
    ("bad channel!", {"x": 1}, None, None),
    (["ok", "bad channel!"], {"x": 1}, None, None),
    ([], {"x": 1}, None, None),
    ([f"c{i}" for i in range(101)], {"x": 1}, None, None),
    ("a", {"x": "y" * MAX_DATA_BYTES}, None, None),        # classic, too big
    (["a"], "y" * (MAX_DATA_BYTES + 1), None, None),       # envelope, too big
    ("a", {"x": 1}, "", None),
    ("a", {"x": 1}, None, "not-a-socket-id"),
    ("a", {"x": object()}, None, None),                    # not JSON-serialisable
    (["a"], {"x": float("nan")}, None, None),              # not JSON to a browser
])
def test_invalid_input_raises_and_pushes_nothing(
        r: redis.Redis, queue_name: str, channels: Any, data: Any, event: str | None,
        socket_id: str | None) -> None:
    with pytest.raises(InvalidMessage):
        notify(channels, data, event, socket_id, client=r, queue=queue_name)
    assert r.exists(queue_name) == 0


def test_an_app_makes_an_envelope_of_version_2(r: redis.Redis, queue_name: str) -> None:
    producer = Producer(r, queue_name, clock=lambda: 99.5)
    pushed = [producer.notify("a", {"n": 1}, app="tenant-b"),
              producer.notify(["a", "b"], "text", "ev", "1.2", app="tenant_C-9"),
              notify("a", {"n": 3}, client=r, queue=queue_name, app="default"),
              producer.notify("a", {"n": 4}, app=None)]
    assert popped(r, queue_name) == pushed
    shapes = [json.loads(text) for text in pushed]
    assert [(s.get("relay"), s.get("app"), "channel" in s) for s in shapes] == [
        (2, "tenant-b", False), (2, "tenant_C-9", False), (2, "default", False),
        (None, None, True)]  # no app: classic, as before
    assert shapes[0]["enqueued_at"] == 99.5
    parsed = [parse(text.encode(), "hit") for text in pushed]
    assert [(n.app, n.channels, n.event) for n in parsed] == [
        ("tenant-b", ("a",), "hit"), ("tenant_C-9", ("a", "b"), "ev"), (None, ("a",), "hit"),
        (None, ("a",), "hit")]


@pytest.mark.parametrize("app", ["", "tenant b", "tenant.b", "x" * 65, 5, ["a"]])
def test_a_bad_app_raises_and_pushes_nothing(r: redis.Redis, queue_name: str, app: Any
                                             ) -> None:
    with pytest.raises(InvalidMessage, match="app"):
        notify("a", {"x": 1}, client=r, queue=queue_name, app=app)
    with pytest.raises(InvalidMessage, match="app"):
        Producer(r, queue_name).notify(["a"], "x", app=app)
    assert r.exists(queue_name) == 0


def test_import_does_not_load_gevent() -> None:
    code = "import relay.producer, sys; assert 'gevent' not in sys.modules, 'gevent loaded'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_worker_delivers_what_the_producer_pushed(
        start_worker: Callable[..., WorkerProcess], r: redis.Redis, queue_name: str,
        pusher: LocalPusher) -> None:
    start_worker()
    notify("site-42", {"title": "Hi", "url": "/a"}, client=r, queue=queue_name)
    notify(["x", "y"], {"n": 1}, "order-paid", "123.456", client=r, queue=queue_name)
    events = pusher.wait_for_events(3, timeout=10)
    seen = sorted((e["channel"], e["name"], json.loads(e["data"]), e["socket_id"])
                  for e in events)
    assert seen == [
        ("site-42", "hit", {"title": "Hi", "url": "/a"}, None),
        ("x", "order-paid", {"n": 1}, "123.456"),
        ("y", "order-paid", {"n": 1}, "123.456"),
    ]
