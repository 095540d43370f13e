"""Redis deployments for the tests, started on free ports: TLS, Sentinel, Cluster.

1. `make_certs`: a CA, a server certificate for 127.0.0.1 and a client certificate signed
   by it, and a second CA that signed nothing (the "wrong CA"), with the openssl CLI.
2. `tls_server`: a TLS-only redis-server (`--port 0 --tls-port P`).
3. `SentinelSet`: a master and a replica (appendonly) and three sentinels watching them,
   tuned to fail over within a few seconds. With `certs`, every one of them is TLS-only
   (replication and the sentinels' own links too); with `password`, the master and the
   replica require it of the default user and the sentinels require `sentinel_password`.
4. `ClusterSet`: three masters joined with `redis-cli --cluster create`; with `certs`,
   TLS-only nodes (`tls-cluster yes`: the bus and the slot map are TLS too); with
   `replicas=1`, a replica (appendonly) for each master, which takes over when it dies.

Each needs redis-server (and redis-cli, openssl); `require` skips a test with the reason
when the machine lacks one.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from relay.redis_server import RedisServer, find_binary, free_port
from tests.support import wait_for


def require(*tools: str, version: tuple[int, int] = (6, 2)) -> None:
    """Skip the calling test, saying why, when a tool is missing here or too old."""
    try:
        binary = find_binary()
    except FileNotFoundError as exc:
        pytest.skip(f"no redis-server: {exc}")
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed on this machine")
    found = server_version(binary)
    if found < version:
        pytest.skip(f"{binary} is Redis {found}; this test needs {version} or newer")


def server_version(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


# -- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    dir: Path
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    wrong_ca: str


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


# P-256 keys: made in milliseconds, where an RSA key takes up to a second on a busy machine;
# what the tests check (which CA, whether a client shows a certificate) is the same.
NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


def _ca(name: str, cwd: Path) -> None:
    _openssl("req", "-x509", *NEW_KEY, "-nodes", "-days", "2", "-subj",
             f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=cwd)


def _signed(name: str, ca: str, cwd: Path, server: bool) -> None:
    _openssl("req", *NEW_KEY, "-nodes", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=cwd)
    ext = cwd / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server
                   else "extendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", f"{name}.crt",
             cwd=cwd)


def make_certs(where: Path) -> Certs:
    where.mkdir(parents=True, exist_ok=True)
    _ca("ca", where)
    _ca("wrongca", where)
    _signed("server", "ca", where, server=True)
    _signed("client", "ca", where, server=False)
    p = str(where)
    return Certs(where, f"{p}/ca.crt", f"{p}/server.crt", f"{p}/server.key",
                 f"{p}/client.crt", f"{p}/client.key", f"{p}/wrongca.crt")


def _tls_ping(port: int, certs: Certs) -> bytes:
    """The start of the reply to PING over a TLS handshake with the client certificate;
    b"" when the server does not answer yet."""
    context = ssl.create_default_context(cafile=certs.ca)
    context.load_cert_chain(certs.client_cert, certs.client_key)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(b"PING\r\n")
            return s.recv(16)
    except OSError:
        return b""


def _tls_answers(port: int, certs: Certs) -> bool:
    return _tls_ping(port, certs).startswith(b"+PONG")


def _tls_replies(port: int, certs: Certs) -> bool:
    """Any reply to PING (a server requiring a password says NOAUTH)."""
    return _tls_ping(port, certs)[:1] in (b"+", b"-")


def tls_args(certs: Certs, port: int) -> list[str]:
    """TLS only on port, outgoing links (replication, sentinels) over TLS too."""
    return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", certs.server_cert,
            "--tls-key-file", certs.server_key, "--tls-ca-cert-file", certs.ca,
            "--tls-auth-clients", "no", "--tls-replication", "yes"]


# A master that syncs a replica diskless (the default since Redis 7) first waits this long
# for more replicas to arrive, 5 s by default: each replica here arrives alone, and would make
# every deployment with one settle 5 s later for nothing. 0 starts the transfer at once.
NO_SYNC_DELAY = ["--repl-diskless-sync-delay", "0"]


def _server(certs: Certs | None, extra: list[str], appendonly: bool = False,
            conf: str | None = None) -> RedisServer:
    """A plain server, or a TLS-only one on a port of its own when certs are given."""
    if certs is None:
        return RedisServer(appendonly=appendonly, extra=extra, conf=conf)
    port = free_port()
    return RedisServer(port=port, appendonly=appendonly, conf=conf, plain_port=False,
                       extra=[*tls_args(certs, port), *extra],
                       ready=lambda: _tls_replies(port, certs))


def admin_client(port: int, certs: Certs | None = None, password: str | None = None,
                 **kwargs: object) -> redis.Redis:
    """The test's own client to one server of a deployment (TLS and password as it has)."""
    tls = {} if certs is None else {"ssl": True, "ssl_ca_certs": certs.ca}
    return redis.Redis(host="127.0.0.1", port=port, password=password, **tls, **kwargs)


