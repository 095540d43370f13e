"""relay.redis_server: the throwaway servers' ports."""

from __future__ import annotations

import socket

from relay.redis_server import OWN_PORTS, free_port


def test_ports_are_free_distinct_and_below_the_ephemeral_ranges() -> None:
    """Picked before binding (a cluster's nodes and bus ports), they must not coincide, and
    no outgoing connection may take one meanwhile: those get theirs from 32768 up."""
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(p in OWN_PORTS for p in ports) and max(OWN_PORTS) < 32768
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))  # free indeed

