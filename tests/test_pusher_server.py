"""Tests for relay.pusher_server: the local Pusher HTTP API used by the other tests.

The official ``pusher`` library is the client wherever it can be, so a signing or
format difference from real Pusher shows up here. Requests the library refuses to
build (too many channels, oversized data, tampered signatures) are crafted with a
signer written independently below; ``test_crafted_request_is_accepted`` proves that
signer right, so the 4xx tests fail for the reason they claim.
"""

import hashlib
import hmac
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pusher
import pytest
import requests

from relay.pusher_server import LocalPusher, parse_batch, parse_trigger

REPO_ROOT = Path(__file__).resolve().parent.parent
EVENTS = "/apps/1/events"
BATCH = "/apps/1/batch_events"


@pytest.fixture(scope="module")
def server() -> Iterator[LocalPusher]:
    with LocalPusher(app_id="1", key="test-key", secret="test-secret") as local:
        yield local


@pytest.fixture(autouse=True)
def _fresh(server: LocalPusher) -> None:
    server.reset()


@pytest.fixture
def client(server: LocalPusher) -> pusher.Pusher:
    return pusher.Pusher(
        app_id="1", key="test-key", secret="test-secret",
        host="127.0.0.1", port=server.port, ssl=False, timeout=5,
    )


def signed_url(
    server: LocalPusher,
    path: str,
    body: bytes,
    *,
    secret: str | None = None,
    timestamp: int | None = None,
    body_md5: str | None = None,
) -> str:
    params = {
        "auth_key": server.key,
        "auth_timestamp": str(int(time.time()) if timestamp is None else timestamp),
        "auth_version": "1.0",
        "body_md5": hashlib.md5(body).hexdigest() if body_md5 is None else body_md5,
    }
    query = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
    to_sign = f"POST\n{path}\n{query}".encode()
    key = (server.secret if secret is None else secret).encode()
    signature = hmac.new(key, to_sign, hashlib.sha256).hexdigest()
    return f"{server.base_url}{path}?{query}&auth_signature={signature}"


def post(
    server: LocalPusher, payload: Any, path: str = EVENTS, timeout: float = 5, **sign: Any
) -> requests.Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return requests.post(
        signed_url(server, path, body, **sign), data=body, timeout=timeout,
        headers={"Content-Type": "application/json"},
    )


def event(**overrides: Any) -> dict[str, Any]:
    return {"name": "my-event", "channels": ["my-channel"], "data": "{}", **overrides}


def statuses(server: LocalPusher) -> list[Any]:
    return [entry["status"] for entry in server.stats()["requests"]]


# ---------------------------------------------------------------- happy paths


def test_trigger_is_recorded(server: LocalPusher, client: pusher.Pusher) -> None:
    before = time.time()
    assert client.trigger("my-channel", "my-event", {"hello": "world"}) == {}
    after = time.time()

    [record] = server.wait_for_events(1)
    assert record["channel"] == "my-channel"
    assert record["name"] == "my-event"
    assert json.loads(record["data"]) == {"hello": "world"}
    assert record["socket_id"] is None
    assert record["path"] == EVENTS
    assert before - 1 <= record["received_at"] <= after + 1
    assert server.stats()["by_status"] == {"200": 1}


def test_multi_channel_trigger_records_one_event_per_channel(
    server: LocalPusher, client: pusher.Pusher
) -> None:
    client.trigger(["a", "b", "c"], "multi", "payload")
    records = server.wait_for_events(3)
    assert [r["channel"] for r in records] == ["a", "b", "c"]
    assert {(r["name"], r["data"]) for r in records} == {("multi", "payload")}
    assert server.stats()["requests_total"] == 1


def test_trigger_batch(server: LocalPusher, client: pusher.Pusher) -> None:
    reply = client.trigger_batch([
        {"channel": "one", "name": "first", "data": "1"},
        {"channel": "two", "name": "second", "data": "2", "socket_id": "12.34"},
    ])
    assert reply == {}
    records = server.wait_for_events(2)
    assert [(r["channel"], r["name"], r["data"]) for r in records] == [
        ("one", "first", "1"), ("two", "second", "2"),
    ]
    assert records[1]["socket_id"] == "12.34"
    assert {r["path"] for r in records} == {BATCH}


