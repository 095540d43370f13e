"""A local Pusher-compatible HTTP API server for tests, dev mode and benchmarks.

1. Serves ``POST /apps/{app_id}/events`` and ``POST /apps/{app_id}/batch_events``
   and answers like Pusher's HTTP API: ``200 {}`` on success (``{"batch": [...]}``
   / ``{"channels": {...}}`` only when ``info`` was asked for), 404 elsewhere.
2. Authenticates exactly as Pusher documents (auth_key, auth_timestamp within
   600 s, auth_version 1.0, body_md5, HMAC-SHA256 auth_signature), comparing in
   constant time, so a client with a signing bug fails here as it would there.
3. Enforces Pusher's limits with Pusher's codes: 10 events per batch, 100
   channels per event, 200-char event names, channel names (164 chars, charset,
   ``#server-to-user-`` prefix), socket_id format -> 400; data over 10,240 bytes
   of UTF-8 -> 413; invalid JSON -> 400. Error bodies are short plain text.
4. Records what it accepted (one record per channel per event) and counts every
   API request, with its time and status, including those hit by a fault.
5. Has run-time fault modes: ``delay`` (plus ``jitter``: a random extra delay, uniform in
   0..jitter seconds, per request), ``status``, ``retry_after``, ``reset``
   (RST via SO_LINGER 0), ``hang``, ``soketi_errors`` and ``fail_next``.
6. Exposes an unauthenticated control API on the same port under ``/_control/``:
   ``POST mode``, ``POST reset``, ``GET events``, ``GET stats`` (``?requests=0`` leaves
   out the per-request list) and ``GET count`` (just ``events_total`` and
   ``requests_total``: cheap to poll however many records are kept).
7. Runs as ``python -m relay.pusher_server --port 0 --app-id 1 --key K --secret S
   [--host H] [--print]``; it prints ``LISTENING <port>`` on stdout (the only
   stdout output, written directly rather than via logging so that a parent can
   rely on it whatever the logging setup); ``--print`` logs each event via logging
   (stderr).
8. ``LocalPusher`` runs that command in a child process for tests, the benchmark
   and the dev mode, and talks to the control API with stdlib ``urllib`` only. Its
   ``stderr`` argument sends the server's log elsewhere (default: the parent's stderr).

The HTTP layer is a minimal HTTP/1.1 keep-alive parser on ``gevent.server.StreamServer``
rather than ``gevent.pywsgi``: it is faster and gives direct access to the socket,
which the ``reset`` and ``hang`` fault modes need.

Soketi's error style (``soketi_errors``): soketi's http-handler.ts means to answer
errors with ``{"error": msg, "code": N}`` and status N, but its CORS middleware calls
uWebSockets' ``writeHeader`` first, which writes ``200 OK`` implicitly, and uWS then
ignores the later ``writeStatus``. On the wire, auth, validation, size and rate-limit
errors therefore arrive as HTTP 200 with that JSON body, and success is ``200
{"ok": true}``. Unknown routes still get a real 404.
"""

import argparse
import hashlib
import hmac
import json
import logging
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any, NoReturn
from urllib.parse import quote, unquote_plus

import gevent
from gevent.event import Event
from gevent.server import StreamServer
from gevent.socket import wait_read

from relay import rules

log = logging.getLogger(__name__)

TIMESTAMP_TOLERANCE = 600
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
INFO_ATTRIBUTES = ("subscription_count", "user_count")
REPO_ROOT = Path(__file__).resolve().parent.parent
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
WAIT_POLL_S = 0.01


class ApiError(Exception):
    """A request Pusher would refuse, with the status it would use."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    """One parsed HTTP request; the body is kept raw because body_md5 signs the bytes."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass
