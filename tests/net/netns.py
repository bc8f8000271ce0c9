"""Network namespaces made and removed by tests (the network rule: traffic stays inside)."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator

from pyroute2 import netns


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    name = f"apl-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the block with this thread in namespace ``name`` (tap fds stay valid after)."""
    netns.pushns(name)
    try:
        yield
    finally:
        netns.popns()


def ns_exec(name: str, *args: str) -> str:
    return sh("ip", "netns", "exec", name, *args)
