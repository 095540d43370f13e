"""The local Pusher-compatible server's state and request handling.

1. Serves ``POST /apps/{app_id}/events`` and ``POST /apps/{app_id}/batch_events`` for each
   of its apps, each request checked against its own app's key and secret, and answers
   like Pusher's HTTP API: ``200 {}`` on success (``{"batch": [...]}`` /
   ``{"channels": {...}}`` only when ``info`` was asked for), 404 elsewhere.
2. Records what it accepted (one record per channel per event, with its ``app_id``) and
   counts every API request, with its time, app and status, including those hit by a fault.
3. Applies the run-time fault modes (see ``modes``): server-wide, or one app's own, which
   replace the server-wide ones for that app (a 401 for one app while another answers 200).
4. Exposes an unauthenticated control API on the same port under ``/_control/``:
   ``POST mode`` (with ``"app_id"`` in the body: that app's modes only; without: the whole
   server's, every app's own dropped), ``POST reset``, ``GET events``, ``GET stats``
   (``?requests=0`` leaves out the per-request list) and ``GET count`` (just
   ``events_total`` and ``requests_total``: cheap to poll however many records are kept),
   ``GET order`` (each channel's event data in the order the events were accepted, for
   ordering tests). ``events``, ``count`` and ``order`` take ``?app_id=`` for one app's.
"""

import json
import logging
import re
import socket
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from relay import rules
from relay.pusher_server.auth import AppCredentials, authenticate
from relay.pusher_server.e2e import DecryptError, decrypt, master_key
from relay.pusher_server.modes import STYLES, Modes
from relay.pusher_server.protocol import (
    ApiError,
    Connection,
    Request,
    Response,
    parse_query,
    reset,
    send,
)
from relay.pusher_server.validate import channels_in, parse_batch, parse_trigger

log = logging.getLogger(__name__)

_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_APP_PATH = re.compile(r"\A/apps/([^/]+)/")
_PARSERS = {"events": parse_trigger, "batch_events": parse_batch}


@dataclass
class _Faults:
    """One set of modes in force (server-wide, or one app's) and its fail_next countdown."""

    modes: Modes
    left: int


