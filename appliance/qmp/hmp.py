"""The human monitor (HMP): QEMU's text commands, on a socket or through QMP.

Lab tools drive QEMU through it: vrnetlab and GNS3 start VMs with
``-monitor tcp:…,server,nowait`` or ``telnet:…`` and type ``stop``, ``cont``,
``set_link``, ``info status`` at a ``(qemu)`` prompt; ``virsh
qemu-monitor-command --hmp`` and ``qmp-shell -H`` send the same words through
QMP's ``human-monitor-command``. Both end in :func:`execute`.

On a socket the monitor behaves like QEMU's readline: it greets with a
banner and ``(qemu) ``, echoes what is typed by redrawing the line (cursor
back, the line, erase to the end), and on Enter prints ``\\r\\n``, the
command's output and a new prompt. Scripts that wait for the prompt and
skip the echo work unchanged. On ``telnet`` sockets it first offers what
QEMU's telnet server offers (it will echo and suppress go-ahead, binary both
ways) and drops the client's telnet commands from the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import ApplianceError
from appliance.machine import telnet
from appliance.machine.console import raw_terminal, restore_terminal
from appliance.machine.telnet import TelnetInput
from appliance.qmp import commands, netops
from appliance.qmp.server import QmpServer, QmpSpec

log = logging.getLogger(__name__)

PROMPT = b"(qemu) "
_V = commands.QEMU_VERSION
BANNER = (f"QEMU {_V['major']}.{_V['minor']}.{_V['micro']} monitor - type 'help' for more "
          "information\r\n").encode()
MAX_LINE = 4096  # QEMU's READLINE_CMD_BUF_SIZE
_ESC_BACK = b"\x1b[D"
_ERASE = b"\x1b[K"

# name|alias -> (arguments, help), in QEMU's `help` layout and words.
HELP = {
    "cont|c": ("", "resume emulation"),
    "help|?": ("[cmd]", "show the help"),
    "hostfwd_add": ("[netdev_id] [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport",
                    "redirect TCP or UDP connections from host to guest (requires -net user)"),
    "hostfwd_remove": ("[netdev_id] [tcp|udp]:[hostaddr]:hostport",
                       "remove host-to-guest TCP or UDP redirection"),
    "info": ("[subcommand]", "show various information about the system state"),
    "object_add": ("[qom-type=]type,id=str[,prop=value][,...]", "create QOM object"),
    "object_del": ("id", "destroy QOM object"),
    "quit|q": ("", "quit the emulator"),
    "set_link": ("name on|off", "change the link status of a network adapter"),
    "stop|s": ("", "stop emulation"),
    "system_powerdown": ("", "send system power down event"),
    "system_reset": ("", "reset the system"),
}
INFO_HELP = {
    "kvm": "show KVM information",
    "name": "show the current VM name",
    "network": "show the network state",
    "status": "show the current VM status (running|paused)",
    "usernet": "show user network stack connection states",
    "uuid": "show the current VM UUID",
    "version": "show the version of QEMU",
}
_NAMES = {alias: names for names in HELP for alias in names.split("|")}
_SPACE = " \t\n\v\f\r"  # C's isspace(), which QEMU's monitor splits at


async def execute(ctx: Any, line: str, *, only: frozenset[str] | None = None) -> str:
    """Run one HMP command line and return what QEMU would print (``\r\n`` line ends).

    Errors come back as text, as QEMU's monitor prints them; nothing raises.

    :param only: the commands (and ``info`` subcommands, as ``"info NAME"``)
        of a monitor with fewer than a VM's; the others are unknown to it.
    """
    name, end = command_name(line)
    if not name:
        return ""
    names = _NAMES.get(name)
    if names is None or not _has(only, names.split("|")[0]):
        return _unknown(line, end)
    word, rest = names.split("|")[0], line[end:]
    try:
        if word == "object_add":
            # Its argument is the rest of the line as typed (QEMU's "S" argument type).
            if not rest.strip(_SPACE):
                return _usage(name, "object_add: string expected")
            return await _object_add(ctx, rest.strip(_SPACE))
        if word == "info":
            return await _info(ctx, line, end, only)
        words = hmp_words(rest)
        if words is None:
            return _usage(name, f"{word}: string expected")
        return await _dispatch(ctx, [name, *words], only)
    except ApplianceError as err:  # QMP's errors too: QEMU prints them after "Error: "
        return f"Error: {err}\r\n"
    except Exception:  # noqa: BLE001 - a bug must not end the monitor
        log.exception("human monitor: %r failed", line)
        return "Error: internal error (see the log)\r\n"


def command_name(line: str, start: int = 0) -> tuple[str, int]:
    """The command name in ``line`` from ``start``, and the index just past it.

    Read as QEMU's get_command_name (monitor/hmp.c) reads it: white space
    skipped, then up to white space or ``/`` (``x/4i``); no quoting.
    """
    i, n = start, len(line)
    while i < n and line[i] in _SPACE:
        i += 1
    j = i
    while j < n and line[j] not in _SPACE and line[j] != "/":
        j += 1
    return line[i:j], j


def _unknown(line: str, end: int) -> str:
    # QEMU quotes the line from its very start (white space included) to the
    # end of the name it does not know: "unknown command: 'info  bogus'".
    return f"unknown command: '{line[:end]}'\r\n"


def _has(only: frozenset[str] | None, name: str) -> bool:
    return only is None or name in only


def hmp_words(text: str) -> list[str] | None:
    """The arguments of a command line as QEMU's monitor reads its string arguments
    (monitor/hmp.c, get_str): words split at white space, where a word that starts
    with a double quote runs to the closing quote, spaces included, and takes the
    escapes \\n, \\r, \\\\, \\' and \\". None for an unterminated quote or another
    escape, which QEMU refuses as "string expected"."""
    words: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _SPACE:
            i += 1
        if i == n:
            return words
        if text[i] != '"':
            j = i
            while j < n and text[j] not in _SPACE:
                j += 1
            words.append(text[i:j])
            i = j
            continue
        out: list[str] = []
        i += 1
        while i < n and text[i] != '"':
            if text[i] == "\\":
                code = text[i + 1 : i + 2]
                if code not in _ESCAPES:
                    return None
                out.append(_ESCAPES[code])
                i += 2
            else:
                out.append(text[i])
                i += 1
        if i == n:
            return None  # no closing quote
        words.append("".join(out))
        i += 1


_ESCAPES = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def _usage(word: str, problem: str) -> str:
    return f"{problem}\r\nTry \"help {word}\" for more information\r\n"


async def _dispatch(ctx: Any, words: list[str], only: frozenset[str] | None) -> str:
    names = _NAMES[words[0]]
    word, args = names.split("|")[0], words[1:]
    if word in ("stop", "cont", "system_reset", "system_powerdown", "quit"):
        if args:
            return _usage(words[0], f"{names}: extraneous characters at the end of line")
        await commands.COMMANDS[word].handler(ctx, {})
        return ""
    if word == "help":
        return help_text(args, only)
    if word == "set_link":
        if not args:
            return _usage(words[0], "set_link: string expected")
        if len(args) < 2 or args[1] not in ("on", "off"):
            return _usage(words[0], "Expected 'on' or 'off'")
        if len(args) > 2:
            return _usage(words[0], "set_link: extraneous characters at the end of line")
        netops.set_link(ctx.machine, args[0], args[1] == "on")
        return ""
    if word in ("hostfwd_add", "hostfwd_remove"):
        if not args:
            return _usage(words[0], f"{word}: string expected")
        if len(args) > 2:
            return _usage(words[0], f"{word}: extraneous characters at the end of line")
        netdev_id, rule = (args[0], args[1]) if len(args) == 2 else (None, args[0])
        net = _user_net(ctx, netdev_id)
        if isinstance(net, str):
            return net
        if word == "hostfwd_add":
            return await _hostfwd_add(net, rule)
        return _hostfwd_remove(net, rule)
    # object_del
    if not args:
        return _usage(words[0], "object_del: string expected")
    if len(args) > 1:
        return _usage(words[0], "object_del: extraneous characters at the end of line")
    netops.del_capture(ctx.machine, args[0])
    return ""


def help_text(args: list[str], only: frozenset[str] | None = None) -> str:
    """What ``help [cmd]`` / ``help info [what]`` prints; ``only``: the command and info names of a
    monitor with fewer commands than a VM's."""
    if args and args[0] == "info":
        items = sorted((k, v) for k, v in INFO_HELP.items() if only is None or f"info {k}" in only)
        if len(args) > 1:
            items = [(k, v) for k, v in items if k == args[1]]
            if not items:
                return f"unknown command: 'info {args[1]}'\r\n"
        return "".join(f"info {k}  -- {v}\r\n" for k, v in items)
    rows = []
    for names, (params, text) in sorted(HELP.items()):
        if args and args[0] not in names.split("|"):
            continue
        if only is not None and names.split("|")[0] not in only:
            continue
        rows.append(f"{names} {params} -- {text}\r\n" if params else f"{names}  -- {text}\r\n")
    if args and not rows:
        return f"unknown command: '{args[0]}'\r\n"
    return "".join(rows)