def tls_server(certs: Certs, auth_clients: bool) -> RedisServer:
    """Started; skips the test when this redis-server was built without TLS."""
    port = free_port()
    extra = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", certs.server_cert,
             "--tls-key-file", certs.server_key, "--tls-ca-cert-file", certs.ca,
             "--tls-auth-clients", "yes" if auth_clients else "no"]
    binary = find_binary()
    if not tls_supported(binary):
        pytest.skip(f"{binary} has no TLS support (built without BUILD_TLS)")
    server = RedisServer(port=port, extra=extra, plain_port=False,
                         ready=lambda: _tls_answers(port, certs))
    return server.start()


def tls_supported(binary: str) -> bool:
    """A build without TLS refuses `tls-port` as an unknown directive; one with TLS gets as
    far as the next (deliberately unknown) directive and refuses that instead."""
    out = subprocess.run([binary, "--tls-port", "1", "--relay-no-such-directive", "x"],
                         capture_output=True, text=True, timeout=10)
    return "tls-port" not in out.stdout + out.stderr


# -- Sentinel ----------------------------------------------------------------------------------

SERVICE = "relaysvc"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000


class SentinelSet:
    """A master, a replica and three sentinels; `kill_master` is the crash to survive."""

    def __init__(self, certs: Certs | None = None, password: str | None = None,
                 sentinel_password: str | None = None) -> None:
        if certs is not None and not tls_supported(find_binary()):
            pytest.skip(f"{find_binary()} has no TLS support (built without BUILD_TLS)")
        self.certs = certs
        self.password = password
        self.sentinel_password = sentinel_password
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        self.master = _server(certs, [*auth, *NO_SYNC_DELAY], appendonly=True)
        self.replica = _server(certs, [*auth, *NO_SYNC_DELAY, "--replicaof", "127.0.0.1",
                                       str(self.master.port)], appendonly=True)
        self.sentinels: list[RedisServer] = []
        self.dir = tempfile.mkdtemp(prefix="relay-sentinel-")

    def start(self) -> SentinelSet:
        """Started and settled; on a failure part-way, everything started is stopped."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> SentinelSet:
        self.master.start()
        self.replica.start()
        # Each sentinel is told the others (and the replica) up front, under ids of our own:
        # left to find them, it hears of them in their hellos, sent every 2 s.
        ids = [os.urandom(20).hex() for _ in range(3)]
        confs = [os.path.join(self.dir, f"sentinel{n}.conf") for n in range(3)]
        self.sentinels = [_server(self.certs, ["--sentinel"], conf=conf) for conf in confs]
        for n, conf in enumerate(confs):
            Path(conf).write_text("\n".join(self._sentinel_conf(n, ids)) + "\n")
        for sentinel in self.sentinels:
            sentinel.start()
        wait_for(self._replica_synced, timeout=20, what="the replica to sync")
        wait_for(lambda: all(self._sentinel_sees_replica(s) for s in self.sentinels),
                 timeout=20, what="the sentinels to see the replica and reach each other")
        return self

    def _sentinel_conf(self, n: int, ids: list[str]) -> list[str]:
        lines = [f"sentinel myid {ids[n]}",
                 f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2",
                 f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
                 f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
                 f"sentinel parallel-syncs {SERVICE} 1",
                 f"sentinel known-replica {SERVICE} 127.0.0.1 {self.replica.port}"]
        lines += [f"sentinel known-sentinel {SERVICE} 127.0.0.1 {other.port} {ids[m]}"
                  for m, other in enumerate(self.sentinels) if m != n]
        if self.password:
            lines.append(f"sentinel auth-pass {SERVICE} {self.password}")
        if self.sentinel_password:  # asked of clients, and of each other
            lines += [f"requirepass {self.sentinel_password}",
                      f"sentinel sentinel-pass {self.sentinel_password}"]
        return lines

    def node(self, server: RedisServer, **kwargs: object) -> redis.Redis:
        """The test's own client to the master or the replica (as the default user)."""
        return admin_client(server.port, self.certs, self.password, **kwargs)

    def _sentinel(self, server: RedisServer) -> redis.Redis:
        return admin_client(server.port, self.certs, self.sentinel_password)

    def _replica_synced(self) -> bool:
        client = self.node(self.replica)
        try:
            return client.info("replication").get("master_link_status") == "up"
        finally:
            client.close()

    def _sentinel_sees_replica(self, sentinel: RedisServer) -> bool:
        """It sees the replica up, and has working links to both other sentinels (a known
        sentinel not reached yet is flagged disconnected)."""
        client = self._sentinel(sentinel)
        try:
            replicas = client.sentinel_slaves(SERVICE)
            others = client.sentinel_sentinels(SERVICE)
            return any(r["is_slave"] and not r["is_disconnected"] for r in replicas) and \
                len(others) >= 2 and not any(o["is_disconnected"] or o["is_sdown"]
                                             for o in others)
        finally:
            client.close()

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        scheme = "redis+sentinel" if self.certs is None else "rediss+sentinel"
        query = "" if self.certs is None else f"?ssl_ca_certs={self.certs.ca}"
        return f"{scheme}://{hosts}/{SERVICE}/0{query}"

    def master_port(self) -> int:
        client = self._sentinel(self.sentinels[0])
        try:
            return int(client.sentinel_get_master_addr_by_name(SERVICE)[1])
        finally:
            client.close()

    def replicated(self) -> bool:
        """The replica has every write the master took (its acknowledged offset is the
        master's). `WAIT` would not say it: it counts only the asking connection's writes."""
        master = self.node(self.master)
        try:
            info = master.info("replication")
        finally:
            master.close()
        replica = info.get("slave0")
        return isinstance(replica, dict) and \
            int(replica["offset"]) == int(info["master_repl_offset"])

    def kill_master(self) -> None:
        self.master.kill()

    def promoted(self) -> bool:
        return self.master_port() == self.replica.port

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.master]:
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- Cluster -----------------------------------------------------------------------------------


