"""The dashboard's API on a real Redis: what it reads, what it moves, and who may ask."""

from __future__ import annotations

import base64
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from relay.dashboard.app import DashboardApp, DashboardServer
from relay.dashboard.data import Trend
from relay.dashboard.security import Guard, is_loopback
from relay.queue import RedisQueue
from relay.redis_server import RedisServer
from tests.dashboard_support import dashboard_cmd, listening_port
from tests.support import wait_for

XSS = '<script>alert("owned")</script>'


class Client:
    """urllib against one dashboard; keeps the page's CSRF token like the page's JS does."""

    def __init__(self, base: str, auth: str | None = None) -> None:
        self.base = base
        self.auth = auth
        self.token = ""

    def call(self, path: str, body: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method="POST" if data else "GET")
        if data is not None:
            req.add_header("Content-Type", "application/json")
            req.add_header("X-CSRF-Token", self.token)
        if self.auth:
            token = base64.b64encode(self.auth.encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, path: str, body: dict[str, Any] | None = None) -> Any:
        status, _, raw = self.call(path, body)
        assert status == 200, (status, raw)
        return json.loads(raw)

    def load_page(self) -> str:
        status, _, raw = self.call("/")
        assert status == 200, raw
        html = raw.decode()
        self.token = re.search(r'name="csrf-token" content="([0-9a-f]+)"', html).group(1)
        return html


@pytest.fixture
def serve(r: redis.Redis, queue_name: str) -> Iterator[Callable[..., Client]]:
    servers: list[DashboardServer] = []

    def start(auth: str | None = None) -> Client:
        queue = RedisQueue(r, queue_name, worker_id="dashboard")
        server = DashboardServer("127.0.0.1:0", DashboardApp(queue, Guard(auth)))
        server.start()
        servers.append(server)
        return Client(f"http://127.0.0.1:{server.port}", auth)

    yield start
    for server in servers:
        server.stop()


def dead_letter(r: redis.Redis, queue_name: str, payload: str, error: str = "not JSON",
                error_class: str = "invalid", failed_at: float | None = None) -> bytes:
    entry = json.dumps({"payload": payload, "error": error, "error_class": error_class,
                        "failed_at": failed_at or time.time(), "attempts": 1})
    r.rpush(f"{queue_name}:dead", entry)
    return entry.encode()


# -- reading -----------------------------------------------------------------------------------


def test_overview_matches_redis(serve: Callable[..., Client], r: redis.Redis,
                                queue_name: str) -> None:
    worker = RedisQueue(r, queue_name, worker_id="host-a:7:ab")
    worker.heartbeat(8, {"busy": 2, "inflight": 7, "pool": 4,
                            "circuit": {"open": True, "reason": "401 bad key",
                                        "next_probe_in_s": 3.0},
                            "paused_for_s": 0.0, "rate_limit": {"per_s": 100, "burst": 100},
                            "shedding": {"backlog": {"active": True, "dropped": 5}}})
    r.rpush(queue_name, *[b"x"] * 5)
    r.zadd(f"{queue_name}:retry", {"a": 1e12, "b": 2e12})
    dead_letter(r, queue_name, "p")
    o = serve().json("/api/overview")
    assert (o["length"], o["retry"]["scheduled"], o["dead"]) == (5, 2, 1)
    assert o["retry"]["next_due_in_s"] > 0
    [w] = o["workers"]
    assert (w["id"], w["pid"], w["pool"], w["busy"], w["inflight"]) == (
        "host-a:7:ab", os.getpid(), 4, 2, 7)
    assert not w["late"] and not w["expired"]
    assert o["inflight"] == 7
    gates = o["gates"]
    assert gates["circuit"]["open"] and gates["circuit"]["open_in"][0]["reason"] == "401 bad key"
    assert gates["rate_limit"]["per_s"] == 100
    assert gates["shedding"] == {"backlog": True, "max_age": False}


def test_a_late_heartbeat_is_marked(serve: Callable[..., Client], r: redis.Redis,
                                    queue_name: str) -> None:
    worker = RedisQueue(r, queue_name, worker_id="w-late")
    worker.heartbeat(100)
    r.zincrby(f"{queue_name}:workers", -60, "w-late")  # as if its last beat was 60 s ago
    [w] = serve().json("/api/overview")["workers"]
    assert w["late"] and not w["expired"] and w["heartbeat_age_s"] >= 60


