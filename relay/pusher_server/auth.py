"""Pusher's request authentication: auth_key, auth_timestamp, body_md5, HMAC signature.

Checked exactly as Pusher documents it, comparing in constant time, so a client with a
signing bug fails here as it would there. Each app has its own credentials
(``AppCredentials``): a request is checked against the app its path names.
"""

import hashlib
import hmac
import time
from dataclasses import dataclass, field

from relay.pusher_server.protocol import ApiError, Request, equal, parse_query

TIMESTAMP_TOLERANCE_S = 600


@dataclass(frozen=True)
class AppCredentials:
    """One Pusher app the server serves: its id, key and secret."""

    app_id: str
    key: str
    secret: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> "AppCredentials":
        """``ID:KEY:SECRET`` (the command line's ``--app``); the secret may hold colons."""
        app_id, key, secret = (text.split(":", 2) + ["", ""])[:3]
        if not app_id or not key or not secret:
            raise ValueError("an app is ID:KEY:SECRET")
        return cls(app_id, key, secret)

    def as_arg(self) -> str:
        """The ``--app`` argument that parse() reads back (it holds the secret)."""
        return f"{self.app_id}:{self.key}:{self.secret}"


def authenticate(request: Request, key: str, secret: str, now: float) -> None:
    """Check the query-string signature the way Pusher documents it; ApiError(401) if not."""
    params = parse_query(request.query)
    signature = params.pop("auth_signature", "")
    for name in ("auth_key", "auth_timestamp", "auth_version"):
        if name not in params:
            raise ApiError(401, f"Missing {name}")
    if not equal(params["auth_key"], key):
        raise ApiError(401, "Unknown auth_key")
    if params["auth_version"] != "1.0":
        raise ApiError(401, "Unsupported auth_version, expected 1.0")
    check_timestamp(params["auth_timestamp"], now)
    if request.body or "body_md5" in params:
        expected_md5 = hashlib.md5(request.body).hexdigest()
        if not equal(params.get("body_md5", ""), expected_md5):
            raise ApiError(401, "Invalid body_md5")
    query = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
    to_sign = f"{request.method}\n{request.path}\n{query}"
    expected = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    if not equal(signature, expected):
        raise ApiError(401, f"Invalid signature: expected HMAC-SHA256 hex of {to_sign!r}")


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def check_timestamp(value: str, now: float) -> None:
    """Pusher refuses a timestamp more than 600 s from its clock, with this very text."""
    try:
        timestamp = int(value)
    except ValueError:
        raise ApiError(401, "auth_timestamp must be an integer") from None
    if abs(now - timestamp) > TIMESTAMP_TOLERANCE_S:
        raise ApiError(
            401,
            f"Timestamp expired: Given timestamp ({_iso(timestamp)}) not within "
            f"{TIMESTAMP_TOLERANCE_S}s of server time ({_iso(now)})",
        )
