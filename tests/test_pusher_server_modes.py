"""The local server's dialects and modes: what each one puts on the wire.

The client is the official pusher library (it signs exactly as Pusher expects); requests
it refuses to build are sent with its own Request object and a plain requests call.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import pusher
import pytest
import requests
from pusher.http import POST, Request

from relay.pusher_server import LocalPusher

KEY_B64 = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(scope="module")
def server() -> Iterator[LocalPusher]:
    with LocalPusher() as local:
        yield local


@pytest.fixture(autouse=True)
def _fresh(server: LocalPusher) -> None:
    server.reset()


def client(server: LocalPusher, **options: Any) -> pusher.Pusher:
    return pusher.Pusher(app_id="1", key="test-key", secret="test-secret", host="127.0.0.1",
                         port=server.port, ssl=False, timeout=5, **options)


def post(server: LocalPusher, path: str, params: dict[str, Any]) -> requests.Response:
    """Sign with the library, send with requests: no client-side validation in the way."""
    request = Request(client(server)._pusher_client, POST, f"/apps/1/{path}", params)
    return requests.post(f"{server.base_url}{request.signed_path}", data=request.body,
                         headers=request.headers, timeout=5)


def event(channel: str = "c", data: str = "x", name: str = "e") -> dict[str, Any]:
    return {"name": name, "channels": [channel], "data": data}


def test_status_for_chosen_channels_only(server: LocalPusher) -> None:
    server.set_mode(status=500, status_channels=["bad-1", "bad-2"])
    assert post(server, "events", event("good")).status_code == 200
    assert post(server, "events", event("bad-2")).status_code == 500
    batch = {"batch": [{"channel": "good", "name": "e", "data": "1"},
                       {"channel": "bad-1", "name": "e", "data": "2"}]}
    assert post(server, "batch_events", batch).status_code == 500  # a batch fails whole
    assert [e["channel"] for e in server.events()] == ["good"]


def test_reverb_answers_422_for_validation_and_413_over_10000_bytes(server: LocalPusher
                                                                    ) -> None:
    server.set_mode(dialect="reverb")
    refused = post(server, "events", event("bad channel!"))
    assert refused.status_code == 422
    assert "message" in refused.json()
    assert post(server, "events", event(data="x" * 9_000)).status_code == 200
    too_big = post(server, "events", event(data="x" * 10_001))
    assert (too_big.status_code, too_big.text.strip()) == (413, "Payload too large.")
    assert server.stats()["modes"]["max_request_bytes"] == 10_000


def test_sockudo_error_body_has_a_string_code_and_retry_after(server: LocalPusher) -> None:
    server.set_mode(dialect="sockudo", status=503, retry_after="3")
    answer = post(server, "events", event())
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "3"
    assert answer.json()["code"] == "backpressure"
    assert answer.json()["status"] == 503


def test_soketi_errors_arrive_under_200(server: LocalPusher) -> None:
    server.set_mode(dialect="soketi")
    answer = post(server, "events", event("bad channel!"))
    assert answer.status_code == 200
    assert answer.json()["code"] == 400
    assert post(server, "events", event()).json() == {"ok": True}


def test_pure_pusher_is_the_default(server: LocalPusher) -> None:
    answer = post(server, "events", event("bad channel!"))
    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert post(server, "events", event()).json() == {}


@pytest.mark.parametrize("skew_s", [-700, 700])
def test_clock_skew_refuses_with_pusher_s_words_and_shows_in_date(server: LocalPusher,
                                                                  skew_s: int) -> None:
    server.set_mode(skew_s=skew_s)
    before = time.time()
    answer = post(server, "events", event())
    assert answer.status_code == 401
    assert answer.text.startswith("Timestamp expired: Given timestamp (")
    assert "not within 600s of server time" in answer.text
    offset = parsedate_to_datetime(answer.headers["Date"]).timestamp() - before
    assert abs(offset - skew_s) < 60  # the Date header has whole seconds; the rest is slack
    server.set_mode(skew_s=skew_s / 7)  # 100 s: within Pusher's 600 s window
    assert post(server, "events", event()).status_code == 200


def test_max_data_bytes_is_settable(server: LocalPusher) -> None:
    big = event(data="x" * 50_000)
    assert post(server, "events", big).status_code == 413
    server.set_mode(max_data_bytes=102_400)
    assert post(server, "events", big).status_code == 200
    assert post(server, "events", event(data="x" * 102_401)).status_code == 413


def test_encrypted_events_are_decrypted_with_the_master_key(server: LocalPusher) -> None:
    server.set_mode(encryption_master_key_base64=KEY_B64)
    sender = client(server, encryption_master_key_base64=KEY_B64)
    sender.trigger("private-encrypted-room", "msg", {"text": "hello, é"})
    sender.trigger_batch([{"channel": "private-encrypted-b", "name": "m", "data": "two"},
                          {"channel": "plain", "name": "m", "data": "three"}])
    events = {e["channel"]: e for e in server.wait_for_events(3)}
    first = events["private-encrypted-room"]
    assert "hello" not in first["data"]  # what went over the wire is ciphertext
    assert json.loads(first["plaintext"]) == {"text": "hello, é"}
    assert events["private-encrypted-b"]["plaintext"] == "two"
    assert "plaintext" not in events["plain"]
    assert server.order()["private-encrypted-room"] == [first["plaintext"]]


def test_wrong_key_or_tampered_data_is_reported_not_decrypted(server: LocalPusher) -> None:
    other = base64.b64encode(b"\x01" * 32).decode()
    server.set_mode(encryption_master_key_base64=other)
    client(server, encryption_master_key_base64=KEY_B64).trigger("private-encrypted-x", "m", "s")
    post(server, "events", event("private-encrypted-y", data="not encrypted"))
    errors = [e.get("decrypt_error") for e in server.wait_for_events(2)]
    assert errors == ["does not decrypt with this channel's key",
                      'data is not {"nonce": b64, "ciphertext": b64}']


@pytest.mark.parametrize("bad", [
    {"encryption_master_key_base64": "c2hvcnQ="},
    {"dialect": "ably"},
    {"delay_range": [0.02, 0.01]},
    {"max_data_bytes": -1},
])
def test_bad_modes_are_refused(server: LocalPusher, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="400"):
        server.set_mode(**bad)


def test_key_is_not_echoed_in_the_log(tmp_path: Any) -> None:
    log = tmp_path / "server.log"
    with LocalPusher(stderr=log) as local:
        local.set_mode(encryption_master_key_base64=KEY_B64)
    text = log.read_text()
    assert "modes set" in text and KEY_B64 not in text


def test_arrival_order_per_channel_and_random_delay(server: LocalPusher) -> None:
    server.set_mode(delay_range=[0, 0.005])
    sender = client(server)
    for n in range(5):
        sender.trigger(["a", "b"], "e", str(n))
    assert server.order() == {"a": ["0", "1", "2", "3", "4"], "b": ["0", "1", "2", "3", "4"]}
    assert [e["seq"] for e in server.events()] == list(range(10))
