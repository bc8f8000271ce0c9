"""Disk images named on a command line: ``-drive``, ``-blockdev`` and ``-hda``, parsed and opened.

Parsing gives an :class:`ImageSource` (file, format, cache mode, locking,
snapshot): everything needed to open the image, so the VMM and the storage
daemon open disks the same way. :func:`open_image_source` turns one into a
:class:`BlockBackend`: raw files through :mod:`appliance.storage.raw` (image
locking, ``aio=native``, hole punching), qcow2 through :mod:`appliance.qcow2`
with the same QEMU-compatible locks taken on a separate descriptor.

Format probing follows QEMU: without ``format=`` a file starting with the
qcow2 magic is qcow2, anything else raw with a warning, and then a guest
write that would make block 0 look like a qcow2 header is refused (QEMU's
``raw`` driver does the same, so a guest cannot turn its disk into an image
header that points at host files).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from appliance.cli.json_types import Alternate, Required, Union, check_text
from appliance.cli.options import OptionDict, parse_bool, parse_option, parse_size
from appliance.errors import ApplianceError, ConfigError
from appliance.storage.backend import BlockBackend
from appliance.storage.errors import BackendOpenError, ReadOnlyError
from appliance.storage.formats import PROBE_HEAD, foreign_format, foreign_format_of, unsupported_message

QCOW2_MAGIC = b"QFI\xfb"
FORMATS = ("raw", "qcow2")
CACHE_MODES = ("none", "writeback", "writethrough", "unsafe", "directsync")
AIO_MODES = ("threads", "native")
DISCARD_MODES = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}
INTERFACES = ("virtio", "none")

# BlockdevDriver (qapi/block-core.json, QEMU 7.2 on Linux): a driver QEMU has and we do not is
# refused as not supported, any other name in QAPI's words.
QEMU_DRIVERS = frozenset((
    "blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write copy-on-read "
    "dmg file snapshot-access ftp ftps gluster host_cdrom host_device http https iscsi luks nbd nfs "
    "null-aio null-co nvme parallels preallocate qcow qcow2 qed quorum raw rbd replication ssh "
    "throttle vdi vhdx vmdk vpc vvfat").split())
# BlockdevOptions (qapi/block-core.json, QEMU 7.2), its members in QAPI's order, for the
# drivers -blockdev takes: what type the JSON form's members must have (cli.json_types). An
# inline "file" or "backing" is a node of its own, checked against the same table.
BLOCKDEV = Union("driver", {
    "driver": "string", "node-name": "string", "discard": "string",
    "cache": {"direct": "boolean", "no-flush": "boolean"}, "read-only": "boolean",
    "auto-read-only": "boolean", "force-share": "boolean", "detect-zeroes": "string",
}, {})
_FILE_REF = Alternate("BlockdevRef", BLOCKDEV)
_OVERLAP_FLAGS: dict[str, object] = {"template": "string", **dict.fromkeys((
    "main-header", "active-l1", "active-l2", "refcount-table", "refcount-block", "snapshot-table",
    "inactive-l1", "inactive-l2", "bitmap-directory"), "boolean")}
BLOCKDEV.branches.update({
    "file": {"filename": Required("string"), "pr-manager": "string", "locking": "string", "aio": "string",
             "aio-max-batch": "integer", "drop-cache": "boolean", "x-check-cache-dropped": "boolean"},
    "raw": {"file": Required(_FILE_REF), "offset": "integer", "size": "integer"},
    "qcow2": {
        "file": Required(_FILE_REF), "backing": Alternate("BlockdevRefOrNull", BLOCKDEV, null=True),
        "lazy-refcounts": "boolean", "pass-discard-request": "boolean",
        "pass-discard-snapshot": "boolean", "pass-discard-other": "boolean",
        "overlap-check": Alternate("Qcow2OverlapChecks", _OVERLAP_FLAGS), "cache-size": "integer",
        "l2-cache-size": "integer", "l2-cache-entry-size": "integer",
        "refcount-cache-size": "integer", "cache-clean-interval": "integer",
        "data-file": _FILE_REF,
    },
})

# BLOCK_PROBE_BUF_SIZE in QEMU: the bytes a probe looks at, and that a guest
# may not rewrite into another format's header on a probed raw image.
PROBE_BYTES = 512

Warn = Callable[[str], None]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def probe_warning(path: str) -> str:
    """QEMU's warning, word for word, for a raw image opened without ``format=``."""
    return (
        f"WARNING: Image format was not specified for '{path}' and probing guessed raw.\n"
        "         Automatically detecting the format is dangerous for raw images, "
        "write operations on block 0 will be restricted.\n"
        "         Specify the 'raw' format explicitly to remove the restrictions."
    )