async def _info(ctx: Any, line: str, end: int, only: frozenset[str] | None) -> str:
    """``info`` and its subcommand, whose name is read like a command's (QEMU's sub_table)."""
    what, end = command_name(line, end)
    if not what:
        return help_text(["info"], only)
    if what not in INFO_HELP or not _has(only, f"info {what}"):
        return _unknown(line, end)
    if line[end:].strip(_SPACE):  # no info subcommand takes an argument
        return _usage(f"info {what}", f"{what}: extraneous characters at the end of line")
    if what == "status":
        status = (await commands.COMMANDS["query-status"].handler(ctx, {}))["status"]
        # QEMU says "paused (<reason>)" for every stopped state but a plain stop.
        if status == "running":
            return "VM status: running\r\n"
        return "VM status: paused\r\n" if status == "paused" else f"VM status: paused ({status})\r\n"
    if what == "name":
        name = getattr(getattr(ctx.machine, "config", None), "name", "")
        return f"{name}\r\n" if name else ""
    if what == "version":
        return f"{_V['major']}.{_V['minor']}.{_V['micro']}\r\n"
    if what == "kvm":
        return "kvm support: enabled\r\n"
    if what == "uuid":
        return f"{(await commands.COMMANDS['query-uuid'].handler(ctx, {}))['UUID']}\r\n"
    if what == "usernet":
        return netops.usernet_info(ctx.machine)
    return _network(ctx)  # "network", the last of INFO_HELP


