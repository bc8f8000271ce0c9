"""`appliance net-daemon`: serve virtio-net over vhost-user.

The network counterpart of ``appliance storage-daemon``: ``--netdev`` takes
the same options as ``appliance run -netdev`` (QEMU's syntax), ``--export
type=vhost-user-net`` puts a virtio-net device on a unix socket, and QEMU
plugs it in with ``-chardev socket,id=c,path=P -netdev
vhost-user,id=n,chardev=c,queues=N -device virtio-net-pci,netdev=n,mq=on``.
QEMU keeps the control queue; we serve the data queues.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any

from appliance.cli.options import parse_option
from appliance.errors import ApplianceError, ConfigError
from appliance.net.backend import FrameBackend
from appliance.net.netdev import NetdevConfig, TapNetdev, open_netdev, parse_netdev
from appliance.nic.config import FilterDumpConfig

log = logging.getLogger(__name__)

USAGE = """\
usage: appliance net-daemon [options]

Serve virtio-net devices to vhost-user front ends (QEMU, Cloud Hypervisor).

  --netdev TYPE,id=ID,...       a host network backend, as for 'appliance run -netdev':
                                tap, bridge, dgram, socket, stream, user
  --export type=vhost-user-net,id=ID,netdev=ID,addr.type=unix,addr.path=PATH[,queues=N]
                                serve netdev ID on a unix socket with N queue pairs
  --object filter-dump,id=ID,netdev=ID,file=PATH[,maxlen=N]
                                capture the netdev's frames to a pcap (a file, a FIFO
                                or a listening unix socket), as QEMU's filter-dump
  -h, --help                    show this help

Runs until SIGINT or SIGTERM, then removes its sockets.
"""


@dataclass(frozen=True)
class NetExport:
    id: str
    netdev: str
    path: str
    queues: int


def parse_export(text: str) -> NetExport:
    opts = parse_option("--export", text)
    kind = opts.require("type")
    if kind != "vhost-user-net":
        raise ConfigError(f"--export: type '{kind}' is not supported (use vhost-user-net)")
    ident = opts.require("id")
    netdev = opts.require("netdev")
    addr_type = opts.require("addr.type")
    if addr_type != "unix":
        raise ConfigError(f"--export: addr.type '{addr_type}' is not supported (use unix)")
    path = opts.require("addr.path")
    queues = opts.take_int("queues", 1, minimum=1) or 1
    opts.finish()
    return NetExport(ident, netdev, path, queues)


def parse_args(argv: list[str]) -> tuple[dict[str, NetdevConfig], list[NetExport]]:
    netdevs, exports, _ = parse_all(argv)
    return netdevs, exports


def parse_all(argv: list[str]) -> tuple[dict[str, NetdevConfig], list[NetExport], list[FilterDumpConfig]]:
    netdevs: dict[str, NetdevConfig] = {}
    exports: list[NetExport] = []
    dumps: list[FilterDumpConfig] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name in ("--netdev", "--export", "--object"):
            if eq:
                value = inline
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise ConfigError(f"option '{name}' needs a value")
            if name == "--netdev":
                cfg = parse_netdev(value, "--netdev")
                if cfg.id in netdevs:
                    raise ConfigError(f"--netdev: duplicate id '{cfg.id}'")
                netdevs[cfg.id] = cfg
            elif name == "--object":
                dumps.append(FilterDumpConfig.parse(value))
            else:
                exports.append(parse_export(value))
        else:
            raise ConfigError(f"unknown option '{arg}'")
        i += 1
    if not exports:
        raise ConfigError("nothing to do: give at least one --export")
    ids = set()
    for e in exports:
        if e.netdev not in netdevs:
            raise ConfigError(f"--export {e.id}: no netdev '{e.netdev}'")
        if e.id in ids:
            raise ConfigError(f"--export: duplicate id '{e.id}'")
        ids.add(e.id)
        nd = netdevs[e.netdev]
        if e.queues > 1 and not isinstance(nd, TapNetdev):
            raise ConfigError(f"--export {e.id}: queues={e.queues} needs a tap netdev")
    used = [e.netdev for e in exports]
    dup = {n for n in used if used.count(n) > 1}
    if dup:
        raise ConfigError(f"--export: netdev '{dup.pop()}' is exported twice")
    for d in dumps:
        if d.netdev not in netdevs:
            raise ConfigError(f"--object filter-dump,id={d.id}: no netdev '{d.netdev}'")
    return netdevs, exports, dumps


async def _close(owner: Any) -> None:
    for name in ("stop", "close"):
        fn = getattr(owner, name, None)
        if fn is not None:
            res = fn()
            if inspect.isawaitable(res):
                await res
            return


async def serve(
    netdevs: dict[str, NetdevConfig],
    exports: list[NetExport],
    stop: asyncio.Event,
    dumps: list[FilterDumpConfig] | None = None,
) -> None:
    """Open every export's netdev, serve it until ``stop`` is set, then tear down."""
    from appliance.net.capture import CapturingBackend, open_capture
    from appliance.nic.virtio_net import VirtioNet
    from appliance.virtio.vhost_user.backend import VhostUserBackend
    from appliance.virtio.vhost_user.server import VhostUserServer

    owners: list[Any] = []
    servers: list[VhostUserServer] = []
    try:
        for n, e in enumerate(exports):
            cfg = netdevs[e.netdev]
            queues = e.queues
            if isinstance(cfg, TapNetdev) and cfg.queues > queues:
                queues = cfg.queues
            backends, owner = await open_netdev(cfg, queues=queues)
            owners.append(owner)
            mine = [d for d in dumps or () if d.netdev == e.netdev]
            if mine:
                # One pcap per filter, shared by every queue pair of the netdev.
                writers = [await asyncio.to_thread(open_capture, d.file, maxlen=d.maxlen) for d in mine]
                wrapped: list[FrameBackend] = []
                for b in backends:
                    cap = CapturingBackend(b)
                    cap.writers.extend(writers)
                    wrapped.append(cap)
                backends = wrapped
            mac = bytes([0x52, 0x54, 0x00, 0x12, 0x35, 0x56 + n])
            device = VirtioNet(backends, mac, control_queue=False)
            server = VhostUserServer(e.path, VhostUserBackend(device))
            await server.start()
            servers.append(server)
            log.info("export %s: netdev %s on %s (%d queue pairs)", e.id, e.netdev, e.path, len(backends))
        await stop.wait()
    finally:
        for s in servers:
            await s.close()
        for o in owners:
            await _close(o)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(USAGE)
        return 0
    netdevs, exports, dumps = parse_all(argv)
    logging.basicConfig(level=logging.INFO, format="net-daemon: %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(netdevs, exports, stop, dumps)

    try:
        asyncio.run(run())
    except ApplianceError as err:
        if isinstance(err, ConfigError):
            raise
        print(f"appliance net-daemon: {err}", file=sys.stderr)
        return 1
    return 0