def test_trend_says_growing_or_draining(serve: Callable[..., Client], r: redis.Redis,
                                        queue_name: str) -> None:
    client = serve()
    r.rpush(queue_name, *[b"x"] * 100)
    assert client.json("/api/overview")["trend"]["state"] == "measuring"  # one sample yet
    r.ltrim(queue_name, 50, -1)

    def measured() -> dict[str, Any] | None:
        trend = client.json("/api/overview")["trend"]
        return trend if trend["state"] != "measuring" else None

    trend = wait_for(measured, 10, "a second sample a second later")
    assert trend["state"] == "draining" and trend["eta_s"] is not None
    assert trend["change_per_s"] < 0
    r.rpush(queue_name, *[b"x"] * 100)
    assert client.json("/api/overview")["trend"]["state"] == "growing"


def test_trend_on_a_fresh_page_is_the_recent_rate_not_the_oldest_sample() -> None:
    """Issue 21, stumble 4: a dashboard process that served a page an hour ago compared with
    that page's sample, and said "growing 0.3/s" while the queue grew 39/s."""
    trend = Trend()
    trend.observe(1000.0, 0, 0.0)  # a page open an hour ago, the queue empty
    assert trend.observe(4600.0, 1000, 0.0) == {"state": "measuring", "change_per_s": None,
                                                "eta_s": None}
    assert trend.observe(4602.0, 1078, 0.0)["change_per_s"] == 39.0  # the next refresh
    for step in range(2, 12):  # refreshes every 2 s: over TREND_SPAN_S, the last 10 s
        latest = trend.observe(4600.0 + 2 * step, 1000 + 78 * step, 0.0)
    assert latest == {"state": "growing", "change_per_s": 39.0, "eta_s": None}
    # The drain that follows: 50/s down to empty, said as it is, not averaged with the growth.
    for step in range(1, 6):
        latest = trend.observe(4622.0 + 2 * step, 1858 - 100 * step, 0.0)
    assert latest["state"] == "draining" and latest["change_per_s"] == -50.0
    assert latest["eta_s"] == pytest.approx(1358 / 50, abs=0.1)


def test_several_apps_filter_the_series_and_name_the_app_of_an_open_circuit(
        serve: Callable[..., Client], r: redis.Redis, queue_name: str) -> None:
    """With several apps the settle scripts keep each app's buckets beside the queue's; the
    page offers the apps, /api/series?app= reads one of them."""
    queue = RedisQueue(r, queue_name, worker_id="host-a:7:ab")
    queue.heartbeat(8, {"circuit": {"app": "tenant-b", "open": True, "reason": "HTTP 401"},
                        "circuits": [{"app": "default", "open": False, "reason": None},
                                     {"app": "tenant-b", "open": True, "reason": "HTTP 401",
                                      "next_probe_in_s": 2.0}]})
    now = int(queue.now())
    for second in (now - 3, now - 2):
        r.hset(f"{queue_name}:history:s:{second}", mapping={"delivered": 7})
        r.hset(f"{queue_name}:history:app:default:s:{second}", mapping={"delivered": 5})
        r.hset(f"{queue_name}:history:app:tenant-b:s:{second}", mapping={"delivered": 2})
    r.hset(f"{queue_name}:stats", mapping={"delivered": 14, "app:default:delivered": 10,
                                           "app:tenant-b:delivered": 4})
    client = serve()
    overview = client.json("/api/overview")
    assert overview["apps"] == ["default", "tenant-b"]
    assert overview["totals"] == {"delivered": 14}
    [opened] = overview["gates"]["circuit"]["open_in"]
    assert (opened["app"], opened["reason"]) == ("tenant-b", "HTTP 401")
    assert client.json("/api/series")["totals"]["delivered"] == 14
    tenant = client.json("/api/series?window=15m&app=tenant-b")
    assert (tenant["app"], tenant["totals"]["delivered"]) == ("tenant-b", 4)
    assert client.json("/api/series?app=default")["totals"]["delivered"] == 10
    assert client.json("/api/series?app=gone")["totals"]["delivered"] == 0
    status, _, raw = client.call("/api/series?app=a%20b")
    assert status == 400 and b"app must be an app name" in raw
    html = client.load_page()
    assert '<p id="series-app-filter"><label>app' in html
    assert "<option>default</option><option>tenant-b</option>" in html
    assert "host-a:7:ab: app tenant-b: HTTP 401 (next probe in 2.0 s)" in html
    # a line per app, as `relay stats` has it
    lines = overview["app_lines"]
    assert lines["tenant-b"]["totals"] == {"delivered": 4}
    assert lines["tenant-b"]["circuit"] == {"open_in": ["host-a:7:ab"], "reason": "HTTP 401"}
    assert ("<tr><td>tenant-b</td><td>4</td><td>0</td><td>0</td><td>open in 1 worker(s): "
            "HTTP 401</td><td>off</td></tr>") in html
    assert '<div class="scroll" id="apps-panel"><table>' in html


