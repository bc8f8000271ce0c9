"""Ports for the servers tests start, taken from below the kernel's ephemeral range.

A port from ``bind(("", 0))`` is an ephemeral one: between the check and the test's own bind, any
outgoing connection on the machine may be given it as its source port. Below that range the kernel
hands out nothing by itself, so a port found free here stays free unless a test takes it.
"""

from __future__ import annotations

import random
import socket

_HANDED_OUT: set[int] = set()
_LOWEST = 20000


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free now for TCP and UDP on every address, and never handed out twice in a run."""
    top = max(_ephemeral_start(), _LOWEST + 1000)
    pick = random.Random()
    for _ in range(500):
        port = pick.randrange(_LOWEST, top)
        if port in _HANDED_OUT:
            continue
        try:
            with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                t.bind(("0.0.0.0", port))
                u.bind(("0.0.0.0", port))
        except OSError:
            continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in {_LOWEST}-{top - 1}")
