"""`appliance net-daemon`: serve virtio-net over vhost-user.

The network counterpart of ``appliance storage-daemon``: ``--netdev`` takes
the same options as ``appliance run -netdev`` (QEMU's syntax), ``--export
type=vhost-user-net`` puts a virtio-net device on a unix socket, and QEMU
plugs it in with ``-chardev socket,id=c,path=P -netdev
vhost-user,id=n,chardev=c,queues=N -device virtio-net-pci,netdev=n,mq=on``.
QEMU keeps the control queue; we serve the data queues. Front ends come and go
(QEMU killed and started again on the socket): a ``user`` netdev then ends what
the gone guest held, as QEMU's own ``-netdev user`` ends with QEMU
(:meth:`DaemonNic._front_end_gone`).

``--netdev hubport,id=P,hubid=N[,netdev=B]`` ports join exports and back ends on
one segment (:mod:`appliance.net.hub`): the guests of several front ends then share
one user network, something QEMU's per-VM libslirp cannot give them.

``--chardev socket,id=ID,path=P,server=on,wait=off --monitor chardev=ID``
(qemu-storage-daemon's syntax) adds a QMP monitor: the exports' NICs are
observed and steered at run time with the same commands as `appliance run`'s
NICs (:mod:`appliance.qmp.net_daemon_commands`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.cli.options import parse_option
from appliance.cli.storage_daemon import parse_chardev, parse_monitor
from appliance.errors import ApplianceError, ConfigError
from appliance.machine.config import ChardevConfig
from appliance.net.hub import join_hubports
from appliance.net.netdev import HubportNetdev, NetdevConfig, TapNetdev, open_netdev, parse_netdev
from appliance.nic.config import FilterDumpConfig

log = logging.getLogger(__name__)

USAGE = """\
usage: appliance net-daemon [options]

