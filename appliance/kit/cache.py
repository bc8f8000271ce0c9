"""Stamp files: rebuild a kit part only when the hash of its inputs changes.

Each part writes ``stamps/<part>.json`` after its outputs are in place; the
stamp holds a digest of everything the part was built from (source files, tool
versions, package versions). A missing output or a different digest means
"build again". Outputs are written under a temporary name and renamed, so a
reader never sees half a file even while another process rebuilds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def digest(*items: str | bytes | Path) -> str:
    """SHA-256 over ``items``; a :class:`Path` contributes its name and contents."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, Path):
            h.update(item.name.encode() + b"\0")
            h.update(item.read_bytes())
        elif isinstance(item, str):
            h.update(item.encode())
        else:
            h.update(item)
        h.update(b"\0\1")
    return h.hexdigest()


def tree_files(root: Path, suffixes: Iterable[str] | None = None) -> list[Path]:
    """Regular files under ``root`` in a stable order (optionally filtered by suffix)."""
    wanted = tuple(suffixes) if suffixes is not None else None
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and (wanted is None or p.name.endswith(wanted) or p.name == "Makefile")
    ]
    return sorted(files)


class Stamps:
    """The stamp directory of one kit cache."""

    def __init__(self, kitdir: Path) -> None:
        self.dir = kitdir / "stamps"

    def fresh(self, part: str, key: str, outputs: Iterable[Path]) -> bool:
        """Whether ``part`` was last built from ``key`` and all its outputs exist."""
        try:
            data = json.loads((self.dir / f"{part}.json").read_text())
        except (OSError, ValueError):
            return False
        return data.get("key") == key and all(p.exists() for p in outputs)

    def record(self, part: str, key: str, **info: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / f"{part}.json", json.dumps({"key": key, **info}, indent=1).encode())

    def info(self, part: str) -> dict[str, str]:
        try:
            data = json.loads((self.dir / f"{part}.json").read_text())
        except (OSError, ValueError):
            return {}
        return {k: str(v) for k, v in data.items()}


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@contextmanager
def locked(kitdir: Path) -> Iterator[None]:
    """Hold the cache's build lock: two builders (parallel test runs) take turns."""
    kitdir.mkdir(parents=True, exist_ok=True)
    with open(kitdir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
