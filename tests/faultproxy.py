"""A TCP proxy in front of a real redis-server that can lose one reply on the wire.

A command reaches Redis and runs, but its answer never reaches the client: the proxy drops
both connections instead, as a network that fails after the request went out. That is the one
way a worker can end up with items in its in-flight list that it never saw. Runs in the test
process on gevent's (monkey-patched) sockets.
"""

from __future__ import annotations

import socket

import gevent
import gevent.event


class LostReply:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._armed: bytes | None = None  # lose the reply to the next command holding this
        self.lost = gevent.event.Event()
        self._greenlets = [gevent.spawn(self._accept)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def lose_reply_to(self, marker: bytes) -> None:
        """Lose the reply to the next command whose bytes contain `marker` (e.g. b"BLMOVE")."""
        self._armed = marker
        self.lost.clear()

    def close(self) -> None:
        gevent.killall(self._greenlets, timeout=5)
        self.listener.close()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
            doomed = gevent.event.Event()  # this connection carried the armed command
            self._greenlets.append(gevent.spawn(self._upstream, client, server, doomed))
            self._greenlets.append(gevent.spawn(self._downstream, server, client, doomed))

    def _upstream(self, client: socket.socket, server: socket.socket,
                  doomed: gevent.event.Event) -> None:
        try:
            while data := client.recv(65536):
                if self._armed is not None and self._armed in data:
                    self._armed = None
                    doomed.set()
                server.sendall(data)
        except OSError:
            pass
        finally:
            server.close()

    def _downstream(self, server: socket.socket, client: socket.socket,
                    doomed: gevent.event.Event) -> None:
        try:
            while data := server.recv(65536):
                if doomed.is_set():  # the answer to the armed command (and what follows it)
                    self.lost.set()
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()
