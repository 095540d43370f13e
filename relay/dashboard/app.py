"""The dashboard's WSGI app and its gevent server.

GET  /                          the page (numbers rendered in; app.js refreshes it every 2 s)
GET  /static/<file>             app.js, style.css, icon.svg: shipped in the package
GET  /api/overview              the queue now, workers, gates, totals
GET  /api/series?window=15m|24h per-second (15m) or per-minute (24h) rates and latency
                 [&app=NAME]    one Pusher app's notifications (RELAY_APPS, several apps)
GET  /api/dead?offset=&limit=&q=&class=   a page of dead letters, filtered
GET  /api/dead/entry?id=        one dead letter in full
POST /api/dead/requeue          {"id": ...} one entry, or {"q": ..., "class": ...} the filtered
                                (`invalid` ones only with class=invalid: skipped_invalid says)
POST /api/dead/purge            {"older_than": "7d", "q": ..., "class": ...}
POST /api/pause                 {"reason": ..., "for": "30m" or ""}: pause, or update the pause
POST /api/resume                {}
POST /api/quiet                 {"worker": WORKER_ID}
A GET never changes anything; a POST needs the page's CSRF token and a same-origin request.
The pause and quiet actions name who asked: the basic-auth user (or "page") @ the client.
"""

from __future__ import annotations

import argparse
import json
import logging
import mimetypes
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import redis
from gevent.pywsgi import WSGIServer

from relay import rules
from relay.admin import parse_duration
from relay.dashboard import page
from relay.dashboard.data import ERROR_CLASSES, Board, DeadFilter
from relay.dashboard.security import SECURITY_HEADERS, Guard
from relay.history import WINDOWS, SeriesReader
from relay.pause import PauseError, parse_for
from relay.queue import RedisQueue

log = logging.getLogger(__name__)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
STATIC = ("app.js", "style.css", "icon.svg")
MAX_BODY = 64 * 1024
PAGE_LIMIT_MAX = 200