def _network(ctx: Any) -> str:
    """``info network``: each NIC and the netdev it is wired to, in QEMU's lines and order:
    the hubs first, newest first (QEMU prints its hubs ahead of the rest), each hub's ports
    newest first; then each netdev without a NIC alone on its line (QEMU opens netdevs before
    NICs), then the NICs."""
    from appliance.machine.devices import HubNetdevSpec, PeerlessNetdevSpec
    from appliance.net.netdev import Unplugged

    specs = netops.nic_specs(ctx.machine)
    hubs: list[str] = []
    out: list[str] = []
    for spec in specs:
        if isinstance(spec, PeerlessNetdevSpec) and not isinstance(spec, HubNetdevSpec):
            out.append(f"{_netdev_line(spec)}\r\n")
    for spec in specs:
        if isinstance(spec, PeerlessNetdevSpec) or getattr(spec, "port", None) is not None:
            continue  # on a hub: listed with it
        nic = _nic_line(spec)
        if isinstance(spec.netdev, Unplugged):
            out.append(f"{nic}\r\n")
            continue
        netdev = _netdev_line(spec)
        if getattr(spec, "hub", -1) == 0:
            # A -net pair: both hang off hub 0, its ports listed newest first as QEMU does.
            ports = {spec.hub_port: nic, 1 - spec.hub_port: netdev}
            hubs.append("hub 0\r\n")
            hubs.extend(f" \\ hub0port{p}: {ports[p]}\r\n" for p in (1, 0))
            continue
        out.append(f"{nic}\r\n")
        out.append(f" \\ {netdev}\r\n")
    for hub in reversed(netops.hubs(ctx.machine)):
        hubs.append(f"hub {hub.id}\r\n")
        for port in reversed(hub.ports):
            peer = next((s for s in specs if getattr(s, "port", None) is port), None)
            if peer is None:
                hubs.append(f" \\ {port.name}\r\n")
            elif isinstance(peer, HubNetdevSpec):
                hubs.append(f" \\ {port.name}: {_netdev_line(peer)}\r\n")
            else:
                hubs.append(f" \\ {port.name}: {_nic_line(peer)}\r\n")
    return "".join(hubs + out)