def test_one_app_offers_no_filter(serve: Callable[..., Client], r: redis.Redis,
                                  queue_name: str) -> None:
    r.hset(f"{queue_name}:stats", mapping={"delivered": 3})
    client = serve()
    overview = client.json("/api/overview")
    assert overview["apps"] == [] and overview["app_lines"] is None
    html = client.load_page()
    assert '<p id="series-app-filter" hidden>' in html and 'id="apps-panel" hidden>' in html


def test_series_endpoint_and_its_bad_input(serve: Callable[..., Client], r: redis.Redis,
                                           queue_name: str) -> None:
    client = serve()
    series = client.json("/api/series?window=24h")
    assert series["window"] == "24h" and len(series["points"]) == 1440
    assert client.call("/api/series?window=1y")[0] == 400


def test_dead_page_filters_and_pages(serve: Callable[..., Client], r: redis.Redis,
                                     queue_name: str) -> None:
    for i in range(5):
        dead_letter(r, queue_name, f"apple {i}")
    dead_letter(r, queue_name, "pear", error="413 too big", error_class="rejected")
    client = serve()
    page = client.json("/api/dead?limit=2&offset=1")
    assert (page["total"], page["matched"], len(page["entries"])) == (6, 6, 2)
    assert page["entries"][0]["head"] == "apple 1"
    assert client.json("/api/dead?q=APPLE")["matched"] == 5
    assert client.json("/api/dead?q=too+big")["matched"] == 1
    assert client.json("/api/dead?class=rejected")["entries"][0]["head"] == "pear"
    assert client.call("/api/dead?class=bogus")[0] == 400
    assert client.call("/api/dead?limit=x")[0] == 400
    ident = page["entries"][0]["id"]
    assert client.json(f"/api/dead/entry?id={ident}")["payload"] == "apple 1"
    assert client.call("/api/dead/entry?id=nope")[0] == 404


# -- acting ------------------------------------------------------------------------------------


def test_requeue_one_moves_it_once_even_for_two_operators(serve: Callable[..., Client],
                                                          r: redis.Redis,
                                                          queue_name: str) -> None:
    dead_letter(r, queue_name, '{"channel":"c","n":1}')
    alice, bob = serve(), serve()
    alice.load_page()
    bob.load_page()
    ident = alice.json("/api/dead")["entries"][0]["id"]
    assert alice.json("/api/dead/requeue", {"id": ident}) == {"moved": 1}
    assert bob.json("/api/dead/requeue", {"id": ident}) == {"moved": 0}
    assert r.lrange(queue_name, 0, -1) == [b'{"channel":"c","n":1}']
    assert r.llen(f"{queue_name}:dead") == 0