Serve virtio-net devices to vhost-user front ends (QEMU, Cloud Hypervisor).

  --netdev TYPE,id=ID,...       a host network backend, as for 'appliance run -netdev':
                                tap, bridge, dgram, socket, stream, user (a tap runs
                                script=/downscript=, QEMU's /etc/qemu-ifup and
                                /etc/qemu-ifdown when none is given; script=no for none)
  --netdev hubport,id=ID,hubid=N[,netdev=ID]
                                a port of hub N: export the port, or give it a back end;
                                every frame goes out of every other port, so several
                                front ends' guests share one segment (one user network,
                                each guest its own lease, or a tap or a UDP link)
  --export type=vhost-user-net,id=ID,netdev=ID,addr.type=unix,addr.path=PATH[,queues=N]
                                serve netdev ID on a unix socket with N queue pairs
  --object filter-dump,id=ID,netdev=ID,file=PATH[,maxlen=N]
                                capture the netdev's frames to a pcap (a file, a FIFO
                                or a listening unix socket), as QEMU's filter-dump
  --chardev socket,id=ID,path=PATH[,server=on|off][,wait=on|off]
  --chardev socket,id=ID,host=HOST,port=PORT[,server=on|off][,wait=on|off]
                                a socket for --monitor (server,nowait also accepted)
  --monitor [chardev=]ID[,mode=control][,pretty=on|off]
                                a QMP monitor on that socket: qmp_capabilities,
                                query-version, query-commands, set_link (export or
                                netdev id; off drops frames both ways, while the
                                carrier a QEMU guest sees stays QEMU's own),
                                object-add/object-del filter-dump,
                                x-query-usernet, x-appliance-query-usernet,
                                x-appliance-query-nics, human-monitor-command
                                (info usernet, info version, set_link,
                                hostfwd_add, hostfwd_remove, quit), quit
  -h, --help                    show this help

Runs until SIGINT, SIGTERM or the QMP command quit, then removes its sockets.
"""


def announced_queue_num(pairs: int) -> int | None:
    """What an export of ``pairs`` queue pairs answers to GET_QUEUE_NUM (None: its ring count).

    QEMU's vhost-user netdev (``vhost_user_start``) and DPDK's virtio-user take the answer
    as queue pairs and refuse a ``queues=`` above it. With several pairs the device offers
    MQ and the guest drives every pair QEMU made, so the answer must be the pairs: answering
    rings let ``queues=4`` start on a 2-pair export, and the guest's traffic on the pairs we
    do not have was lost. With one pair there is no MQ: the guest drives pair 0 alone and
    QEMU starts only its rings, so the ring count (2) is answered, and ``queues=2`` starts.
    """
    return pairs if pairs > 1 else None


@dataclass(frozen=True)
class NetExport:
    id: str
    netdev: str
    path: str
    queues: int


@dataclass
class NetDaemonArgs:
    """The whole command line."""

    netdevs: dict[str, NetdevConfig] = field(default_factory=dict)
    exports: list[NetExport] = field(default_factory=list)
    dumps: list[FilterDumpConfig] = field(default_factory=list)
    chardevs: dict[str, ChardevConfig] = field(default_factory=dict)
    # (chardev id, pretty) per --monitor
    monitors: list[tuple[str, bool]] = field(default_factory=list)


def parse_export(text: str) -> NetExport:
    opts = parse_option("--export", text, implied="type")  # [type=]vhost-user-net, as qemu-storage-daemon
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
    a = parse_command_line(argv)
    return a.netdevs, a.exports


def parse_all(argv: list[str]) -> tuple[dict[str, NetdevConfig], list[NetExport], list[FilterDumpConfig]]:
    a = parse_command_line(argv)
    return a.netdevs, a.exports, a.dumps


_OPTIONS = ("--netdev", "--export", "--object", "--chardev", "--monitor")


def parse_command_line(argv: list[str]) -> NetDaemonArgs:
    """Parse and cross-check the command line (``--opt value`` and ``--opt=value``).

    :raises ConfigError: On an unknown option or a bad value, naming it.
    """
    a = NetDaemonArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name not in _OPTIONS:
            raise ConfigError(f"unknown option '{arg}'")
        if eq:
            value = inline
        elif i + 1 < len(argv):
            i += 1
            value = argv[i]
        else:
            raise ConfigError(f"option '{name}' needs a value")
        if name == "--netdev":
            cfg = parse_netdev(value, "--netdev")
            if cfg.id in a.netdevs:
                raise ConfigError(f"--netdev: duplicate id '{cfg.id}'")
            a.netdevs[cfg.id] = cfg
        elif name == "--object":
            a.dumps.append(FilterDumpConfig.parse(value))
        elif name == "--chardev":
            cd = parse_chardev(value)
            if cd.id in a.chardevs:
                raise ConfigError(f"--chardev {value}: duplicate id '{cd.id}'")
            a.chardevs[cd.id] = cd
        elif name == "--monitor":
            a.monitors.append(parse_monitor(value))
        else:
            a.exports.append(parse_export(value))
        i += 1
    _validate(a)
    return a


def _validate(a: NetDaemonArgs) -> None:
    if not a.exports:
        raise ConfigError("nothing to do: give at least one --export")
    used: set[str] = set()
    for cid, _ in a.monitors:
        if cid not in a.chardevs:
            raise ConfigError(f'--monitor chardev={cid}: chardev "{cid}" not found')
        if cid in used:
            raise ConfigError(f"--monitor chardev={cid}: Device '{cid}' is in use")
        used.add(cid)
    _, _, peers = join_hubports(a.netdevs.items(), _hubport_option)
    ids = set()
    for e in a.exports:
        if e.netdev not in a.netdevs:
            raise ConfigError(f"--export {e.id}: no netdev '{e.netdev}'")
        if e.id in ids:
            raise ConfigError(f"--export: duplicate id '{e.id}'")
        ids.add(e.id)
        nd = a.netdevs[e.netdev]
        if e.netdev in peers or isinstance(nd, HubportNetdev) and nd.netdev is not None:
            # A hub port has one peer: its back end, or the export's device (QEMU's words).
            raise ConfigError(f"--export {e.id}: Property 'virtio-net-device.netdev' can't take value "
                              f"'{e.netdev}', it's in use")
        if e.queues > 1 and not isinstance(nd, TapNetdev):
            raise ConfigError(f"--export {e.id}: queues={e.queues} needs a tap netdev")
    used_nd = [e.netdev for e in a.exports]
    dup = {n for n in used_nd if used_nd.count(n) > 1}
    if dup:
        raise ConfigError(f"--export: netdev '{dup.pop()}' is exported twice")
    dump_ids: set[str] = set()
    lists: dict[str, list[FilterDumpConfig]] = {}
    for d in a.dumps:
        if d.netdev not in a.netdevs:
            # QEMU's words for -object filter-dump (netfilter_complete), with the option named.
            raise ConfigError(f"--object filter-dump,id={d.id}: Parameter 'netdev' expects a network backend id")
        if d.id in dump_ids:
            raise ConfigError(f"--object filter-dump,id={d.id}: duplicate id '{d.id}'")
        captures = lists.setdefault(d.netdev, [])
        try:
            captures.insert(d.place(captures, dump_ids), d)
        except ConfigError as err:
            raise ConfigError(f"--object filter-dump,id={d.id}: {err}") from None
        dump_ids.add(d.id)
    for d in a.dumps:
        nd = a.netdevs[d.netdev]
        if isinstance(nd, HubportNetdev) and nd.netdev is not None:
            raise ConfigError(f"--object filter-dump,id={d.id}: hub port '{d.netdev}' has netdev "
                              f"'{nd.netdev}' for its peer; capture on '{nd.netdev}'")
    # Each netdev's filters in the order of its filter list (position=, insert=), as QEMU keeps them.
    a.dumps = [d for captures in lists.values() for d in captures]


def _hubport_option(ident: str) -> str:
    return f"--netdev hubport,id={ident}"


async def _close(owner: Any) -> None:
    for name in ("stop", "close"):
        fn = getattr(owner, name, None)
        if fn is not None:
            res = fn()
            if inspect.isawaitable(res):
                await res
            return


@dataclass(eq=False)
class DaemonNic:
    """One export: a virtio-net device on its netdev, behind its vhost-user socket.

    Shaped like :class:`appliance.machine.devices.NicSpec` (``netdev``,
    ``name``, ``owner``, ``backends``, ``device``, ``captures``, ``writers``),
    so :mod:`appliance.qmp.netops` finds it by export or netdev id, captures
    it and reads its user-mode stack the same way as a VM's NIC.
    """

    export: NetExport
    netdev: NetdevConfig
    mac: bytes
    captures: list[FilterDumpConfig] = field(default_factory=list)
    owner: Any = field(default=None, repr=False)
    backends: list[Any] = field(default_factory=list, repr=False)
    writers: list[Any] = field(default_factory=list, repr=False)
    device: Any = field(default=None, repr=False)
    server: Any = field(default=None, repr=False)
    port: Any = field(default=None, repr=False)  # on a hub (appliance.net.hub): the HubPort it uses
    # On a hub: the back ends beside it (HubNetdevSpec), told when this export's guest goes.
    hub_peers: list[Any] = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        # netops.nic_names: the export id is the device's name.
        return f"virtio-net {self.export.id}"

    @property
    def link_up(self) -> bool:
        return self.device is None or bool(self.device.link_up)

    async def open(self) -> None:
        """Open the netdev and its captures, make the device and listen on the socket."""
        from appliance.nat import UserNetwork
        from appliance.net.capture import open_capture, with_captures
        from appliance.nic.virtio_net import VirtioNet
        from appliance.virtio.vhost_user.backend import VhostUserBackend
        from appliance.virtio.vhost_user.server import VhostUserServer

        e = self.export
        queues = e.queues
        if isinstance(self.netdev, TapNetdev) and self.netdev.queues > queues:
            queues = self.netdev.queues
        if self.port is not None:
            side = self.port.connect_nic()
            backends, self.owner = [side], side
        else:
            backends, self.owner = await open_netdev(self.netdev, queues=queues)
        if isinstance(self.owner, UserNetwork):
            self.owner.yield_after_host_wakeup = True  # a process of its own: see UserNetwork
        for d in self.captures:
            # One pcap per filter, shared by every queue pair of the netdev.
            self.writers.append(await asyncio.to_thread(open_capture, Path(d.file), maxlen=d.maxlen,
                                                        queue=d.queue, status=d.status))
        self.backends = with_captures(backends, self.writers)
        self.device = VirtioNet(self.backends, self.mac, control_queue=False, yield_after_rx_irq=True)
        # Nothing else here runs Python threads: kicks are read letting the GIL go (cheaper cold).
        backend = VhostUserBackend(self.device, queue_num=announced_queue_num(len(self.backends)),
                                   single_threaded=True)
        self.server = VhostUserServer(e.path, backend, on_disconnect=self._front_end_gone)
        await self.server.start()
        log.info("export %s: netdev %s on %s (%d queue pairs)", e.id, e.netdev, e.path, len(self.backends))

    def _front_end_gone(self) -> None:
        """The front end disconnected: its VMM exited (killed, powered off, restarted), taking the
        guest with it. A user-mode stack ends that guest's connections and forgets its leases
        (:meth:`appliance.nat.UserNetwork.guest_gone`), as QEMU's own ``-netdev user`` ends with
        QEMU; a tap or socket netdev keeps nothing of a guest's."""
        if self.port is not None:
            # A hub's user network serves other guests too: only this one's flows end.
            macs = getattr(self.owner, "guest_macs", {})
            for spec in self.hub_peers:
                left = getattr(spec.owner, "guest_left", None)
                if left is not None:
                    for mac in macs:
                        left(mac)
            macs.clear()
            return
        gone = getattr(self.owner, "guest_gone", None)
        if gone is not None:
            gone()

    def set_link(self, up: bool) -> None:
        """QMP ``set_link``: the device's status bit, and frames dropped both ways while down."""
        device = self.device
        if device is None:
            return
        device.set_link(up)

    async def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.close()
        for w in self.writers:
            with contextlib.suppress(Exception):
                w.close()
        self.writers.clear()
        self.backends = []
        self.device = None
        owner, self.owner = self.owner, None
        if owner is not None:
            await _close(owner)


class NetDaemon:
    """The daemon as an object: its NICs (``nics``, one per export) and its end.

    ::

        daemon = NetDaemon(netdevs, exports, dumps)
        await daemon.start()
        ...
        await daemon.close()

    The QMP monitor (:mod:`appliance.qmp.net_daemon_commands`) gets it as
    its machine.
    """

    def __init__(
        self,
        netdevs: dict[str, NetdevConfig],
        exports: list[NetExport],
        dumps: list[FilterDumpConfig] | None = None,
    ) -> None:
        from appliance.machine.devices import HubNetdevSpec

        # Hubs join exports and back ends on one segment: several front ends' guests on one
        # user network (each its own lease), or beside a tap or a UDP link.
        self.hubs, ports, back_ends = join_hubports(netdevs.items(), _hubport_option)
        # The back ends behind hub ports, opened before the exports and closed after them; the
        # monitor finds them beside the exports (info usernet, hostfwd_add, set_link, captures).
        self.hub_netdevs = [
            HubNetdevSpec(netdevs[ident], name=f"netdev {ident}", hub=port.hub.id, port=port,
                          captures=[d for d in dumps or () if d.netdev == ident])
            for ident, port in back_ends.items()]
        self.nics: list[DaemonNic] = []
        for n, e in enumerate(exports):
            mac = bytes([0x52, 0x54, 0x00, 0x12, 0x35, (0x56 + n) & 0xFF])
            mine = [d for d in dumps or () if d.netdev == e.netdev]
            on = ports.get(e.netdev)
            beside = [s for s in self.hub_netdevs if on is not None and s.port.hub is on.hub]
            self.nics.append(DaemonNic(e, netdevs[e.netdev], mac, mine, port=on, hub_peers=beside))
        # Set by quit (QMP), a signal, or anyone who wants the daemon to end.
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        """Serve every export; on a failure what was opened is closed again."""
        try:
            for spec in self.hub_netdevs:
                await spec.open()
            for nic in self.nics:
                await nic.open()
        except BaseException:
            await self.close()
            raise

    def quit(self) -> None:
        """End the daemon (QMP ``quit``) once the reply is out."""
        asyncio.get_running_loop().call_soon(self.stopped.set)

    async def close(self) -> None:
        for nic in self.nics:
            await nic.close()
        for spec in self.hub_netdevs:
            await spec.close()


async def open_monitors(daemon: NetDaemon, chardevs: dict[str, ChardevConfig],
                        monitors: list[tuple[str, bool]]) -> list[Any]:
    """Start each ``--monitor`` as a QMP server over the net-daemon's command table.

    :raises ConfigError: When a monitor socket cannot be opened.
    """
    from appliance.qmp.net_daemon_commands import COMMANDS
    from appliance.qmp.server import open_qmp_server

    servers: list[Any] = []
    try:
        for cid, pretty in monitors:
            servers.append(await open_qmp_server(
                daemon, chardevs[cid], pretty=pretty, what=f"--chardev id={cid}",
                prog="appliance net-daemon", table=COMMANDS))
    except BaseException:
        for server in servers:
            await server.close()
        raise
    return servers


async def serve(
    netdevs: dict[str, NetdevConfig],
    exports: list[NetExport],
    stop: asyncio.Event,
    dumps: list[FilterDumpConfig] | None = None,
    *,
    chardevs: dict[str, ChardevConfig] | None = None,
    monitors: list[tuple[str, bool]] | None = None,
) -> None:
    """Open every export's netdev, serve it until ``stop`` is set (or QMP ``quit``), then tear down."""
    daemon = NetDaemon(netdevs, exports, dumps)
    servers: list[Any] = []
    waiters: list[asyncio.Task[Any]] = []
    try:
        await daemon.start()
        servers = await open_monitors(daemon, chardevs or {}, monitors or [])
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(daemon.stopped.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        for s in servers:
            with contextlib.suppress(Exception):
                await s.close()
        await daemon.close()


def wants_help(argv: list[str]) -> bool:
    """-h or --help where an option may stand (not as another option's value, e.g. a path)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            return True
        i += 2 if arg in _OPTIONS else 1
    return False


def main(argv: list[str]) -> int:
    if wants_help(argv):
        sys.stdout.write(USAGE)
        return 0
    args = parse_command_line(argv)
    logging.basicConfig(level=logging.INFO, format="net-daemon: %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.netdevs, args.exports, stop, args.dumps, chardevs=args.chardevs, monitors=args.monitors)

    try:
        asyncio.run(run())
    except ApplianceError as err:
        if isinstance(err, ConfigError):
            raise
        print(f"appliance net-daemon: {err}", file=sys.stderr)
        return 1
    return 0