class ClusterSet:
    """Three masters (and `replicas` replicas each): every slot served, joined by redis-cli."""

    def __init__(self, certs: Certs | None = None, replicas: int = 0) -> None:
        if certs is not None and not tls_supported(find_binary()):
            pytest.skip(f"{find_binary()} has no TLS support (built without BUILD_TLS)")
        self.certs = certs
        self.replicas = replicas
        # The bus port is given too: by default it is port + 10000, maybe taken or > 65535.
        tls = [] if certs is None else ["--tls-cluster", "yes"]
        self.nodes = [_server(certs, ["--cluster-enabled", "yes", "--cluster-config-file",
                                      "nodes.conf", "--cluster-node-timeout", "2000",
                                      "--cluster-port", str(free_port()), *tls,
                                      *NO_SYNC_DELAY],
                              appendonly=replicas > 0)
                      for _ in range(3 * (1 + replicas))]

    def start(self) -> ClusterSet:
        """Joined and serving every slot; on a failure part-way, the nodes are stopped."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> ClusterSet:
        for node in self.nodes:
            node.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        tls = [] if self.certs is None else ["--tls", "--cacert", self.certs.ca]
        subprocess.run(["redis-cli", *tls, "--cluster", "create", *addrs, "--cluster-yes",
                        "--cluster-replicas", str(self.replicas)],
                       check=True, capture_output=True, timeout=60)
        wait_for(self._ok, timeout=30, what="cluster_state:ok on every node")
        if self.replicas:
            wait_for(self._replicas_synced, timeout=30, what="every replica in sync")
        return self

    def _replicas_synced(self) -> bool:
        for node in self.nodes:
            client = self.node(node.port)
            try:
                info = client.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
            finally:
                client.close()
        return True

    def by_port(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def node(self, port: int, **kwargs: object) -> redis.Redis:
        """The test's own plain client to one node."""
        return admin_client(port, self.certs, **kwargs)

    def _ok(self) -> bool:
        for node in self.nodes:
            client = self.node(node.port)
            try:
                if client.cluster("info").get("cluster_state") != "ok":
                    return False
            finally:
                client.close()
        return True

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])
        if self.certs is None:
            return "redis+cluster://" + hosts
        return f"rediss+cluster://{hosts}?ssl_ca_certs={self.certs.ca}"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
