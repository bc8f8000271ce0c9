"""A writer for the "newc" cpio archive the kernel unpacks as its initramfs.

Format per ``Documentation/driver-api/early-userspace/buffer-format.rst``: each
entry is the ASCII magic ``070701``, thirteen 8-digit hex fields, the NUL-
terminated name padded to a 4-byte boundary (counting the 110-byte header), and
the data padded the same way; ``TRAILER!!!`` ends the archive. Writing it here
rather than with ``cpio -o`` lets us add device nodes (``/dev/console``) without
root and makes the archive byte-for-byte reproducible (fixed mtime, inode
numbers in order).
"""

from __future__ import annotations

import stat


class CpioWriter:
    """Collects entries in memory; :meth:`finish` returns the archive bytes."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        name = name.lstrip("/")
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name}")
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts.append(header + encoded + _pad(len(header) + len(encoded)))
        self._parts.append(data + _pad(len(data)))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)
