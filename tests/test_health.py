"""/metrics, /healthz, the stuck-loop watchdog, JSON logs and the progress line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

from relay.housekeeping import Summary
from relay.logs import JsonFormatter, RepeatFilter
from relay.metrics import Metrics
from relay.redis_server import free_port
from tests.support import ROOT, wait_for


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def test_metrics_and_healthz_follow_the_worker(r, pusher, start_worker, queue_name,
                                               redis_server):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    start_worker(RELAY_METRICS_ADDR=f"127.0.0.1:{port}")
    status, body = _get(base + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(7)])
    r.rpush(queue_name, "not json")
    pusher.wait_for_events(7)
    text = wait_for(lambda: (t := _get(base + "/metrics")[1]) and
                    _metric(t, 'relay_notifications_delivered_total{app="default"}') == 7 and t,
                    what="delivered_total 7")
    dead = 'relay_notifications_dead_lettered_total{app="default",reason="invalid"}'
    assert _metric(text, dead) == 1
    assert _metric(text, 'relay_pusher_calls_total{app="default",status="2xx"}') >= 1
    assert _metric(text, "relay_pool_size") == 10
    assert 'relay_build_info{version="' in text
    assert pusher.secret not in text
    pusher.set_mode(status=401)
    r.rpush(queue_name, json.dumps({"channel": "c", "n": 99}))
    status, body = wait_for(lambda: (res := _get(base + "/healthz"))[0] == 503 and res,
                            what="/healthz to report the open circuit")
    report = json.loads(body)
    assert report["problems"] == ["circuit"] and "401" in report["circuit"]
    check = subprocess.run([sys.executable, str(ROOT / "worker.py"), "check"], cwd=ROOT,
                           env={"REDIS_URL": redis_server.url, "RELAY_QUEUE": queue_name,
                                "RELAY_METRICS_ADDR": f"127.0.0.1:{port}"},
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 1 and "circuit" in check.stdout
    pusher.clear_mode()
    wait_for(lambda: _get(base + "/healthz")[0] == 200, timeout=15, what="healthy again")
    assert _get(base + "/nope")[0] == 404


def test_a_taken_metrics_port_costs_the_endpoint_not_the_delivery(r, pusher, start_worker,
                                                                  queue_name):
    port = free_port()
    first = start_worker(RELAY_METRICS_ADDR=f"127.0.0.1:{port}")
    second = start_worker(RELAY_METRICS_ADDR=f"127.0.0.1:{port}")
    assert "cannot listen on 127.0.0.1:" in second.log() and "RELAY_METRICS_ADDR" in second.log()
    first.signal()
    assert first.wait() == 0
    r.rpush(queue_name, json.dumps({"channel": "c", "n": 1}))
    pusher.wait_for_events(1)  # delivered by the second worker, the only one left
    assert second.alive


def test_json_logs_are_one_object_per_line(r, pusher, start_worker, queue_name):
    w = start_worker(RELAY_LOG_FORMAT="json")
    r.rpush(queue_name, "not json")
    wait_for(lambda: "dead-lettered" in w.log(), what="the dead-letter line")
    w.signal()
    assert w.wait() == 0
    lines = [json.loads(line) for line in w.log().splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "message"} <= set(o) for o in lines)
    [dead] = [o for o in lines if "dead-lettered" in o["message"]]
    assert dead["level"] == "warning" and dead["error_class"] == "invalid"
    assert dead["attempts"] == 0  # fields travel as JSON keys


def test_watchdog_catches_a_greenlet_that_blocks_the_hub(tmp_path):
    script = textwrap.dedent("""
        from gevent import monkey; monkey.patch_all()
        import gevent, json, time
        from relay.health import Watchdog
        blocked = []
        dog = Watchdog(on_block=lambda: blocked.append(1))
        dog.start()
        gevent.sleep(1.5)                           # cooperative: not a block
        quiet = len(blocked) + len(dog.reports)
        monkey.get_original("time", "sleep")(1.5)   # what an unpatched call does to the hub
        deadline = time.time() + 10
        while not blocked and time.time() < deadline:
            gevent.sleep(0.1)
        print(json.dumps({"quiet": quiet, "blocked": len(blocked) > 0,
                          "recent": dog.blocked_recently(time.time())}))
    """)
    path = tmp_path / "blocker.py"  # a file, so the reported stack shows its source line
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result == {"quiet": 0, "blocked": True, "recent": True}
    assert "event loop was blocked" in out.stderr and "get_original" in out.stderr


def test_progress_line_gives_rate_and_eta_or_says_it_grows():
    summary = Summary(Metrics(), queue=None, inflight=lambda: 0)
    summary.last_backlog = 20_000
    assert summary._progress(18_000, 2.0) == "backlog 18,000, draining 1,000/s, ETA 18 s"
    assert summary._progress(22_000, 2.0) == "backlog 22,000, growing 1,000/s"
    assert summary._progress(0, 2.0) == "backlog 0"


def test_repeated_identical_errors_are_logged_once_per_window():
    now = [0.0]
    f = RepeatFilter(window_s=10, clock=lambda: now[0])

    def rec(msg, level=logging.ERROR):
        return logging.LogRecord("relay.x", level, __file__, 1, msg, (), None)

    assert f.filter(rec("boom"))
    assert not f.filter(rec("boom"))
    assert not f.filter(rec("boom"))
    assert f.filter(rec("other"))
    assert f.filter(rec("boom", logging.INFO))  # info lines are never held back
    now[0] = 11
    again = rec("boom")
    assert f.filter(again) and again.repeated == 2
    assert json.loads(JsonFormatter().format(again))["repeated"] == 2


def test_summary_line_counts_this_interval(caplog):
    class Queue:
        def lengths(self):
            return {"queue": 0, "retry": 0, "dead": 0}

    metrics = Metrics()
    summary = Summary(metrics, Queue(), inflight=lambda: 0)
    metrics.delivered.labels("default").inc(30)
    metrics.calls.labels("2xx", "default").inc(3)
    metrics.calls.labels("5xx", "default").inc(2)
    metrics.calls.labels("network", "default").inc(1)
    with caplog.at_level("INFO", logger="relay.housekeeping"):
        summary.tick()
        summary.tick()  # nothing new: no second line
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("delivered 30 (") and "failed Pusher calls 3" in line