class HttpError(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def _query(environ: dict[str, Any]) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _int(text: str | None, default: int, low: int, high: int) -> int:
    try:
        return max(low, min(high, int(text))) if text else default
    except ValueError:
        raise HttpError("400 Bad Request", f"not a number: {text[:20]!r}") from None


def _filter(values: dict[str, Any]) -> DeadFilter:
    cls = str(values.get("class") or "")
    if cls and cls not in ERROR_CLASSES:
        raise HttpError("400 Bad Request", "class must be one of " + ", ".join(ERROR_CLASSES))
    return DeadFilter(text=str(values.get("q") or ""), error_class=cls)


class DashboardApp:
    """Routes requests to the Board; wraps every answer in the security headers."""

    def __init__(self, queue: RedisQueue, guard: Guard) -> None:
        self.board = Board(queue)
        self.queue = queue
        self.guard = guard
        self.series = SeriesReader(queue.client, queue.keys, queue.now)
        self.gets: dict[str, Callable[[dict[str, Any], str], tuple[str, bytes, str]]] = {
            "/": self._page, "/api/overview": self._overview, "/api/series": self._series,
            "/api/dead": self._dead, "/api/dead/entry": self._dead_entry}
        self.posts: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
            "/api/dead/requeue": self._requeue, "/api/dead/purge": self._purge,
            "/api/pause": self._pause, "/api/resume": self._resume, "/api/quiet": self._quiet}

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        try:
            status, body, ctype = self._route(environ)
        except HttpError as exc:
            status, body, ctype = exc.status, _json({"error": str(exc)}), "application/json"
        except redis.RedisError as exc:
            log.warning("dashboard: Redis error %s", type(exc).__name__)
            status, ctype = "503 Service Unavailable", "application/json"
            body = _json({"error": f"redis: {type(exc).__name__}"})
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                   *SECURITY_HEADERS]
        if status.startswith("401"):
            headers.append(("WWW-Authenticate", 'Basic realm="relay", charset="UTF-8"'))
        start_response(status, headers)
        return [body]

    def _route(self, environ: dict[str, Any]) -> tuple[str, bytes, str]:
        user = self.guard.user(environ)
        if user is None:
            raise HttpError("401 Unauthorized", "authentication required")
        path, method = environ.get("PATH_INFO", "/"), environ.get("REQUEST_METHOD", "GET")
        if path.startswith("/static/") and method in ("GET", "HEAD"):
            return _static(path.removeprefix("/static/"))
        if path == "/favicon.ico":
            return "204 No Content", b"", "image/x-icon"
        if method in ("GET", "HEAD") and path in self.gets:
            return self.gets[path](environ, user)
        if method == "POST" and path in self.posts:
            refusal = self.guard.post_refusal(environ, user)
            if refusal is not None:
                raise HttpError("403 Forbidden", refusal)
            who = f"{user or 'page'}@{environ.get('REMOTE_ADDR') or '?'}"
            return "200 OK", _json(self.posts[path](_body(environ), who)), "application/json"
        if path in self.gets or path in self.posts:
            raise HttpError("405 Method Not Allowed", "method not allowed")
        raise HttpError("404 Not Found", "not found")

    # -- GET --------------------------------------------------------------------------------------

    def _page(self, environ: dict[str, Any], user: str) -> tuple[str, bytes, str]:
        html = page.render(self.board.overview(), self.series.read("15m"),
                           self.board.dead_page(DeadFilter(), 0, 20),
                           self.guard.csrf_token(user))
        return "200 OK", html, "text/html; charset=utf-8"

    def _overview(self, environ: dict[str, Any], user: str) -> tuple[str, bytes, str]:
        return "200 OK", _json(self.board.overview()), "application/json"

    def _series(self, environ: dict[str, Any], user: str) -> tuple[str, bytes, str]:
        query = _query(environ)
        window = query.get("window", "15m")
        if window not in WINDOWS:
            raise HttpError("400 Bad Request", "window must be one of " + ", ".join(WINDOWS))
        app = query.get("app") or None
        if app is not None and rules.app_problem(app) is not None:
            raise HttpError("400 Bad Request", "app must be an app name: 1 to "
                            f"{rules.MAX_APP_NAME} letters, digits, '_' or '-'")
        data = self.series.read(window, app)
        data["app"] = app
        return "200 OK", _json(data), "application/json"

    def _dead(self, environ: dict[str, Any], user: str) -> tuple[str, bytes, str]:
        q = _query(environ)
        offset = _int(q.get("offset"), 0, 0, 10**9)
        limit = _int(q.get("limit"), 20, 1, PAGE_LIMIT_MAX)
        data = self.board.dead_page(_filter(q), offset, limit)
        return "200 OK", _json(data), "application/json"

    def _dead_entry(self, environ: dict[str, Any], user: str) -> tuple[str, bytes, str]:
        entry = self.board.dead_entry(_query(environ).get("id", ""))
        if entry is None:
            raise HttpError("404 Not Found", "no such dead letter (moved or purged?)")
        return "200 OK", _json(entry), "application/json"

    # -- POST -------------------------------------------------------------------------------------

    def _requeue(self, body: dict[str, Any], who: str) -> dict[str, Any]:
        if body.get("id"):
            return {"moved": self.board.requeue_one(str(body["id"]))}
        return self.board.requeue(_filter(body))

    def _purge(self, body: dict[str, Any], who: str) -> dict[str, Any]:
        try:
            older_than = parse_duration(str(body.get("older_than", "")))
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise HttpError("400 Bad Request", str(exc)) from None
        return {"moved": self.board.purge(_filter(body), older_than)}

    def _pause(self, body: dict[str, Any], who: str) -> dict[str, Any]:
        try:
            for_s = parse_for(str(body.get("for") or ""))
        except PauseError as exc:
            raise HttpError("400 Bad Request", f"for: {exc}") from None
        return self.board.pause(str(body.get("reason") or ""), for_s, who)

    def _resume(self, body: dict[str, Any], who: str) -> dict[str, Any]:
        return self.board.resume(who)

    def _quiet(self, body: dict[str, Any], who: str) -> dict[str, Any]:
        worker = str(body.get("worker") or "")
        if not worker:
            raise HttpError("400 Bad Request", "name the worker: {\"worker\": WORKER_ID}")
        done = self.board.quiet(worker, who)
        if not done["registered"]:
            raise HttpError("404 Not Found", f"no registered worker {worker[:80]!r}")
        return done


def _json(data: Any) -> bytes:
    # Escaping < > & keeps a payload inert even if some client renders the JSON as HTML.
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def _body(environ: dict[str, Any]) -> dict[str, Any]:
    if not str(environ.get("CONTENT_TYPE", "")).startswith("application/json"):
        raise HttpError("415 Unsupported Media Type", "send application/json")
    length = _int(environ.get("CONTENT_LENGTH"), 0, 0, MAX_BODY + 1)
    if length > MAX_BODY:
        raise HttpError("413 Payload Too Large", "body too large")
    try:
        data = json.loads(environ["wsgi.input"].read(length) or b"{}")
    except ValueError:
        raise HttpError("400 Bad Request", "body is not JSON") from None
    if not isinstance(data, dict):
        raise HttpError("400 Bad Request", "body must be a JSON object")
    return data


def _static(name: str) -> tuple[str, bytes, str]:
    if name not in STATIC:
        raise HttpError("404 Not Found", "not found")
    data = resources.files("relay.dashboard").joinpath("static", name).read_bytes()
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if ctype.startswith("text/") or name.endswith(".js"):
        ctype = ("text/javascript" if name.endswith(".js") else ctype) + "; charset=utf-8"
    return "200 OK", data, ctype


class DashboardServer:
    """gevent's WSGI server on RELAY_DASHBOARD_ADDR."""

    def __init__(self, addr: str, app: DashboardApp) -> None:
        host, _, port = addr.rpartition(":")
        self.server = WSGIServer((host.strip("[]"), int(port)), app, log=None, error_log=log)

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(timeout=1)