# -drive keys QEMU takes bare (``readonly`` for ``readonly=on``).
_DRIVE_FLAGS = ("readonly", "read-only", "snapshot", "copy-on-read", "cache.direct", "cache.no-flush")


@dataclass(frozen=True, slots=True)
class ImageSource:
    """One image to open, with file-level options (QEMU's format node over its file node).

    :param fmt: ``raw``, ``qcow2`` or ``None`` (probe, warning when raw).
    :param snapshot: write into a temporary qcow2 overlay, discarded at close.
    :param what: the option it came from, to prefix error messages.
    :param l2_cache_size: qcow2's L2 table cache in bytes (QEMU's
        ``l2-cache-size``); None sizes it as QEMU does by default.
    """

    path: Path
    fmt: str | None = None
    read_only: bool = False
    cache: str = "writeback"
    aio: str = "threads"
    discard: str = "ignore"
    locking: bool = True
    snapshot: bool = False
    what: str = "-drive"
    l2_cache_size: int | None = None

    def validate(self, *, check_path: bool = True) -> None:
        """Checks that need no file access but the path's existence.

        :param check_path: also check that the file exists and is no directory.
        :raises ConfigError: When a value cannot work.
        """
        if self.fmt is not None and self.fmt not in FORMATS:
            raise ConfigError(f"{self.what}: format '{self.fmt}' is not supported (raw or qcow2)")
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"{self.what}: invalid cache option '{self.cache}'")
        if self.aio not in AIO_MODES:
            raise ConfigError(f"{self.what}: invalid aio option '{self.aio}' (threads or native)")
        if self.aio == "native" and self.cache not in ("none", "directsync"):
            raise ConfigError(f"{self.what}: aio=native was specified, but it requires cache.direct=on")
        if self.discard not in ("ignore", "unmap"):
            raise ConfigError(f"{self.what}: invalid discard option '{self.discard}'")
        if self.l2_cache_size is not None and self.fmt == "raw":
            raise ConfigError(f"{self.what}: l2-cache-size is a qcow2 option")
        if not check_path:
            return
        if not self.path.exists():
            raise ConfigError(f"{self.what}: Could not open '{self.path}': No such file or directory")
        if self.path.is_dir():
            raise ConfigError(f"{self.what}: Could not open '{self.path}': Is a directory")

    @property
    def writes_file(self) -> bool:
        """Whether the file itself is opened for writing (not with ``snapshot``)."""
        return not self.read_only and not self.snapshot


