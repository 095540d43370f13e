"""Run by tests/test_producer_matrix.py under each old interpreter (2.7, 3.6 ... 3.13).

Usage: python legacy_producer.py APP_DIR DEPS_DIR TAG [OTEL_DIR], with REDIS_URL and
RELAY_QUEUE set; APP_DIR holds only the files the README says to copy into an app (relay/...).
Pushes one classic message, one envelope and one through the one-off notify(), checks that
bad input raises InvalidMessage and pushes nothing, and prints one JSON line: the
interpreter, the redis-py version and the texts pushed. Notifications naming an app
(`app=`) go to a queue no worker reads, reported as `apps_pushed`: the worker's routing by
app is not what this script tests. Without OTEL_DIR, nothing of OpenTelemetry may be
loaded. With it (the opentelemetry-api package alone), a classic message and an envelope
are pushed inside an active span (the API's own non-recording span: no SDK), and the line
also gives the API's version and the context expected. Syntax Python 2.7 reads, as the
module it tests; exits non-zero on the first failed check.
"""

import json
import os
import sys

sys.path.insert(0, sys.argv[1])  # the app: the producer's files, copied as the README says
sys.path.insert(0, sys.argv[2])  # redis-py for this interpreter, nothing else
OTEL_DIR = sys.argv[4] if len(sys.argv) > 4 else None
if OTEL_DIR:
    sys.path.insert(0, OTEL_DIR)  # opentelemetry-api, as an app that traces has it

import redis  # noqa: E402

import relay  # noqa: E402
from relay.producer import InvalidMessage, Producer, SettingError, client_from_env, notify  # noqa: E402

BAD = [  # (channels, data, event, socket_id): each must raise and push nothing
    ("bad channel!", {"x": 1}, None, None),
    ([], {"x": 1}, None, None),
    (["c%d" % i for i in range(101)], {"x": 1}, None, None),
    ("a", {"x": "y" * 10240}, None, None),
    (["a"], "y" * 10241, None, None),
    ("a", {"x": 1}, "", None),
    ("a", {"x": 1}, None, "not-a-socket-id"),
    ("a", {"x": object()}, None, None),
    (["a"], {"x": float("nan")}, None, None),
]
BAD_APPS = ["", "tenant b", "tenant.b", "x" * 65, 5]


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


def traced(producer, tag):
    # type: (Producer, str) -> dict
    """Push a classic message and an envelope inside an active span: the envelope carries its
    context, the classic message does not change."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
    from opentelemetry.version import __version__
    context = SpanContext(int(TRACE_ID, 16), int(SPAN_ID, 16), is_remote=False,
                          trace_flags=TraceFlags(0x01),
                          trace_state=TraceState([("legacy", "py%d%d" % sys.version_info[:2])]))
    with trace.use_span(NonRecordingSpan(context), end_on_exit=False):
        classic = Producer(producer.client, queue=producer.queue, classic=True)
        pushed = [classic.notify(tag, {"n": 4}),
                  producer.notify([tag + "-t"], {"n": 5}, "traced")]
    return {"opentelemetry": __version__, "pushed": pushed, "trace_id": TRACE_ID,
            "span_id": SPAN_ID, "traceparent": "00-%s-%s-01" % (TRACE_ID, SPAN_ID),
            "tracestate": "legacy=py%d%d" % sys.version_info[:2]}


def main():
    # type: () -> int
    tag = sys.argv[3]
    assert "gevent" not in sys.modules, "relay.producer loaded gevent"
    assert "pusher" not in sys.modules, "relay.producer loaded pusher"
    assert os.path.dirname(os.path.dirname(relay.__file__)) == sys.argv[1], relay.__file__
    queue = os.environ["RELAY_QUEUE"]
    client = client_from_env()
    producer = Producer(client)
    pushed = [
        producer.notify(tag, {"n": 1, "text": u"h\u00e9llo"}),
        producer.notify([tag + "-a", tag + "-b"], {"n": 2}, "legacy-event", "123.456"),
        notify(tag, u"plain \u2713 text", "one-off"),
    ]
    # Bad input goes to a queue no worker reads: the live worker on `queue` would make a
    # length check there race with its taking.
    unread = queue + ":legacy-unread"
    refusing = Producer(client, queue=unread)
    for channels, data, event, socket_id in BAD:
        try:
            refusing.notify(channels, data, event, socket_id)
        except InvalidMessage:
            continue
        raise AssertionError("no InvalidMessage for %r" % ((channels, event, socket_id),))
    for app in BAD_APPS:
        try:
            refusing.notify("a", {"x": 1}, app=app)
        except InvalidMessage:
            continue
        raise AssertionError("no InvalidMessage for app=%r" % (app,))
    assert client.llen(unread) == 0, "bad input was pushed"
    # RELAY_MAX_DATA_BYTES: the worker's limit, as an argument (or from the environment).
    Producer(client, queue=unread, max_data_bytes=20000).notify(tag, {"x": "y" * 15000})
    try:
        Producer(client, queue=unread, max_data_bytes="lots")
        raise AssertionError("no SettingError for max_data_bytes='lots'")
    except SettingError as exc:
        assert str(exc).startswith("RELAY_MAX_DATA_BYTES: must be"), exc
    assert client.llen(unread) == 1
    client.delete(unread)
    apps_queue = queue + ":legacy-apps"
    apps_pushed = [
        Producer(client, queue=apps_queue).notify(tag, {"n": 4}, app="tenant-b"),
        notify([tag], u"\u2713", "one-off", None, client, apps_queue, app=u"tenant_C-9"),
    ]
    assert client.llen(apps_queue) == 2
    client.delete(apps_queue)
    report = {"python": "%d.%d.%d" % sys.version_info[:3], "redis": redis.__version__,
              "pushed": pushed, "apps_pushed": apps_pushed, "opentelemetry": None}
    if OTEL_DIR:
        more = traced(producer, tag)
        report.update(more, pushed=pushed + more["pushed"])
    else:
        loaded = [m for m in sys.modules if m.split(".")[0] == "opentelemetry"]
        assert not loaded, "OpenTelemetry loaded without being installed: %r" % loaded
    producer.close()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
