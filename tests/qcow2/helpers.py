"""Shared helpers for the qcow2 tests: qemu-img/qemu-io as the oracle."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from appliance.qcow2 import open_image


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=check)


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> str:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run([*argv, str(path)], capture_output=True, text=True, check=True)
    assert "error" not in r.stdout.lower() and "fail" not in r.stdout.lower(), r.stdout
    return r.stdout


def oracle_raw(path: Path, tmp: Path, fmt: str = "qcow2") -> bytes:
    out = tmp / (path.name + ".oracle.raw")
    qemu_img("convert", "-f", fmt, "-O", "raw", str(path), str(out))
    return out.read_bytes()


async def read_all(path: Path, fmt: str | None = "qcow2", chunk: int = 1 << 20) -> bytes:
    img = await open_image(path, read_only=True, fmt=fmt)
    try:
        out = bytearray(img.size)
        mv = memoryview(out)
        pos = 0
        while pos < img.size:
            n = min(chunk, img.size - pos)
            await img.readv(pos, [mv[pos : pos + n]])
            pos += n
        return bytes(out)
    finally:
        await img.close()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def check_clean(path: Path) -> None:
    r = qemu_img("check", str(path), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
