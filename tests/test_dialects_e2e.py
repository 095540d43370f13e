"""The worker as a subprocess: encrypted and user channels, the data limit, and a Reverb-style
422, end to end through Redis and the local server."""

from __future__ import annotations

import base64
import json

from tests.support import wait_for

KEY_B64 = base64.b64encode(b"relay end-to-end test master key").decode()  # 32 bytes


def _dead(r, queue_name):
    return [json.loads(x) for x in r.lrange(f"{queue_name}:dead", 0, -1)]


def test_encrypted_and_user_channels_arrive_as_a_subscriber_reads_them(r, pusher, start_worker,
                                                                       queue_name):
    assert len(base64.b64decode(KEY_B64)) == 32
    pusher.set_mode(encryption_master_key_base64=KEY_B64)
    start_worker(PUSHER_ENCRYPTION_MASTER_KEY_BASE64=KEY_B64)
    r.rpush(queue_name,
            json.dumps({"channel": "private-encrypted-room", "text": "secret é"}),
            json.dumps({"relay": 1, "channels": ["private-encrypted-room"], "event": "m",
                        "data": "two"}),
            json.dumps({"relay": 1, "channels": ["#server-to-user-42"], "event": "m",
                        "data": {"n": 3}}),
            json.dumps({"channel": "plain", "n": 4}))
    events = pusher.wait_for_events(4)
    seen = {(e["channel"], e.get("plaintext", e["data"])) for e in events}
    assert seen == {("private-encrypted-room", '{"text":"secret é"}'),
                    ("private-encrypted-room", "two"),
                    ("#server-to-user-42", '{"n":3}'), ("plain", '{"n":4}')}
    assert all("secret" not in e["data"] for e in events)
    assert _dead(r, queue_name) == []


def test_encrypted_channel_without_a_key_is_a_dead_letter_naming_the_setting(
        r, pusher, start_worker, queue_name):
    start_worker()
    r.rpush(queue_name, json.dumps({"channel": "private-encrypted-x", "t": 1}),
            json.dumps({"channel": "ok", "t": 2}))
    pusher.wait_for_events(1)
    [dead] = wait_for(lambda: _dead(r, queue_name), what="the dead letter")
    assert "PUSHER_ENCRYPTION_MASTER_KEY_BASE64" in dead["error"]
    assert dead["attempts"] == 0


def test_max_data_bytes_lets_large_events_through(r, pusher, start_worker, queue_name):
    pusher.set_mode(max_data_bytes=102_400)
    start_worker(RELAY_MAX_DATA_BYTES="102400")
    r.rpush(queue_name, json.dumps({"channel": "big", "blob": "x" * 80_000}),
            json.dumps({"channel": "too-big", "blob": "x" * 102_400}))
    [event] = pusher.wait_for_events(1)
    assert event["channel"] == "big" and len(event["data"]) > 80_000
    [dead] = wait_for(lambda: _dead(r, queue_name), what="the too-big one dead-lettered")
    assert "over the limit of 102400" in dead["error"]


def test_reverb_422_is_dead_at_once_and_neighbours_are_delivered(r, pusher, start_worker,
                                                                 queue_name):
    pusher.set_mode(dialect="reverb", status=422, status_channels=["refused"])
    start_worker(RELAY_POOL_SIZE="1")
    channels = ["a", "b", "refused", "c", "d"]
    r.rpush(queue_name, *[json.dumps({"channel": c}) for c in channels])
    events = pusher.wait_for_events(4)
    assert sorted(e["channel"] for e in events) == ["a", "b", "c", "d"]
    [dead] = wait_for(lambda: _dead(r, queue_name), what="the refused one dead-lettered")
    assert dead["error"].startswith("HTTP 422")
    assert dead["attempts"] <= 1  # never retried
    assert json.loads(dead["payload"]) == {"channel": "refused"}


def test_sockudo_503_with_retry_after_pauses_and_0_does_not(r, pusher, start_worker,
                                                            queue_name):
    pusher.set_mode(dialect="sockudo", status=503, retry_after="0", fail_next=1)
    w = start_worker(RELAY_POOL_SIZE="1")
    r.rpush(queue_name, json.dumps({"channel": "a", "n": 1}))
    pusher.wait_for_events(1)
    assert "slow down" not in w.log()  # Retry-After: 0 is no pause
    pusher.set_mode(dialect="sockudo", status=503, retry_after="2", fail_next=1)
    r.rpush(queue_name, json.dumps({"channel": "a", "n": 2}))
    pusher.wait_for_events(2)
    assert "every greenlet waits 2.0 s" in w.log()
    statuses = [q["status"] for q in pusher.stats()["requests"]]
    assert statuses == [503, 200, 503, 200]
    assert _dead(r, queue_name) == []
