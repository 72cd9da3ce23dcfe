"""Loopback ports: for the rendezvous, the HTTP listener and the tests' and benches' servers."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's pick; a race with other processes remains, as with
    any port picked before it is bound)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
