"""`appliance storage-daemon`: serve block devices over vhost-user.

Takes qemu-storage-daemon's syntax, so scripts written for it work unchanged::

    appliance storage-daemon \\
        --blockdev driver=file,node-name=file0,filename=disk.img \\
        --blockdev driver=qcow2,node-name=disk0,file=file0 \\
        --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,\\
addr.path=/tmp/vu.sock,writable=on,num-queues=2

A ``file`` node names an image file; a ``raw`` or ``qcow2`` node layers a
format on a file node. ``--blockdev`` is parsed and resolved by
:mod:`appliance.storage.blockdev`, the same code as ``appliance run
-blockdev``, and images are opened the same way (locks, ``aio=native``). Each export is one virtio-blk device behind one
vhost-user socket; several exports run in one daemon. It runs until SIGTERM or
SIGINT (or a QMP ``quit``) and removes its sockets on the way out.

``--chardev socket,id=ID,path=P,server=on,wait=off --monitor chardev=ID``
gives it qemu-storage-daemon's QMP monitor, so block nodes and exports can be
added and removed at run time (:mod:`appliance.qmp.daemon_commands`).

:class:`StorageDaemon` is the same thing as a Python object, for tests that
want the daemon inside their own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.cli.options import parse_option
from appliance.errors import ApplianceError, ConfigError, HelpRequested
from appliance.machine.config import ChardevConfig
from appliance.storage.backend import BlockBackend
from appliance.storage.blockdev import (
    BlockdevConfig,
    OpenImage,
    open_source,
    resolve_blockdev,
)

USAGE = """\
usage: appliance storage-daemon [options]

Serves block devices to other VMMs over vhost-user (qemu-storage-daemon syntax).

  -h, --help             show this help and exit
  -V, --version          show the version and exit
  --blockdev [driver=]file,node-name=<name>,filename=<path>[,read-only=on|off]
             [,cache.direct=on|off][,cache.no-flush=on|off][,aio=threads|native]
             [,discard=ignore|unmap][,locking=on|off|auto]
                         an image file (aio=native needs cache.direct=on)
  --blockdev [driver=]raw|qcow2,node-name=<name>,file=<file-node>[,read-only=on|off]
             [,discard=ignore|unmap][,l2-cache-size=<bytes> (qcow2)]
                         a format layered on a file node
  --blockdev [driver=]raw|qcow2,node-name=<name>,file.driver=file,
             file.filename=<path>[,file.<file option>=...]
                         the same with its file node written inline
  --export [type=]vhost-user-blk,id=<id>,node-name=<name>,addr.type=unix,
           addr.path=<socket>[,writable=on|off][,num-queues=<n>]
           [,logical-block-size=<bytes>][,serial=<str>][,iothread=<id>]
                         serve a node as a vhost-user-blk device
  --object iothread,id=<id>[,poll-max-ns=<ns>]
                         an I/O thread for exports; its poll-max-ns bounds how
                         long disk completions are polled for (default 100000)
  --chardev socket,id=<id>,path=<path>[,server=on|off][,wait=on|off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on|off][,wait=on|off]
                         a socket for --monitor (server,nowait also accepted)
  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                         a QMP monitor on that socket: qmp_capabilities,
                         query-version, query-commands, query-named-block-nodes,
                         query-block-exports, blockdev-add, blockdev-del,
                         block-export-add, block-export-del, quit
  --pidfile <path>       write the daemon's pid to this file

