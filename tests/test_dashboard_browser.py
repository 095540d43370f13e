"""The operator's page in a real headless Chromium (Debian's), driven by Playwright.

The test installs what it needs where it can (chromium via apt-get when running as root,
playwright via pip); otherwise it skips and says why. Playwright's own browser download is
never used: it launches /usr/bin/chromium.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from relay.producer import encode
from relay.pusher_server import LocalPusher
from relay.redis_server import RedisServer
from tests.dashboard_support import dashboard_cmd, listening_port
from tests.support import WorkerProcess, wait_for
from tests.test_admin import admin

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
XSS = '<img src=x onerror="window.__owned=1"><script>window.__owned=1</script>'
INSTALL_TIMEOUT_S = 900


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def ensure_chromium() -> str:
    found = _chromium()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium, and no root apt-get to install it: apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT_S, check=False)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium ({' '.join(cmd)}): {done.stderr[-300:]}")
    return _chromium() or pytest.skip("chromium installed but not found on PATH")


def ensure_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"],
                              capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
                              check=False)
        if done.returncode != 0:
            pytest.skip(f"playwright is not installed and pip failed: {done.stderr[-300:]}")
        from playwright.sync_api import sync_playwright
    return sync_playwright


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = ensure_chromium()
    sync_playwright = ensure_playwright()
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def start_dashboard(redis_server: RedisServer, queue_name: str, tmp_path: Path
                    ) -> Iterator[Callable[..., str]]:
    procs: list[subprocess.Popen] = []

    def start(**env: str) -> str:
        log_path = tmp_path / f"dashboard{len(procs)}.log"
        proc = dashboard_cmd(redis_server, queue_name, log_path,
                             RELAY_DASHBOARD_ADDR="127.0.0.1:0", **env)
        procs.append(proc)
        port = wait_for(lambda: listening_port(proc, log_path), 20, "the dashboard to listen")
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


class Console:
    """Every console error and uncaught page error, to assert there were none."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))


def text(page: Any, selector: str) -> str:
    return str(page.text_content(selector)).strip()


