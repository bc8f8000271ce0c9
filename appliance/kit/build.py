"""Build the kit's parts into the cache, each only when its inputs changed.

Parts and what their stamp hashes:

``kernel``     Debian kernel package name and version → ``bzImage``, ``vmlinux``
               and the unpacked modules tree
``tools``      ``guest/linux-tools`` sources and the compiler → ``kitio``, ``kitnet``
``initramfs``  kernel stamp, busybox binary, ``tools`` stamp and this package's
               initramfs code → ``initramfs.cpio.gz``
``guest``      ``guest/`` sources and the compiler → ``testguest.elf``
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.kit import bzimage, cpio, debian, initramfs, modules
from appliance.kit.cache import Stamps, digest, locked, tree_files, write_atomic
from appliance.kit.errors import KitError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_SRC = REPO_ROOT / "guest"
BUSYBOX = Path("/bin/busybox")
# ethtool -l/-L in the Linux guest (channels of a multiqueue virtio-net); busybox has none.
ETHTOOL = Path("/usr/sbin/ethtool")


@dataclass(frozen=True, slots=True)
class KitPaths:
    """Where the kit's parts live (they exist once ``appliance kit build`` ran)."""

    kitdir: Path
    guest_elf: Path      # the test guest, a PVH ELF
    bzimage: Path        # Debian's cloud kernel
    vmlinux: Path        # the same kernel, uncompressed ELF (from the bzImage payload)
    initramfs: Path      # gzip newc cpio: busybox, virtio modules, /init
    kitio: Path          # static block I/O benchmark (also inside the initramfs)
    kitnet: Path         # static TCP bulk sender/sink (also inside the initramfs)


def kit_dir() -> Path:
    """The cache directory: ``$APPLIANCE_KIT_DIR`` or ``.cache/kit`` in the repository."""
    env = os.environ.get("APPLIANCE_KIT_DIR")
    return Path(env).resolve() if env else REPO_ROOT / ".cache" / "kit"


def paths(kitdir: Path | None = None) -> KitPaths:
    """The paths of the kit's parts; builds nothing."""
    d = kitdir or kit_dir()
    return KitPaths(
        kitdir=d,
        guest_elf=d / "testguest.elf",
        bzimage=d / "bzImage",
        vmlinux=d / "vmlinux",
        initramfs=d / "initramfs.cpio.gz",
        kitio=d / "kitio",
        kitnet=d / "kitnet",
    )


def _say(msg: str) -> None:
    print(f"kit: {msg}", file=sys.stderr, flush=True)


def _compiler_id() -> str:
    cc = os.environ.get("CC", "gcc")
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError as err:
        raise KitError(f"compiler {cc} is not installed") from err