class Response:
    """What to write back; built by handlers, serialised by ``_send``."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def text(cls, status: int, message: str) -> "Response":
        return cls(status, message.encode() + b"\n")

    @classmethod
    def json(cls, status: int, payload: Any) -> "Response":
        return cls(status, json.dumps(payload).encode(), "application/json")


@dataclass(frozen=True)
class Modes:
    """Fault modes; replaced as a whole by the control API so a test states all it wants."""

    delay: float = 0.0
    jitter: float = 0.0
    status: int = 0
    retry_after: str | None = None
    reset: bool = False
    hang: bool = False
    soketi_errors: bool = False
    fail_next: int = 0

    @classmethod
    def from_dict(cls, data: Any) -> "Modes":
        """Validate a control-API body, so a typo in a test fails loudly."""
        if not isinstance(data, dict):
            raise ValueError("mode body must be a JSON object")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown modes: {sorted(unknown)}")
        retry_after = data.get("retry_after")
        modes = cls(
            delay=float(data.get("delay") or 0),
            jitter=float(data.get("jitter") or 0),
            status=int(data.get("status") or 0),
            retry_after=None if retry_after is None else str(retry_after),
            reset=bool(data.get("reset")),
            hang=bool(data.get("hang")),
            soketi_errors=bool(data.get("soketi_errors")),
            fail_next=int(data.get("fail_next") or 0),
        )
        if modes.delay < 0 or modes.jitter < 0 or modes.fail_next < 0:
            raise ValueError("delay, jitter and fail_next must not be negative")
        if modes.status and not 100 <= modes.status <= 599:
            raise ValueError("status must be an HTTP status code")
        return modes

    @property
    def active(self) -> bool:
        """True when a request would be treated differently from a healthy server."""
        return bool(self.delay or self.jitter or self.status or self.reset or self.hang
                    or self.soketi_errors)


# --------------------------------------------------------------------------- HTTP


class _Connection:
    """Reads successive (keep-alive) requests off one client socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def read_request(self) -> Request | None:
        """Return the next request, or None when the client closed the connection."""
        head = self._read_head()
        if head is None:
            return None
        method, target, version, headers = _parse_head(head)
        if "chunked" in headers.get("transfer-encoding", ""):
            raise ApiError(411, "Chunked request bodies are not supported; send Content-Length")
        body = self._read_body(_content_length(headers))
        path, _, query = target.partition("?")
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            keep_alive = connection != "close"
        else:
            keep_alive = connection == "keep-alive"
        return Request(method, path, query, headers, body, keep_alive)

    def _read_head(self) -> bytes | None:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
                return head
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise ApiError(431, "Request header too large")
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk

    def _read_body(self, length: int) -> bytes:
        while len(self.buffer) < length:
            chunk = self.sock.recv(max(65536, length - len(self.buffer)))
            if not chunk:
                raise ConnectionResetError("client closed the connection mid-body")
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return body


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise ApiError(400, "Malformed request line") from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, version, headers


def _content_length(headers: dict[str, str]) -> int:
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise ApiError(400, "Invalid Content-Length") from None
    if length < 0:
        raise ApiError(400, "Invalid Content-Length")
    if length > MAX_BODY_BYTES:
        raise ApiError(413, "Request body too large")
    return length


def _send(sock: socket.socket, response: Response, keep_alive: bool) -> None:
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [
        f"HTTP/1.1 {response.status} {phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
    ]
    if not keep_alive:
        lines.append("Connection: close")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body)


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0 so the peer gets a real RST, like a crashed proxy."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --------------------------------------------------------------------- validation


def _check_channel(channel: Any) -> str:
    problem = rules.channel_problem(channel)
    if problem is not None:
        raise ApiError(400, f"Invalid channel: {problem}")
    return channel


def _check_event(item: dict[str, Any]) -> dict[str, Any]:
    """Validate the fields shared by single and batch events; return a partial record."""
    name, data, socket_id = item.get("name"), item.get("data"), item.get("socket_id")
    problem = rules.event_problem(name)
    if problem is not None:
        raise ApiError(400, f"Invalid event name: {problem}")
    if not isinstance(data, str):
        raise ApiError(400, "Event data must be a string")
    problem = rules.socket_id_problem(socket_id)
    if problem is not None:
        raise ApiError(400, f"Invalid socket_id: {problem}")
    problem = rules.data_size_problem(len(data.encode("utf-8")))
    if problem is not None:
        raise ApiError(413, f"Event data too large: {problem}")
    return {"name": name, "data": data, "socket_id": socket_id}


def _channels_of(body: dict[str, Any]) -> list[str]:
    if "channels" in body:
        channels = body["channels"]
        if not isinstance(channels, list) or not channels:
            raise ApiError(400, "channels must be a non-empty list")
    elif "channel" in body:
        channels = [body["channel"]]
    else:
        raise ApiError(400, "Missing channels or channel")
    if len(channels) > rules.MAX_CHANNELS:
        raise ApiError(400, f"Too many channels: {len(channels)}, limit {rules.MAX_CHANNELS}")
    return [_check_channel(channel) for channel in channels]