def wait_page(page: Any, condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    """Poll the page (it refreshes itself every 2 s) until condition() holds."""
    return wait_for(condition, timeout, what, interval=0.2)


def test_page_with_a_worker_draining(browser: Any, start_dashboard: Callable[..., str],
                                     start_worker: Callable[..., WorkerProcess],
                                     r: redis.Redis, queue_name: str,
                                     pusher: LocalPusher) -> None:
    url = start_dashboard()
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    console = Console(page)
    response = page.goto(url)
    assert response.status == 200
    worker = start_worker()
    notes = [encode([f"site-{i % 7}"], {"n": i}, "hit") for i in range(300)]
    r.rpush(queue_name, *notes)
    r.rpush(queue_name, f"not json {XSS}")
    wait_for(lambda: int(r.hget(f"{queue_name}:stats", "delivered") or 0) == 300, 60,
             "the worker to deliver 300")
    wait_for(lambda: r.llen(f"{queue_name}:dead") == 1, 30, "the dead letter")

    # The numbers on the page catch up with Redis by themselves (no reload).
    wait_page(page, lambda: text(page, '[data-t="delivered"]') == "300", "300 on the page")
    wait_page(page, lambda: text(page, '[data-k="dead"]') == "1", "1 dead letter on the page")
    assert text(page, '[data-k="length"]') == str(r.llen(queue_name)) == "0"
    assert text(page, '[data-k="retry.scheduled"]') == str(r.zcard(f"{queue_name}:retry"))
    assert text(page, '[data-k="workers_alive"]') == "1"
    workers = text(page, "#workers")
    assert str(worker.proc.pid) in workers and "/ 10" in workers  # greenlets busy / the pool
    points = page.get_attribute('#chart-rate path[data-series="delivered"]', "data-points")
    assert int(points) >= 1
    assert re.fullmatch(r"\d+ (ms|s)", text(page, '[data-t="age_p50"]'))  # envelopes' age
    assert re.fullmatch(r"\d+ (ms|s)", text(page, '[data-t="call_p99"]'))
    assert page.get_attribute('#chart-rate path[data-series="delivered"]', "d").count("L") > 10

    # The dead letter's payload is text, not markup.
    row = page.locator("#dead tr", has_text="not json")
    assert XSS in row.locator("td.payload").text_content()
    assert page.evaluate("window.__owned") is None
    assert page.locator("#dead img, #dead script").count() == 0

    # Stop the worker, so the requeued letter stays in the queue to be counted.
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    row.locator("button.requeue").click()
    wait_page(page, lambda: "1 dead letter(s) moved" in text(page, "#action-result"),
              "the action's answer")
    wait_page(page, lambda: text(page, '[data-k="dead"]') == "0", "the dead count to drop")
    assert r.llen(f"{queue_name}:dead") == 0
    assert r.lrange(queue_name, 0, -1) == [f"not json {XSS}".encode()]
    screenshot = os.environ.get("RELAY_DASHBOARD_SCREENSHOT")
    if screenshot:
        page.screenshot(path=screenshot, full_page=True)
    assert console.errors == []
    page.close()


def test_window_switch_and_filter(browser: Any, start_dashboard: Callable[..., str],
                                  r: redis.Redis, queue_name: str) -> None:
    for i, cls in enumerate(("invalid", "rejected", "rejected")):
        r.rpush(f"{queue_name}:dead", json.dumps({"payload": f"p{i}", "error": "e",
                                                   "error_class": cls, "failed_at": 1.0,
                                                   "attempts": 1}))
    page = browser.new_page()
    console = Console(page)
    page.goto(start_dashboard())
    wait_page(page, lambda: page.locator("#dead tr[data-id]").count() == 3, "3 dead rows")
    page.select_option("#dead-filter select", "rejected")
    wait_page(page, lambda: page.locator("#dead tr[data-id]").count() == 2, "the filter")
    page.click('[data-window="24h"]')
    wait_page(page, lambda: text(page, "#window-name") == "last 24h", "the 24 h window")
    assert console.errors == []
    page.close()


def test_the_app_selector_shows_one_apps_charts(browser: Any,
                                                start_dashboard: Callable[..., str],
                                                r: redis.Redis, queue_name: str) -> None:
    """Several apps: the selector lists them and reads one app's buckets; it appears when a
    second app shows up (a reload added one) without reloading the page."""
    now = int(r.time()[0])
    for second in (now - 3, now - 2):
        r.hset(f"{queue_name}:history:s:{second}", mapping={"delivered": 7})
        r.hset(f"{queue_name}:history:app:default:s:{second}", mapping={"delivered": 5})
        r.hset(f"{queue_name}:history:app:tenant-b:s:{second}", mapping={"delivered": 2})
    r.hset(f"{queue_name}:stats", mapping={"delivered": 14, "app:default:delivered": 10})
    page = browser.new_page()
    console = Console(page)
    page.goto(start_dashboard())
    assert page.locator("#series-app-filter").is_hidden()  # one app known so far
    assert page.locator("#apps-panel").is_hidden()
    wait_page(page, lambda: text(page, '[data-t="delivered"]') == "14", "the queue's 14")
    r.hset(f"{queue_name}:stats", "app:tenant-b:delivered", 4)
    wait_page(page, lambda: page.locator("#series-app-filter").is_visible(), "the selector")
    assert page.eval_on_selector_all("#series-app option", "os => os.map(o => o.value)") == [
        "", "default", "tenant-b"]
    wait_page(page, lambda: page.locator("#apps tr").count() == 2, "a line per app")
    assert page.locator("#apps-panel").is_visible()
    assert [text(page, f"#apps tr:nth-child({i}) td:first-child") for i in (1, 2)] == [
        "default", "tenant-b"]
    page.select_option("#series-app", "tenant-b")
    wait_page(page, lambda: text(page, '[data-t="delivered"]') == "4", "tenant-b's 4")
    page.select_option("#series-app", "")
    wait_page(page, lambda: text(page, '[data-t="delivered"]') == "14", "every app's 14")
    assert console.errors == []
    page.close()


def test_with_auth_on_no_credentials_get_401(browser: Any,
                                             start_dashboard: Callable[..., str]) -> None:
    url = start_dashboard(RELAY_DASHBOARD_AUTH="ops:pa55word")
    anonymous = browser.new_context()
    assert anonymous.request.get(url + "/api/overview").status == 401
    page = anonymous.new_page()
    seen: list[int] = []
    page.on("response", lambda resp: seen.append(resp.status))
    try:
        status = page.goto(url).status
    except Exception as exc:  # headless Chromium cancels the login prompt: a navigation error
        assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc) or "401" in str(exc), exc
        status = seen[0] if seen else None
    assert status == 401
    anonymous.close()
    # (a page that is refused its credentials is a navigation error in Chromium: ask directly)
    wrong = browser.new_context(http_credentials={"username": "ops", "password": "nope"})
    assert wrong.request.get(url + "/api/overview").status == 401
    wrong.close()
    known = browser.new_context(http_credentials={"username": "ops", "password": "pa55word"})
    page = known.new_page()
    console = Console(page)
    assert page.goto(url).status == 200
    wait_page(page, lambda: page.get_attribute("body", "data-refreshed"), "a refresh")
    assert "pa55word" not in page.content()
    assert console.errors == []
    known.close()