Each --blockdev/--export also takes its JSON form, as qemu-storage-daemon does.
Runs until SIGTERM, SIGINT or the QMP command quit.
"""


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """One ``--export type=vhost-user-blk``."""

    SYNTAX = "type=vhost-user-blk,id=<id>,node-name=<name>,addr.type=unix,addr.path=<path>,…"
    id: str
    node_name: str
    path: str
    writable: bool = False
    num_queues: int = 1
    logical_block_size: int = 512
    serial: str | None = None
    iothread: str | None = None

    @classmethod
    def parse(cls, text: str) -> ExportConfig:
        from appliance.net.netdev import SOCKET_TYPES

        o = parse_option("--export", text, implied="type")
        kind = o.require("type")
        if kind not in ("nbd", "vhost-user-blk", "fuse", "vduse-blk"):  # BlockExportType, QEMU 7.2
            raise ConfigError(f"--export: Parameter 'type' does not accept value '{kind}'")
        if kind != "vhost-user-blk":
            raise ConfigError(f"--export: type '{kind}' is not supported (vhost-user-blk)")
        ident = o.require("id")
        node = o.require("node-name")
        if not any(key.startswith("addr.") for key in o):
            raise ConfigError("--export: Parameter 'addr' is missing")
        addr_type = o.require("addr.type")
        if addr_type not in SOCKET_TYPES:
            raise ConfigError(f"--export: Parameter 'type' does not accept value '{addr_type}'")
        if addr_type != "unix":
            raise ConfigError(f"--export: addr.type={addr_type} is not supported (unix)")
        path = o.require("addr.path")
        writable = o.take_bool("writable")
        num_queues = o.take_int("num-queues", 1, minimum=1)
        assert num_queues is not None
        if num_queues > 64:
            raise ConfigError(f"--export: num-queues={num_queues} is more than 64")
        lbs = o.take_int("logical-block-size", 512, minimum=512)
        assert lbs is not None
        # QEMU's range for block sizes: a power of two from 512 bytes to 2 MiB.
        if lbs & (lbs - 1) or lbs > 2 << 20:
            raise ConfigError(f"--export: logical-block-size={lbs} is not a power of two up to 2097152")
        serial = o.take("serial")
        iothread = o.take("iothread")
        o.take_bool("fixed-iothread", False)
        o.finish()
        return cls(ident, node, path, writable, num_queues, lbs, serial, iothread)


@dataclass(slots=True)
class DaemonConfig:
    blockdevs: list[BlockdevConfig] = field(default_factory=list)
    exports: list[ExportConfig] = field(default_factory=list)
    pidfile: str | None = None
    help: bool = False
    chardevs: dict[str, ChardevConfig] = field(default_factory=dict)
    # (chardev id, pretty) per --monitor
    monitors: list[tuple[str, bool]] = field(default_factory=list)
    # --object iothread: id -> poll-max-ns (None: the default)
    iothreads: dict[str, int | None] = field(default_factory=dict)

    def validate(self) -> None:
        """Cross-option checks: unique names, existing references, no conflicting writers."""
        used: set[str] = set()
        for cid, _ in self.monitors:
            cd = self.chardevs.get(cid)
            if cd is None:
                raise ConfigError(f'--monitor chardev={cid}: chardev "{cid}" not found')
            if cid in used:
                raise ConfigError(f"--monitor chardev={cid}: Device '{cid}' is in use")
            used.add(cid)
        nodes: dict[str, BlockdevConfig] = {}
        for b in self.blockdevs:
            if b.node_name in nodes:
                raise ConfigError(f"--blockdev: duplicate node name '{b.node_name}'")
            nodes[b.node_name] = b
        # qemu-storage-daemon opens every node at start-up, so a format node
        # over a missing or wrong file node is an error even when unexported.
        for b in self.blockdevs:
            resolve_blockdev(nodes, b.node_name, what="--blockdev", check_path=False)
        ids: set[str] = set()
        paths: set[str] = set()
        writers: set[str] = set()
        for e in self.exports:
            if e.id in ids:
                raise ConfigError(f"--export: duplicate export id '{e.id}'")
            ids.add(e.id)
            if e.path in paths:
                raise ConfigError(f"--export: socket '{e.path}' is used twice")
            paths.add(e.path)
            if e.iothread is not None and e.iothread not in self.iothreads:
                raise ConfigError(f'--export: iothread "{e.iothread}" not found')
            node = nodes.get(e.node_name)
            if node is None:
                raise ConfigError(f"--export: node '{e.node_name}' does not exist")
            if e.writable and resolve_blockdev(nodes, e.node_name, what="--export", check_path=False).read_only:
                raise ConfigError(f"--export: '{e.id}' is writable but node '{e.node_name}' is read-only")
            if e.writable:
                if e.node_name in writers:
                    raise ConfigError(f"--export: node '{e.node_name}' is exported writable twice")
                writers.add(e.node_name)


_OPTIONS_WITH_VALUE = {"--blockdev", "--export", "--pidfile", "--chardev", "--monitor", "--object"}


def parse_object(text: str, iothreads: dict[str, int | None]) -> None:
    """``--object iothread,id=ID[,poll-max-ns=NS]`` (storage.poll.parse_iothread)."""
    from appliance.cli.json_types import OBJECT, check_text
    from appliance.storage import poll

    check_text("--object", text, OBJECT, closed=True)
    o = parse_option("--object", text, implied="qom-type")
    kind = o.require("qom-type")
    if kind != "iothread":
        raise ConfigError(f"--object: type '{kind}' is not supported (iothread)")
    o.option = "--object iothread"
    ident, ns = poll.parse_iothread(o)
    if ident in iothreads:
        raise ConfigError(f"--object: duplicate id '{ident}'")
    iothreads[ident] = ns


def parse_chardev(text: str) -> ChardevConfig:
    """``--chardev socket,id=…``: the only backend a monitor can use here.

    :raises ConfigError: On another backend, a missing id or address, a bad port.
    """
    o = parse_option("--chardev", text, implied="backend", flags=("server", "wait", "nowait", "nodelay"))
    backend = o.require("backend")
    cid = o.require("id")
    if backend != "socket":
        raise ConfigError(f"--chardev {text}: backend '{backend}' is not supported (socket)")
    server = o.take_bool("server", False)
    # 'nowait' is the spelling before QEMU 6.0's wait=off.
    wait = o.take_bool("wait", True) and not o.take_bool("nowait", False)
    o.take_bool("nodelay")
    path = o.take("path")
    host = o.take("host")
    port = o.take("port")
    o.finish()
    if path is not None:
        cfg = ChardevConfig("socket", id=cid, path=path, server=server, wait=wait)
    elif port is not None:
        try:
            port_n = int(port, 10)
        except ValueError:
            raise ConfigError(f"--chardev {text}: port '{port}' is not a number") from None
        cfg = ChardevConfig("socket", id=cid, host=host or "", port=port_n, server=server, wait=wait)
    else:
        raise ConfigError(f"--chardev {text}: socket needs 'path' or 'port'")
    cfg.validate()
    return cfg


def parse_monitor(text: str) -> tuple[str, bool]:
    """``--monitor [chardev=]ID[,mode=control][,pretty=on|off]`` → (chardev id, pretty).

    qemu-storage-daemon's monitor is QMP only (mode defaults to control there).
    """
    o = parse_option("--monitor", text, implied="chardev", flags=("pretty",))
    cid = o.require("chardev")
    mode = o.take("mode", "control")
    pretty = o.take_bool("pretty", False)
    o.finish()
    if mode != "control":
        raise ConfigError(f"--monitor {text}: mode '{mode}' (the human monitor) is not supported; "
                          "Only QMP is supported")
    return cid, pretty


def parse_args(argv: list[str]) -> DaemonConfig:
    """Parse the command line (``--opt value`` and ``--opt=value`` both work).

    :raises ConfigError: on any unknown option or bad value, naming it.
    """
    cfg = DaemonConfig()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            cfg.help = True
            continue
        if arg in ("-V", "--version"):
            from appliance import __version__

            raise HelpRequested(f"appliance storage-daemon version {__version__} "
                                "(qemu-storage-daemon 7.2 style command line)\n")
        name, eq, value = arg.partition("=")
        if name not in _OPTIONS_WITH_VALUE:
            raise ConfigError(f"unrecognized option '{arg}'")
        if not eq:
            if i >= len(argv):
                raise ConfigError(f"option '{name}' requires an argument")
            value = argv[i]
            i += 1
        if name == "--blockdev":
            cfg.blockdevs.append(BlockdevConfig.parse(value, option="--blockdev"))
        elif name == "--export":
            cfg.exports.append(ExportConfig.parse(value))
        elif name == "--chardev":
            cd = parse_chardev(value)
            if cd.id in cfg.chardevs:
                raise ConfigError(f"--chardev {value}: duplicate id '{cd.id}'")
            cfg.chardevs[cd.id] = cd
        elif name == "--monitor":
            cfg.monitors.append(parse_monitor(value))
        elif name == "--object":
            parse_object(value, cfg.iothreads)
        else:
            cfg.pidfile = value
    if not cfg.help:
        cfg.validate()
    return cfg


@dataclass(eq=False)
class Export:
    """A running export: the device, its back end and its socket."""

    config: ExportConfig
    backend: BlockBackend
    device: Any
    server: Any


class DaemonError(ApplianceError):
    """A run-time request (a QMP command) the daemon refuses; the message is qemu-storage-daemon's."""