# --- -drive -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DriveConfig:
    """One ``-drive`` (or ``-hda``)."""

    SYNTAX: ClassVar[str] = (
        "file=<path>[,format=raw|qcow2][,if=virtio|none][,id=<id>][,cache=none|writeback|"
        "writethrough|unsafe|directsync][,aio=threads|native][,readonly=on|off]"
        "[,discard=ignore|unmap][,serial=<str>][,snapshot=on|off][,addr=<slot>][,l2-cache-size=<size>]"
    )
    source: ImageSource
    interface: str = "virtio"
    id: str | None = None
    serial: str = ""
    addr: str | None = None

    @classmethod
    def parse(cls, text: str, *, option: str = "-drive") -> DriveConfig:
        """Parse the text after ``-drive``.

        ``if=`` defaults to ``virtio``: this machine has no IDE or SCSI
        controller for QEMU's other defaults to land on.

        :raises ConfigError: On an unknown key or a bad value, naming it.
        """
        # Bare booleans (``readonly`` for ``readonly=on``), with QEMU 7.2's deprecation warning.
        o = parse_option(option, text, flags=_DRIVE_FLAGS, warn_flags=True)
        file = o.take("file")
        if file is None or file == "":
            raise ConfigError(f"{option}: Parameter 'file' is missing (empty drives are not supported)")
        interface = o.take("if", "virtio") or "virtio"
        if interface not in INTERFACES:
            raise ConfigError(f"{option}: interface if={interface} is not supported (virtio or none)")
        media = o.take("media", "disk")
        if media != "disk":
            raise ConfigError(f"{option}: media={media} is not supported (disk only)")
        # index= numbers IDE/SCSI units; virtio disks take PCI slots in order.
        o.take_int("index", None, minimum=0)
        _drive_policies(o, option)
        ident = o.take("id")
        if ident is not None:
            _check_id(option, ident)
        if "readonly" in o:  # QEMU renames the legacy key before it reads it
            if "read-only" in o:
                raise ConfigError(f"{option}: 'read-only' and its alias 'readonly' can't be used at the same time")
            o["read-only"] = o.pop("readonly")
        source = ImageSource(
            Path(file),
            fmt=o.take("format"),
            read_only=o.take_bool("read-only", False),
            cache=_drive_cache(o, option),
            aio=o.take("aio", "threads") or "",
            discard=_discard(o, option),
            locking=_locking(o, "file.locking"),
            snapshot=o.take_bool("snapshot", False),
            what=f"{option} file={file}",
            l2_cache_size=_l2_cache_size(o, "l2-cache-size", f"{option} file={file}"),
        )
        serial = o.take("serial", "") or ""
        addr = o.take("addr")
        if addr is not None:
            if interface != "virtio":
                raise ConfigError(f"{option}: addr= needs if=virtio")
            from appliance.pci.allocator import parse_pci_address
            from appliance.pci.errors import PciError

            try:
                parse_pci_address(addr)
            except PciError as err:
                raise ConfigError(f"{option}: {err}") from None
        o.finish()
        cfg = cls(source, interface, ident, serial, addr)
        cfg.source.validate()
        return cfg


def _l2_cache_size(o: OptionDict, key: str, what: str) -> int | None:
    """``l2-cache-size`` in bytes (a size with QEMU's suffixes), or None when not given."""
    text = o.take(key)
    if text is None:
        return None
    size = parse_size(text, f"{what} {key}")
    if size < 1:
        raise ConfigError(f"{what}: {key} must be positive")
    return size


def _drive_cache(o: OptionDict, option: str) -> str:
    """``cache=`` with QEMU's finer ``cache.direct=``/``cache.no-flush=`` applied over it."""
    mode = o.take("cache", "writeback") or ""
    direct = o.take("cache.direct")
    no_flush = o.take("cache.no-flush")
    if direct is None and no_flush is None:
        return mode
    # What each mode means in those two terms (QEMU's table); writethrough and
    # directsync also turn the write cache off, which no pair here can keep.
    base = {"none": (True, False), "writeback": (False, False), "unsafe": (False, True)}.get(mode)
    if base is None:
        raise ConfigError(f"{option}: cache={mode} cannot be combined with cache.direct/cache.no-flush")
    d = base[0] if direct is None else parse_bool(direct, option, "cache.direct")
    n = base[1] if no_flush is None else parse_bool(no_flush, option, "cache.no-flush")
    if d and n:
        raise ConfigError(f"{option}: cache.direct=on with cache.no-flush=on is not supported")
    return "none" if d else "unsafe" if n else "writeback"


def _drive_policies(o: OptionDict, option: str) -> None:
    """Error and copy policies: what this machine does is QEMU's reporting default."""
    # QEMU's werror=enospc (its default) pauses the VM on a full disk; here
    # every error goes to the guest, which is werror/rerror=report.
    for key, allowed in (("werror", ("report",)), ("rerror", ("report",))):
        value = o.take(key)
        if value is not None and value not in allowed:
            raise ConfigError(f"{option}: {key}={value} is not supported (errors are reported to the guest)")
    value = o.take("detect-zeroes")
    if value not in (None, "off"):
        raise ConfigError(f"{option}: detect-zeroes={value} is not supported")
    if o.take_bool("copy-on-read", False):
        raise ConfigError(f"{option}: copy-on-read=on is not supported")