def test_socket_id_is_recorded(server: LocalPusher, client: pusher.Pusher) -> None:
    client.trigger("my-channel", "my-event", "x", socket_id="123.456")
    assert server.wait_for_events(1)[0]["socket_id"] == "123.456"


def test_info_is_answered_like_pusher(server: LocalPusher) -> None:
    response = post(server, event(info="subscription_count"))
    assert response.json() == {"channels": {"my-channel": {"subscription_count": 0}}}
    response = post(server, {"batch": [
        {"channel": "a", "name": "e", "data": "", "info": "subscription_count"},
        {"channel": "b", "name": "e", "data": ""},
    ]}, BATCH)
    assert response.json() == {"batch": [{"subscription_count": 0}, {}]}


def test_crafted_request_is_accepted(server: LocalPusher) -> None:
    response = post(server, event(channels=["x"]))
    assert response.status_code == 200, response.text
    assert response.json() == {}
    assert server.wait_for_events(1)[0]["channel"] == "x"


def test_single_channel_field_is_accepted(server: LocalPusher) -> None:
    payload = {"name": "e", "channel": "solo", "data": "d"}
    assert post(server, payload).status_code == 200
    assert server.wait_for_events(1)[0]["channel"] == "solo"


def test_keep_alive_session_serves_many_requests(server: LocalPusher) -> None:
    with requests.Session() as session:
        for i in range(50):
            body = json.dumps(event(data=str(i))).encode()
            response = session.post(signed_url(server, EVENTS, body), data=body, timeout=5)
            assert response.status_code == 200
    assert [r["data"] for r in server.wait_for_events(50)] == [str(i) for i in range(50)]


# ------------------------------------------------------------- authentication


@pytest.mark.parametrize("key,secret", [("test-key", "not-the-secret"),
                                        ("other-key", "test-secret")])
def test_wrong_secret_or_key_is_401(server: LocalPusher, key: str, secret: str) -> None:
    wrong = pusher.Pusher(app_id="1", key=key, secret=secret, host="127.0.0.1",
                          port=server.port, ssl=False)
    with pytest.raises(pusher.errors.PusherBadAuth):
        wrong.trigger("my-channel", "my-event", "x")
    assert server.events() == []
    assert server.stats()["by_status"] == {"401": 1}


def test_tampered_body_md5_is_401(server: LocalPusher) -> None:
    body = json.dumps(event()).encode()
    other_md5 = hashlib.md5(json.dumps(event(data="other")).encode()).hexdigest()
    response = requests.post(signed_url(server, EVENTS, body, body_md5=other_md5), data=body)
    assert response.status_code == 401
    assert "body_md5" in response.text
    assert server.events() == []


def test_stale_timestamp_is_401_but_500s_is_fine(server: LocalPusher) -> None:
    assert post(server, event(), timestamp=int(time.time()) - 605).status_code == 401
    assert post(server, event(), timestamp=int(time.time()) + 605).status_code == 401
    assert post(server, event(), timestamp=int(time.time()) - 500).status_code == 200
    assert len(server.events()) == 1


def test_missing_signature_is_401(server: LocalPusher) -> None:
    response = requests.post(f"{server.base_url}{EVENTS}", json=event())
    assert response.status_code == 401


# --------------------------------------------------------------------- limits


def test_eleven_event_batch_is_400_ten_is_fine(server: LocalPusher) -> None:
    item = {"channel": "c", "name": "e", "data": "d"}
    assert post(server, {"batch": [item] * 11}, BATCH).status_code == 400
    assert server.events() == []
    assert post(server, {"batch": [item] * 10}, BATCH).status_code == 200
    assert len(server.wait_for_events(10)) == 10


def test_101_channels_is_400_100_is_fine(server: LocalPusher) -> None:
    channels = [f"c{i}" for i in range(101)]
    assert post(server, event(channels=channels)).status_code == 400
    assert server.events() == []
    assert post(server, event(channels=channels[:100])).status_code == 200
    assert len(server.wait_for_events(100)) == 100


def test_data_over_10240_bytes_is_413(server: LocalPusher) -> None:
    response = post(server, event(data="x" * 10241))
    assert response.status_code == 413
    assert post(server, event(data="é" * 5121)).status_code == 413  # 10,242 UTF-8 bytes
    assert server.events() == []
    assert post(server, event(data="x" * 10240)).status_code == 200