class StorageDaemon:
    """The daemon as an object: open the nodes, serve the exports, close it all.

    ::

        async with StorageDaemon(parse_args([...])) as d:
            blk = d.exports["exp0"].device
            await d.add_blockdev(BlockdevConfig.parse(...))
            await d.add_export(ExportConfig(...))

    Nodes are held as their configurations (``config.blockdevs``) and opened
    when an export uses them, writable when a writable export does; the last
    export of a node closes it again (a later export reopens it in its mode).
    """

    def __init__(self, config: DaemonConfig) -> None:
        config.validate()
        self.config = config
        from appliance.storage import poll

        poll.bound_by_iothreads([config.iothreads[e.iothread] for e in config.exports if e.iothread])
        self.exports: dict[str, Export] = {}
        self._images: dict[str, OpenImage] = {}
        # Set by quit (QMP), a signal, or anyone who wants the daemon to end.
        self.stopped = asyncio.Event()

    @property
    def nodes(self) -> dict[str, BlockdevConfig]:
        """Node name → configuration, in the order they were added."""
        return {b.node_name: b for b in self.config.blockdevs}

    async def start(self) -> None:
        """Open every exported node and start listening.

        :raises ApplianceError: (a StorageError or VhostUserError) when a node
            cannot be opened or a socket cannot be created; everything opened
            so far is closed again.
        """
        try:
            writable = {e.node_name for e in self.config.exports if e.writable}
            for e in self.config.exports:
                await self._serve_export(e, write=e.node_name in writable)
        except BaseException:
            await self.close()
            raise

    async def _serve_export(self, e: ExportConfig, *, write: bool) -> Export:
        from appliance.virtio.vhost_user import VhostUserBackend, VhostUserServer

        opened = e.node_name not in self._images
        backend = await self._open(e.node_name, write=write)
        try:
            device = _make_device(e, backend)
            # Block requests may be replayed, so a restarted daemon can take
            # over what a killed one had in flight.
            server = VhostUserServer(e.path, VhostUserBackend(device, inflight=True))
            await server.start()
        except BaseException:
            if opened:
                await self._close_image(e.node_name)
            raise
        exp = Export(e, backend, device, server)
        self.exports[e.id] = exp
        return exp

    async def _open(self, node_name: str, *, write: bool) -> BlockBackend:
        if node_name in self._images:
            return self._images[node_name].backend
        src = resolve_blockdev(self.nodes, node_name, what="--export", check_path=False)
        if not write:
            src = replace(src, read_only=True)
        image = await open_source(src)
        self._images[node_name] = image
        return image.backend

    async def _close_image(self, node_name: str) -> None:
        image = self._images.pop(node_name, None)
        if image is not None:
            with contextlib.suppress(Exception):
                await image.close()

    # --- run-time changes (the QMP monitor) ------------------------------------------

    def add_blockdev(self, node: BlockdevConfig) -> None:
        """Add a node (``blockdev-add``); it is opened when exported.

        :raises DaemonError: On a duplicate name or a missing or wrong file node.
        """
        nodes = self.nodes
        if node.node_name in nodes:
            raise DaemonError(f"Duplicate nodes with node-name='{node.node_name}'")
        if node.file is not None:
            if node.file not in nodes:
                raise DaemonError(f"Cannot find device='{node.file}' nor node-name='{node.file}'")
            nodes[node.node_name] = node
            try:
                resolve_blockdev(nodes, node.node_name, what="blockdev-add", check_path=False)
            except ConfigError as err:
                raise DaemonError(str(err).split(": ", 1)[-1]) from None
        self.config.blockdevs.append(node)

    async def del_blockdev(self, node_name: str) -> None:
        """Remove a node (``blockdev-del``) that no export and no other node uses.

        :raises DaemonError: With qemu-storage-daemon's messages.
        """
        if node_name not in self.nodes:
            raise DaemonError(f"Failed to find node with node-name='{node_name}'")
        if any(e.config.node_name == node_name for e in self.exports.values()):
            raise DaemonError(f"Node {node_name} is in use")
        if any(b.file == node_name for b in self.config.blockdevs):
            raise DaemonError(f"Block device {node_name} is in use")
        await self._close_image(node_name)
        self.config.blockdevs = [b for b in self.config.blockdevs if b.node_name != node_name]

    async def add_export(self, e: ExportConfig) -> Export:
        """Serve a node on a new socket (``block-export-add``).

        :raises DaemonError: On a duplicate id or socket, a missing node, a
            writable export of a read-only node, or a socket that cannot be bound.
        :raises StorageError: When the image cannot be opened.
        """
        if e.id in self.exports:
            raise DaemonError(f"Block export id '{e.id}' is already in use")
        node = self.nodes.get(e.node_name)
        if node is None:
            raise DaemonError(f"Cannot find device='' nor node-name='{e.node_name}'")
        if any(x.config.path == e.path for x in self.exports.values()):
            raise DaemonError(f"Socket {e.path} is already used by another export")
        src = resolve_blockdev(self.nodes, e.node_name, what="block-export-add", check_path=False)
        if e.writable and src.read_only:
            raise DaemonError("Cannot export read-only node as writable")
        image = self._images.get(e.node_name)
        if e.writable and image is not None and image.backend.read_only:
            # One open image per node: switching a read-only one to read-write
            # under a running read-only export is not done.
            raise DaemonError(f"Node {e.node_name} is open read-only for another export; "
                              "delete that export first")
        from appliance.virtio.vhost_user import VhostUserError

        try:
            exp = await self._serve_export(e, write=e.writable)
        except VhostUserError as err:
            cause = err.__cause__
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(err)
            raise DaemonError(f"Failed to bind socket to {e.path}: {reason}") from err
        self.config.exports.append(e)
        return exp

    async def del_export(self, ident: str) -> None:
        """Stop serving an export (``block-export-del``): its socket goes, its front end is dropped.

        :raises DaemonError: When there is no such export.
        """
        exp = self.exports.pop(ident, None)
        if exp is None:
            raise DaemonError(f"Export '{ident}' is not found")
        self.config.exports = [e for e in self.config.exports if e.id != ident]
        with contextlib.suppress(Exception):
            await exp.server.close()
        if not any(x.config.node_name == exp.config.node_name for x in self.exports.values()):
            await self._close_image(exp.config.node_name)

    def quit(self) -> None:
        """End the daemon (``quit``): :func:`serve` returns 0 once the reply is out."""
        # Later, not now: the reply to quit goes out before the monitor closes.
        asyncio.get_running_loop().call_soon(self.stopped.set)

    async def close(self) -> None:
        """Stop serving (removing the sockets) and close the images."""
        for exp in list(self.exports.values()):
            with contextlib.suppress(Exception):
                await exp.server.close()
        self.exports.clear()
        for image in list(self._images.values()):
            with contextlib.suppress(Exception):
                await image.close()
        self._images.clear()

    async def __aenter__(self) -> StorageDaemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _make_device(e: ExportConfig, backend: BlockBackend) -> Any:
    from appliance.storage.blk import VirtioBlk

    return VirtioBlk(
        backend,
        num_queues=e.num_queues,
        read_only=not e.writable or backend.read_only,
        serial=e.serial or "",
        # This export's own blk_size (qemu-storage-daemon's option): another
        # export of the same node keeps its own.
        logical_block_size=e.logical_block_size,
    )


