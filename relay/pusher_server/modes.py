"""Fault modes and servers' dialects: how an answer differs from what Pusher would say.

1. ``Modes`` is the whole set, replaced at once by the control API, so a test states all it
   wants and a typo fails loudly.
2. ``DIALECTS`` re-shape an answer the way another Pusher-compatible server puts it on the
   wire (read in each server's source; versions in the README's "Self-hosted servers"):
   - ``pusher``: plain-text error bodies with the real status (the default);
   - ``soketi`` (1.6): soketi's http-handler.ts means to answer errors with
     ``{"error": msg, "code": N}`` and status N, but its CORS middleware calls uWebSockets'
     ``writeHeader`` first, which writes ``200 OK`` implicitly, and uWS then ignores the
     later ``writeStatus``. On the wire, errors arrive as HTTP 200 with that JSON body, and
     success is ``200 {"ok": true}``. Unknown routes still get a real 404;
   - ``reverb`` (Laravel Reverb 1.x): a validation failure is 422 with the validator's
     JSON, and a request over ``max_request_size`` (10,000 bytes) is closed with 413;
   - ``sockudo``: ``{"error": msg, "code": "<name>", "status": N}`` with the real status,
     the code a string (``rate_limited``, ``backpressure``, ``payload_too_large``...).
3. ``skew_s`` runs the server's clock that far from the real one: its Date header and its
   600 s timestamp check both use it, as a server with a wrong clock would.
"""

import random
from dataclasses import asdict, dataclass, fields
from http import HTTPStatus
from typing import Any

from relay.pusher_server.e2e import master_key
from relay.pusher_server.protocol import Response

DIALECTS = ("pusher", "soketi", "reverb", "sockudo")
REVERB_MAX_REQUEST_BYTES = 10_000  # config/reverb.php: max_request_size
SOCKUDO_CODES = {400: "invalid_input", 401: "auth_failed", 403: "forbidden", 404: "not_found",
                 413: "payload_too_large", 429: "rate_limited", 503: "backpressure"}


@dataclass(frozen=True)
class Modes:
    """Fault modes and dialect; replaced as a whole by the control API."""

    delay: float = 0.0
    delay_range: tuple[float, float] | None = None  # a random delay in [lo, hi] seconds
    status: int = 0
    status_channels: tuple[str, ...] = ()  # when set, ``status`` hits only these channels
    retry_after: str | None = None
    reset: bool = False
    hang: bool = False
    dialect: str = "pusher"
    skew_s: float = 0.0
    max_data_bytes: int = 0  # 0: Pusher's 10,240
    max_request_bytes: int = 0  # 0: no limit below the server's 1 MB (reverb: 10,000)
    encryption_master_key_base64: str | None = None  # decrypt private-encrypted-* events
    fail_next: int = 0

    @classmethod
    def from_dict(cls, data: Any) -> "Modes":
        """Validate a control-API body, so a typo in a test fails loudly."""
        if not isinstance(data, dict):
            raise ValueError("mode body must be a JSON object")
        data = dict(data)
        if data.pop("soketi_errors", False):  # the older name of dialect="soketi"
            data["dialect"] = "soketi"
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown modes: {sorted(unknown)}")
        retry_after = data.get("retry_after")
        dialect = data.get("dialect") or "pusher"
        delay_range = data.get("delay_range")
        modes = cls(
            delay=float(data.get("delay") or 0),
            delay_range=None if delay_range is None else _pair(delay_range),
            status=int(data.get("status") or 0),
            status_channels=tuple(str(c) for c in data.get("status_channels") or ()),
            retry_after=None if retry_after is None else str(retry_after),
            reset=bool(data.get("reset")),
            hang=bool(data.get("hang")),
            dialect=str(dialect),
            skew_s=float(data.get("skew_s") or 0),
            max_data_bytes=int(data.get("max_data_bytes") or 0),
            max_request_bytes=int(data.get("max_request_bytes")
                                  or (REVERB_MAX_REQUEST_BYTES if dialect == "reverb" else 0)),
            encryption_master_key_base64=data.get("encryption_master_key_base64"),
            fail_next=int(data.get("fail_next") or 0),
        )
        modes.check()
        return modes

    def check(self) -> None:
        if min(self.delay, self.fail_next, self.max_data_bytes, self.max_request_bytes) < 0:
            raise ValueError("delay, fail_next and the limits must not be negative")
        if self.status and not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {DIALECTS}")
        if self.encryption_master_key_base64 is not None:
            master_key(self.encryption_master_key_base64)

    def shown(self) -> dict[str, Any]:
        """The modes that differ from a healthy server, for a log line: the key masked."""
        shown = {k: v for k, v in asdict(self).items() if v and k != "dialect"}
        if self.dialect != "pusher":
            shown["dialect"] = self.dialect
        if self.encryption_master_key_base64:
            shown["encryption_master_key_base64"] = "***"
        return shown

    @property
    def active(self) -> bool:
        """True when a request would be treated differently from a healthy server."""
        return bool(self.delay or self.delay_range or self.status or self.reset or self.hang
                    or self.dialect != "pusher" or self.skew_s)

    def status_for(self, channels: list[str]) -> int:
        """The fault status this request gets (0: none); None channels means unreadable."""
        if not self.status:
            return 0
        if not self.status_channels:
            return self.status
        return self.status if set(channels) & set(self.status_channels) else 0

    def random_delay(self) -> float:
        if self.delay_range is None:
            return self.delay
        return self.delay + random.uniform(*self.delay_range)


def _pair(value: Any) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not 0 <= low <= high:
        raise ValueError("delay_range must be [low, high] with 0 <= low <= high")
    return low, high


def soketi_style(response: Response) -> Response:
    """Re-shape an answer as soketi puts it on the wire (see the module docstring)."""
    if response.status == 404:
        return Response(404)
    if response.status < 400:
        return Response.json(200, {"ok": True})
    return Response.json(200, {"error": _message(response), "code": response.status})


def reverb_style(response: Response) -> Response:
    """Reverb answers a validation failure (Pusher's 400) with 422 and the validator's JSON."""
    if response.status == 400:
        return Response.json(422, {"message": _message(response)})
    return response


def sockudo_style(response: Response) -> Response:
    """sockudo's AppError body: a string code beside the real status."""
    if response.status < 400:
        return response
    code = SOCKUDO_CODES.get(response.status, "internal_error")
    styled = Response.json(response.status, {"error": _message(response), "code": code,
                                             "status": response.status})
    styled.headers.extend(response.headers)
    return styled


def _message(response: Response) -> str:
    text = response.body.decode("utf-8", "replace").strip()
    return text or HTTPStatus(response.status).phrase


STYLES = {"soketi": soketi_style, "reverb": reverb_style, "sockudo": sockudo_style}