def _check_id(option: str, ident: str) -> None:
    if not ident or not (ident[0].isalpha()) or not all(c.isalnum() or c in "-._" for c in ident):
        raise ConfigError(f"{option}: invalid id '{ident}'")


def _discard(o: OptionDict, option: str) -> str:
    value = o.take("discard", "ignore") or "ignore"
    if value not in DISCARD_MODES:
        raise ConfigError(f"{option}: invalid discard option '{value}' (ignore or unmap)")
    return DISCARD_MODES[value]


def _locking(o: OptionDict, key: str) -> bool:
    value = o.take(key, "auto") or "auto"
    if value == "auto":
        return True
    return parse_bool(value, o.option, key)


# --- -blockdev / --blockdev -------------------------------------------------------------

# QAPI enums of -blockdev members: BlockdevDiscardOptions, OnOffAuto (file's locking).
_DISCARD = ("ignore", "unmap")
_ON_OFF_AUTO = ("on", "off", "auto")


def _member_enum(o: OptionDict, key: str, values: tuple[str, ...], default: str) -> str:
    """An enum member (BlockdevAioOptions, BlockdevDiscardOptions, OnOffAuto, …): only its
    names, as QAPI takes them, refused in the visitor's words."""
    value = o.take(key)
    if value is None:
        return default
    if value not in values:
        raise ConfigError(f"{o.option}: Parameter '{key}' does not accept value '{value}'")
    return value


