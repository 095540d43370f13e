"""Who may see the page and who may act on it.

1. Loopback by default; a non-loopback address needs RELAY_DASHBOARD_AUTH (the CLI refuses
   to start otherwise), which turns on HTTP basic auth, compared in constant time.
2. Every action is a POST carrying a CSRF token: an HMAC of the user under a secret that
   lives only in this process, put on the page it served. A cross-site page can neither read
   the token (same-origin policy) nor send a same-origin Origin, so its POST is refused.
3. Every answer carries a Content-Security-Policy allowing only this origin's own files: a
   payload that slipped past escaping still could not run a script.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import secrets
from collections.abc import Mapping
from typing import Any

SECURITY_HEADERS = [
    ("Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-store"),
]


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    """Basic auth (optional), CSRF tokens and the same-origin check for one server."""

    def __init__(self, auth: str | None, secret: bytes | None = None) -> None:
        self._auth = auth.encode() if auth else None
        self._secret = secret or secrets.token_bytes(32)

    @property
    def auth_required(self) -> bool:
        return self._auth is not None

    def user(self, environ: Mapping[str, Any]) -> str | None:
        """The authenticated user ("" when auth is off), or None: answer 401."""
        if self._auth is None:
            return ""
        header = str(environ.get("HTTP_AUTHORIZATION", ""))
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            return None
        if not hmac.compare_digest(given, self._auth):
            return None
        return given.split(b":", 1)[0].decode("utf-8", errors="replace")

    def csrf_token(self, user: str) -> str:
        return hmac.new(self._secret, b"csrf:" + user.encode(), "sha256").hexdigest()

    def post_refusal(self, environ: Mapping[str, Any], user: str) -> str | None:
        """Why this POST must not act, or None when it is the page's own."""
        site = environ.get("HTTP_SEC_FETCH_SITE")
        if site is not None and site not in ("same-origin", "none"):
            return "cross-site request"
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None:
            scheme = environ.get("wsgi.url_scheme", "http")
            if origin != f"{scheme}://{environ.get('HTTP_HOST', '')}":
                return "cross-origin request"
        token = str(environ.get("HTTP_X_CSRF_TOKEN", ""))
        if not hmac.compare_digest(token.encode(), self.csrf_token(user).encode()):
            return "missing or wrong CSRF token (reload the page)"
        return None