def _nic_line(spec: Any) -> str:
    mac = getattr(spec.device, "mac", None)
    mac_text = ":".join(f"{b:02x}" for b in mac) if isinstance(mac, bytes | bytearray) else "?"
    # QEMU 7.2 shows no carrier state here (set_link leaves the line as it was).
    return f"{spec.name.removeprefix('virtio-net ')}: index=0,type=nic,model=virtio-net-pci,macaddr={mac_text}"


def _netdev_line(spec: Any) -> str:
    return f"{spec.netdev.id}: index=0,type={_netdev_info(spec.netdev, spec.owner)}{_filters(spec)}"


def _filters(spec: Any) -> str:
    """The netdev's filter-dump objects, in QEMU's block under its line (net.c print_net_client:
    each filter's QOM properties, in the order QEMU 7.2 lists them for filter-dump)."""
    captures = getattr(spec, "captures", None)
    if not captures:
        return ""
    return "\r\nfilters:" + "".join(
        f"\r\n  - {c.id}: type=filter-dump,file={c.file},maxlen={c.maxlen},position={c.position},"
        f"status={'on' if c.status else 'off'},insert={c.insert},netdev={c.netdev},queue={c.queue}"
        for c in captures)


# QEMU's default bridge helper (qemu-options.hx, -netdev bridge): QEMU 7.2 names it in the bridge's
# line; the appliance bridges its taps itself and runs no helper.
BRIDGE_HELPER = "/usr/lib/qemu/qemu-bridge-helper"


def _netdev_info(cfg: Any, owner: Any = None) -> str:
    """``TYPE,INFO`` as QEMU 7.2's print_net_client writes a netdev (its type, then the netdev's
    info_str, with the comma even when that is empty): net/tap.c, net/dgram.c, net/socket.c,
    net/stream.c and net/slirp.c each set their own. ``owner`` is the open netdev, for what
    only it knows (the kernel's tap name, a stream's peer)."""
    from appliance.net.netdev import BridgeNetdev, DgramNetdev, StreamNetdev, TapNetdev

    if isinstance(cfg, TapNetdev):
        if cfg.fds:
            return f"tap,fd={cfg.fds[0]}"
        name = getattr(owner, "name", "") or cfg.ifname or ""
        return f"tap,ifname={name},script={cfg.script or 'no'},downscript={cfg.downscript or 'no'}"
    if isinstance(cfg, BridgeNetdev):
        return f"tap,helper={BRIDGE_HELPER},br={cfg.bridge}"  # QEMU's bridge is a tap
    if isinstance(cfg, DgramNetdev):
        return f"{cfg.form},{_dgram_info(cfg)}"
    if isinstance(cfg, StreamNetdev):
        return f"{cfg.form},{_stream_info(cfg, getattr(owner, 'peer', None))}"
    c = cfg.config
    return f"user,net={c.net.network_address},restrict={'on' if c.restrict else 'off'}"


def _hostport(addr: Any) -> str:
    return addr if isinstance(addr, str) else f"{addr[0]}:{addr[1]}"


