"""HTTPS in tests: a throwaway CA, a TLS front for the local Pusher server, a CONNECT proxy.

Production reaches Pusher only over HTTPS, often through a proxy; the local server speaks
plain HTTP. These put the real TLS and proxy layers in between, in the test process (gevent
servers; the suite runs monkey-patched), and count what crosses them, so a test can tell
keep-alive from a handshake per call and a tunnelled call from a direct one.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gevent.server import StreamServer

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA certificate: what REQUESTS_CA_BUNDLE points at
    cert: Path  # the server's certificate (for 127.0.0.1 and localhost), signed by the CA
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_certs(directory: Path, label: str = "relay test") -> Certs:
    """A fresh CA and a server certificate it signed, valid for a day, into `directory`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name(f"{label} CA"))
        .issuer_name(_name(f"{label} CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    return Certs(
        ca=_pem(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM)),
        cert=_pem(directory / "server.pem", cert.public_bytes(serialization.Encoding.PEM)),
        key=_pem(directory / "server.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())))


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy until either side closes; then close both, so the other direction ends too."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.close()
            except OSError:
                pass


def _no_delay(sock: socket.socket) -> socket.socket:
    """Send each write at once, as TLS terminators and proxies do (nginx's tcp_nodelay). An
    answer that arrives in two reads leaves here in two writes; with Nagle's algorithm the
    second waits for the client's delayed ACK of the first: 40 ms on every call."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _connect(port: int, host: str = HOST) -> socket.socket:
    upstream = socket.create_connection((host, port), timeout=10)
    upstream.settimeout(None)
    return _no_delay(upstream)


def _splice(client: socket.socket, upstream: socket.socket) -> None:
    back = gevent.spawn(_pipe, upstream, client)
    _pipe(client, upstream)
    back.join()


class _Server:
    """A gevent StreamServer on a free loopback port, stopped by the context manager."""

    def __init__(self, **server_options: Any) -> None:
        self.server = StreamServer((HOST, 0), self._accept, **server_options)

    def _accept(self, sock: socket.socket, address: Any) -> None:
        self._handle(_no_delay(sock), address)

    def _handle(self, sock: socket.socket, address: Any) -> None:
        raise NotImplementedError

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def __enter__(self) -> _Server:
        self.server.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.stop(timeout=1)


class TlsFront(_Server):
    """Terminates TLS with `certs` and forwards the plain bytes to HOST:`upstream_port`.

    `connections` counts completed handshakes: one per connection the client opened, so a
    client that keeps its connections alive shows few for many calls. `failed_handshakes`
    counts clients that refused the certificate.
    """

    def __init__(self, certs: Certs, upstream_port: int) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certs.cert, certs.key)
        self.upstream_port = upstream_port
        self.connections = 0
        self.failed_handshakes = 0
        super().__init__()
        self.context = context

    def _handle(self, sock: socket.socket, address: Any) -> None:
        try:
            tls = self.context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError):
            self.failed_handshakes += 1
            sock.close()
            return
        self.connections += 1
        try:
            upstream = _connect(self.upstream_port)
        except OSError:
            tls.close()
            return
        _splice(tls, upstream)

    @property
    def url_base(self) -> str:
        return f"https://{HOST}:{self.port}"


class ConnectProxy(_Server):
    """An HTTP proxy that only tunnels (CONNECT host:port), as HTTPS_PROXY is used for
    https URLs. `connects` lists each tunnel's target, in order."""

    def __init__(self) -> None:
        self.connects: list[str] = []
        self.refused: list[str] = []
        super().__init__()

    def _handle(self, sock: socket.socket, address: Any) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                sock.close()
                return
            head += data
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = request_line.partition(" ")
        target = rest.partition(" ")[0]
        if method != "CONNECT":
            self.refused.append(request_line)
            sock.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            sock.close()
            return
        host, _, port = target.rpartition(":")
        try:
            upstream = _connect(int(port), host.strip("[]"))
        except (OSError, ValueError):
            sock.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            sock.close()
            return
        self.connects.append(target)
        sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        _splice(sock, upstream)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"
