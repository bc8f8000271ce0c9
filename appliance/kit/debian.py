"""Fetch Debian's cloud kernel package and unpack it, without installing it.

``linux-image-cloud-amd64`` is a metapackage; the kernel is the
``linux-image-<abi>-cloud-amd64`` package it depends on. ``apt-get download``
fetches that .deb into the cache and ``dpkg-deb -x`` unpacks it there, so the
host's own kernel and /lib/modules are never touched.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from appliance.kit.errors import KitError

log = logging.getLogger(__name__)

META_PACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True, slots=True)
class KernelPackage:
    name: str       # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str    # Debian version, e.g. 6.1.192-2

    @property
    def release(self) -> str:
        """The kernel release (``uname -r``), which names /lib/modules/<release>."""
        return self.name.removeprefix("linux-image-")


def _run(argv: list[str], cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise KitError(f"{argv[0]} is not installed (the kit needs a Debian host)")
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise KitError(f"{' '.join(argv[:2])} failed: {tail}")
    return proc.stdout


def _depends(meta: str) -> str | None:
    out = _run(["apt-cache", "depends", meta])
    m = re.search(r"Depends:\s*(linux-image-\S+)", out)
    return m.group(1) if m else None


def resolve(meta: str = META_PACKAGE) -> KernelPackage:
    """The kernel package ``meta`` depends on, updating apt's lists if they are empty.

    :raises KitError: When apt cannot name the package.
    """
    try:
        name = _depends(meta)
    except KitError:
        name = None
    if name is None:
        log.info("apt lists lack %s; running apt-get update", meta)
        _run(["apt-get", "update", "-qq"])
        name = _depends(meta)
        if name is None:
            raise KitError(f"apt knows no kernel package for {meta}")
    out = _run(["apt-cache", "show", "--no-all-versions", name])
    m = re.search(r"^Version:\s*(\S+)", out, re.MULTILINE)
    if m is None:
        raise KitError(f"apt-cache show gave no version for {name}")
    return KernelPackage(name, m.group(1))


def fetch(pkg: KernelPackage, workdir: Path) -> Path:
    """Download and unpack ``pkg`` under ``workdir``; returns the unpacked root.

    :raises KitError: When the download or the unpacking fails.
    """
    debdir = workdir / "deb"
    root = workdir / f"root-{pkg.release}"
    if debdir.exists():
        shutil.rmtree(debdir)
    debdir.mkdir(parents=True)
    # apt-get download drops privileges to _apt, which cannot write a root-owned
    # cache; the warning it prints about that is harmless, the download works.
    _run(["apt-get", "download", "-q", f"{pkg.name}={pkg.version}"], cwd=debdir)
    debs = sorted(debdir.glob("*.deb"))
    if not debs:
        raise KitError(f"apt-get download left no .deb for {pkg.name}")
    if root.exists():
        shutil.rmtree(root)
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
    shutil.rmtree(debdir)
    return root


def bzimage_path(root: Path, pkg: KernelPackage) -> Path:
    path = root / "boot" / f"vmlinuz-{pkg.release}"
    if not path.exists():
        raise KitError(f"{pkg.name} has no /boot/vmlinuz-{pkg.release}")
    return path


def modules_dir(root: Path, pkg: KernelPackage) -> Path:
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if (base / pkg.release).is_dir():
            return base / pkg.release
    raise KitError(f"{pkg.name} has no modules directory")