def test_library_trigger_of_oversized_data_gets_413(
    server: LocalPusher, client: pusher.Pusher
) -> None:
    # pusher 3.3.4's trigger() only refuses data above ~30 KB, so the server must.
    with pytest.raises(pusher.errors.PusherBadStatus, match="413"):
        client.trigger("my-channel", "my-event", "x" * 10241)


@pytest.mark.parametrize("channel", [
    "bad channel", "bad!", "", "x" * 165, "#server-to-user-", "#server-to-user-a b",
])
def test_bad_channel_name_is_400(server: LocalPusher, channel: str) -> None:
    assert post(server, event(channels=[channel])).status_code == 400
    assert server.events() == []


@pytest.mark.parametrize("channel", [
    "x" * 164, "private-a_b=c@d,e.f;g-h", "#server-to-user-user-42",
])
def test_valid_channel_names_are_accepted(server: LocalPusher, channel: str) -> None:
    assert post(server, event(channels=[channel])).status_code == 200


@pytest.mark.parametrize("payload", [
    event(name="n" * 201),
    event(name=""),
    event(socket_id="abc"),
    event(socket_id="1.2.3"),
    event(data={"not": "a string"}),
    {"name": "e", "data": "d"},
    event(channels=[]),
    [1, 2],
])
def test_invalid_event_is_400(server: LocalPusher, payload: Any) -> None:
    assert post(server, payload).status_code == 400
    assert server.events() == []


def test_invalid_json_is_400(server: LocalPusher) -> None:
    response = post(server, b"{not json")
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("text/plain")


def test_batch_is_all_or_nothing(server: LocalPusher) -> None:
    good = {"channel": "c", "name": "e", "data": "d"}
    response = post(server, {"batch": [good, dict(good, channel="bad channel")]}, BATCH)
    assert response.status_code == 400
    assert server.events() == []


def test_unknown_paths_are_404(server: LocalPusher) -> None:
    assert post(server, event(), path="/apps/2/events").status_code == 404
    assert post(server, event(), path="/nope").status_code == 404
    assert requests.get(f"{server.base_url}/_control/nope").status_code == 404


def test_validation_functions_directly() -> None:
    records, reply = parse_trigger(event(channels=["a", "b"], socket_id="1.2"))
    assert [r["channel"] for r in records] == ["a", "b"] and reply == {}
    records, reply = parse_batch({"batch": []})
    assert records == [] and reply == {}


# ---------------------------------------------------------------- fault modes


def test_delay(server: LocalPusher, client: pusher.Pusher) -> None:
    server.set_mode(delay=0.3)
    started = time.monotonic()
    client.trigger("my-channel", "my-event", "x")
    assert time.monotonic() - started >= 0.3
    assert len(server.events()) == 1


def test_status_503(server: LocalPusher, client: pusher.Pusher) -> None:
    server.set_mode(status=503)
    for _ in range(3):
        with pytest.raises(pusher.errors.PusherBadStatus, match="503"):
            client.trigger("my-channel", "my-event", "x")
    stats = server.stats()
    assert stats["requests_total"] == 3
    assert stats["by_status"] == {"503": 3}
    assert all(entry["at"] > 0 for entry in stats["requests"])
    assert server.events() == []


@pytest.mark.parametrize("status, error", [
    (401, pusher.errors.PusherBadAuth), (403, pusher.errors.PusherForbidden),
    (500, pusher.errors.PusherBadStatus),
])
def test_status_modes_reach_the_library(
    server: LocalPusher, client: pusher.Pusher, status: int, error: type[Exception]
) -> None:
    server.set_mode(status=status)
    with pytest.raises(error):
        client.trigger("my-channel", "my-event", "x")


def test_429_with_retry_after(server: LocalPusher) -> None:
    server.set_mode(status=429, retry_after=7)
    response = post(server, event())
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"


def test_reset_raises_connection_error(server: LocalPusher) -> None:
    server.set_mode(reset=True)
    with pytest.raises(requests.exceptions.ConnectionError) as raised:
        post(server, event())
    assert "ConnectionResetError" in str(raised.value)  # an RST, not a polite FIN
    stats = server.stats()
    assert stats["faults"] == {"reset": 1}
    assert stats["requests"][0]["fault"] == "reset"
    assert server.events() == []