def _info_attributes(info: Any) -> dict[str, int]:
    """There are no subscribers here, so every requested count is zero."""
    if not isinstance(info, str) or not info:
        return {}
    return {name: 0 for name in info.split(",") if name in INFO_ATTRIBUTES}


def parse_trigger(body: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Validate a POST /events body; return one record per channel and the reply."""
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    channels = _channels_of(body)
    event = _check_event(body)
    reply: dict[str, Any] = {}
    if body.get("info"):
        attributes = _info_attributes(body["info"])
        reply = {"channels": {channel: attributes for channel in channels}}
    return [dict(event, channel=channel) for channel in channels], reply


def parse_batch(body: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Validate a POST /batch_events body as a whole: Pusher accepts all or nothing."""
    if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
        raise ApiError(400, "Request body must be an object with a batch list")
    batch = body["batch"]
    if len(batch) > rules.MAX_BATCH_EVENTS:
        raise ApiError(400, f"Batch too large: {len(batch)} events, limit {rules.MAX_BATCH_EVENTS}")
    records = []
    for item in batch:
        if not isinstance(item, dict):
            raise ApiError(400, "Batch items must be objects")
        channel = _check_channel(item.get("channel"))
        records.append(dict(_check_event(item), channel=channel))
    if any(isinstance(item, dict) and item.get("info") for item in batch):
        return records, {"batch": [_info_attributes(item.get("info")) for item in batch]}
    return records, {}


def _soketi_style(response: Response) -> Response:
    """Re-shape an answer as soketi puts it on the wire (see the module docstring)."""
    if response.status == 404:
        return Response(404)
    if response.status < 400:
        return Response.json(200, {"ok": True})
    message = response.body.decode("utf-8", "replace").strip() or HTTPStatus(response.status).phrase
    return Response.json(200, {"error": message, "code": response.status})


def _parse_query(query: str) -> dict[str, str]:
    """Like dict(parse_qsl(query, keep_blank_values=True)), at a third of the cost."""
    params = {}
    for pair in query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            if "%" in pair or "+" in pair:
                name, value = unquote_plus(name), unquote_plus(value)
            params[name] = value
    return params


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


# ------------------------------------------------------------------------- server


class PusherServer:
    """Server state and request handling; one instance per process, built by main()."""

    def __init__(
        self,
        app_id: str,
        key: str,
        secret: str,
        print_events: bool = False,
        max_records: int = 200_000,
    ) -> None:
        self.app_id, self.key, self.secret = app_id, key, secret
        self.print_events = print_events
        self.max_records = max_records
        self.routes = {
            f"/apps/{app_id}/events": parse_trigger,
            f"/apps/{app_id}/batch_events": parse_batch,
        }
        self._server: StreamServer | None = None
        self._release = Event()
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
        self._release.set()
        if self._server is not None:
            self._server.stop(timeout=1)

    # -- state

    def _clear_records(self) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=self.max_records)
        self.requests: deque[dict[str, Any]] = deque(maxlen=self.max_records)
        self.requests_total = 0
        self.events_total = 0
        self.by_status: dict[str, int] = {}
        self.faults: dict[str, int] = {}

    def _set_modes(self, modes: Modes) -> None:
        """Install modes and wake requests hung under the previous ones."""
        self.modes = modes
        self._fail_left = modes.fail_next
        self._release.set()
        self._release = Event()

    def _take_modes(self) -> tuple[Modes, Event]:
        """Modes for this request; count down fail_next and go healthy when it runs out.

        Running out does not wake hung requests: they wait for an explicit change.
        """
        modes, release = self.modes, self._release
        if modes.active and modes.fail_next:
            self._fail_left -= 1
            if self._fail_left <= 0:
                self.modes = Modes()
        return modes, release

    def count(self) -> dict[str, int]:
        """The totals only: constant cost, unlike events() and stats() with many records."""
        return {"events_total": self.events_total, "requests_total": self.requests_total}

    def stats(self, requests: bool = True) -> dict[str, Any]:
        """Counters and modes, plus the per-request list unless ``requests`` is False."""
        stats: dict[str, Any] = {
            "requests_total": self.requests_total,
            "by_status": dict(self.by_status),
            "faults": dict(self.faults),
            "events_total": self.events_total,
            "modes": asdict(self.modes),
        }
        if requests:
            stats["requests"] = list(self.requests)
        return stats

    # -- connections

    def handle_connection(self, sock: socket.socket, _address: Any) -> None:
        """Serve keep-alive requests until the client or a fault ends the connection."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(sock)
        try:
            while self._serve_one(connection):
                pass
        except OSError:
            pass  # the client went away; nothing to answer

    def _serve_one(self, connection: _Connection) -> bool:
        try:
            request = connection.read_request()
        except ApiError as error:
            _send(connection.sock, Response.text(error.status, error.message), False)
            return False
        if request is None:
            return False
        if request.path.startswith("/_control/"):
            response: Response | None = self.control(request)
        else:
            response = self.api(request, connection.sock)
        if response is None:
            return False
        _send(connection.sock, response, request.keep_alive)
        return request.keep_alive

    # -- API

    def api(self, request: Request, sock: socket.socket) -> Response | None:
        """Answer one API request under the current modes; None means no answer at all."""
        received_at = time.time()
        modes, release = self._take_modes()
        entry: dict[str, Any] = {
            "at": received_at, "path": request.path, "status": None, "fault": None,
        }
        self.requests.append(entry)
        self.requests_total += 1
        if modes.delay or modes.jitter:
            gevent.sleep(modes.delay + random.uniform(0.0, modes.jitter))
        if modes.reset or modes.hang:
            self._drop(entry, modes, release, sock)
            return None
        response = self._fault_response(modes) or self._pusher(request, received_at)
        if modes.soketi_errors:
            response = _soketi_style(response)
        entry["status"] = response.status
        key = str(response.status)
        self.by_status[key] = self.by_status.get(key, 0) + 1
        return response

    def _drop(
        self, entry: dict[str, Any], modes: Modes, release: Event, sock: socket.socket
    ) -> None:
        fault = "reset" if modes.reset else "hang"
        entry["fault"] = fault
        self.faults[fault] = self.faults.get(fault, 0) + 1
        if modes.hang:
            release.wait()  # until the modes change or the server stops
        if modes.reset:
            _reset(sock)
        else:
            sock.close()

    def _fault_response(self, modes: Modes) -> Response | None:
        if not modes.status:
            return None
        response = Response.text(modes.status, HTTPStatus(modes.status).phrase)
        if modes.retry_after is not None:
            response.headers.append(("Retry-After", modes.retry_after))
        return response

    def _pusher(self, request: Request, now: float) -> Response:
        parse = self.routes.get(request.path)
        if parse is None:
            return Response.text(404, "Not found")
        if request.method != "POST":
            response = Response.text(405, "Method not allowed")
            response.headers.append(("Allow", "POST"))
            return response
        try:
            self._authenticate(request, now)
            try:
                body = json.loads(request.body)
            except ValueError:
                raise ApiError(400, "Request body is not valid JSON") from None
            records, reply = parse(body)
        except ApiError as error:
            return Response.text(error.status, error.message)
        self._record(records, request.path, now)
        return Response.json(200, reply)

    def _authenticate(self, request: Request, now: float) -> None:
        """Check the query-string signature the way Pusher documents it."""
        params = _parse_query(request.query)
        signature = params.pop("auth_signature", "")
        for name in ("auth_key", "auth_timestamp", "auth_version"):
            if name not in params:
                raise ApiError(401, f"Missing {name}")
        if not _equal(params["auth_key"], self.key):
            raise ApiError(401, "Unknown auth_key")
        if params["auth_version"] != "1.0":
            raise ApiError(401, "Unsupported auth_version, expected 1.0")
        self._check_timestamp(params["auth_timestamp"], now)
        if request.body or "body_md5" in params:
            expected_md5 = hashlib.md5(request.body).hexdigest()
            if not _equal(params.get("body_md5", ""), expected_md5):
                raise ApiError(401, "Invalid body_md5")
        query = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
        to_sign = f"{request.method}\n{request.path}\n{query}"
        expected = hmac.new(self.secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
        if not _equal(signature, expected):
            raise ApiError(401, f"Invalid signature: expected HMAC-SHA256 hex of {to_sign!r}")

    @staticmethod
    def _check_timestamp(value: str, now: float) -> None:
        try:
            timestamp = int(value)
        except ValueError:
            raise ApiError(401, "auth_timestamp must be an integer") from None
        if abs(now - timestamp) > TIMESTAMP_TOLERANCE:
            raise ApiError(
                401,
                f"Timestamp expired: {timestamp} is not within "
                f"{TIMESTAMP_TOLERANCE}s of server time {int(now)}",
            )

    def _record(self, records: list[dict[str, Any]], path: str, now: float) -> None:
        for record in records:
            record.update(received_at=now, path=path)
            self.events.append(record)
            if self.print_events:
                log.info(
                    "event %s on %s (socket_id=%s): %s",
                    record["name"], record["channel"], record["socket_id"], record["data"][:500],
                )
        self.events_total += len(records)

    # -- control

    def control(self, request: Request) -> Response:
        """The unauthenticated test-control API: modes, records, stats."""
        handlers = {
            ("POST", "/_control/mode"): self._control_mode,
            ("GET", "/_control/events"): lambda _r: Response.json(200, list(self.events)),
            ("GET", "/_control/stats"): self._control_stats,
            ("GET", "/_control/count"): lambda _r: Response.json(200, self.count()),
            ("POST", "/_control/reset"): self._control_reset,
        }
        handler = handlers.get((request.method, request.path))
        if handler is None:
            return Response.text(404, "Unknown control endpoint")
        return handler(request)

    def _control_mode(self, request: Request) -> Response:
        try:
            modes = Modes.from_dict(json.loads(request.body or b"{}"))
        except (ValueError, TypeError) as error:
            return Response.text(400, str(error))
        self._set_modes(modes)
        log.info("modes set: %s", {k: v for k, v in asdict(modes).items() if v})
        return Response.json(200, asdict(modes))

    def _control_stats(self, request: Request) -> Response:
        value = _parse_query(request.query).get("requests", "1").lower()
        if value not in _FLAGS:
            return Response.text(400, f"requests must be one of {sorted(_FLAGS)}, not {value!r}")
        return Response.json(200, self.stats(requests=_FLAGS[value]))

    def _control_reset(self, _request: Request) -> Response:
        self._clear_records()
        self._set_modes(Modes())
        return Response.json(200, {})


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--print", dest="print_events", action="store_true",
                        help="log every received event (dev mode)")
    parser.add_argument("--max-records", type=int, default=200_000,
                        help="events and request entries kept in memory (oldest dropped)")
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="stop when stdin closes (LocalPusher uses it: no orphans)")
    return parser.parse_args(argv)


def _stop_on_eof(fd: int, done: Event) -> None:
    """Stop when the parent's end of our stdin closes, so a killed test run leaves no orphan."""
    while True:
        wait_read(fd)
        if not os.read(fd, 4096):
            done.set()
            return


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; announce the port on stdout."""
    from gevent import monkey

    monkey.patch_all()
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s pusher_server: %(message)s",
    )
    server = PusherServer(
        args.app_id, args.key, args.secret, args.print_events, args.max_records
    )
    port = server.start(args.host, args.port)
    sys.stdout.write(f"LISTENING {port}\n")
    sys.stdout.flush()
    log.info("local Pusher API for app %s on http://%s:%d", args.app_id, args.host, port)
    done = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, done.set)
    if args.exit_on_stdin_eof:
        gevent.spawn(_stop_on_eof, sys.stdin.fileno(), done)
    done.wait()
    server.stop()
    return 0


# ------------------------------------------------------------------------ helper


StderrTarget = int | IO[Any] | str | os.PathLike[str] | None


class LocalPusher:
    """Runs the server as a child process so parents need no gevent and get real sockets.

    Usable as a context manager. Control calls use urllib, which works in plain and
    gevent-patched parents alike.

    ``stderr`` is where the server's log goes: None (the default) inherits the parent's
    stderr; a path is opened for writing (truncated) at each start and closed at stop; an
    open file object, a file descriptor or ``subprocess.DEVNULL`` is passed as is (and left
    open). ``subprocess.PIPE`` and ``subprocess.STDOUT`` are refused: nobody would read
    the pipe, and stdout carries the ``LISTENING`` line.
    """

    def __init__(
        self,
        app_id: str = "1",
        key: str = "test-key",
        secret: str = "test-secret",
        print_events: bool = False,
        python: str = sys.executable,
        host: str = "127.0.0.1",
        startup_timeout: float = 15.0,
        stderr: StderrTarget = None,
    ) -> None:
        if stderr in (subprocess.PIPE, subprocess.STDOUT):
            raise ValueError("stderr=PIPE or STDOUT would block or corrupt the server's output; "
                             "pass a path, a file, DEVNULL or None")
        self.app_id, self.key, self.secret = app_id, key, secret
        self.print_events = print_events
        self.python = python
        self.host = host
        self.port = 0
        self.startup_timeout = startup_timeout
        self.stderr = stderr
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr_file: IO[bytes] | None = None

    def __enter__(self) -> "LocalPusher":
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """PUSHER_URL-style URL for relay's config (pusher 3.3.4's from_url mangles ports)."""
        key, secret = quote(self.key, safe=""), quote(self.secret, safe="")
        return f"http://{key}:{secret}@{self.host}:{self.port}/apps/{self.app_id}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The server process's id (for /proc readings); RuntimeError when not started."""
        if self._process is None:
            raise RuntimeError("LocalPusher is not running: call start() first")
        return self._process.pid

    def start(self) -> None:
        """Spawn the server and wait for its ``LISTENING <port>`` line."""
        command = [
            self.python, "-m", "relay.pusher_server", "--host", self.host, "--port", "0",
            "--app-id", self.app_id, "--key", self.key, "--secret", self.secret,
            "--exit-on-stdin-eof",
        ]
        if self.print_events:
            command.append("--print")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        stderr: Any = self.stderr
        if isinstance(stderr, str | os.PathLike):
            stderr = self._stderr_file = open(stderr, "wb")  # closed in stop()
        try:
            self._process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=stderr,
            )
        except BaseException:
            self._close_stderr_file()
            raise
        try:
            self.port = self._read_port()
        except BaseException:
            self.stop()
            raise

    def _read_port(self) -> int:
        assert self._process is not None and self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], self.startup_timeout)
        if not ready:
            raise TimeoutError(f"pusher_server gave no LISTENING line in {self.startup_timeout}s")
        line = self._process.stdout.readline().decode("utf-8", "replace")
        if not line.startswith("LISTENING "):
            raise RuntimeError(
                f"pusher_server failed to start (exit code {self._process.poll()}, "
                f"first stdout line {line!r}; see its stderr)"
            )
        return int(line.split()[1])

    def _close_stderr_file(self) -> None:
        stderr_file, self._stderr_file = self._stderr_file, None
        if stderr_file is not None:
            stderr_file.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the child, kill it if it does not exit in time. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            self._close_stderr_file()
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
        self._close_stderr_file()

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        import urllib.error
        import urllib.request

        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise ValueError(f"{method} {path}: {error.code} {error.read().decode()}") from None

    def set_mode(self, **modes: Any) -> dict[str, Any]:
        """Replace all fault modes (see ``Modes``); unknown names raise ValueError."""
        return self._call("POST", "/_control/mode", modes)

    def clear_mode(self) -> None:
        self._call("POST", "/_control/mode", {})

    def events(self) -> list[dict[str, Any]]:
        return self._call("GET", "/_control/events")

    def count(self) -> dict[str, int]:
        """``{"events_total": N, "requests_total": M}``: cheap, whatever the record count."""
        return self._call("GET", "/_control/count")

    def stats(self, requests: bool = True) -> dict[str, Any]:
        """Counters and modes; ``requests=False`` leaves out the per-request list."""
        return self._call("GET", "/_control/stats" + ("" if requests else "?requests=0"))

    def reset(self) -> None:
        """Forget events, counters and modes (between tests)."""
        self._call("POST", "/_control/reset", {})

    def wait_for_events(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Poll until at least n events were recorded, then return them all.

        Polls the cheap count endpoint and fetches the event list once, when enough have
        arrived (or at the deadline, for the TimeoutError that says what did arrive).
        """
        deadline = time.monotonic() + timeout
        while self.count()["events_total"] < n:
            if time.monotonic() >= deadline:
                self._timed_out(n, timeout)
            time.sleep(WAIT_POLL_S)
        return self.events()

    def _timed_out(self, n: int, timeout: float) -> NoReturn:
        events = self.events()
        stats = self.stats(requests=False)
        seen = [(e["channel"], e["name"]) for e in events[-5:]]
        raise TimeoutError(
            f"expected {n} events within {timeout}s, got {len(events)} "
            f"(last: {seen}); requests_total={stats['requests_total']} "
            f"by_status={stats['by_status']} faults={stats['faults']} "
            f"modes={ {k: v for k, v in stats['modes'].items() if v} }"
        )


if __name__ == "__main__":
    sys.exit(main())