def _make(target: str, build_dir: Path) -> None:
    if shutil.which("make") is None:
        raise KitError("make is not installed")
    proc = subprocess.run(
        ["make", "-s", "-C", str(GUEST_SRC), f"O={build_dir}", target],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise KitError(f"building {target} in guest/ failed")


class Builder:
    """Builds parts of one kit directory; hold :func:`locked` while using it."""

    def __init__(self, kitdir: Path, force: bool = False) -> None:
        self.paths = paths(kitdir)
        self.kitdir = kitdir
        self.stamps = Stamps(kitdir)
        self.force = force
        self.work = kitdir / "work"

    def _part(self, part: str, key: str, outputs: list[Path], build: Callable[[], dict[str, str]]) -> None:
        if not self.force and self.stamps.fresh(part, key, outputs):
            _say(f"{part} is up to date")
            return
        _say(f"building {part}")
        info = build()
        self.stamps.record(part, key, **info)

    # -- Linux -------------------------------------------------------------

    def kernel(self) -> debian.KernelPackage:
        try:
            pkg = debian.resolve()
        except KitError:
            old = self.stamps.info("kernel")
            if not old.get("package") or not self.paths.bzimage.exists():
                raise
            # Offline with a kernel already cached: keep using it.
            _say("apt is unavailable; keeping the cached kernel")
            return debian.KernelPackage(old["package"], old["version"])
        root = self.work / "kernel" / f"root-{pkg.release}"
        key = digest("kernel-v1", pkg.name, pkg.version, Path(bzimage.__file__))

        def build() -> dict[str, str]:
            _say(f"fetching {pkg.name} {pkg.version}")
            for old in (self.work / "kernel").glob("root-*"):
                shutil.rmtree(old)
            fetched = debian.fetch(pkg, self.work / "kernel")
            image = debian.bzimage_path(fetched, pkg).read_bytes()
            vmlinux = bzimage.extract_vmlinux(image)
            write_atomic(self.paths.bzimage, image)
            write_atomic(self.paths.vmlinux, vmlinux, 0o755)
            return {"package": pkg.name, "version": pkg.version, "release": pkg.release}

        self._part("kernel", key, [self.paths.bzimage, self.paths.vmlinux, root], build)
        return pkg

    def tools(self) -> str:
        sources = tree_files(GUEST_SRC / "linux-tools", (".c", ".h"))
        key = digest("tools-v1", _compiler_id(), GUEST_SRC / "Makefile", *sources)

        def build() -> dict[str, str]:
            out = self.work / "build"
            _make("tools", out)
            write_atomic(self.paths.kitio, (out / "kitio").read_bytes(), 0o755)
            write_atomic(self.paths.kitnet, (out / "kitnet").read_bytes(), 0o755)
            return {}

        self._part("tools", key, [self.paths.kitio, self.paths.kitnet], build)
        return key

    def initramfs(self, pkg: debian.KernelPackage, tools_key: str) -> None:
        if not BUSYBOX.exists():
            raise KitError(f"{BUSYBOX} is missing (install busybox-static)")
        if not ETHTOOL.exists():
            raise KitError(f"{ETHTOOL} is missing (install ethtool)")
        root = self.work / "kernel" / f"root-{pkg.release}"
        key = digest(
            "initramfs-v2", self.stamps.info("kernel").get("key", ""), tools_key,
            BUSYBOX, ETHTOOL, *initramfs.shared_objects(ETHTOOL),
            Path(initramfs.__file__), Path(modules.__file__), Path(cpio.__file__),
        )

        def build() -> dict[str, str]:
            tree = modules.ModuleTree(debian.modules_dir(root, pkg))
            order = tree.load_order(initramfs.WANTED_MODULES)
            data = initramfs.build_initramfs(
                BUSYBOX, order, {"kitio": self.paths.kitio, "kitnet": self.paths.kitnet},
                {"usr/sbin/ethtool": ETHTOOL},
            )
            write_atomic(self.paths.initramfs, data)
            return {"modules": ",".join(m.name for m in order)}

        self._part("initramfs", key, [self.paths.initramfs], build)

    # -- test guest --------------------------------------------------------

    def guest(self) -> None:
        sources = [p for p in tree_files(GUEST_SRC, (".c", ".h", ".S", ".ld"))
                   if "linux-tools" not in p.parts and "build" not in p.relative_to(GUEST_SRC).parts]
        key = digest("guest-v1", _compiler_id(), *sources)

        def build() -> dict[str, str]:
            out = self.work / "build"
            _make("guest", out)
            write_atomic(self.paths.guest_elf, (out / "testguest.elf").read_bytes(), 0o755)
            return {}

        self._part("guest", key, [self.paths.guest_elf], build)


def build(*, force: bool = False, linux: bool = True, guest: bool = True,
          kitdir: Path | None = None) -> KitPaths:
    """Build (or confirm up to date) the kit's parts.

    :param force: rebuild even when stamps say the parts are current.
    :param linux: build the kernel, kitio and the initramfs.
    :param guest: build the test guest.
    :raises KitError: When a tool is missing or a step fails.
    """
    d = kitdir or kit_dir()
    with locked(d):
        b = Builder(d, force)
        if linux:
            pkg = b.kernel()
            tools_key = b.tools()
            b.initramfs(pkg, tools_key)
        if guest:
            b.guest()
        return b.paths