def test_hang_times_out_until_cleared(server: LocalPusher) -> None:
    server.set_mode(hang=True)
    with pytest.raises(requests.exceptions.Timeout):
        post(server, event(), timeout=0.3)
    assert server.stats()["faults"] == {"hang": 1}
    server.clear_mode()
    assert post(server, event()).status_code == 200
    assert len(server.events()) == 1


def test_fail_next_then_healthy(server: LocalPusher) -> None:
    server.set_mode(status=503, fail_next=2)
    assert [post(server, event()).status_code for _ in range(3)] == [503, 503, 200]
    assert statuses(server) == [503, 503, 200]
    assert len(server.events()) == 1
    assert server.stats()["modes"]["status"] == 0


def test_fail_next_with_reset(server: LocalPusher) -> None:
    server.set_mode(reset=True, fail_next=1)
    with pytest.raises(requests.exceptions.ConnectionError):
        post(server, event())
    assert post(server, event()).status_code == 200


def test_soketi_errors(server: LocalPusher, client: pusher.Pusher) -> None:
    server.set_mode(soketi_errors=True)
    ok = post(server, event())
    assert (ok.status_code, ok.json()) == (200, {"ok": True})

    bad_auth = post(server, event(), secret="wrong")
    assert bad_auth.status_code == 200
    assert bad_auth.json()["code"] == 401
    assert bad_auth.json()["error"]

    too_big = post(server, event(data="x" * 10241))
    assert (too_big.status_code, too_big.json()["code"]) == (200, 413)
    assert post(server, event(), path="/nope").status_code == 404

    server.set_mode(soketi_errors=True, status=503)
    outage = post(server, event())
    assert (outage.status_code, outage.json()["code"]) == (200, 503)
    # The official library takes such an answer for success: a relay must look at the body.
    assert client.trigger("my-channel", "my-event", "x") == {"error": "Service Unavailable",
                                                             "code": 503}
    assert len(server.events()) == 1


def test_unknown_mode_is_rejected(server: LocalPusher) -> None:
    with pytest.raises(ValueError, match="unknown modes"):
        server.set_mode(explode=True)
    with pytest.raises(ValueError):
        server.set_mode(status=42)


# --------------------------------------------------------------- control/helper


def test_reset_clears_records_and_modes(server: LocalPusher) -> None:
    post(server, event())
    server.set_mode(status=500)
    server.reset()
    assert server.events() == []
    stats = server.stats()
    assert (stats["requests_total"], stats["requests"], stats["modes"]["status"]) == (0, [], 0)
    assert post(server, event()).status_code == 200


def test_wait_for_events_times_out_with_details(server: LocalPusher) -> None:
    post(server, event())
    with pytest.raises(TimeoutError, match=r"expected 2 events within 0.2s, got 1"):
        server.wait_for_events(2, timeout=0.2)


def test_count_endpoint_has_the_totals_only(server: LocalPusher) -> None:
    assert server.count() == {"events_total": 0, "requests_total": 0}
    post(server, event(channels=["a", "b", "c"]))
    post(server, event(), secret="wrong")  # a request, but no event
    assert server.count() == {"events_total": 3, "requests_total": 2}
    response = requests.get(f"{server.base_url}/_control/count", timeout=5)
    assert response.json() == {"events_total": 3, "requests_total": 2}
    server.reset()
    assert server.count() == {"events_total": 0, "requests_total": 0}


def test_wait_for_events_polls_the_count_and_fetches_events_once(
    server: LocalPusher, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"count": 0, "events": 0}
    count, events = server.count, server.events

    def counted_count() -> dict[str, int]:
        calls["count"] += 1
        if calls["count"] == 2:  # the first poll saw too few; the second sees enough
            post(server, event(data="2"))
        return count()

    def counted_events() -> list[dict[str, Any]]:
        calls["events"] += 1
        return events()

    monkeypatch.setattr(server, "count", counted_count)
    monkeypatch.setattr(server, "events", counted_events)
    post(server, event(data="1"))
    assert [r["data"] for r in server.wait_for_events(2)] == ["1", "2"]
    assert calls == {"count": 2, "events": 1}