@dataclass(frozen=True, slots=True)
class BlockdevConfig:
    """One block node: a ``file`` node (an image file) or a ``raw``/``qcow2`` node over one.

    The one parser behind ``appliance run -blockdev`` and ``appliance
    storage-daemon --blockdev`` (the same grammar as QEMU's and
    qemu-storage-daemon's, so both say the same about the same text).
    """

    SYNTAX: ClassVar[str] = (
        "[driver=]file,node-name=<name>,filename=<path>[,read-only=on|off][,cache.direct=on|off]"
        "[,cache.no-flush=on|off][,aio=threads|native][,discard=ignore|unmap][,locking=on|off|auto]"
        " | [driver=]raw|qcow2,node-name=<name>,file=<file-node>[,read-only=on|off][,discard=…]"
        "[,l2-cache-size=<bytes> (qcow2)]"
        " | [driver=]raw|qcow2,node-name=<name>,file.driver=file,file.filename=<path>[,file.<file option>=…]"
    )
    driver: str
    node_name: str
    filename: Path | None = None
    file: str | None = None
    read_only: bool = False
    cache_direct: bool = False
    no_flush: bool = False
    aio: str = "threads"
    discard: str = "ignore"
    locking: bool = True
    l2_cache_size: int | None = None
    # The option it came from (``-blockdev``/``--blockdev``), for later messages.
    option: str = field(default="-blockdev", compare=False)

    @classmethod
    def parse(cls, text: str, *, option: str = "-blockdev") -> BlockdevConfig:
        """Parse the text after ``option``.

        Both QEMU's ``key=value`` form and its JSON form are taken.

        :raises ConfigError: On an unknown driver or key, or a bad value.
        """
        check_text(option, text, BLOCKDEV)
        o = parse_option(option, text, implied="driver")
        driver = o.require("driver")
        node = o.take("node-name")
        if node is None:
            # QEMU's visitor finds a missing member of the driver's first (the table's Required
            # ones); the root node's name is checked after (bdrv_open).
            for key, kind in BLOCKDEV.branches.get(driver, {}).items():
                if isinstance(kind, Required) and key not in o and f"{key}.driver" not in o:
                    raise ConfigError(f"{option}: Parameter '{key}' is missing")
            raise ConfigError(f"{option}: 'node-name' must be specified for the root node")
        _check_id(option, node)
        what = f"{option} node-name={node}"
        o.option = what
        # The base members (BlockdevOptions), then the driver's.
        discard = _member_enum(o, "discard", _DISCARD, "ignore")
        cache_direct = o.take_bool("cache.direct")
        no_flush = o.take_bool("cache.no-flush")
        read_only = o.take_bool("read-only")
        o.take_bool("auto-read-only")  # only steers QEMU's reopen logic
        # Accepted at their defaults only: we never share an image that another user has locked,
        # nor detect zeroes.
        if o.take_bool("force-share"):
            raise ConfigError(f"{what}: force-share=on is not supported")
        detect = _member_enum(o, "detect-zeroes", ("off", "on", "unmap"), "off")
        if detect != "off":
            raise ConfigError(f"{what}: detect-zeroes={detect} is not supported")
        if driver == "file":
            filename = o.require("filename")
            cfg = cls(
                driver, node, filename=Path(filename), read_only=read_only, cache_direct=cache_direct,
                no_flush=no_flush, aio=_member_enum(o, "aio", AIO_MODES, "threads"), discard=discard,
                locking=_member_enum(o, "locking", _ON_OFF_AUTO, "auto") != "off", option=option,
            )
            o.finish()
            cfg._check_aio(what)
            return cfg
        if driver in FORMATS:
            l2 = _l2_cache_size(o, "l2-cache-size", what) if driver == "qcow2" else None
            if "file" not in o and "file.driver" in o:
                inline = cls._inline_file(driver, node, read_only, discard, o, option, cache_direct, no_flush)
                return replace(inline, l2_cache_size=l2)
            file = o.require("file")
            o.finish()
            # A format node's cache.* (libvirt writes them on both nodes) is taken; its I/O is its
            # file node's, opened with that node's own cache mode, as in QEMU.
            return cls(driver, node, file=file, read_only=read_only, discard=discard, option=option,
                       l2_cache_size=l2, cache_direct=cache_direct, no_flush=no_flush)
        if driver in QEMU_DRIVERS:
            raise ConfigError(f"{option}: driver '{driver}' is not supported (file, raw or qcow2)")
        raise ConfigError(f"{option}: Parameter 'driver' does not accept value '{driver}'")

    @classmethod
    def _inline_file(
        cls, driver: str, node: str, read_only: bool, discard: str, o: OptionDict, option: str,
        cache_direct: bool, no_flush: bool,
    ) -> BlockdevConfig:
        """``driver=qcow2,file.driver=file,file.filename=…``: the file node written inside, which
        inherits the format node's cache.* and read-only unless it sets its own."""
        what = o.option
        inner = o.take("file.driver")
        if inner != "file":
            raise ConfigError(f"{what}: file.driver={inner} is not supported (file)")
        cfg = cls(
            driver, node, filename=Path(o.require("file.filename")),
            read_only=read_only or o.take_bool("file.read-only", read_only),
            cache_direct=o.take_bool("file.cache.direct", cache_direct),
            no_flush=o.take_bool("file.cache.no-flush", no_flush),
            aio=_member_enum(o, "file.aio", AIO_MODES, "threads"),
            discard=_member_enum(o, "file.discard", _DISCARD, discard),
            locking=_member_enum(o, "file.locking", _ON_OFF_AUTO, "auto") != "off", option=option,
        )
        o.finish()
        cfg._check_aio(what)
        return cfg

    def _check_aio(self, what: str) -> None:
        if self.aio == "native" and not self.cache_direct:
            raise ConfigError(f"{what}: aio=native was specified, but it requires cache.direct=on")


def resolve_blockdev(
    nodes: dict[str, BlockdevConfig], name: str, *, what: str, check_path: bool = True
) -> ImageSource:
    """The :class:`ImageSource` a device (or an export) gets when it names node ``name``.

    :param check_path: also check that the image file exists (the storage
        daemon leaves that to opening, where a missing file is a run-time error).
    :raises ConfigError: When the node or the file node below it is missing or wrong.
    """
    node = nodes.get(name)
    if node is None:
        raise ConfigError(f"{what}: no drive or block node named '{name}'")
    label = f"{node.option} node-name={name}"
    if node.driver == "file":
        file, fmt = node, "raw"
    elif node.filename is not None:
        file, fmt = node, node.driver
    else:
        below = nodes.get(node.file or "")
        if below is None:
            raise ConfigError(f"{label}: file node '{node.file}' does not exist")
        if below.driver != "file":
            raise ConfigError(f"{label}: '{node.file}' is not a driver=file node")
        file, fmt = below, node.driver
    assert file.filename is not None
    cache = "writeback"
    if file.cache_direct:
        cache = "none"
    elif file.no_flush:
        cache = "unsafe"
    discard = "unmap" if node.discard == "unmap" or file.discard == "unmap" else "ignore"
    src = ImageSource(
        file.filename, fmt=fmt, read_only=node.read_only or file.read_only, cache=cache,
        aio=file.aio, discard=discard, locking=file.locking, what=label, l2_cache_size=node.l2_cache_size,
    )
    src.validate(check_path=check_path)
    return src