def test_requeue_the_filtered_and_purge_older_than(serve: Callable[..., Client],
                                                   r: redis.Redis, queue_name: str) -> None:
    old = time.time() - 8 * 86400
    for i in range(3):
        dead_letter(r, queue_name, f"keep {i}", failed_at=old)
    dead_letter(r, queue_name, "retry me", error_class="exhausted")
    dead_letter(r, queue_name, "fresh")
    client = serve()
    client.load_page()
    assert client.json("/api/dead/requeue", {"class": "exhausted"}) == {
        "moved": 1, "skipped_invalid": 0}
    assert r.lrange(queue_name, 0, -1) == [b"retry me"]
    assert client.json("/api/dead/purge", {"older_than": "7d"}) == {"moved": 3}
    assert [json.loads(e)["payload"] for e in r.lrange(f"{queue_name}:dead", 0, -1)] == ["fresh"]
    assert client.call("/api/dead/purge", {"older_than": "soon"})[0] == 400


def test_requeue_the_filtered_skips_invalid_unless_that_class_is_chosen(
        serve: Callable[..., Client], r: redis.Redis, queue_name: str) -> None:
    dead_letter(r, queue_name, "not json", error_class="invalid")
    dead_letter(r, queue_name, '{"channel":"c"}', error="HTTP 503", error_class="exhausted")
    client = serve()
    client.load_page()
    assert client.json("/api/dead/requeue", {"q": ""}) == {"moved": 1, "skipped_invalid": 1}
    assert r.lrange(queue_name, 0, -1) == [b'{"channel":"c"}']
    assert client.json("/api/dead/requeue", {"class": "invalid"}) == {
        "moved": 1, "skipped_invalid": 0}
    assert r.llen(f"{queue_name}:dead") == 0


@pytest.mark.parametrize("headers,why", [
    ({"X-CSRF-Token": "0" * 64}, "CSRF"),
    ({"Origin": "http://evil.example"}, "cross-origin"),
    ({"Sec-Fetch-Site": "cross-site"}, "cross-site"),
], ids=["wrong-token", "foreign-origin", "cross-site"])
def test_a_post_from_elsewhere_is_refused(serve: Callable[..., Client], r: redis.Redis,
                                          queue_name: str, headers: dict[str, str],
                                          why: str) -> None:
    dead_letter(r, queue_name, "p")
    client = serve()
    client.load_page()
    if "X-CSRF-Token" in headers:
        client.token = headers.pop("X-CSRF-Token")
    status, _, body = client.call("/api/dead/requeue", {"class": ""}, headers)
    assert status == 403 and why in json.loads(body)["error"]
    assert r.llen(f"{queue_name}:dead") == 1 and r.llen(queue_name) == 0


def test_get_never_acts_and_post_needs_json(serve: Callable[..., Client], r: redis.Redis,
                                            queue_name: str) -> None:
    dead_letter(r, queue_name, "p")
    client = serve()
    assert client.call("/api/dead/requeue")[0] == 405
    assert client.call("/api/dead/purge?older_than=0s")[0] == 405
    client.load_page()
    status, _, _ = client.call("/api/dead/requeue", {"class": ""},
                               {"Content-Type": "text/plain"})
    assert status == 415
    assert r.llen(f"{queue_name}:dead") == 1


# -- pause, resume, quiet ------------------------------------------------------------------------


def test_pause_resume_and_quiet_through_the_api(serve: Callable[..., Client], r: redis.Redis,
                                                queue_name: str) -> None:
    RedisQueue(r, queue_name, worker_id="host-a:7:ab").heartbeat(60, {"delivery": "delivering"})
    client = serve(auth="ops:s3cret-pw")
    assert client.json("/api/overview")["pause"] is None
    html = client.load_page()
    assert 'id="pause-banner" role="alert" hidden' in html
    done = client.json("/api/pause", {"reason": "pusher incident", "for": "10m"})
    assert not done["updated"] and done["paused"]["who"] == "ops@127.0.0.1"
    assert 590 < r.pttl(f"{queue_name}:pause") / 1000 <= 600
    o = client.json("/api/overview")
    assert o["pause"]["reason"] == "pusher incident" and 590 < o["pause"]["left_s"] <= 600
    assert o["pause"]["text"].startswith("by ops@127.0.0.1 since ")
    html = client.load_page()  # without JavaScript the banner is there too
    assert 'id="pause-banner" role="alert">' in html and "pusher incident" in html
    assert client.json("/api/pause", {"reason": "still", "for": ""})["updated"]
    assert r.ttl(f"{queue_name}:pause") == -1  # until resumed now
    status, _, body = client.call("/api/pause", {"for": "soon"})
    assert status == 400 and "not a duration: 'soon'" in json.loads(body)["error"]
    assert client.json("/api/resume", {}) == {"resumed": True}
    assert not r.exists(f"{queue_name}:pause")
    assert client.json("/api/quiet", {"worker": "host-a:7:ab"})["quiet"]
    [w] = client.json("/api/overview")["workers"]
    assert w["quiet"]["how"] == "page" and w["quiet"]["who"] == "ops@127.0.0.1"
    assert client.call("/api/quiet", {"worker": "nobody"})[0] == 404