async def open_monitors(daemon: StorageDaemon) -> list[Any]:
    """Start each ``--monitor`` as a QMP server over the daemon's command table.

    :raises ConfigError: When a monitor socket cannot be opened.
    """
    from appliance.qmp.daemon_commands import COMMANDS
    from appliance.qmp.server import open_qmp_server

    servers: list[Any] = []
    try:
        for cid, pretty in daemon.config.monitors:
            servers.append(await open_qmp_server(
                daemon, daemon.config.chardevs[cid], pretty=pretty, what=f"--chardev id={cid}",
                prog="appliance storage-daemon", table=COMMANDS))
    except BaseException:
        for server in servers:
            await server.close()
        raise
    return servers


async def serve(config: DaemonConfig) -> int:
    """Run the daemon until SIGTERM, SIGINT or QMP ``quit``."""
    loop = asyncio.get_running_loop()
    daemon = StorageDaemon(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stopped.set)
    monitors: list[Any] = []
    wrote_pid = False
    try:
        async with daemon:
            monitors = await open_monitors(daemon)
            if config.pidfile:
                try:
                    with open(config.pidfile, "w", encoding="ascii") as f:
                        f.write(f"{os.getpid()}\n")
                except OSError as err:
                    # A runtime failure, as qemu-storage-daemon reports it (exit 1).
                    print(f"appliance storage-daemon: cannot create PID file {config.pidfile}: "
                          f"{err.strerror or err}", file=sys.stderr)
                    return 1
                wrote_pid = True
            await daemon.stopped.wait()
    finally:
        for server in monitors:
            with contextlib.suppress(Exception):
                await server.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if wrote_pid and config.pidfile:
            # Only our own file: one we could not write may be somebody else's.
            with contextlib.suppress(OSError):
                os.unlink(config.pidfile)
    return 0


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    if cfg.help:
        sys.stdout.write(USAGE)
        return 0
    if not cfg.exports and not cfg.monitors:
        raise ConfigError("no --export or --monitor given; nothing to serve")
    import logging

    logging.basicConfig(level=logging.WARNING, format="appliance storage-daemon: %(message)s")
    try:
        return asyncio.run(serve(cfg))
    except ConfigError:
        raise
    except ApplianceError as err:
        print(f"appliance storage-daemon: {err}", file=sys.stderr)
        return 1