# --- opening ------------------------------------------------------------------------------


class ProbedRawGuard:
    """A raw image whose format was guessed: writes that would give block 0 an image header fail.

    Everything else passes straight to the backend underneath.
    """

    def __init__(self, inner: BlockBackend) -> None:
        self.inner = inner
        self.size = inner.size
        self.read_only = inner.read_only
        self.logical_block_size = inner.logical_block_size
        self.supports_discard = inner.supports_discard
        self.refused_writes = 0

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        return await self.inner.readv(offset, bufs)

    async def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if offset < PROBE_HEAD:
            want = PROBE_HEAD - offset
            head = bytearray()
            for b in bufs:
                head += b[: want - len(head)]
                if len(head) >= want:
                    break
            # Bytes the write does not cover keep their old value.
            current = bytearray(PROBE_HEAD)
            if offset > 0 or len(head) < want:
                await self.inner.readv(0, [memoryview(current)])
            current[offset : offset + len(head)] = head
            # QEMU refuses the same writes: once block 0 carries a format's
            # signature the next probe would open the disk as that format.
            if current[: len(QCOW2_MAGIC)] == QCOW2_MAGIC or foreign_format(bytes(current)):
                self.refused_writes += 1
                raise ReadOnlyError("write to block 0 of a probed raw image refused "
                                    "(it would look like another image format)")
        return await self.inner.writev(offset, bufs)

    async def flush(self) -> None:
        await self.inner.flush()

    async def discard(self, offset: int, length: int) -> None:
        await self.inner.discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        await self.inner.write_zeroes(offset, length, may_unmap=may_unmap)

    async def close(self) -> None:
        await self.inner.close()


@dataclass(eq=False)
class OpenImage:
    """An opened :class:`ImageSource`: the backend and what has to go with it."""

    source: ImageSource
    backend: BlockBackend
    fmt: str
    lock_fds: list[int]

    async def close(self) -> None:
        """Close the backend, then drop the image locks."""
        try:
            await self.backend.close()
        finally:
            for fd in self.lock_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.lock_fds.clear()


def probe_format(path: Path) -> str:
    """``qcow2`` when the file starts with its magic, else ``raw``.

    :raises BackendOpenError: The file is in a format we do not implement
        (VMDK, VHD, QED, ...), which must not be served as a raw disk.
    """
    foreign = foreign_format_of(path)
    if foreign is not None:
        raise BackendOpenError(unsupported_message(path, foreign))
    with open(path, "rb") as f:
        return "qcow2" if f.read(len(QCOW2_MAGIC)) == QCOW2_MAGIC else "raw"


def _lock(path: Path, *, write: bool) -> int:
    from appliance.storage.locking import lock_image

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        lock_image(fd, str(path), write=write)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def open_image_source(src: ImageSource, *, warn: Warn = _stderr) -> OpenImage:
    """Open ``src`` as a BlockBackend (in the running loop).

    :param warn: where the probing warning goes (stderr by default).
    :raises ConfigError: With a one-line message naming the option when the
        image cannot be opened: missing, locked by another user, not the
        format given, corrupt.
    """
    src.validate()
    try:
        return await _open(src, warn)
    except ConfigError:
        raise
    except (ApplianceError, OSError) as err:
        text = getattr(err, "strerror", None) if isinstance(err, OSError) else None
        raise ConfigError(f"{src.what}: {text or err}") from err


