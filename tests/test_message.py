"""relay.message: classic and envelope parsing, retry wrappers, and every refusal."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay.message import (
    InvalidMessage,
    Limits,
    Notification,
    encrypted_size,
    envelope,
    parse,
    payload_of,
    retry_wrapper,
)


def raw(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def env(**fields: Any) -> bytes:
    base: dict[str, Any] = {"relay": 1, "channels": ["c"], "event": "ev", "data": {"x": 1}}
    base.update(fields)
    return raw({k: v for k, v in base.items() if v is not ...})


def refused(message: bytes, *reason_parts: str) -> str:
    with pytest.raises(InvalidMessage) as caught:
        parse(message, "hit")
    reason = str(caught.value)
    for part in reason_parts:
        assert part in reason, reason
    return reason


# -- classic -----------------------------------------------------------------------------------


def test_classic_message() -> None:
    text = b'{"channel": "site-42", "title": "T\xc3\xa9", "url": "https://x/y"}'
    note = parse(text, "hit")
    assert note.channels == ("site-42",)
    assert note.event == "hit"
    assert note.data == '{"title":"T\u00e9","url":"https://x/y"}'  # compact, not ASCII-escaped
    assert json.loads(note.data) == {"title": "T\u00e9", "url": "https://x/y"}
    assert note.raw == text
    assert note.payload == text.decode()
    assert (note.socket_id, note.enqueued_at, note.attempts, note.id) == (None, None, 0, None)
    assert note.cost == 1


def test_classic_uses_the_configured_event() -> None:
    assert parse(b'{"channel":"a"}', "new-visit").event == "new-visit"
    assert parse(b'{"channel":"a"}', "new-visit").data == "{}"


def test_classic_accepts_a_str() -> None:
    assert parse('{"channel":"a","n":1}', "hit").data == '{"n":1}'  # type: ignore[arg-type]


@pytest.mark.parametrize("extra", [
    {"channels": ["x", "y"]},
    {"event": "other"},
    {"relay": 1},
    {"relay": 1, "channels": ["x"], "event": "e", "data": "d", "payload": "{}"},
])
def test_classic_with_envelope_like_keys_stays_classic(extra: dict[str, Any]) -> None:
    note = parse(raw({"channel": "site-1", **extra}), "hit")
    assert note.channels == ("site-1",)
    assert note.event == "hit"
    assert json.loads(note.data) == extra
    assert note.attempts == 0


def test_server_to_user_channel_is_accepted() -> None:
    assert parse(raw({"channel": "#server-to-user-u1"}), "hit").channels == (
        "#server-to-user-u1",)


# -- envelope ----------------------------------------------------------------------------------


def test_envelope_with_every_field() -> None:
    message = raw({"relay": 1, "channels": ["a", "private-b", "presence-c"], "event": "ev",
                   "data": {"k": [1, 2]}, "socket_id": "123.456",
                   "enqueued_at": 1700000000.5, "id": 77})
    note = parse(message, "hit")
    assert note.channels == ("a", "private-b", "presence-c")
    assert note.cost == 3
    assert note.event == "ev"
    assert note.data == '{"k":[1,2]}'
    assert note.socket_id == "123.456"
    assert note.enqueued_at == 1700000000.5
    assert note.id == "77"
    assert note.payload == message.decode()
    assert note.attempts == 0


def test_envelope_string_data_passes_through() -> None:
    note = parse(env(data='{"already":"json"}'), "hit")
    assert note.data == '{"already":"json"}'
    assert parse(env(data="plain text"), "hit").data == "plain text"


def test_envelope_optional_fields_default_to_none() -> None:
    note = parse(env(), "hit")
    assert (note.socket_id, note.enqueued_at, note.id) == (None, None, None)


def test_envelope_helper_round_trip() -> None:
    text = envelope(["a", "b"], "ev", {"n": "\u00e9"}, socket_id="1.2", enqueued_at=5.0,
                    ident="id-1")
    note = parse(text.encode(), "ignored")
    assert (note.channels, note.event, note.data) == (("a", "b"), "ev", '{"n":"\u00e9"}')
    assert (note.socket_id, note.enqueued_at, note.id) == ("1.2", 5.0, "id-1")


@pytest.mark.parametrize("kwargs,reason", [
    ({"channels": ["bad channel"], "event": "e", "data": {}}, "invalid channel"),
    ({"channels": [], "event": "e", "data": {}}, "channels"),
    ({"channels": ["a"], "event": "", "data": {}}, "event"),
    ({"channels": ["a"], "event": "e", "data": "x" * 10_241}, "10241 bytes"),
    ({"channels": ["a"], "event": "e", "data": {}, "socket_id": "nope"}, "socket_id"),
])
def test_envelope_helper_validates_at_the_source(kwargs: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        envelope(**kwargs)


# -- retry wrapper -----------------------------------------------------------------------------


def test_retry_wrapper_round_trip() -> None:
    payload = '{"channel":"site-1","title":"t"}'
    wrapper = retry_wrapper(payload, 3, 1700000000.25, "HTTP 503: down")
    note = parse(wrapper.encode(), "hit")
    assert note.raw == wrapper.encode()
    assert note.payload == payload
    assert note.attempts == 3
    assert note.first_failed_at == 1700000000.25
    assert (note.channels, note.event, note.data) == (("site-1",), "hit", '{"title":"t"}')
    assert json.loads(wrapper)["retry"]["last_error"] == "HTTP 503: down"


def test_retry_wrapper_of_an_envelope_keeps_its_fields() -> None:
    payload = envelope(["a", "b"], "ev", "d", socket_id="1.2", enqueued_at=9.0, ident="x")
    note = parse(retry_wrapper(payload, 1, 10.0, "e").encode(), "hit")
    assert (note.channels, note.event, note.data) == (("a", "b"), "ev", "d")
    assert (note.socket_id, note.enqueued_at, note.id, note.attempts) == ("1.2", 9.0, "x", 1)


def test_retry_wrapper_nonce_differs_for_equal_inputs() -> None:
    a = retry_wrapper('{"channel":"c"}', 1, 1.0, "e")
    b = retry_wrapper('{"channel":"c"}', 1, 1.0, "e")
    assert a != b
    assert json.loads(a)["nonce"] != json.loads(b)["nonce"]
    assert parse(a.encode(), "hit").payload == parse(b.encode(), "hit").payload


def test_nested_retry_wrapper_is_refused() -> None:
    inner = retry_wrapper('{"channel":"c"}', 1, 1.0, "e")
    refused(retry_wrapper(inner, 2, 1.0, "e").encode(), "nested")


@pytest.mark.parametrize("wrapper", [
    {"relay": 1, "payload": 5},
    {"relay": 1, "payload": '{"channel":"c"}', "retry": "soon"},
    {"relay": 1, "payload": '{"channel":"c"}', "retry": {"attempts": "x"}},
    {"relay": 1, "payload": '{"channel":"c"}', "retry": {"attempts": None}},
    {"relay": 1, "payload": '{"channel":"c"}', "retry": {"attempts": 1.5}},
    {"relay": 1, "payload": '{"channel":"c"}', "retry": {"attempts": -1}},
])
def test_malformed_retry_wrapper_is_invalid_not_a_crash(wrapper: dict[str, Any]) -> None:
    refused(raw(wrapper), "malformed retry wrapper")


def test_retry_wrapper_with_bad_inner_payload_is_invalid() -> None:
    refused(retry_wrapper('{"no":"channel"}', 1, 1.0, "e").encode(), "no channel")
    refused(raw({"relay": 1, "payload": '{"channel":"c"}',
                 "retry": {"attempts": 1, "first_failed_at": "yesterday"}}), "first_failed_at")


# -- payload_of --------------------------------------------------------------------------------


def test_payload_of() -> None:
    classic = b'{"channel":"c","x":1}'
    assert payload_of(classic) == classic.decode()
    wrapper = retry_wrapper(classic.decode(), 2, 1.0, "e").encode()
    assert payload_of(wrapper) == classic.decode()
    assert payload_of(b"\xff\xfe not utf-8") == "\ufffd\ufffd not utf-8"
    assert payload_of(b'{"relay":1,"payload":broken') == '{"relay":1,"payload":broken'
    assert payload_of(b'{"relay":1,"payload":5}') == '{"relay":1,"payload":5}'


def test_payload_of_knows_a_wrapper_by_its_shape_not_its_text() -> None:
    inner = '{"channel":"c"}'
    reordered = json.dumps({"retry": {"attempts": 1}, "payload": inner, "relay": 1}, indent=1)
    assert payload_of(reordered.encode()) == inner
    # a classic message is never a wrapper, whatever else it carries
    classic = json.dumps({"channel": "c", "relay": 1, "payload": "x"}).encode()
    assert payload_of(classic) == classic.decode()
    other_version = json.dumps({"relay": 2, "payload": inner}).encode()
    assert payload_of(other_version) == other_version.decode()


def test_payload_of_never_raises_on_hostile_input() -> None:
    deep = b'{"relay":1,"payload":' + b"[" * 100_000
    assert payload_of(deep) == deep.decode()
    lone = b'{"relay":1,"payload":"\\ud800"}'
    assert payload_of(lone) == lone.decode()  # a lone surrogate cannot go back into Redis


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("message,reason", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b"", "not JSON"),
    (b"[1, 2]", "not a JSON object (got list)"),
    (b"42", "not a JSON object (got int)"),
    (b'"channel"', "not a JSON object (got str)"),
    (b"null", "not a JSON object"),
    (b'{"title": "no channel"}', "no channel"),
    (b'{"channels": ["a"], "event": "e", "data": {}}', "no channel"),  # envelope without relay
    (b'{"relay": 3, "channels": ["a"], "event": "e", "data": {}}', "no channel"),
    (b'{"channel": ""}', "channel must be a non-empty string"),
    (b'{"channel": 42}', "channel must be a non-empty string"),
    (b'{"channel": "a b"}', "invalid channel name"),
    (b'{"channel": "caf\xc3\xa9"}', "invalid channel name"),
    (b'{"channel": "a/b"}', "invalid channel name"),
    (b"[" * 100_000, "nested too deeply"),
])
def test_invalid_classic(message: bytes, reason: str) -> None:
    refused(message, reason)


@pytest.mark.parametrize("fields,reason", [
    ({"data": ...}, "envelope needs data"),
    ({"channels": ...}, "channels"),
    ({"channels": []}, "channels"),
    ({"channels": "not-a-list-but-ok"}, None),
    ({"channels": {"a": 1}}, "channels"),
    ({"channels": ["ok", "bad!"]}, "invalid channel name"),
    ({"event": None}, "event must be a non-empty string"),
    ({"event": ""}, "event must be a non-empty string"),
    ({"event": 5}, "event must be a non-empty string"),
    ({"socket_id": "abc"}, "socket_id"),
    ({"socket_id": "1234"}, "socket_id"),
    ({"socket_id": "1.2.3"}, "socket_id"),
    ({"socket_id": 1.2}, "socket_id"),
    ({"enqueued_at": "now"}, "enqueued_at"),
    ({"enqueued_at": True}, "enqueued_at"),
    ({"event": "\ud800"}, "lone surrogate"),
    ({"data": "\udc00"}, "lone surrogate"),
])
def test_invalid_envelope(fields: dict[str, Any], reason: str | None) -> None:
    if reason is None:
        assert parse(env(**fields), "hit").channels == ("not-a-list-but-ok",)
    else:
        refused(env(**fields), reason)


def test_an_envelope_without_event_gets_relay_event_as_a_classic_message_does() -> None:
    """So the producer can stamp enqueued_at on what was a classic message, and the browser
    receives the same event (issue 21)."""
    n = parse(env(event=..., enqueued_at=1764170000.25), "page-view")
    assert (n.channels, n.event, n.data, n.enqueued_at) == (
        ("c",), "page-view", '{"x":1}', 1764170000.25)
    classic = parse(raw({"channel": "c", "x": 1}), "page-view")
    assert (classic.event, classic.data) == (n.event, n.data)


def test_lone_surrogate_in_classic_data_is_invalid_not_a_crash() -> None:
    refused(b'{"channel":"c","t":"\\ud800"}', "lone surrogate")


def test_channel_name_length_limit() -> None:
    assert parse(raw({"channel": "c" * 164}), "hit").channels == ("c" * 164,)
    refused(raw({"channel": "c" * 165}), "164")
    refused(env(channels=["ok", "c" * 165]), "164")


def test_channel_count_limit() -> None:
    hundred = [f"ch-{i}" for i in range(100)]
    assert parse(env(channels=hundred), "hit").channels == tuple(hundred)
    refused(env(channels=[*hundred, "one-more"]), "101 channels", "100")


def test_event_name_length_limit() -> None:
    assert parse(env(event="e" * 200), "hit").event == "e" * 200
    refused(env(event="e" * 201), "200")
    with pytest.raises(InvalidMessage, match="200"):
        parse(b'{"channel":"c"}', "e" * 201)  # the configured classic event is checked too


def test_data_size_limit_ascii() -> None:
    assert len(parse(env(data="x" * 10_240), "hit").data) == 10_240
    refused(env(data="x" * 10_241), "10241 bytes", "10240")


def test_data_size_limit_counts_utf8_bytes() -> None:
    # "\u00e9" is two bytes of UTF-8 and "\u20ac" three: the limit is on bytes, not characters.
    assert parse(env(data="\u00e9" * 5_120), "hit").data == "\u00e9" * 5_120
    refused(env(data="\u00e9" * 5_120 + "x"), "10241 bytes")
    refused(env(data="\u20ac" * 3_414), "10242 bytes")  # 3,414 characters only
    assert parse(env(data="\u20ac" * 3_413 + "x"), "hit")


def test_data_size_limit_for_classic_counts_the_encoded_object() -> None:
    # data = {"t":"..."} : 8 bytes of JSON around the value, unescaped UTF-8 inside.
    fits = raw({"channel": "c", "t": "\u00e9" * 5_116})
    assert len(parse(fits, "hit").data.encode()) == 10_240
    refused(raw({"channel": "c", "t": "\u00e9" * 5_116 + "x"}), "10241 bytes")


def test_notification_is_frozen() -> None:
    note = parse(b'{"channel":"c"}', "hit")
    assert isinstance(note, Notification)
    with pytest.raises(AttributeError):
        note.event = "x"  # type: ignore[misc]


def test_nan_and_infinity_are_refused_because_browsers_cannot_parse_them():
    import pytest

    from relay.message import InvalidMessage, envelope, parse

    with pytest.raises(InvalidMessage, match="NaN"):
        parse(b'{"channel": "c", "v": NaN}', "hit")
    with pytest.raises(InvalidMessage, match="NaN"):
        parse(b'{"relay": 1, "channels": ["c"], "event": "e", "data": [Infinity]}', "hit")
    with pytest.raises(InvalidMessage, match="NaN"):
        envelope(["c"], "e", {"v": float("nan")})


# -- deployment limits: RELAY_MAX_DATA_BYTES and encrypted channels ------------------------------


def test_data_limit_follows_the_setting() -> None:
    big = env(data="x" * 50_000)
    with pytest.raises(InvalidMessage, match="50000 bytes, over the limit of 10240"):
        parse(big, "hit")
    assert len(parse(big, "hit", Limits(max_data_bytes=100_000)).data) == 50_000
    with pytest.raises(InvalidMessage, match="over the limit of 100"):
        parse(env(data="x" * 101), "hit", Limits(max_data_bytes=100))


def test_encrypted_channel_without_a_key_names_the_setting() -> None:
    for message in (b'{"channel": "private-encrypted-x"}',
                    env(channels=["private-encrypted-x"])):
        with pytest.raises(InvalidMessage, match="PUSHER_ENCRYPTION_MASTER_KEY_BASE64"):
            parse(message, "hit", Limits(encryption=False))
        assert parse(message, "hit", Limits(encryption=True)).channels == ("private-encrypted-x",)


def test_encrypted_channel_must_be_the_only_one() -> None:
    with pytest.raises(InvalidMessage, match="only channel"):
        parse(env(channels=["private-encrypted-x", "plain"]), "hit", Limits(encryption=True))


def test_encrypted_size_is_what_the_pusher_library_sends() -> None:
    import base64

    from pusher.crypto import encrypt

    key = base64.b64decode(base64.b64encode(b"k" * 32))
    for size in (0, 1, 2, 3, 100, 7_000, 10_000):
        sent = json.dumps(encrypt("private-encrypted-x", "é" * (size // 2) + "x" * (size % 2),
                                  key), ensure_ascii=False)
        assert len(sent.encode("utf-8")) == encrypted_size(size), size


def test_data_limit_applies_after_encryption() -> None:
    limits = Limits(encryption=True)
    fits = max(n for n in range(7_000, 8_000) if encrypted_size(n) <= 10_240)
    ok = env(channels=["private-encrypted-x"], data="x" * fits)
    assert parse(ok, "hit", limits).data == "x" * fits
    too_big = env(channels=["private-encrypted-x"], data="x" * (fits + 3))
    with pytest.raises(InvalidMessage, match="once encrypted, over the limit of 10240"):
        parse(too_big, "hit", limits)
    refused(too_big, "once encrypted")  # the producer's default: checked the same way
    # the same size on a plain channel is fine
    assert parse(env(data="x" * (fits + 3)), "hit", limits)


def test_server_to_user_envelope_and_limits() -> None:
    note = parse(env(channels=["#server-to-user-42"]), "hit")
    assert note.channels == ("#server-to-user-42",)
    refused(env(channels=["#server-to-user-" + "u" * 201]), "user id longer than 200")
    refused(env(channels=["#other"]), "invalid channel name")


# -- the app an envelope names (RELAY_APPS) ----------------------------------------------------


def app_env(**fields: Any) -> bytes:
    return env(relay=2, **fields)


def test_an_envelope_names_its_app() -> None:
    note = parse(app_env(app="tenant-b"), "hit")
    assert (note.app, note.channels, note.data) == ("tenant-b", ("c",), '{"x":1}')
    assert parse(app_env(app="A_z-9" * 12 + "abcd"), "hit").app == "A_z-9" * 12 + "abcd"


@pytest.mark.parametrize("message", [
    b'{"channel": "c"}',  # classic: always the default app
    b'{"channel": "c", "app": "tenant-b", "relay": 2}',  # classic: its `app` is data
    env(),  # version 1, no app
    env(app=None),
    app_env(),  # version 2 without an app
    app_env(app="default"),  # named or not, one key for the default app
])
def test_the_default_app_is_none(message: bytes) -> None:
    assert parse(message, "hit").app is None


def test_a_classic_message_keeps_app_as_data() -> None:
    note = parse(b'{"channel": "c", "app": "tenant-b"}', "hit")
    assert (note.app, json.loads(note.data)) == (None, {"app": "tenant-b"})


@pytest.mark.parametrize("app", [
    "", "tenant b", "tenant.b", "tenant/b", "t\u00e9nant", "x" * 65, 42, ["a"], {"a": 1}, True,
])
def test_bad_app_names_are_refused(app: Any) -> None:
    refused(app_env(app=app), "app")


def test_a_version_1_envelope_naming_an_app_is_read_as_the_contract_writes_it() -> None:
    """The contract's envelope is version 1 with an optional `app`: this worker reads it.
    (The producer writes version 2 with an app, which workers older than RELAY_APPS refuse
    instead of sending it to the default app.)"""
    assert parse(env(app="tenant-b"), "hit").app == "tenant-b"


def test_envelope_encoder_writes_version_2_with_an_app() -> None:
    text = envelope(["c"], "ev", {"x": 1}, app="tenant-b")
    assert json.loads(text)["relay"] == 2
    assert parse(text.encode(), "hit").app == "tenant-b"
    assert json.loads(envelope(["c"], "ev", {"x": 1}))["relay"] == 1
    with pytest.raises(InvalidMessage, match="invalid app name"):
        envelope(["c"], "ev", {"x": 1}, app="no spaces")


def test_a_retry_wrapper_keeps_the_app() -> None:
    payload = app_env(app="tenant-b").decode()
    note = parse(retry_wrapper(payload, 2, 10.0, "HTTP 503").encode(), "hit")
    assert (note.app, note.attempts, note.payload) == ("tenant-b", 2, payload)


def test_limits_per_app() -> None:
    per_app = {None: Limits(max_data_bytes=10), "big": Limits(max_data_bytes=100_000),
               "plain": Limits(encryption=False)}
    asked: list[str | None] = []

    def limits_for(app: str | None) -> Limits:
        asked.append(app)
        if app not in per_app:
            raise InvalidMessage(f"unknown app {app!r}")
        return per_app[app]

    big = "x" * 50_000
    assert parse(app_env(app="big", data=big), "hit", limits_for).data == big
    with pytest.raises(InvalidMessage, match="over the limit of 10"):
        parse(env(data=big), "hit", limits_for)  # no app: the default's limits
    with pytest.raises(InvalidMessage, match="over the limit of 10"):
        parse(b'{"channel": "c", "app": "big", "d": "' + big.encode() + b'"}', "hit", limits_for)
    with pytest.raises(InvalidMessage, match="PUSHER_ENCRYPTION_MASTER_KEY_BASE64"):
        parse(app_env(app="plain", channels=["private-encrypted-x"]), "hit", limits_for)
    with pytest.raises(InvalidMessage, match="unknown app 'gone'"):
        parse(retry_wrapper(app_env(app="gone").decode(), 1, 1.0, "e").encode(), "hit",
              limits_for)
    assert asked == ["big", None, None, "plain", "gone"]