class PusherServer:
    """Server state and request handling; one instance per process, built by main()."""

    def __init__(
        self,
        app_id: str,
        key: str,
        secret: str,
        print_events: bool = False,
        max_records: int = 200_000,
        extra_apps: Sequence[AppCredentials] = (),
    ) -> None:
        self.app_id, self.key, self.secret = app_id, key, secret
        self.apps = {app.app_id: app for app in (AppCredentials(app_id, key, secret),
                                                 *extra_apps)}
        if len(self.apps) != 1 + len(extra_apps):
            raise ValueError("every app needs an id of its own")
        self.print_events = print_events
        self.max_records = max_records
        self.routes = {f"/apps/{app}/{name}": (self.apps[app], parse)
                       for app in self.apps for name, parse in _PARSERS.items()}
        self._server: StreamServer | None = None
        self._faults: dict[str | None, _Faults] = {}  # None: server-wide
        self._release: dict[str | None, Event] = {}  # wakes an app's hung requests
        self._clear_records()
        self._set_modes(Modes())

    # -- lifecycle

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind and serve in the background; return the bound port."""
        self._server = StreamServer((host, port), self.handle_connection, backlog=1024)
        self._server.start()
        return self._server.server_port

    def stop(self) -> None:
        """Release hung requests, then stop accepting and close connections."""
        for release in self._release.values():
            release.set()
        if self._server is not None:
            self._server.stop(timeout=1)

    # -- state

    def _clear_records(self) -> None:
        # A request begun before a reset (a killed test worker's call, answered after a
        # delay) is answered but not recorded: the records start clean for the next test.
        self.epoch = getattr(self, "epoch", 0) + 1
        self.events: deque[dict[str, Any]] = deque(maxlen=self.max_records)
        self.requests: deque[dict[str, Any]] = deque(maxlen=self.max_records)
        self.requests_total = 0
        self.events_total = 0
        self.by_status: dict[str, int] = {}
        self.faults: dict[str, int] = {}
        self.by_app = {app: {"events_total": 0, "requests_total": 0, "by_status": {}}
                       for app in self.apps}

    @property
    def modes(self) -> Modes:
        """The server-wide modes (an app may have its own: ``app_modes``)."""
        return self._faults[None].modes

    @property
    def app_modes(self) -> dict[str, Modes]:
        return {app: faults.modes for app, faults in self._faults.items() if app is not None}

    def _set_modes(self, modes: Modes, app_id: str | None = None) -> None:
        """Install modes and wake requests hung under the ones they replace: server-wide
        modes replace every app's own; an app's replace that app's only."""
        if app_id is None:
            self._faults = {None: _Faults(modes, modes.fail_next)}
            woken = list(self._release)
        else:
            self._faults[app_id] = _Faults(modes, modes.fail_next)
            woken = [app_id] if app_id in self._release else []
        for app in woken:
            self._release.pop(app).set()

    def _take_modes(self, app_id: str | None) -> tuple[Modes, Event]:
        """Modes for a request to this app; count down fail_next and go healthy when it runs
        out. Running out does not wake hung requests: they wait for an explicit change.
        """
        faults = self._faults.get(app_id) or self._faults[None]
        release = self._release.setdefault(app_id, Event())
        modes = faults.modes
        if modes.active and modes.fail_next:
            faults.left -= 1
            if faults.left <= 0:
                faults.modes = Modes()
        return modes, release

    def count(self, app_id: str | None = None) -> dict[str, int]:
        """The totals only (of one app, or all): constant cost, unlike events() and stats()
        with many records."""
        if app_id is not None:
            mine = self.by_app[app_id]
            return {"events_total": mine["events_total"],
                    "requests_total": mine["requests_total"]}
        return {"events_total": self.events_total, "requests_total": self.requests_total}

    def stats(self, requests: bool = True) -> dict[str, Any]:
        """Counters and modes, plus the per-request list unless ``requests`` is False."""
        stats: dict[str, Any] = {
            "requests_total": self.requests_total,
            "by_status": dict(self.by_status),
            "faults": dict(self.faults),
            "events_total": self.events_total,
            "modes": asdict(self.modes),
            "app_modes": {app: asdict(modes) for app, modes in self.app_modes.items()},
            "apps": {app: dict(counts, by_status=dict(counts["by_status"]))
                     for app, counts in self.by_app.items()},
        }
        if requests:
            stats["requests"] = list(self.requests)
        return stats

    # -- connections

    def handle_connection(self, sock: socket.socket, _address: Any) -> None:
        """Serve keep-alive requests until the client or a fault ends the connection."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = Connection(sock)
        try:
            while self._serve_one(connection):
                pass
        except OSError:
            pass  # the client went away; nothing to answer

    def _serve_one(self, connection: Connection) -> bool:
        try:
            request = connection.read_request()
        except ApiError as error:
            send(connection.sock, Response.text(error.status, error.message), False)
            return False
        if request is None:
            return False
        if request.path.startswith("/_control/"):
            response: Response | None = self.control(request)
        else:
            response = self.api(request, connection.sock)
        if response is None:
            return False
        send(connection.sock, response, request.keep_alive)
        return request.keep_alive

    # -- API

    def api(self, request: Request, sock: socket.socket) -> Response | None:
        """Answer one API request under the current modes; None means no answer at all."""
        received_at = time.time()
        epoch = self.epoch
        app_id = self._app_of(request.path)
        modes, release = self._take_modes(app_id)
        entry: dict[str, Any] = {
            "at": received_at, "path": request.path, "status": None, "fault": None,
            "app_id": app_id,
        }
        self.requests.append(entry)
        self.requests_total += 1
        mine = self.by_app.get(app_id) if app_id is not None else None
        if mine is not None:
            mine["requests_total"] += 1
        delay = modes.random_delay()
        if delay:
            gevent.sleep(delay)
        if modes.reset or modes.hang:
            self._drop(entry, modes, release, sock)
            return None
        now = time.time() + modes.skew_s
        response = (self._fault_response(modes, request)
                    or self._pusher(request, modes, now, epoch))
        style = STYLES.get(modes.dialect)
        if style is not None:
            response = style(response)
        response.headers.append(("Date", formatdate(now, usegmt=True)))
        entry["status"] = response.status
        if epoch != self.epoch:
            return response
        key = str(response.status)
        self.by_status[key] = self.by_status.get(key, 0) + 1
        if mine is not None:
            mine["by_status"][key] = mine["by_status"].get(key, 0) + 1
        return response

    def _app_of(self, path: str) -> str | None:
        """The app a request's path names, when the server has it."""
        match = _APP_PATH.match(path)
        return match.group(1) if match and match.group(1) in self.apps else None

    def _drop(
        self, entry: dict[str, Any], modes: Modes, release: Event, sock: socket.socket
    ) -> None:
        fault = "reset" if modes.reset else "hang"
        entry["fault"] = fault
        self.faults[fault] = self.faults.get(fault, 0) + 1
        if modes.hang:
            release.wait()  # until the modes change or the server stops
        if modes.reset:
            reset(sock)
        else:
            sock.close()

    def _fault_response(self, modes: Modes, request: Request) -> Response | None:
        if modes.max_request_bytes and len(request.body) > modes.max_request_bytes:
            return Response.text(413, "Payload too large.")  # Reverb's words
        status = modes.status_for(channels_in(request.body) if modes.status_channels else [])
        if not status:
            return None
        response = Response.text(status, HTTPStatus(status).phrase)
        if modes.retry_after is not None:
            response.headers.append(("Retry-After", modes.retry_after))
        return response

    def _pusher(self, request: Request, modes: Modes, now: float, epoch: int) -> Response:
        route = self.routes.get(request.path)
        if route is None:
            return Response.text(404, "Not found")
        app, parse = route
        if request.method != "POST":
            response = Response.text(405, "Method not allowed")
            response.headers.append(("Allow", "POST"))
            return response
        try:
            authenticate(request, app.key, app.secret, now)
            try:
                body = json.loads(request.body)
            except ValueError:
                raise ApiError(400, "Request body is not valid JSON") from None
            records, reply = parse(body, modes.max_data_bytes or rules.MAX_DATA_BYTES)
        except ApiError as error:
            return Response.text(error.status, error.message)
        if modes.encryption_master_key_base64:
            _decrypt_records(records, master_key(modes.encryption_master_key_base64))
        if epoch == self.epoch:
            self._record(records, request.path, time.time(), app.app_id)
        return Response.json(200, reply)

    def _record(self, records: list[dict[str, Any]], path: str, now: float, app_id: str
                ) -> None:
        for record in records:
            record.update(received_at=now, path=path, seq=self.events_total, app_id=app_id)
            self.events_total += 1
            self.by_app[app_id]["events_total"] += 1
            self.events.append(record)
            if self.print_events:
                log.info(
                    "%sevent %s on %s (socket_id=%s): %s",
                    f"app {app_id}: " if len(self.apps) > 1 else "", record["name"],
                    record["channel"], record["socket_id"], record["data"][:500],
                )

    # -- control

    def control(self, request: Request) -> Response:
        """The unauthenticated test-control API: modes, records, stats."""
        handlers = {
            ("POST", "/_control/mode"): self._control_mode,
            ("GET", "/_control/events"):
                lambda r: Response.json(200, list(self._events_of(r))),
            ("GET", "/_control/stats"): self._control_stats,
            ("GET", "/_control/count"):
                lambda r: Response.json(200, self.count(self._asked_app(r))),
            ("GET", "/_control/order"):
                lambda r: Response.json(200, arrival_order(self._events_of(r))),
            ("POST", "/_control/reset"): self._control_reset,
        }
        handler = handlers.get((request.method, request.path))
        if handler is None:
            return Response.text(404, "Unknown control endpoint")
        try:
            return handler(request)
        except ApiError as error:
            return Response.text(error.status, error.message)

    def _asked_app(self, request: Request) -> str | None:
        """The ``?app_id=`` of a control request (None: every app)."""
        app_id = parse_query(request.query).get("app_id")
        if app_id is not None and app_id not in self.apps:
            raise ApiError(400, f"unknown app_id {app_id!r}")
        return app_id

    def _events_of(self, request: Request) -> Iterable[dict[str, Any]]:
        app_id = self._asked_app(request)
        if app_id is None:
            return self.events
        return (event for event in self.events if event["app_id"] == app_id)

    def _control_mode(self, request: Request) -> Response:
        try:
            body = json.loads(request.body or b"{}")
            app_id = body.pop("app_id", None) if isinstance(body, dict) else None
            if app_id is not None and app_id not in self.apps:
                raise ValueError(f"unknown app_id {app_id!r}")
            modes = Modes.from_dict(body)
        except (ValueError, TypeError) as error:
            return Response.text(400, str(error))
        self._set_modes(modes, app_id)
        log.info("modes set%s: %s", "" if app_id is None else f" for app {app_id}",
                 modes.shown())
        return Response.json(200, asdict(modes))

    def _control_stats(self, request: Request) -> Response:
        value = parse_query(request.query).get("requests", "1").lower()
        if value not in _FLAGS:
            return Response.text(400, f"requests must be one of {sorted(_FLAGS)}, not {value!r}")
        return Response.json(200, self.stats(requests=_FLAGS[value]))

    def _control_reset(self, _request: Request) -> Response:
        self._clear_records()
        self._set_modes(Modes())
        return Response.json(200, {})




def _decrypt_records(records: list[dict[str, Any]], key: bytes) -> None:
    """Add what a subscriber would read: ``plaintext``, or ``decrypt_error`` saying why not."""
    for record in records:
        if record["channel"].startswith(rules.ENCRYPTED_PREFIX):
            try:
                record["plaintext"] = decrypt(record["channel"], record["data"], key)
            except DecryptError as exc:
                record["decrypt_error"] = str(exc)


def arrival_order(events: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """Each channel's event data (plaintext when decrypted) in the order it was accepted."""
    order: dict[str, list[str]] = {}
    for event in events:
        order.setdefault(event["channel"], []).append(event.get("plaintext", event["data"]))
    return order
