"""Fault modes and servers' dialects: how an answer is changed from what Pusher would say.

Soketi's error style (``soketi_errors``): soketi's http-handler.ts means to answer
errors with ``{"error": msg, "code": N}`` and status N, but its CORS middleware calls
uWebSockets' ``writeHeader`` first, which writes ``200 OK`` implicitly, and uWS then
ignores the later ``writeStatus``. On the wire, auth, validation, size and rate-limit
errors therefore arrive as HTTP 200 with that JSON body, and success is ``200
{"ok": true}``. Unknown routes still get a real 404.
"""

from dataclasses import dataclass, fields
from http import HTTPStatus
from typing import Any

from relay.pusher_server.wire import Response


@dataclass(frozen=True)
class Modes:
    """Fault modes; replaced as a whole by the control API so a test states all it wants."""

    delay: float = 0.0
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
            status=int(data.get("status") or 0),
            retry_after=None if retry_after is None else str(retry_after),
            reset=bool(data.get("reset")),
            hang=bool(data.get("hang")),
            soketi_errors=bool(data.get("soketi_errors")),
            fail_next=int(data.get("fail_next") or 0),
        )
        if modes.delay < 0 or modes.fail_next < 0:
            raise ValueError("delay and fail_next must not be negative")
        if modes.status and not 100 <= modes.status <= 599:
            raise ValueError("status must be an HTTP status code")
        return modes

    @property
    def active(self) -> bool:
        """True when a request would be treated differently from a healthy server."""
        return bool(self.delay or self.status or self.reset or self.hang or self.soketi_errors)


def soketi_style(response: Response) -> Response:
    """Re-shape an answer as soketi puts it on the wire (see the module docstring)."""
    if response.status == 404:
        return Response(404)
    if response.status < 400:
        return Response.json(200, {"ok": True})
    message = response.body.decode("utf-8", "replace").strip() or HTTPStatus(response.status).phrase
    return Response.json(200, {"error": message, "code": response.status})

