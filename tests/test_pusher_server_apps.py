"""The local Pusher server with several apps: each its own credentials, records and faults.

The client is the official pusher library, one per app, so each request is signed the way
Pusher expects with that app's key and secret.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pusher
import pytest
import requests

from relay.apps import load_apps
from relay.pusher_server import AppCredentials, LocalPusher

APPS = [AppCredentials("1", "key-1", "secret-1"), AppCredentials("2", "key-2", "secret-2"),
        AppCredentials("3", "key-3", "secret:with:colons")]


@pytest.fixture(scope="module")
def server() -> Iterator[LocalPusher]:
    first, *others = APPS
    with LocalPusher(first.app_id, first.key, first.secret, extra_apps=others) as local:
        yield local


@pytest.fixture(autouse=True)
def _fresh(server: LocalPusher) -> None:
    server.reset()


def client(server: LocalPusher, app_id: str, key: str | None = None,
           secret: str | None = None, timeout: float = 5) -> pusher.Pusher:
    app = server.apps[app_id]
    return pusher.Pusher(app_id=app_id, key=key or app.key, secret=secret or app.secret,
                         host="127.0.0.1", port=server.port, ssl=False, timeout=timeout)


def status_of(server: LocalPusher, app_id: str, **signing: str) -> int:
    """Trigger one event on `app_id`; the HTTP status it got (200 when it was accepted)."""
    try:
        client(server, app_id, **signing).trigger("c", "e", app_id)
    except pusher.errors.PusherBadAuth:
        return 401
    except pusher.errors.PusherBadStatus as exc:
        return int(str(exc).split(":")[0].split()[-1])
    return 200


def test_each_app_takes_its_own_signed_requests_and_records_its_id(server: LocalPusher) -> None:
    for app in APPS:
        client(server, app.app_id).trigger(["a", "b"], "e", f"for {app.app_id}")
    client(server, "2").trigger_batch([{"channel": "x", "name": "e", "data": "batch"}])
    events = server.wait_for_events(7)
    assert [(e["app_id"], e["channel"], e["data"]) for e in events] == [
        ("1", "a", "for 1"), ("1", "b", "for 1"), ("2", "a", "for 2"), ("2", "b", "for 2"),
        ("3", "a", "for 3"), ("3", "b", "for 3"), ("2", "x", "batch")]
    assert [e["data"] for e in server.events("2")] == ["for 2", "for 2", "batch"]
    assert server.count("2") == {"events_total": 3, "requests_total": 2}
    assert server.count() == {"events_total": 7, "requests_total": 4}
    assert len(server.wait_for_events(3, app_id="2")) == 3
    assert server.order("3") == {"a": ["for 3"], "b": ["for 3"]}
    by_app = server.stats()["apps"]
    assert {app: counts["by_status"] for app, counts in by_app.items()} == {
        "1": {"200": 1}, "2": {"200": 2}, "3": {"200": 1}}
    assert [r["app_id"] for r in server.stats()["requests"]] == ["1", "2", "3", "2"]


@pytest.mark.parametrize("app_id,signing", [
    ("2", {"secret": "secret-1"}),  # app 1's secret on app 2
    ("2", {"key": "key-1", "secret": "secret-1"}),  # app 1's credentials on app 2's path
    ("1", {"key": "key-2"}),  # app 2's key with app 1's secret
    ("3", {"secret": "secret"}),  # a secret cut at its first colon
])
def test_a_request_is_checked_against_its_own_app(server: LocalPusher, app_id: str,
                                                  signing: dict[str, str]) -> None:
    assert status_of(server, app_id, **signing) == 401
    assert server.events() == []
    assert server.stats()["apps"][app_id]["by_status"] == {"401": 1}


def test_an_app_the_server_does_not_have_is_404(server: LocalPusher) -> None:
    assert status_of(server, "1") == 200
    stranger = pusher.Pusher(app_id="9", key="key-1", secret="secret-1", host="127.0.0.1",
                             port=server.port, ssl=False)
    with pytest.raises(pusher.errors.PusherBadStatus, match="404"):
        stranger.trigger("c", "e", "x")
    assert server.stats()["requests"][-1]["app_id"] is None


def test_status_for_one_app_while_the_others_answer_200(server: LocalPusher) -> None:
    server.set_mode(app_id="2", status=401)
    assert [status_of(server, app.app_id) for app in APPS] == [200, 401, 200]
    assert server.stats()["app_modes"]["2"]["status"] == 401
    assert server.stats()["modes"]["status"] == 0
    server.clear_mode("2")
    assert [status_of(server, app.app_id) for app in APPS] == [200, 200, 200]
    assert [e["app_id"] for e in server.events()] == ["1", "3", "1", "2", "3"]


def test_an_apps_own_modes_replace_the_server_wide_ones_for_it(server: LocalPusher) -> None:
    server.set_mode(status=503)
    server.clear_mode("3")  # app 3 healthy, whatever the server says
    assert [status_of(server, app.app_id) for app in APPS] == [503, 503, 200]
    server.set_mode(app_id="1", status=429, retry_after=2)
    assert [status_of(server, app.app_id) for app in APPS] == [429, 503, 200]
    server.set_mode(status=500)  # server-wide again: every app's own modes are dropped
    assert [status_of(server, app.app_id) for app in APPS] == [500, 500, 500]
    assert server.stats()["app_modes"] == {}


def test_delay_for_one_app(server: LocalPusher) -> None:
    server.set_mode(app_id="2", delay=1.0)
    started = time.monotonic()
    assert status_of(server, "1") == 200
    fast = time.monotonic() - started
    started = time.monotonic()
    assert status_of(server, "2") == 200
    slow = time.monotonic() - started
    assert slow >= 1.0 and fast < 0.5, (fast, slow)


def test_fail_next_counts_per_app(server: LocalPusher) -> None:
    server.set_mode(status=503, fail_next=1)
    server.set_mode(app_id="2", status=500, fail_next=2)
    assert [status_of(server, "2") for _ in range(3)] == [500, 500, 200]
    assert [status_of(server, "1") for _ in range(2)] == [503, 200]
    assert status_of(server, "3") == 200  # the server-wide countdown ran out at app 1


def _post_in_thread(server: LocalPusher, app_id: str, timeout: float
                    ) -> tuple[threading.Thread, list[Any]]:
    """Send one signed request in a thread; its outcome lands in the returned list."""
    from pusher.http import POST, Request

    signed = Request(client(server, app_id)._pusher_client, POST, f"/apps/{app_id}/events",
                     {"name": "e", "channels": ["c"], "data": "x"})
    outcome: list[Any] = []

    def post() -> None:
        try:
            outcome.append(requests.post(server.base_url + signed.signed_path, data=signed.body,
                                         headers=signed.headers, timeout=timeout).status_code)
        except requests.RequestException as exc:
            outcome.append(type(exc))

    thread = threading.Thread(target=post)
    thread.start()
    return thread, outcome


def test_hang_for_one_app_is_released_by_its_own_change_only(server: LocalPusher) -> None:
    server.set_mode(app_id="1", hang=True)
    server.set_mode(app_id="2", hang=True)
    hung_1, outcome_1 = _post_in_thread(server, "1", timeout=1.5)
    hung_2, outcome_2 = _post_in_thread(server, "2", timeout=30)
    deadline = time.monotonic() + 10
    while server.stats().get("faults", {}).get("hang", 0) < 2:
        assert time.monotonic() < deadline, "the two requests never hung"
        time.sleep(0.01)
    assert status_of(server, "3") == 200  # app 3 is not held up
    server.clear_mode("2")  # wakes app 2's hung request (closed unanswered), not app 1's
    hung_2.join(10)
    assert outcome_2 == [requests.exceptions.ConnectionError]
    hung_1.join(10)
    assert outcome_1 == [requests.exceptions.ReadTimeout]
    server.clear_mode()


def test_control_refuses_an_unknown_app(server: LocalPusher) -> None:
    with pytest.raises(ValueError, match="unknown app_id '9'"):
        server.set_mode(app_id="9", status=500)
    for call in (server.events, server.count, server.order):
        with pytest.raises(ValueError, match="400"):
            call("9")


def test_url_for_each_app_and_a_relay_apps_file(server: LocalPusher, tmp_path: Path) -> None:
    assert server.url == server.url_for("1")
    assert server.url_for("3") == (f"http://key-3:secret%3Awith%3Acolons@127.0.0.1:"
                                   f"{server.port}/apps/3")
    path = tmp_path / "apps.toml"
    path.write_text(server.apps_toml({"default": "1", "tenant-b": "3"}))
    path.chmod(0o600)
    apps = load_apps(str(path))
    targets = {app.name: app.pusher for app in apps}
    assert {n: (t.app_id, t.key, t.secret, t.port) for n, t in targets.items()} == {
        "default": ("1", "key-1", "secret-1", server.port),
        "tenant-b": ("3", "key-3", "secret:with:colons", server.port)}
    tenant = targets["tenant-b"]
    pusher.Pusher(app_id=tenant.app_id, key=tenant.key, secret=tenant.secret, host=tenant.host,
                  port=tenant.port, ssl=tenant.ssl).trigger("c", "e", "via the file")
    assert [e["data"] for e in server.wait_for_events(1, app_id="3")] == ["via the file"]


def test_app_ids_must_differ_and_parse_from_the_command_line() -> None:
    with pytest.raises(ValueError, match="id of its own"):
        LocalPusher("1", extra_apps=[AppCredentials("1", "k", "s")])
    assert AppCredentials.parse("2:k:s:with:colons") == AppCredentials("2", "k", "s:with:colons")
    for bad in ("2:k", "2::s", ":k:s", "2"):
        with pytest.raises(ValueError, match="ID:KEY:SECRET"):
            AppCredentials.parse(bad)
    assert "secret" not in repr(AppCredentials("2", "k", "secret"))


def test_secrets_stay_out_of_the_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with LocalPusher(stderr=log, print_events=True,
                     extra_apps=[AppCredentials("2", "key-2", "hush-2")]) as local:
        client(local, "2").trigger("c", "e", "x")
        local.wait_for_events(1)
        local.set_mode(app_id="2", status=401)
    text = log.read_text()
    assert "local Pusher API for app 1, 2 on" in text
    assert "app 2: event e on c (socket_id=None)" in text and "modes set for app 2" in text
    assert "hush-2" not in text and "test-secret" not in text