def _dgram_info(cfg: Any) -> str:
    if cfg.multicast:
        return f"socket: mcast={_hostport(cfg.remote)}" if cfg.form == "socket" else f"mcast={_hostport(cfg.remote)}"
    if cfg.form == "socket":
        return f"socket: udp={_hostport(cfg.remote)}"  # net_socket_udp_init names the peer only
    sep = ":" if isinstance(cfg.local, str) else "/"  # net/dgram.c: "udp=%s:%s" for unix paths
    return f"udp={_hostport(cfg.local)}{sep}{_hostport(cfg.remote)}"


def _stream_info(cfg: Any, peer: Any) -> str:
    """Nothing until a peer is there; then net/socket.c's or net/stream.c's words for it."""
    if peer is None:
        return ""
    if cfg.form == "socket":
        return f"socket: {'connection from' if cfg.listen else 'connect to'} {_hostport(peer)}"
    if isinstance(cfg.address, str):
        return f"unix:{cfg.address}"
    return f"tcp:{_hostport(peer)}"


def _user_net(ctx: Any, netdev_id: str | None) -> Any:
    """The user-mode network ``netdev_id`` names (the first without one), or QEMU's complaint."""
    from appliance.nat.stack import UserNetwork

    specs = netops.user_net_specs(ctx.machine)
    nets = [(s.netdev.id, s.owner) for s in specs if isinstance(s.owner, UserNetwork)]
    if netdev_id is not None:
        for ident, net in nets:
            if ident == netdev_id:
                return net
        if any(s.netdev.id == netdev_id for s in specs):
            return "invalid device specified\r\n"  # a netdev, but not a user one
        return f"unrecognized netdev id '{netdev_id}'\r\n"
    return nets[0][1] if nets else "user mode network stack not in use\r\n"


async def _hostfwd_add(net: Any, rule: str) -> str:
    from appliance.nat.config import HostfwdError

    try:
        await net.add_hostfwd(rule)
    except HostfwdError as err:
        return f"{err.detail}\r\n"
    except (ApplianceError, OSError):
        return f"Could not set up host forwarding rule '{rule}'\r\n"
    return ""


def _hostfwd_remove(net: Any, rule: str) -> str:
    try:
        found = net.remove_hostfwd(rule)
    except ApplianceError:
        return "invalid format\r\n"
    return f"host forwarding rule for {rule} {'removed' if found else 'not found'}\r\n"


async def _object_add(ctx: Any, spec: str) -> str:
    from appliance.cli.options import is_identifier, parse_option

    opts = parse_option("object_add", spec, implied="qom-type")
    kind = opts.take("qom-type")
    ident = opts.take("id")
    if kind != "filter-dump":
        return f"Error: Parameter 'qom-type' does not accept value '{kind}'\r\n"
    if not ident:
        return "Error: Parameter 'id' is missing\r\n"
    if not is_identifier(ident):
        # QEMU's id_wellformed() check, with the hint HMP prints under it.
        return ("Error: Parameter 'id' expects an identifier\r\n"
                "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\r\n")
    await netops.add_capture(ctx.machine, ident, dict(opts), hmp=True)
    return ""


# --- the readline side --------------------------------------------------------------