async def open_source(src: ImageSource, *, warn: Warn = _stderr) -> OpenImage:
    """Open ``src`` as :func:`open_image_source` does, but leave failures as storage errors.

    For the storage daemon, where an image that cannot be opened is a
    run-time failure (exit 1, as qemu-storage-daemon's) rather than a
    command-line error.

    :raises StorageError: (BackendOpenError, Qcow2Error…) When the image
        cannot be opened, is locked by another user or is corrupt.
    :raises ConfigError: When a value of ``src`` cannot work.
    """
    src.validate(check_path=False)
    try:
        return await _open(src, warn)
    except OSError as err:
        raise BackendOpenError(f"Could not open '{src.path}': {err.strerror or err}") from err


async def _open(src: ImageSource, warn: Warn) -> OpenImage:
    fmt = src.fmt
    probed = False
    if fmt is None:
        fmt = await asyncio.to_thread(probe_format, src.path)
        probed = fmt == "raw"
        # QEMU warns only when the probed raw image itself will be written:
        # not for readonly=on, nor under -snapshot (the image is then only
        # read; the overlay takes the writes).
        if probed and not src.read_only and not src.snapshot:
            warn(probe_warning(str(src.path)))
    locks: list[int] = []
    try:
        backend: BlockBackend
        if src.snapshot and not src.read_only:
            backend = await _open_snapshot(src, fmt, locks)
        elif fmt == "raw":
            from appliance.storage.raw import open_raw

            backend = await asyncio.to_thread(
                open_raw, src.path, read_only=src.read_only, cache=src.cache,
                discard=src.discard, aio=src.aio, locking=src.locking,
            )
            if probed and not src.read_only:
                backend = ProbedRawGuard(backend)
        else:
            if src.locking:
                locks.append(await asyncio.to_thread(_lock, src.path, write=not src.read_only))
            backend = await _open_qcow2(src.path, read_only=src.read_only, cache=src.cache,
                                        l2_cache_size=src.l2_cache_size, aio=src.aio)
            _set_discard(backend, src.discard)
    except BaseException:
        for fd in locks:
            os.close(fd)
        raise
    return OpenImage(src, backend, fmt, locks)


async def _open_qcow2(path: Path, *, read_only: bool, cache: str, l2_cache_size: int | None = None,
                      aio: str = "threads") -> BlockBackend:
    from appliance.qcow2 import open_image

    # aio= as QEMU means it: a thread pool (threads, its default) or kernel AIO
    # (native), for the data I/O the engine does under O_DIRECT.
    backend: BlockBackend = await open_image(path, read_only=read_only, fmt="qcow2", cache=cache,
                                             l2_cache_size=l2_cache_size, aio=aio)
    return backend


def _set_discard(backend: BlockBackend, discard: str) -> None:
    # QEMU's default discard=ignore keeps the guest from unmapping; the
    # device offers DISCARD only when the backend says it supports it.
    if discard != "unmap" and backend.supports_discard:
        backend.supports_discard = False


async def _open_snapshot(src: ImageSource, fmt: str, locks: list[int]) -> BlockBackend:
    """``-snapshot``: a temporary qcow2 overlay over the image, unlinked once open."""
    from appliance.qcow2 import create_temporary_overlay

    if src.locking:
        locks.append(await asyncio.to_thread(_lock, src.path, write=False))
    overlay = await asyncio.to_thread(create_temporary_overlay, src.path, fmt)
    try:
        backend = await _open_qcow2(overlay, read_only=False, cache=src.cache, l2_cache_size=src.l2_cache_size,
                                    aio=src.aio)
    finally:
        # The open descriptors keep the overlay alive; nothing is left behind
        # however the VMM ends.
        with contextlib.suppress(OSError):
            os.unlink(overlay)
    _set_discard(backend, src.discard)
    return backend


def with_snapshot(src: ImageSource) -> ImageSource:
    """``src`` under the global ``-snapshot``."""
    return replace(src, snapshot=True)


__all__ = [
    "BlockdevConfig", "DriveConfig", "ImageSource", "OpenImage", "ProbedRawGuard",
    "open_image_source", "open_source", "probe_format", "probe_warning",
    "resolve_blockdev", "with_snapshot",
]
