#!/usr/bin/env python3
"""Unpack QEMU from Debian's bookworm-backports into ``.cache/qemu-backport``, beside the system's.

Debian 12's QEMU (7.2) crashes when a vhost-user NIC starts under TCG with MSI-X,
so ``bench/usernet_linux.py`` gives our NIC INTx there. QEMU 8.0 fixed that path
(the vector notifiers are no longer installed for a device whose guest notifier
mask is off, which vhost-user NICs turn off), and bookworm-backports carries a
later QEMU. This script unpacks that QEMU without installing it, so the system's
QEMU, which the tests use, is untouched; ``usernet_linux.py --qemu-root DIR``
then runs every stack on it, ours with MSI-X like the others.

Nothing is installed: the packages are downloaded with an apt state of their
own (a temporary directory) and unpacked with ``dpkg -x``. Its libraries are bookworm's own;
a missing one is named before anything runs.

    .venv/bin/python bench/tools/qemu_backport.py [--dest .cache/qemu-backport]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "deb http://deb.debian.org/debian bookworm-backports main\n"
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios")
BINARY = "usr/bin/qemu-system-x86_64"


def _apt_options(state: Path) -> list[str]:
    """apt options that read and write only below ``state`` (the system's sources and lists untouched)."""
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    sources = state / "backports.list"
    sources.write_text(SOURCE)
    return [
        "-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip


def _candidate(opts: list[str], package: str) -> str:
    out = subprocess.run(["apt-cache", *opts, "policy", package], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)" and "bpo12" in version:
                return version
    raise SystemExit(f"qemu_backport: bookworm-backports has no {package}")


def fetch(dest: Path) -> Path:
    """Download and unpack the backported QEMU into ``dest``; return the binary's path."""
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        opts = _apt_options(state)
        print("qemu_backport: reading the bookworm-backports index", flush=True)
        subprocess.run(["apt-get", *opts, "update", "-q"], check=True, stdout=subprocess.DEVNULL)
        pins = [f"{p}={_candidate(opts, p)}" for p in PACKAGES]
        print("qemu_backport: downloading " + " ".join(pins), flush=True)
        debs = state / "debs"
        debs.mkdir()
        subprocess.run(["apt-get", *opts, "download", "-q", *pins], check=True, cwd=debs, stdout=subprocess.DEVNULL)
        staging = dest.with_name(dest.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(staging)], check=True)
    binary = staging / BINARY
    missing = [line.split()[0] for line in subprocess.run(
        ["ldd", str(binary)], check=True, capture_output=True, text=True).stdout.splitlines() if "not found" in line]
    if missing:
        shutil.rmtree(staging)
        raise SystemExit(f"qemu_backport: libraries missing on this machine: {' '.join(missing)}")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest / BINARY


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--dest", type=Path, default=ROOT / ".cache" / "qemu-backport",
                   help="where to unpack (default: .cache/qemu-backport)")
    a = p.parse_args()
    binary = fetch(a.dest.resolve())
    version = subprocess.run([str(binary), "--version"], check=True, capture_output=True, text=True).stdout
    print(f"qemu_backport: {version.splitlines()[0]} in {a.dest}")
    print(f"run: .venv/bin/python bench/usernet_linux.py --qemu-root {a.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
