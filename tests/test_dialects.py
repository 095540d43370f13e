"""Servers' dialects, end-to-end encryption and the data limit, from relay's side:
classify() over each server's answers, then Delivery against the local server in each mode."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator
from dataclasses import replace

import pytest

from relay.config import PusherTarget, parse_pusher_url
from relay.delivery import MAX_BATCH, Answer, Delivery, Kind, classify
from relay.message import Limits, Notification, parse
from relay.pusher_server import LocalPusher

KEY_B64 = base64.b64encode(bytes(range(32))).decode()
BIG = Limits(max_data_bytes=102_400, encryption=True)


# -- classify ----------------------------------------------------------------------------------


@pytest.mark.parametrize("answer,kind,status,retry_after_s", [
    # Laravel Reverb: validation failure, request too large
    (Answer(422, '{"channels":["The channels field must be an array."]}'), Kind.PERMANENT,
     422, None),
    (Answer(413, "Payload too large."), Kind.PERMANENT, 413, None),
    # sockudo: 503 and 429 with Retry-After, codes that are names
    (Answer(503, '{"error":"busy","code":"backpressure","status":503}', "4"),
     Kind.RATE_LIMITED, 503, 4.0),
    (Answer(503, '{"error":"busy","code":"backpressure","status":503}', "0"),
     Kind.RATE_LIMITED, 503, 0.0),
    (Answer(503, "Service Unavailable"), Kind.TRANSIENT, 503, None),  # no Retry-After
    (Answer(429, '{"error":"slow down","code":"rate_limited","status":429}', "0"),
     Kind.RATE_LIMITED, 429, 0.0),
    # an error named by a string code inside a 200
    (Answer(200, '{"error":"slow down","code":"rate_limited"}'), Kind.RATE_LIMITED, 429, 1.0),
    (Answer(200, '{"error":"too big","code":"payload_too_large"}'), Kind.PERMANENT, 413, None),
    (Answer(200, '{"error":"nope","code":"auth_failed","status":401}'), Kind.SYSTEMIC, 401,
     None),
    (Answer(200, '{"error":"?","code":"something_new"}'), Kind.TRANSIENT, 500, None),
    # Pusher's clock-skew 401
    (Answer(401, "Timestamp expired: Given timestamp (2026-11-26T10:00:00Z) not within 600s "
                 "of server time (2026-11-26T10:20:00Z)"), Kind.SYSTEMIC, 401, None),
])
def test_dialect_answers(answer: Answer, kind: Kind, status: int,
                         retry_after_s: float | None) -> None:
    failure = classify(answer)
    assert failure is not None
    assert (failure.kind, failure.status, failure.retry_after_s) == (kind, status,
                                                                     retry_after_s)


def test_clock_skew_is_named_in_the_reason() -> None:
    failure = classify(Answer(401, "Timestamp expired: Given timestamp (x) not within 600s"))
    assert failure is not None and failure.reason.startswith("clock skew: HTTP 401")
    other = classify(Answer(401, "Invalid signature"))
    assert other is not None and not other.reason.startswith("clock skew")


# -- against the local server ------------------------------------------------------------------


def note(obj: dict, limits: Limits = BIG) -> Notification:
    return parse(json.dumps(obj).encode(), "hit", limits)


@pytest.fixture(params=["urllib3", "requests"])
def http_client(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def target(pusher: LocalPusher) -> PusherTarget:
    return replace(parse_pusher_url(pusher.url, 2.0), encryption_master_key_base64=KEY_B64)


@pytest.fixture
def delivery(target: PusherTarget, http_client: str) -> Iterator[Delivery]:
    d = Delivery(target, pool_size=4, http_client=http_client)
    yield d
    d.close()


def test_422_in_a_batch_dead_letters_only_the_refused_one(pusher: LocalPusher,
                                                          delivery: Delivery) -> None:
    pusher.set_mode(dialect="reverb", status=422, status_channels=["refused"])
    notes = [note({"channel": c}) for c in ("a", "b", "refused", "c")]
    results = delivery.send(notes)
    assert [r.kind if r else None for r in results] == [None, None, Kind.PERMANENT, None]
    assert results[2].status == 422
    assert sorted(e["channel"] for e in pusher.wait_for_events(3)) == ["a", "b", "c"]


def test_413_for_the_request_splits_the_batch(pusher: LocalPusher, delivery: Delivery) -> None:
    pusher.set_mode(dialect="reverb")  # max_request_size 10,000 bytes
    notes = [note({"channel": f"c{i}", "text": "x" * 2_000}) for i in range(MAX_BATCH)]
    assert delivery.send(notes) == [None] * MAX_BATCH
    assert len(pusher.wait_for_events(MAX_BATCH)) == MAX_BATCH
    statuses = [r["status"] for r in pusher.stats()["requests"]]
    assert statuses == [413] + [200] * MAX_BATCH


def test_413_for_a_single_event_is_a_dead_letter_with_the_reason(pusher: LocalPusher,
                                                                  delivery: Delivery) -> None:
    pusher.set_mode(dialect="reverb")
    (failure,) = delivery.send([note({"channel": "a", "text": "x" * 12_000})])
    assert failure is not None and failure.kind is Kind.PERMANENT
    assert failure.reason == "HTTP 413: Payload too large."


@pytest.mark.parametrize("header,pause", [("2", 2.0), ("0", 0.0)])
def test_503_with_retry_after_pauses(pusher: LocalPusher, delivery: Delivery, header: str,
                                     pause: float) -> None:
    pusher.set_mode(dialect="sockudo", status=503, retry_after=header)
    (failure,) = delivery.send([note({"channel": "a"})])
    assert failure is not None
    assert (failure.kind, failure.retry_after_s) == (Kind.RATE_LIMITED, pause)
    assert '"code":"backpressure"' in failure.reason.replace(" ", "")


def test_clock_skew_is_measured_and_cleared(pusher: LocalPusher, delivery: Delivery) -> None:
    assert delivery.clock_skew_s is None
    pusher.set_mode(skew_s=-1_000)
    (failure,) = delivery.send([note({"channel": "a"})])
    assert failure is not None and failure.kind is Kind.SYSTEMIC
    assert failure.reason.startswith("clock skew")
    assert delivery.clock_skew_s is not None and not math.isnan(delivery.clock_skew_s)
    assert abs(delivery.clock_skew_s + 1_000) < 60  # whole-second Date header, plus slack
    pusher.clear_mode()
    assert delivery.send([note({"channel": "a"})]) == [None]
    assert delivery.clock_skew_s is None


def test_encrypted_single_and_batch_decrypt_to_the_plaintext(pusher: LocalPusher,
                                                             delivery: Delivery) -> None:
    pusher.set_mode(encryption_master_key_base64=KEY_B64)
    notes = [
        note({"channel": "private-encrypted-a", "text": "hello, é"}),
        note({"relay": 1, "channels": ["private-encrypted-b"], "event": "m", "data": "two"}),
        note({"channel": "plain", "n": 3}),
    ]
    assert delivery.send(notes) == [None, None, None]  # one batch
    assert delivery.send([notes[0]]) == [None]  # and alone, through /events
    events = pusher.wait_for_events(4)
    by_channel = {e["channel"]: e for e in events}
    assert [e.get("decrypt_error") for e in events] == [None] * 4
    assert json.loads(by_channel["private-encrypted-a"]["plaintext"]) == {"text": "hello, é"}
    assert by_channel["private-encrypted-b"]["plaintext"] == "two"
    assert "hello" not in by_channel["private-encrypted-a"]["data"]
    assert by_channel["plain"]["data"] == '{"n":3}'
    assert [r["path"].rsplit("/", 1)[1] for r in pusher.stats()["requests"]] == [
        "batch_events", "events"]


def test_encrypted_data_at_the_limit_fits_after_encryption(pusher: LocalPusher,
                                                           delivery: Delivery) -> None:
    limits = Limits(encryption=True)  # Pusher's 10,240
    pusher.set_mode(encryption_master_key_base64=KEY_B64)
    from relay.message import encrypted_size
    fits = max(n for n in range(7_000, 8_000) if encrypted_size(n) <= 10_240)
    notes = [note({"relay": 1, "channels": ["private-encrypted-a"], "event": "e",
                   "data": "x" * fits}, limits)]
    assert delivery.send(notes) == [None]  # the server enforces 10,240 on what it received
    [event] = pusher.wait_for_events(1)
    assert len(event["data"].encode()) == encrypted_size(fits)
    assert event["plaintext"] == "x" * fits


def test_large_data_for_servers_that_allow_it(pusher: LocalPusher, delivery: Delivery) -> None:
    pusher.set_mode(max_data_bytes=102_400)
    data = "y" * 60_000  # over the pusher library's own 30 KB check in trigger()
    multi = note({"relay": 1, "channels": ["a", "b"], "event": "e", "data": data})
    batch = [note({"relay": 1, "channels": [c], "event": "e", "data": data}) for c in "cd"]
    assert delivery.send([multi, *batch]) == [None, None, None]
    assert {e["channel"]: len(e["data"]) for e in pusher.wait_for_events(4)} == {
        c: 60_000 for c in "abcd"}


def test_server_to_user_channel_is_delivered(pusher: LocalPusher, delivery: Delivery) -> None:
    notes = [note({"relay": 1, "channels": ["#server-to-user-42"], "event": "e", "data": "1"}),
             note({"channel": "#server-to-user-user_7", "n": 2})]
    assert delivery.send(notes) == [None, None]
    assert sorted(e["channel"] for e in pusher.wait_for_events(2)) == [
        "#server-to-user-42", "#server-to-user-user_7"]
