"""One line that says what failed and where, for errors an operator must act on.

1. `network_error(exc, where)`: a failed HTTP call reduced to its cause (connection refused,
   timed out, TLS handshake failed, DNS lookup failed, connection reset), with the host:port
   relay was calling. urllib3 and requests bury the cause under wrappers whose own text is
   an object repr; this walks the chain down to the socket-level error.
2. `redis_error(exc, where)`: a Redis failure with the (masked) address and redis-py's reason.
3. `probe` and `tls_hint`: the common PUSHER_SSL mistake (TLS spoken to a plain-HTTP port,
   or the reverse), found by asking the server once, and said in one line.

Only names and texts of exceptions are read; anything that looks like `user:password@` in
them is masked, so a secret never reaches a log line through an error message.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator

_USERINFO = re.compile(r"//[^/@\s]+@")
_REPR = re.compile(r"<[^<>]* object at 0x[0-9a-f]+>:?\s*")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """exc, then what it wraps: __cause__/__context__, urllib3's .reason, requests' args."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for inner in (getattr(current, "reason", None), current.__cause__, current.__context__,
                      *current.args):
            if isinstance(inner, BaseException):
                todo.append(inner)


def _clean(text: str) -> str:
    return _USERINFO.sub("//***@", _REPR.sub("", text)).strip()[:200]


def _is(exc: BaseException, names: tuple[str, ...]) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def probe(host: str, port: int, timeout_s: float = 1.0) -> str | None:
    """What really listens at host:port: 'tls', 'plain-http', or None (nothing, or unknown).

    Run once when calls fail, to tell a PUSHER_SSL mistake from an outage: a TLS client
    against a plain-HTTP server sees a handshake error or a timeout, and the reverse a reset.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"HEAD / HTTP/1.0\r\nHost: " + host.encode("idna") + b"\r\n\r\n")
            if sock.recv(5) == b"HTTP/":
                return "plain-http"
    except (OSError, UnicodeError):
        pass
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock, \
                context.wrap_socket(sock, server_hostname=host):
            return "tls"
    except (OSError, ValueError):
        return None


def tls_hint(ssl_on: bool, found: str | None, where: str) -> str | None:
    """The one line that names PUSHER_SSL when the scheme does not match the server."""
    if ssl_on and found == "plain-http":
        return (f"{where} answers plain HTTP, but relay speaks TLS to it: set PUSHER_SSL=false "
                "(or use http:// in PUSHER_URL)")
    if not ssl_on and found == "tls":
        return (f"{where} expects TLS, but relay speaks plain HTTP to it: set PUSHER_SSL=true "
                "(or use https:// in PUSHER_URL)")
    return None


_SOCKET_CAUSES: tuple[tuple[type[BaseException] | str, str], ...] = (
    (ssl.SSLCertVerificationError, "TLS certificate not trusted"),
    (ssl.SSLError, "TLS handshake failed"),
    (socket.gaierror, "DNS lookup failed (no such host?)"),
    ("NameResolutionError", "DNS lookup failed (no such host?)"),
    (ConnectionRefusedError, "connection refused (nothing listening there?)"),
    (ConnectionResetError, "connection reset or closed by the server"),
    ("RemoteDisconnected", "connection reset or closed by the server"),
)
_TIMEOUTS = (("ReadTimeoutError", "timed out waiting for the answer"),
             ("ReadTimeout", "timed out waiting for the answer"),
             ("ConnectTimeoutError", "timed out connecting"),
             ("TimeoutError", "timed out waiting for the answer"))


def _matches(exc: BaseException, what: type[BaseException] | str) -> bool:
    if isinstance(what, str):
        return any(cls.__name__ == what for cls in type(exc).__mro__)
    return isinstance(exc, what)


def _detail(exc: BaseException, words: str) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{words} ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"{words} ({_clean(exc.reason or str(exc))})"
    return words


def _cause(exc: BaseException) -> str:
    """The socket-level reason, in words an operator searches for. Socket errors win over
    timeouts: urllib3's NewConnectionError is a ConnectTimeoutError even when refused."""
    chain = list(_chain(exc))
    for table in (_SOCKET_CAUSES, _TIMEOUTS):
        for what, words in table:
            for inner in chain:
                if _matches(inner, what):
                    return _detail(inner, words)
    if any("refused" in str(inner).lower() for inner in chain):
        return "connection refused (nothing listening there?)"
    return f"{type(exc).__name__}: {_clean(str(exc))}"


# Causes that rule out a PUSHER_SSL mistake: nothing listens, no such host, or the server
# did speak TLS (it presented a certificate). Probing then would only cost a connection.
_NOT_A_SCHEME_MISMATCH = ("connection refused", "DNS lookup failed", "TLS certificate")


def may_be_scheme_mismatch(exc: BaseException) -> bool:
    """Whether this failed call may be TLS spoken to a plain-HTTP port (or the reverse):
    then, and only then, `probe` is worth its connection."""
    return not _cause(exc).startswith(_NOT_A_SCHEME_MISMATCH)


def network_error(exc: BaseException, where: str) -> str:
    """e.g. 'calling 127.0.0.1:6001: connection refused (nothing listening there?)'."""
    return f"calling {where}: {_cause(exc)}"


def reason(exc: BaseException) -> str:
    """The error's class and the first line of its own text, masked: redis-py's texts name
    host:port, and a TLS failure says why there."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {_clean(text)}" if text else type(exc).__name__


def redis_error(exc: BaseException, where: str) -> str:
    """e.g. 'Redis at redis://***@h:6379/0: ConnectionError: Error 111 connecting ...'."""
    return f"Redis at {where}: {reason(exc)}"