def test_the_controls_need_the_token_and_never_act_on_a_get(
        serve: Callable[..., Client], r: redis.Redis, queue_name: str) -> None:
    RedisQueue(r, queue_name, worker_id="w1").heartbeat(60)
    client = serve()
    for path in ("/api/pause", "/api/resume", "/api/quiet"):
        assert client.call(path)[0] == 405
        status, _, body = client.call(path, {"reason": "x", "worker": "w1"})  # no token
        assert status == 403 and "CSRF" in json.loads(body)["error"]
    assert not r.exists(f"{queue_name}:pause", f"{queue_name}:quiet")


# -- security ----------------------------------------------------------------------------------


def test_basic_auth(serve: Callable[..., Client]) -> None:
    client = serve(auth="ops:s3cret-pw")
    for path in ("/", "/api/overview", "/static/app.js"):
        assert client.call(path)[0] == 200
    anonymous = Client(client.base)
    status, headers, _ = anonymous.call("/api/overview")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert anonymous.call("/")[0] == 401
    assert Client(client.base, "ops:wrong").call("/")[0] == 401
    assert Client(client.base, "ops:s3cret-pw:").call("/")[0] == 401
    assert b"s3cret" not in client.call("/")[2] + client.call("/api/overview")[2]


def test_payloads_are_escaped_and_the_page_sets_a_csp(serve: Callable[..., Client],
                                                      r: redis.Redis, queue_name: str) -> None:
    dead_letter(r, queue_name, XSS, error=XSS)
    client = serve()
    status, headers, raw = client.call("/")
    html = raw.decode()
    assert "alert" in html and XSS not in html and "&lt;script&gt;" in html
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "<script>" not in html.replace('<script src="/static/app.js" defer></script>', "")
    _, headers, raw = client.call("/api/dead")
    assert b"<script" not in raw and json.loads(raw)["entries"][0]["head"] == XSS
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_static_files_ship_in_the_package(serve: Callable[..., Client]) -> None:
    client = serve()
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css"),
                        ("icon.svg", "image/svg+xml")):
        status, headers, body = client.call(f"/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(ctype) and body
    assert client.call("/static/../config.py")[0] == 404
    assert client.call("/nothing")[0] == 404


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("::")


# -- the command -------------------------------------------------------------------------------


def test_exposed_without_auth_exits_2_with_one_line(redis_server: RedisServer,
                                                    queue_name: str, tmp_path: Path) -> None:
    log_path = tmp_path / "dashboard.log"
    proc = dashboard_cmd(redis_server, queue_name, log_path, RELAY_DASHBOARD_ADDR="0.0.0.0:0")
    assert proc.wait(timeout=30) == 2
    err = log_path.read_text()
    assert err.count("\n") == 1 and "RELAY_DASHBOARD_AUTH" in err and "loopback" in err


def test_dashboard_command_serves_then_stops_on_sigterm(redis_server: RedisServer,
                                                        queue_name: str,
                                                        tmp_path: Path) -> None:
    log_path = tmp_path / "dashboard.log"
    proc = dashboard_cmd(redis_server, queue_name, log_path, RELAY_DASHBOARD_ADDR="127.0.0.1:0",
                         PUSHER_SECRET="must-not-matter")
    try:
        port = wait_for(lambda: listening_port(proc, log_path), 20, "the dashboard to listen")
        status, _, body = Client(f"http://127.0.0.1:{port}").call("/api/overview")
        assert status == 200 and json.loads(body)["queue"] == queue_name
    finally:
        proc.terminate()
    assert proc.wait(timeout=30) == 0, log_path.read_text()
