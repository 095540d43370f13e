"""HTTP/1.1 on a raw socket: parse keep-alive requests, write responses, reset connections.

1. A minimal keep-alive parser on the socket ``gevent.server.StreamServer`` hands over,
   rather than ``gevent.pywsgi``: it is faster and gives direct access to the socket,
   which the ``reset`` and ``hang`` fault modes need.
2. ``ApiError`` carries the status a refused request gets; the server turns it into a
   response. Named ``wire`` rather than ``http`` so it can never shadow the stdlib package.
"""

import hmac
import json
import socket
import struct
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_plus

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024


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




class Connection:
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


def send(sock: socket.socket, response: Response, keep_alive: bool) -> None:
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


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0 so the peer gets a real RST, like a crashed proxy."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()



def parse_query(query: str) -> dict[str, str]:
    """Like dict(parse_qsl(query, keep_blank_values=True)), at a third of the cost."""
    params = {}
    for pair in query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            if "%" in pair or "+" in pair:
                name, value = unquote_plus(name), unquote_plus(value)
            params[name] = value
    return params


def equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))