class LineEditor:
    """Bytes typed at the monitor -> (echo, finished lines), as QEMU's readline shows them.

    Characters go in at the cursor; backspace, the arrows (left/right move,
    up/down walk the history), home/end, delete and Ctrl-A/Ctrl-E edit; CR
    and LF each end a line; other control characters are ignored. After
    each key the line is redrawn QEMU's way: the cursor back to the start,
    the line, erase to the end, the cursor to its place.
    """

    HISTORY = 64

    def __init__(self, *, telnet: bool = False) -> None:
        self.buf = bytearray()
        self.pos = 0
        self._shown = b""  # the line as the client's screen has it
        self._shown_pos = 0
        self.history: list[bytes] = []
        self._hist = 0  # == len(history): editing a new line
        self._telnet = TelnetInput() if telnet else None
        self._esc = bytearray()  # an escape sequence being read

    def feed(self, data: bytes) -> tuple[bytes, list[str]]:
        echo = bytearray()
        lines: list[str] = []
        if self._telnet is not None:
            data = self._telnet.feed(data)
        for b in data:
            if self._esc:
                self._esc.append(b)
                if len(self._esc) == 2 and b not in (0x5B, 0x4F):
                    self._esc.clear()  # ESC and something else: dropped
                elif len(self._esc) > 2 and 0x40 <= b <= 0x7E or len(self._esc) > 16:
                    self._key(bytes(self._esc))
                    self._esc.clear()
                    self._update(echo)
                continue
            if b == 0x1B:
                self._esc.append(b)
                continue
            if b in (0x0D, 0x0A):
                echo += b"\r\n"
                line = bytes(self.buf)
                lines.append(line.decode("utf-8", "replace"))
                self._remember(line)
                self.buf, self.pos, self._shown, self._shown_pos = bytearray(), 0, b"", 0
                continue
            if b in (0x7F, 0x08):
                if self.pos:
                    del self.buf[self.pos - 1]
                    self.pos -= 1
            elif b == 0x01:  # Ctrl-A
                self.pos = 0
            elif b == 0x05:  # Ctrl-E
                self.pos = len(self.buf)
            elif b >= 0x20 and len(self.buf) < MAX_LINE - 1:
                self.buf.insert(self.pos, b)
                self.pos += 1
            self._update(echo)
        return bytes(echo), lines

    def restart(self) -> None:
        """Start a new, empty line (the one being typed is dropped; the history stays)."""
        self.buf, self.pos, self._shown, self._shown_pos = bytearray(), 0, b"", 0
        self._hist = len(self.history)

    def _key(self, seq: bytes) -> None:
        final = seq[-1:]
        if final == b"D" and self.pos:
            self.pos -= 1
        elif final == b"C" and self.pos < len(self.buf):
            self.pos += 1
        elif final in (b"A", b"B"):
            self._walk_history(-1 if final == b"A" else 1)
        elif final == b"H" or seq == b"\x1b[1~":
            self.pos = 0
        elif final == b"F" or seq == b"\x1b[4~":
            self.pos = len(self.buf)
        elif seq == b"\x1b[3~" and self.pos < len(self.buf):
            del self.buf[self.pos]

    def _walk_history(self, step: int) -> None:
        i = self._hist + step
        if i < 0 or i > len(self.history):
            return
        self._hist = i
        self.buf = bytearray(self.history[i] if i < len(self.history) else b"")
        self.pos = len(self.buf)

    def _remember(self, line: bytes) -> None:
        if line:
            if line in self.history:
                self.history.remove(line)
            self.history = (self.history + [line])[-self.HISTORY:]
        self._hist = len(self.history)

    def _update(self, echo: bytearray) -> None:
        if bytes(self.buf) != self._shown:
            echo += _ESC_BACK * self._shown_pos + self.buf + _ERASE
            self._shown, self._shown_pos = bytes(self.buf), len(self.buf)
        delta = self.pos - self._shown_pos
        echo += (b"\x1b[C" * delta) if delta > 0 else _ESC_BACK * -delta
        self._shown_pos = self.pos


