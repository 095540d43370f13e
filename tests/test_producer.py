"""relay.producer: the shapes it writes, validation before the push, no gevent, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis

from relay.errors import SettingError
from relay.message import InvalidMessage, parse
from relay.producer import Producer, notify
from relay.pusher_server import LocalPusher
from relay.rules import MAX_DATA_BYTES
from tests.support import ROOT, WorkerProcess, wait_for


def popped(r: redis.Redis, queue: str) -> list[str]:
    return [item.decode() for item in r.lrange(queue, 0, -1)]


def test_an_envelope_stamped_with_its_enqueue_time_reads_as_the_classic_form(
        r: redis.Redis, queue_name: str) -> None:
    """What the browser receives (channel, event, data) is what the classic form gave: the
    envelope carries no event, so the worker's RELAY_EVENT applies to both."""
    text = notify("site-42", {"title": "Hi", "url": "/a"}, client=r, queue=queue_name)
    obj = json.loads(text)
    assert obj["relay"] == 1 and "event" not in obj and isinstance(obj["enqueued_at"], float)
    classic = notify("site-42", {"title": "Hi", "url": "/a"}, client=r, queue=queue_name,
                     classic=True)
    assert json.loads(classic) == {"channel": "site-42", "title": "Hi", "url": "/a"}
    assert popped(r, queue_name) == [text, classic]
    for worker_event in ("hit", "page-view"):
        n, c = (parse(t.encode(), worker_event) for t in (text, classic))
        assert (n.channels, n.event, n.data) == (c.channels, c.event, c.data) == (
            ("site-42",), worker_event, '{"title":"Hi","url":"/a"}')
        assert n.enqueued_at == obj["enqueued_at"] and c.enqueued_at is None


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
    n = parse(text.encode(), "the-workers-event")
    expected_channels = (channels,) if isinstance(channels, str) else tuple(channels)
    assert n.channels == expected_channels
    assert n.event == (event or "the-workers-event")
    assert n.data == (data if isinstance(data, str) else json.dumps(data, separators=(",", ":")))
    assert n.socket_id == socket_id


def test_relay_event_is_the_workers_except_in_classic_mode(
        r: redis.Redis, queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_EVENT", "ping")
    text = notify(["a", "b"], {"x": 1}, client=r, queue=queue_name)
    assert parse(text.encode(), "hit").event == "hit"  # left to the worker's setting
    text = notify(["a", "b"], {"x": 1}, client=r, queue=queue_name, classic=True)
    assert parse(text.encode(), "hit").event == "ping"  # as the producer always did


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


def test_data_limit_is_relay_max_data_bytes(r: redis.Redis, queue_name: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    big = {"x": "y" * 15000}
    with pytest.raises(InvalidMessage, match="over the limit of 10240"):
        notify("a", big, client=r, queue=queue_name)
    monkeypatch.setenv("RELAY_MAX_DATA_BYTES", "20000")
    notify("a", big, client=r, queue=queue_name)
    notify("a", big, client=r, queue=queue_name, classic=True)
    with pytest.raises(InvalidMessage, match="over the limit of 12000"):
        Producer(r, queue_name, max_data_bytes=12000).notify("a", big)  # the argument wins
    monkeypatch.setenv("RELAY_MAX_DATA_BYTES", " ")  # empty counts as unset, as for the worker
    assert Producer(r, queue_name).limit == MAX_DATA_BYTES
    assert r.llen(queue_name) == 2


@pytest.mark.parametrize("value", ["abc", "0", "1048577", "-5", "1.5"])
def test_a_bad_relay_max_data_bytes_names_the_setting(
        r: redis.Redis, queue_name: str, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("RELAY_MAX_DATA_BYTES", value)
    with pytest.raises(SettingError, match=r"\ARELAY_MAX_DATA_BYTES: must be "):
        notify("a", {"x": 1}, client=r, queue=queue_name)
    with pytest.raises(SettingError, match="must be 1 to 1048576 bytes"):
        Producer(r, queue_name, max_data_bytes=0)
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
        (1, None, False)]  # no app: version 1, as before
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


def test_worker_delivers_the_same_event_and_data_with_the_age_measured(
        start_worker: Callable[..., WorkerProcess], r: redis.Redis, queue_name: str,
        pusher: LocalPusher) -> None:
    """Under the worker's RELAY_EVENT and a raised RELAY_MAX_DATA_BYTES (soketi's 100 KB),
    the stamped envelope and the classic form arrive alike; only the first gives an age."""
    pusher.set_mode(max_data_bytes=102400)
    start_worker(RELAY_EVENT="page-view", RELAY_MAX_DATA_BYTES="102400")
    data = {"title": "Hi", "body": "y" * 15000}
    producer = Producer(r, queue_name, max_data_bytes=102400)
    producer.notify("site-42", data)
    events = pusher.wait_for_events(1, timeout=10)
    # The settle that counts the age follows the call's answer: wait for it, not just the event.
    wait_for(lambda: [k for key in r.keys(f"{queue_name}:history:s:*") for k in r.hkeys(key)
                      if k.startswith(b"age:")], what="an enqueue-to-delivery age counted")
    Producer(r, queue_name, max_data_bytes=102400, classic=True).notify("site-42", data)
    events = pusher.wait_for_events(2, timeout=10)
    stamped, classic = ((e["channel"], e["name"], e["data"]) for e in events)
    assert stamped == classic
    assert stamped[:2] == ("site-42", "page-view") and json.loads(stamped[2]) == data
