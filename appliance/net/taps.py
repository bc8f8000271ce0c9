"""Which processes hold which tap queues.

Every fd on /dev/net/tun attached to a tap shows ``iff:\t<name>`` in
/proc/PID/fdinfo/FD, which maps taps to their owners without any netlink help.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class TapOwner:
    tap: str
    pid: int
    command: str
    fds: list[int] = field(default_factory=list)


def _tun_fds(pid: str) -> list[int]:
    fds: list[int] = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return fds
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "/dev/net/tun":
                fds.append(int(name))
        except OSError:
            continue
    return fds


def tap_owners() -> list[TapOwner]:
    """Every (tap, process) pair with the fds of the queues that process holds."""
    owners: dict[tuple[str, int], TapOwner] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for fd in _tun_fds(pid):
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    iff = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("iff:")), None)
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if not iff:
                continue
            key = (iff, int(pid))
            owner = owners.setdefault(key, TapOwner(iff, int(pid), comm))
            owner.fds.append(fd)
    for o in owners.values():
        o.fds.sort()
    return sorted(owners.values(), key=lambda o: (o.tap, o.pid))