def fill_history(r: redis.Redis, queue_name: str) -> None:
    """15 minutes of history: 150/s, a minute of failures, a 3 s drain spike at 2,600/s, and
    40/s over the last 12 s and the next 30 (so the tile reads 40 whenever the page asks);
    written as the settle scripts write it (Q:history:s:<second>)."""
    now = int(r.time()[0])
    pipe = r.pipeline(transaction=False)
    for back in range(-30, 900):
        if back <= 12:
            counts = {"delivered": 40}
        elif 300 <= back < 360:
            counts = {"failed": 20, "retried": 6}
        elif 297 <= back < 300:
            counts = {"delivered": 2600}
        else:
            counts = {"delivered": 150 + back % 7}
        for name, n in counts.items():
            pipe.hincrby(f"{queue_name}:history:s:{now - back}", name, n)
    pipe.execute()


# How many lines a cell's text takes, and whether its buttons share one line.
LINES = """cell => { const range = document.createRange(); range.selectNodeContents(cell);
  const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
  return tops.size; }"""


def test_charts_keep_an_incident_readable_and_narrow_columns_do_not_wrap(
        browser: Any, start_dashboard: Callable[..., str], r: redis.Redis,
        queue_name: str) -> None:
    """Issue 21, stumbles 8 and 11: one drain spike must not set the delivery chart's scale,
    failures get a scale of their own, the time axis is labelled along its length, a tile
    says the current delivery rate; the dead letters' short columns stay on one line."""
    fill_history(r, queue_name)
    for i in range(3):
        r.rpush(f"{queue_name}:dead", json.dumps({
            "payload": '{"channel": "bad channel!", "title": "x"}' * 3,
            "error": "HTTP 413: Payload too large: the event data is over the limit",
            "error_class": "rejected", "failed_at": 1.0, "attempts": 10 + i}))
    url = start_dashboard()
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    console = Console(page)
    page.goto(url)
    wait_page(page, lambda: page.get_attribute("body", "data-refreshed"), "a refresh")
    rate = page.locator("#chart-rate svg")
    assert float(rate.get_attribute("data-top")) < 1000  # the usual ~150/s sets the scale...
    assert int(rate.get_attribute("data-clipped")) >= 1  # ...and the spike is marked
    assert "2,600/s" in text(page, "#chart-rate")
    assert int(rate.get_attribute("data-time-labels")) >= 5
    problems = page.locator("#chart-problems svg")
    assert float(problems.get_attribute("data-top")) <= 30  # 20 failed calls/s fill it
    assert int(problems.locator('path[data-series="failed"]').get_attribute("data-points")) == 60
    assert text(page, '[data-k="delivered_per_s"]') == "40"
    screenshot = os.environ.get("RELAY_DASHBOARD_SCREENSHOT")
    if screenshot:
        page.screenshot(path=screenshot.replace(".png", "-incident.png"), full_page=True)

    page.set_viewport_size({"width": 640, "height": 1400})
    wait_page(page, lambda: page.locator("#dead tr[data-id]").count() == 3, "3 dead rows")
    row = page.locator("#dead tr[data-id]").first
    for selector in ("td.nowrap >> nth=0", "td.nowrap >> nth=1", "td.num"):
        assert row.locator(selector).evaluate(LINES) == 1, selector
    tops = {round(b.bounding_box()["y"]) for b in row.locator("td.actions button").all()}
    assert len(tops) == 1, "the buttons folded onto two lines"
    for header in page.locator("#dead-table th").all():
        assert header.evaluate(LINES) <= 1, header.text_content()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 640, f"the page is {width} px wide in a 640 px window"
    assert console.errors == []
    page.close()


