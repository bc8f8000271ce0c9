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
SIGINT and removes its sockets on the way out.

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

from appliance.errors import ApplianceError, ConfigError
from appliance.storage.backend import BlockBackend
from appliance.storage.blockdev import (
    BlockdevConfig,
    OpenImage,
    open_source,
    parse_keyval_or_json,
    resolve_blockdev,
)

USAGE = """\
usage: appliance storage-daemon [options]

Serves block devices to other VMMs over vhost-user (qemu-storage-daemon syntax).

  -h, --help             show this help and exit
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
           [,logical-block-size=<bytes>][,serial=<str>]
                         serve a node as a vhost-user-blk device
  --pidfile <path>       write the daemon's pid to this file

Each --blockdev/--export also takes its JSON form, as qemu-storage-daemon does.
Runs until SIGTERM or SIGINT.
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

    @classmethod
    def parse(cls, text: str) -> ExportConfig:
        o = parse_keyval_or_json("--export", text, implied="type")
        kind = o.require("type")
        if kind != "vhost-user-blk":
            raise ConfigError(f"--export: type '{kind}' is not supported (vhost-user-blk)")
        ident = o.require("id")
        node = o.require("node-name")
        addr_type = o.require("addr.type")
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
        if lbs & (lbs - 1) or lbs > 32768:
            raise ConfigError(f"--export: logical-block-size={lbs} is not a power of two up to 32768")
        serial = o.take("serial")
        o.finish()
        return cls(ident, node, path, writable, num_queues, lbs, serial)


@dataclass(slots=True)
class DaemonConfig:
    blockdevs: list[BlockdevConfig] = field(default_factory=list)
    exports: list[ExportConfig] = field(default_factory=list)
    pidfile: str | None = None
    help: bool = False

    def validate(self) -> None:
        """Cross-option checks: unique names, existing references, no conflicting writers."""
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
            node = nodes.get(e.node_name)
            if node is None:
                raise ConfigError(f"--export: node '{e.node_name}' does not exist")
            if e.writable and resolve_blockdev(nodes, e.node_name, what="--export", check_path=False).read_only:
                raise ConfigError(f"--export: '{e.id}' is writable but node '{e.node_name}' is read-only")
            if e.writable:
                if e.node_name in writers:
                    raise ConfigError(f"--export: node '{e.node_name}' is exported writable twice")
                writers.add(e.node_name)


_OPTIONS_WITH_VALUE = {"--blockdev", "--export", "--pidfile"}


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
        name, eq, value = arg.partition("=")
        if name not in _OPTIONS_WITH_VALUE:
            raise ConfigError(f"unrecognized option '{arg}'")
        if not eq:
            if i >= len(argv):
                raise ConfigError(f"option '{name}' requires an argument")
            value = argv[i]
            i += 1
        if name == "--blockdev":
            cfg.blockdevs.append(BlockdevConfig.parse(value, option="--blockdev", allow_json=True))
        elif name == "--export":
            cfg.exports.append(ExportConfig.parse(value))
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


class StorageDaemon:
    """The daemon as an object: open the nodes, serve the exports, close it all.

    ::

        async with StorageDaemon(parse_args([...])) as d:
            blk = d.exports["exp0"].device
    """

    def __init__(self, config: DaemonConfig) -> None:
        config.validate()
        self.config = config
        self.exports: dict[str, Export] = {}
        self._images: dict[str, OpenImage] = {}

    async def start(self) -> None:
        """Open every exported node and start listening.

        :raises ApplianceError: (a StorageError or VhostUserError) when a node
            cannot be opened or a socket cannot be created; everything opened
            so far is closed again.
        """
        from appliance.virtio.vhost_user import VhostUserBackend, VhostUserServer

        try:
            writable = {e.node_name for e in self.config.exports if e.writable}
            for e in self.config.exports:
                backend = await self._open(e.node_name, write=e.node_name in writable)
                device = _make_device(e, backend)
                # Block requests may be replayed, so a restarted daemon can take
                # over what a killed one had in flight.
                server = VhostUserServer(e.path, VhostUserBackend(device, inflight=True))
                await server.start()
                self.exports[e.id] = Export(e, backend, device, server)
        except BaseException:
            await self.close()
            raise

    async def _open(self, node_name: str, *, write: bool) -> BlockBackend:
        if node_name in self._images:
            return self._images[node_name].backend
        nodes = {b.node_name: b for b in self.config.blockdevs}
        src = resolve_blockdev(nodes, node_name, what="--export", check_path=False)
        if not write:
            src = replace(src, read_only=True)
        image = await open_source(src)
        self._images[node_name] = image
        return image.backend

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

    if e.logical_block_size > backend.logical_block_size:
        # The device reports the backend's block size (blk_size); an export
        # asking for more raises it, as qemu-storage-daemon's option does.
        backend.logical_block_size = e.logical_block_size
    return VirtioBlk(
        backend,
        num_queues=e.num_queues,
        read_only=not e.writable or backend.read_only,
        serial=e.serial or "",
    )


async def serve(config: DaemonConfig) -> int:
    """Run the daemon until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with StorageDaemon(config):
            if config.pidfile:
                with open(config.pidfile, "w", encoding="ascii") as f:
                    f.write(f"{os.getpid()}\n")
            await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if config.pidfile:
            with contextlib.suppress(OSError):
                os.unlink(config.pidfile)
    return 0


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    if cfg.help:
        sys.stdout.write(USAGE)
        return 0
    if not cfg.exports:
        raise ConfigError("no --export given; nothing to serve")
    import logging

    logging.basicConfig(level=logging.WARNING, format="appliance storage-daemon: %(message)s")
    try:
        return asyncio.run(serve(cfg))
    except ConfigError:
        raise
    except ApplianceError as err:
        print(f"appliance storage-daemon: {err}", file=sys.stderr)
        return 1