def test_wait_for_events_fetches_events_once_on_timeout(
    server: LocalPusher, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched = []
    events = server.events
    monkeypatch.setattr(server, "events", lambda: fetched.append(1) or events())
    post(server, event())
    with pytest.raises(TimeoutError, match="got 1"):
        server.wait_for_events(2, timeout=0.1)
    assert fetched == [1]  # for the error message only, not on every poll


def test_stats_without_requests(server: LocalPusher) -> None:
    post(server, event())
    full = server.stats()
    assert len(full["requests"]) == 1
    brief = server.stats(requests=False)
    assert "requests" not in brief
    assert brief == {k: v for k, v in full.items() if k != "requests"}
    assert brief["events_total"] == 1 and brief["by_status"] == {"200": 1}
    url = f"{server.base_url}/_control/stats"
    assert "requests" not in requests.get(url, params={"requests": "0"}, timeout=5).json()
    assert "requests" in requests.get(url, params={"requests": "1"}, timeout=5).json()
    assert requests.get(url, params={"requests": "maybe"}, timeout=5).status_code == 400


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_pid_is_the_server_process(server: LocalPusher) -> None:
    cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
    assert b"relay.pusher_server" in cmdline
    with pytest.raises(RuntimeError, match="not running"):
        _ = LocalPusher().pid


def _trigger_one(local: LocalPusher) -> None:
    client = pusher.Pusher(app_id="1", key="test-key", secret="test-secret",
                           host="127.0.0.1", port=local.port, ssl=False, timeout=5)
    client.trigger("logged-channel", "logged-event", "x")
    local.wait_for_events(1)


def test_stderr_to_a_path(tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    log_path.write_text("stale line from an earlier run\n")
    local = LocalPusher(print_events=True, stderr=log_path)
    with local:
        _trigger_one(local)
    assert local._stderr_file is None  # closed at stop
    text = log_path.read_text()
    assert "event logged-event on logged-channel" in text
    assert "local Pusher API for app 1" in text
    assert "LISTENING" not in text and "stale line" not in text


def test_stderr_to_an_open_file(tmp_path: Path) -> None:
    with open(tmp_path / "server.log", "wb") as log_file:
        with LocalPusher(print_events=True, stderr=log_file) as local:
            _trigger_one(local)
        assert not log_file.closed  # the caller's file is the caller's to close
    assert "event logged-event on logged-channel" in (tmp_path / "server.log").read_text()


def test_stderr_refuses_pipe_and_stdout() -> None:
    for target in (subprocess.PIPE, subprocess.STDOUT):
        with pytest.raises(ValueError, match="stderr"):
            LocalPusher(stderr=target)


def test_url_has_credentials_port_and_app(server: LocalPusher) -> None:
    assert server.url == f"http://test-key:test-secret@127.0.0.1:{server.port}/apps/1"


def test_failed_start_is_reported() -> None:
    broken = LocalPusher(python="/bin/false")
    with pytest.raises(RuntimeError, match="failed to start"):
        broken.start()


def test_helper_works_in_a_gevent_patched_parent() -> None:
    script = textwrap.dedent("""
        from gevent import monkey
        monkey.patch_all()
        import pusher
        from relay.pusher_server import LocalPusher
        with LocalPusher(print_events=True) as local:
            client = pusher.Pusher(app_id="1", key="test-key", secret="test-secret",
                                   host="127.0.0.1", port=local.port, ssl=False)
            client.trigger(["a", "b"], "e", "d")
            assert len(local.wait_for_events(2)) == 2
            local.set_mode(status=503)
            assert local.stats()["modes"]["status"] == 503
        print("OK")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"
    assert "event e on a" in result.stderr  # --print logs each event


def _gone_or_zombie(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_server_exits_when_its_parent_is_killed() -> None:
    script = textwrap.dedent("""
        import os, sys
        from relay.pusher_server import LocalPusher
        local = LocalPusher()
        local.start()
        sys.stdout.write(f"{local.pid}\\n")
        sys.stdout.flush()
        os.kill(os.getpid(), 9)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=60,
    )
    child = int(result.stdout.split()[0])
    deadline = time.monotonic() + 10
    while not _gone_or_zombie(child):
        assert time.monotonic() < deadline, f"orphaned pusher_server {child} still running"
        time.sleep(0.02)