def test_the_pause_banner_resume_pause_and_quiet_controls(
        browser: Any, start_dashboard: Callable[..., str],
        start_worker: Callable[..., WorkerProcess], r: redis.Redis, redis_server: RedisServer,
        queue_name: str, pusher: LocalPusher) -> None:
    """Issue 22: the banner says reason, since, until and who; Resume and Pause act (as the
    dead-letter actions do: a POST with the page's CSRF token); each worker has a Quiet
    button; a POST without the token is refused."""
    worker = start_worker()
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    console = Console(page)
    page.on("dialog", lambda dialog: dialog.accept())  # the Quiet button asks first
    page.goto(start_dashboard())
    wait_page(page, lambda: page.locator("#workers tr[data-worker]").count() == 1, "the worker")
    assert page.is_hidden("#pause-banner") and page.is_visible("#delivering")

    # Paused from the command line: the banner appears by itself.
    out = admin(redis_server, queue_name, "pause", "--for", "10m", "--reason", "pusher incident")
    assert out.returncode == 0, out.stdout + out.stderr
    wait_page(page, lambda: page.is_visible("#pause-banner"), "the banner")
    banner = text(page, "#pause-banner")
    who = out.stdout.split(" by ", 1)[1].split(" since ", 1)[0]
    for part in ("Delivery paused", f"by {who} since ", " UTC (", "until ", "(in 10 min)",
                 ": pusher incident"):
        assert part in banner, (part, banner)
    assert text(page, "#pause-button") == "Update the pause"
    row = page.locator("#workers tr[data-worker]")
    wait_page(page, lambda: "paused" in row.text_content(), "the worker's own word: paused")
    screenshot = os.environ.get("RELAY_DASHBOARD_SCREENSHOT")
    if screenshot:
        page.screenshot(path=screenshot.replace(".png", "-paused.png"), full_page=True)

    # Resume on the page: every worker delivers again.
    page.click("#resume-button")
    wait_page(page, lambda: page.is_hidden("#pause-banner"), "the banner to go")
    assert not r.exists(f"{queue_name}:pause")
    wait_for(lambda: "delivery resumed (relay resume)" in worker.log(), 5, "the worker resuming")
    r.rpush(queue_name, json.dumps({"channel": "c", "n": 1}))
    pusher.wait_for_events(1)

    # Pause from the page, with a reason and a deadline.
    page.fill('#pause-form input[name="reason"]', "deploy <b>now</b>")
    page.fill('#pause-form input[name="for"]', "30m")
    page.click("#pause-button")
    wait_page(page, lambda: page.is_visible("#pause-banner"), "the banner again")
    assert "by page@127.0.0.1 since" in text(page, "#pause-banner")
    assert text(page, "#pause-text").endswith(": deploy <b>now</b>")  # text, not markup
    assert r.hget(f"{queue_name}:pause", "reason") == b"deploy <b>now</b>"
    assert 1790 < r.pttl(f"{queue_name}:pause") / 1000 <= 1800
    wait_for(lambda: "delivery paused by page@127.0.0.1" in worker.log(), 5, "the worker")
    page.click("#resume-button")
    wait_page(page, lambda: page.is_hidden("#pause-banner"), "the banner to go again")

    # Without the page's CSRF token, the same request is refused and changes nothing.
    refused = page.request.post(page.url.rstrip("/") + "/api/pause",
                                data={"reason": "forged"})
    assert refused.status == 403 and "CSRF" in refused.json()["error"]
    assert not r.exists(f"{queue_name}:pause")

    # Quiet one worker from its row.
    row.locator("button.quiet").click()
    wait_page(page, lambda: "quiet" in row.locator("td >> nth=6").text_content(), "quiet")
    assert row.locator("button.quiet").count() == 0
    wait_for(lambda: "quiet (page, by page@127.0.0.1)" in worker.log(), 5, "the worker quiet")
    assert console.errors == []
    page.close()