class HmpSession:
    """One client at the ``(qemu)`` prompt."""

    def __init__(self, monitor: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 *, telnet: bool) -> None:
        self.monitor = monitor
        self.machine = monitor.machine
        self.negotiated = False  # QMP's: HMP clients never get QMP events
        self.reader = reader
        self.writer = writer
        self.telnet = telnet
        self.closed = False

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        self.monitor.emit(event, data)

    async def run(self) -> None:
        editor = LineEditor(telnet=self.telnet)
        self.writer.write((telnet.OFFER if self.telnet else b"") + BANNER + PROMPT)
        try:
            while not self.closed:
                data = await self.reader.read(4096)
                if not data:
                    break
                echo, lines = editor.feed(data)
                self.writer.write(echo)
                for line in lines:
                    if line.split() in (["quit"], ["q"]):
                        self.closed = True
                    out = await execute(self, line)
                    self.writer.write(out.encode() + (b"" if self.closed else PROMPT))
                    if self.closed:
                        break
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        except Exception:  # noqa: BLE001 - one client's trouble is not the VM's
            log.exception("human monitor session failed")
        finally:
            await self.close()

    async def close(self) -> None:
        self.monitor.sessions.discard(self)
        self.closed = True
        if self.writer.is_closing():
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.drain(), 1.0)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


class HmpServer(QmpServer):
    """Listens (or connects out) like the QMP server, but each client gets a ``(qemu)`` prompt."""

    def __init__(self, machine: Any, *, telnet: bool = False) -> None:
        super().__init__(machine)
        self.telnet = telnet
        self._saved_tty: list[Any] | None = None

    def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        return HmpSession(self, reader, writer, telnet=self.telnet)

    async def serve_stdio(self) -> None:
        """``-monitor stdio``: a terminal is put in raw mode (Ctrl-C still a signal), as QEMU's
        stdio chardev does, so that the prompt's own line editing and echo are the only ones."""
        if self._saved_tty is None:
            self._saved_tty = raw_terminal(signals=True)
        await super().serve_stdio()

    async def close(self) -> None:
        await super().close()
        saved, self._saved_tty = self._saved_tty, None
        restore_terminal(saved)


@dataclass(eq=False)
class HmpSpec(QmpSpec):
    """A human monitor as a machine DeviceSpec (``-monitor``, ``-mon mode=readline``)."""

    telnet: bool = False

    def _new_server(self) -> QmpServer | None:
        return HmpServer(self.machine, telnet=self.telnet)


class MuxMonitor:
    """The human monitor on the console's stdio (``-nographic``, ``-serial mon:stdio``).

    QEMU's mux chardev gives the keyboard to the guest at start; Ctrl-A c hands it here (the
    console backend calls :meth:`focus_in`), and back. The first switch prints the banner,
    each one a fresh prompt; switching away ends the line. Guest output keeps going to the
    terminal meanwhile. Commands run one at a time, in the order typed.
    """

    def __init__(self, machine: Any, write: Callable[[bytes], None]) -> None:
        self.machine = machine
        self.negotiated = False  # as HmpSession: no QMP events here
        self._write = write
        self._editor = LineEditor()
        self._greeted = False
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        pass  # a human monitor shows no QMP events

    def focus_in(self) -> None:
        self._editor.restart()  # as QEMU's readline_restart: the line gone, its history kept
        self._write((b"" if self._greeted else BANNER) + PROMPT)
        self._greeted = True

    def focus_out(self) -> None:
        self._write(b"\r\n")

    def feed(self, data: bytes) -> None:
        echo, lines = self._editor.feed(data)
        if echo:
            self._write(echo)
        for line in lines:
            self._lines.put_nowait(line)
        if lines and self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while not self._lines.empty():
                line = self._lines.get_nowait()
                out = await execute(self, line)
                self._write(out.encode() + PROMPT)
        finally:
            self._worker = None

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker


@dataclass(eq=False)
class MuxMonitorSpec:
    """:class:`MuxMonitor` as a machine DeviceSpec: attached to the machine's console when the
    machine opens its devices (its serial console must be a muxed stdio)."""

    machine: Any = field(default=None, repr=False)
    monitor: MuxMonitor | None = field(default=None, repr=False)

    def bind_machine(self, machine: Any) -> None:
        self.machine = machine

    def open(self) -> None:
        console = self.machine.console
        monitor = MuxMonitor(self.machine, console.write_host)
        if console.attach_monitor(monitor):
            self.monitor = monitor

    def attach(self, builder: Any, inst: Any) -> None:
        pass  # nothing on the guest's side

    async def close(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            await monitor.close()
