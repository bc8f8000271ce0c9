"""``-netdev`` in QEMU's syntax: parse each type to a config, open it to backends.

Types: ``tap``, ``bridge``, ``dgram``, ``socket`` (``udp=``/``listen=``/
``connect=``), ``stream`` and ``user``. :func:`parse_netdev` refuses unknown
types and keys by name (exit code 2 through :class:`ConfigError`);
:func:`open_netdev` turns a config into one :class:`FrameBackend` per queue
pair. Only taps carry more than one queue; QEMU's other backends are
single-queue too.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from appliance.cli.json_types import List, Required, Union, check_text
from appliance.cli.options import OptionDict, is_identifier, parse_option, parse_size, split_option
from appliance.errors import ConfigError, HelpRequested
from appliance.net.backend import FrameBackend

# Netdev ids are QEMU identifiers of at most this many characters.
_ID_MAX = 128
_IFNAME = re.compile(r"^[^\s/:]{1,15}$")
MAX_TAP_QUEUES = 16


def _check_id(what: str, ident: str, implicit: str | None = None, is_json: bool = False) -> str:
    if is_json:
        return ident  # QEMU 7.2 checks the id of the key=value form only (QemuOpts' id rules)
    # Only the id -nic or -net makes for itself may be outside QEMU's identifiers (``#netN``).
    if not (is_identifier(ident) and len(ident) <= _ID_MAX) and ident != implicit:
        # QEMU's words, with the id in the option shown (QEMU shows the whole option).
        raise ConfigError(f"{what},id={ident}: Parameter 'id' expects an identifier")
    return ident


def _ifname(what: str, key: str, name: str | None) -> str | None:
    if name is not None and not _IFNAME.match(name):
        raise ConfigError(f"{what}: invalid {key} '{name}'")
    return name


def _port(what: str, key: str, text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise ConfigError(f"{what}: invalid {key} '{text}'") from None
    if not 0 <= n <= 65535:
        raise ConfigError(f"{what}: invalid {key} '{text}'")
    return n


def _host(what: str, key: str, text: str, *, v6: bool = False) -> str:
    if text in ("", "localhost"):
        return "127.0.0.1" if text == "localhost" else "0.0.0.0"
    if v6 and ":" in text:
        try:
            return str(ipaddress.IPv6Address(text.strip("[]")))
        except ValueError:
            raise ConfigError(f"{what}: invalid {key} '{text}'") from None
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        if not re.match(r"^[A-Za-z0-9.-]{1,253}$", text):
            raise ConfigError(f"{what}: invalid {key} '{text}'") from None
    return text


def _int32(what: str, key: str, text: str) -> int:
    """An int32 property as QEMU's visitor reads one (qemu_strtoi64, base 0, then the range)."""
    from appliance.qemu_numbers import NumberError, strtoi64

    try:
        n = strtoi64(text)
    except NumberError:
        raise ConfigError(f"{what}: Parameter '{key}' expects an int64 value") from None
    if not -(2**31) <= n < 2**31:
        raise ConfigError(f"{what}: Parameter '{key}' expects int32_t")
    return n


def _hostport(what: str, key: str, text: str, *, host_optional: bool = False) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or (not host and not host_optional):
        raise ConfigError(f"{what}: {key} '{text}' is not HOST:PORT")
    return _host(what, key, host), _port(what, key, port)


@dataclass(frozen=True, slots=True)
class TapNetdev:
    SYNTAX: ClassVar[str] = (
        "tap,id=str[,ifname=name][,br=bridge][,script=no][,downscript=no][,vnet_hdr=on|off]"
        "[,queues=n][,vhost=off][,sndbuf=bytes][,poll-us=n] | tap,id=str,fd=h|fds=h:h..."
    )
    id: str
    ifname: str | None = None
    bridge: str | None = None
    vnet_hdr: bool = True
    queues: int = 1
    fds: tuple[int, ...] = ()  # inherited tap queues (fd=, fds=)
    sndbuf: int | None = None
    script: str | None = None  # run with the tap's name once it is up (None: none)
    downscript: str | None = None  # run with its name before it goes


@dataclass(frozen=True, slots=True)
class BridgeNetdev:
    SYNTAX: ClassVar[str] = "bridge,id=str[,br=bridge]"
    id: str
    bridge: str = "br0"


@dataclass(frozen=True, slots=True)
class DgramNetdev:
    """A datagram link: UDP (``(host, port)``) or a unix datagram socket (a path).

    ``remote`` a multicast group makes it a shared segment: every member
    gets every frame (``local`` then only names the interface address).
    """

    SYNTAX: ClassVar[str] = (
        "dgram,id=str,local.type=inet,local.host=addr,local.port=port"
        "[,remote.type=inet,remote.host=addr,remote.port=port]"
        " | dgram,id=str,local.type=unix,local.path=path,remote.type=unix,remote.path=path"
        " | dgram,id=str,remote.type=inet,remote.host=mcast-group,remote.port=port[,local.type=inet,local.host=addr]"
    )
    id: str
    local: tuple[str, int] | str | None
    remote: tuple[str, int] | str | None
    form: str = field(default="dgram", compare=False)  # "socket" for -netdev socket,udp=|mcast=

    @property
    def multicast(self) -> bool:
        return isinstance(self.remote, tuple) and is_multicast(self.remote[0])


def is_multicast(host: str) -> bool:
    """Whether ``host`` is an IPv4 multicast group (224.0.0.0/4)."""
    try:
        return ipaddress.IPv4Address(host).is_multicast
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class StreamNetdev:
    SYNTAX: ClassVar[str] = (
        "stream,id=str,server=on|off,addr.type=inet,addr.host=host,addr.port=port[,reconnect=s]"
        " | stream,id=str,server=on|off,addr.type=unix,addr.path=path"
    )
    id: str
    address: tuple[str, int] | str
    listen: bool
    reconnect: float = 1.0
    form: str = field(default="stream", compare=False)  # "socket" for -netdev socket,listen=|connect=


@dataclass(frozen=True, slots=True)
class UserNetdev:
    id: str
    config: Any = field(compare=False)


@dataclass(frozen=True, slots=True)
class HubportNetdev:
    """A port of QEMU's hub ``hubid`` (:mod:`appliance.net.hub`), with ``netdev`` as its peer, or
    the NIC that names it, or nothing."""

    SYNTAX: ClassVar[str] = "hubport,id=str,hubid=n[,netdev=id]"
    id: str
    hubid: int
    netdev: str | None = None


@dataclass(frozen=True, slots=True)
class Unplugged:
    """What a NIC without a netdev has (QEMU warns "nic … has no peer" and runs it): a cable
    to nowhere. No option makes one."""

    id: str = ""


NetdevConfig = TapNetdev | BridgeNetdev | DgramNetdev | StreamNetdev | UserNetdev | HubportNetdev | Unplugged
NetdevType = Literal["tap", "bridge", "dgram", "socket", "stream", "user", "hubport"]
TYPES: tuple[str, ...] = ("tap", "bridge", "dgram", "socket", "stream", "user", "hubport")
# QEMU 7.2's NetClientDriver on Linux (qapi/net.json): a type outside it QEMU's QAPI refuses in its
# own words; one inside it that is not ours is refused as not supported.
QEMU_TYPES = frozenset({"none", "nic", "user", "tap", "l2tpv3", "socket", "stream", "dgram", "vde", "bridge",
                        "hubport", "netmap", "vhost-user", "vhost-vdpa"})
HELP_ORDER = ("socket", "stream", "dgram", "hubport", "tap", "user", "bridge")  # as `-netdev help` lists them

# SocketAddress (qapi/sockets.json), for stream's addr and dgram's local and remote.
_SOCKET_ADDRESS = Union("type", {"type": "string"}, {
    "inet": {"host": "string", "port": "string", "numeric": "boolean", "to": "uint16",
             "ipv4": "boolean", "ipv6": "boolean", "keep-alive": "boolean", "mptcp": "boolean"},
    "unix": {"path": "string", "abstract": "boolean", "tight": "boolean"},
    "vsock": {"cid": "string", "port": "string"},
    "fd": {"str": "string"},
})
# NetdevUserOptions: QEMU wants each item of a list of strings as a String object
# ({"str": "tcp::22-:22"}); the key=value form's alias ipv6-net is not a member.
_STRINGS = List({"str": Required("string")})
_USER: dict[str, object] = {
    "hostname": "string", "restrict": "boolean", "ipv4": "boolean", "ipv6": "boolean",
    "ip": "string", "net": "string", "host": "string", "tftp": "string", "bootfile": "string",
    "dhcpstart": "string", "dns": "string", "dnssearch": _STRINGS, "domainname": "string",
    "ipv6-prefix": "string", "ipv6-prefixlen": "integer", "ipv6-host": "string", "ipv6-dns": "string",
    "smb": "string", "smbserver": "string", "hostfwd": _STRINGS, "guestfwd": _STRINGS,
    "tftp-server-name": "string",
}
# Netdev (qapi/net.json, QEMU 7.2), its members in QAPI's order, for the types here and
# vhost-user: what type the JSON form's members must have (cli.json_types). Each branch holds all
# of 7.2's members, so the check is closed (an unknown one is refused in QEMU's words). stream's
# reconnect is 8.0's member (7.2 has none).
NETDEV = Union("type", {"id": "string", "type": "string"}, {
    "tap": {"ifname": "string", "fd": "string", "fds": "string", "script": "string",
            "downscript": "string", "br": "string", "helper": "string", "sndbuf": "size",
            "vnet_hdr": "boolean", "vhost": "boolean", "vhostfd": "string", "vhostfds": "string",
            "vhostforce": "boolean", "queues": "uint32", "poll-us": "uint32"},
    "socket": {"fd": "string", "listen": "string", "connect": "string", "mcast": "string",
               "localaddr": "string", "udp": "string"},
    "stream": {"addr": _SOCKET_ADDRESS, "server": "boolean", "reconnect": "integer"},
    "dgram": {"local": _SOCKET_ADDRESS, "remote": _SOCKET_ADDRESS},
    "bridge": {"br": "string", "helper": "string"},
    "vhost-user": {"chardev": "string", "vhostforce": "boolean", "queues": "integer"},
    "hubport": {"hubid": "int32", "netdev": "string"},
    "user": _USER,
})


def user_flags(text: str) -> tuple[str, ...]:
    """The keys of ``-netdev user`` taken bare (QEMU's option parser reads ``key`` as key=on and
    ``nokey`` as key=off) when ``text`` is a user netdev: first word ``user``, or ``type=user``
    wherever it stands (``id=n0,type=user,restrict``); none otherwise."""
    if text.lstrip().startswith("{"):
        return ()
    parts = split_option(text)
    if parts[0] != "user" and "type=user" not in parts:
        return ()
    from appliance.nat.config import KEYS

    return KEYS


def _require_id_first(option: str, text: str) -> None:
    """QEMU looks for the id before the type or any other key: ``-netdev bogus,help`` and
    ``-netdev user,help`` are both refused for the missing id."""
    # QEMU finds the id even in a doubled-comma value (``-netdev user,,id=n0`` is then refused
    # for its type 'user,id=n0'), so the search splits on every comma.
    if any(p.startswith("id=") for p in text.split(",")):
        return
    parts = split_option(text)
    kind = parts[0] if "=" not in parts[0] else next((p[5:] for p in parts if p.startswith("type=")), "")
    raise ConfigError(f"{option}{' ' + kind if kind else ''}: Parameter 'id' is missing")


def parse_netdev(text: str, option: str = "-netdev", *, implicit_id: str | None = None) -> NetdevConfig:
    """Parse ``TYPE,id=…,…``.

    :param implicit_id: the id for a netdev made by ``-nic`` (an ``id=`` given
        there is accepted, as QEMU does, but this one is kept); it may use names
        a user cannot.
    :raises ConfigError: naming the bad type, key or value.
    """
    if text in ("help", "?") and implicit_id is None:
        # QEMU's list, in its order, of the types it has and we have too.
        raise HelpRequested("Available netdev backend types:\n" + "".join(f"{t}\n" for t in HELP_ORDER))
    is_json = text.lstrip().startswith("{")
    if is_json:
        check_text(option, text, NETDEV, closed=True)
    elif implicit_id is None:
        _require_id_first(option, text)
    opts = parse_option(option, text, implied="type", flags=user_flags(text), warn_flags=True)
    if implicit_id is not None:
        # QEMU's -nic takes id= (it names the netdev); the NIC here refers to its netdev by
        # the implicit id, so a given one is accepted and that name kept.
        opts.take("id")
        opts["id"] = implicit_id
    kind = opts.take("type")
    if kind is None:
        raise ConfigError(f"{option}: Parameter 'type' is missing")
    if kind not in QEMU_TYPES:
        raise ConfigError(f"{option}: Parameter 'type' does not accept value '{kind}'")
    if kind not in TYPES:
        raise ConfigError(f"{option}: netdev type '{kind}' is not supported")
    what = f"{option} {kind}"
    opts.option = what
    if kind == "hubport" and option == "-net":
        raise ConfigError(f"{what}: network backend 'hubport' is only supported with -netdev/-nic")
    if kind == "user":
        from appliance.nat.config import UserNetConfig

        ident = _check_id(what, opts.require("id"), implicit_id, is_json)
        opts["id"] = ident
        opts["type"] = "user"
        return UserNetdev(ident, UserNetConfig.parse(opts))
    ident = _check_id(what, opts.require("id"), implicit_id, is_json)
    cfg: NetdevConfig
    if kind == "tap":
        cfg = _tap(what, ident, opts)
    elif kind == "bridge":
        cfg = BridgeNetdev(ident, _ifname(what, "br", opts.take("br", "br0")) or "br0")
        if opts.take("helper") is not None:
            raise ConfigError(f"{what}: 'helper' is not supported (the appliance bridges taps itself)")
    elif kind == "dgram":
        cfg = _dgram(what, ident, opts)
    elif kind == "socket":
        cfg = _socket(what, ident, opts)
    elif kind == "hubport":
        cfg = HubportNetdev(ident, _int32(what, "hubid", opts.require("hubid")), opts.take("netdev"))
    else:
        cfg = _stream(what, ident, opts)
    opts.finish()
    return cfg


# QEMU's default tap scripts (DEFAULT_NETWORK_SCRIPT, DEFAULT_NETWORK_DOWN_SCRIPT), shipped by
# Debian's qemu-system-common: the up script brings the tap up and puts it on the bridge the
# default route leaves by, if that is a bridge.
DEFAULT_SCRIPT = "/etc/qemu-ifup"
DEFAULT_DOWNSCRIPT = "/etc/qemu-ifdown"


def _script(value: str | None, default: str) -> str | None:
    """A tap's ``script=``/``downscript=``: "no" or "" for none; left out, QEMU's default, which
    QEMU runs whether it is there or not (failing without it); here it runs when installed."""
    if value is None:
        return default if os.path.isfile(default) else None
    return None if value in ("", "no") else value


def _tap(what: str, ident: str, opts: OptionDict) -> TapNetdev:
    script, downscript = opts.take("script"), opts.take("downscript")
    if opts.take_bool("vhost", False):
        raise ConfigError(f"{what}: 'vhost=on' is not supported (no vhost-net here)")
    for key in ("helper", "vhostfd", "vhostfds"):
        if opts.take(key) is not None:
            raise ConfigError(f"{what}: '{key}' is not supported")
    # poll-us= tunes vhost-net's busy polling; with no vhost there is none to tune.
    opts.take_int("poll-us", 0, minimum=0)
    sndbuf = opts.take("sndbuf")
    sndbuf_bytes = None
    if sndbuf is not None:
        sndbuf_bytes = parse_size(sndbuf, f"{what}: sndbuf")
        if sndbuf_bytes > 0x7FFFFFFF:
            raise ConfigError(f"{what}: sndbuf={sndbuf} is larger than 2 GiB")
    fd, fds = opts.take("fd"), opts.take("fds")
    if fd is not None or fds is not None:
        # The fd's opener set the tap up: QEMU runs no script for it and takes none.
        for key, value in (("script", script), ("downscript", downscript)):
            if value is not None:
                raise ConfigError(f"{what}: {key}= is invalid with {'fd' if fd is not None else 'fds'}=")
        cfg = _tap_fds(what, ident, opts, fd, fds)
        return dataclasses.replace(cfg, sndbuf=sndbuf_bytes)
    queues = opts.take_int("queues", 1, minimum=1) or 1
    if queues > MAX_TAP_QUEUES:
        raise ConfigError(f"{what}: queues={queues} exceeds {MAX_TAP_QUEUES}")
    bridge = _ifname(what, "br", opts.take("br"))
    if bridge is not None:
        # QEMU's default up script would move the tap to the default route's bridge; br= says
        # which bridge, so the defaults are left out (a script given is still run).
        script = "no" if script is None else script
        downscript = "no" if downscript is None else downscript
    return TapNetdev(
        ident,
        ifname=_ifname(what, "ifname", opts.take("ifname")),
        bridge=bridge,
        vnet_hdr=opts.take_bool("vnet_hdr", True),
        queues=queues,
        sndbuf=sndbuf_bytes,
        script=_script(script, DEFAULT_SCRIPT),
        downscript=_script(downscript, DEFAULT_DOWNSCRIPT),
    )


def _tap_fds(what: str, ident: str, opts: OptionDict, fd: str | None,
             fds: str | None) -> TapNetdev:
    """``fd=`` / ``fds=``: tap queues the caller opened (libvirt's way); the
    tap's own settings come with them, so QEMU refuses those options beside."""
    from appliance.net.errors import TapError
    from appliance.net.tun import IFF_VNET_HDR, inspect_tap_fd

    if fd is not None and fds is not None:
        raise ConfigError(f"{what}: fd= and fds= are mutually exclusive")
    key, text = ("fd", fd) if fd is not None else ("fds", fds or "")
    for other in ("ifname", "br", "vnet_hdr", "queues"):
        if opts.take(other) is not None:
            raise ConfigError(f"{what}: {other}= is invalid with {key}=")
    numbers: list[int] = []
    for part in text.split(":") if key == "fds" else [text]:
        if not part.isdigit():
            raise ConfigError(f"{what}: {key}='{text}' is not a file descriptor number")
        numbers.append(int(part))
    if len(set(numbers)) != len(numbers) or len(numbers) > MAX_TAP_QUEUES:
        raise ConfigError(f"{what}: {key}='{text}' must name 1 to {MAX_TAP_QUEUES} different fds")
    try:
        names, flags = zip(*(inspect_tap_fd(n) for n in numbers), strict=True)
    except TapError as err:
        raise ConfigError(f"{what}: {key}: {err}") from None
    if len(set(names)) != 1:
        raise ConfigError(f"{what}: {key}= fds belong to different taps ({', '.join(sorted(set(names)))})")
    if len({f & IFF_VNET_HDR for f in flags}) != 1:
        raise ConfigError(f"{what}: {key}= fds disagree about virtio-net headers")
    return TapNetdev(ident, ifname=names[0], vnet_hdr=bool(flags[0] & IFF_VNET_HDR),
                     queues=len(numbers), fds=tuple(numbers))


# SocketAddressType (qapi/sockets.json).
SOCKET_TYPES = tuple(_SOCKET_ADDRESS.branches)


def _address_type(what: str, kind: str | None, prefix: str, supported: tuple[str, ...]) -> None:
    """Refuse a SocketAddress ``type`` that is missing, not QAPI's (in its words, which name the
    member without its path) or not one of ``supported``."""
    if kind is None:
        raise ConfigError(f"{what}: Parameter '{prefix}.type' is missing")
    if kind not in SOCKET_TYPES:
        raise ConfigError(f"{what}: Parameter 'type' does not accept value '{kind}'")
    if kind not in supported:
        raise ConfigError(f"{what}: {prefix}.type '{kind}' is not supported (use {' or '.join(supported)})")


def _inet(what: str, opts: OptionDict, prefix: str, *, required: bool) -> tuple[str, int] | None:
    kind = opts.take(f"{prefix}.type")
    host = opts.take(f"{prefix}.host")
    port = opts.take(f"{prefix}.port")
    if kind is None and host is None and port is None:
        if required:
            raise ConfigError(f"{what}: Parameter '{prefix}.type' is missing")
        return None
    _address_type(what, kind, prefix, ("inet",))
    # InetSocketAddress's host and port are both mandatory (qapi/sockets.json); "" is any address.
    if host is None:
        raise ConfigError(f"{what}: Parameter '{prefix}.host' is missing")
    if port is None:
        raise ConfigError(f"{what}: Parameter '{prefix}.port' is missing")
    return _host(what, f"{prefix}.host", host), _port(what, f"{prefix}.port", port)


def _unix_address(what: str, opts: OptionDict, prefix: str, path: str) -> str:
    """A unix socket path; with ``abstract=on`` Linux's abstract namespace (unix(7)), which Python
    spells with a leading NUL. QEMU's ``tight=on`` (its default) is the only form: the address is
    the name's own length, as Python binds it."""
    abstract = opts.take_bool(f"{prefix}.abstract", False)
    if not opts.take_bool(f"{prefix}.tight", True):
        raise ConfigError(f"{what}: {prefix}.tight=off is not supported")
    return "\0" + path if abstract else path


def _dgram_addr(what: str, opts: OptionDict, prefix: str) -> tuple[str, int] | str | None:
    """``prefix.type=inet,…host,…port`` as (host, port), ``prefix.type=unix,…path`` as the path."""
    if opts.get(f"{prefix}.type") == "unix":
        opts.take(f"{prefix}.type")
        path = opts.take(f"{prefix}.path")
        if not path:
            raise ConfigError(f"{what}: Parameter '{prefix}.path' is missing")
        return _unix_address(what, opts, prefix, path)
    return _inet(what, opts, prefix, required=False)


def _dgram(what: str, ident: str, opts: OptionDict) -> DgramNetdev:
    remote = _dgram_addr(what, opts, "remote")
    local = _dgram_addr(what, opts, "local")
    cfg = DgramNetdev(ident, local, remote)
    if cfg.multicast:
        # QEMU: a multicast remote needs no local; a local names the interface to use.
        if isinstance(local, str):
            raise ConfigError(f"{what}: multicast only takes local.type=inet")
        return cfg
    # QEMU 7.2 net/dgram.c's checks and words: only a multicast group goes without local=, and
    # nothing goes without remote= (frames would have nowhere to go).
    if local is None:
        raise ConfigError(f"{what}: dgram requires local= parameter")
    if remote is not None and isinstance(remote, str) != isinstance(local, str):
        raise ConfigError(f"{what}: remote and local types must be the same")
    if remote is None:
        raise ConfigError(f"{what}: type=inet or type=unix requires remote parameter")
    return cfg


def _socket(what: str, ident: str, opts: OptionDict) -> DgramNetdev | StreamNetdev:
    udp = opts.take("udp")
    listen = opts.take("listen")
    connect = opts.take("connect")
    localaddr = opts.take("localaddr")
    mcast = opts.take("mcast")
    if opts.take("fd") is not None:
        raise ConfigError(f"{what}: only udp=, mcast=, listen= and connect= are supported")
    chosen = [k for k, v in (("udp", udp), ("mcast", mcast), ("listen", listen), ("connect", connect))
              if v is not None]
    if len(chosen) != 1:
        opts.finish()  # an unknown key first, as QEMU's option parser refuses it
        raise ConfigError(f"{what}: exactly one of listen=, connect=, mcast= or udp= is required")
    if mcast is not None:
        group = _hostport(what, "mcast", mcast)
        if not is_multicast(group[0]):
            raise ConfigError(f"{what}: mcast '{mcast}' is not a multicast address")
        iface = None if localaddr is None else (_host(what, "localaddr", localaddr), 0)
        return DgramNetdev(ident, iface, group, form="socket")
    if udp is not None:
        if localaddr is None:
            raise ConfigError(f"{what}: udp= needs localaddr=")
        # QEMU's parse_host_port() reads an empty host as INADDR_ANY, in every one of these.
        return DgramNetdev(ident, _hostport(what, "localaddr", localaddr, host_optional=True),
                           _hostport(what, "udp", udp, host_optional=True), form="socket")
    if localaddr is not None:
        raise ConfigError(f"{what}: localaddr= goes only with udp=")
    if listen is not None:
        return StreamNetdev(ident, _hostport(what, "listen", listen, host_optional=True), listen=True,
                            form="socket")
    assert connect is not None
    return StreamNetdev(ident, _hostport(what, "connect", connect, host_optional=True), listen=False,
                        form="socket")


def _stream(what: str, ident: str, opts: OptionDict) -> StreamNetdev:
    server = opts.take_bool("server", False)
    reconnect = opts.take_int("reconnect", 1, minimum=0)
    kind = opts.take("addr.type")
    address: tuple[str, int] | str
    if kind == "inet":
        # InetSocketAddress: host and port mandatory (qapi/sockets.json); "" is any address.
        host = opts.require("addr.host")
        port = opts.require("addr.port")
        address = (_host(what, "addr.host", host, v6=True), _port(what, "addr.port", port))
        for key in ("addr.numeric", "addr.to", "addr.ipv4", "addr.ipv6"):
            opts.take(key)
    elif kind == "unix":
        address = _unix_address(what, opts, "addr", opts.require("addr.path"))
    elif kind is None and not any(key.startswith("addr.") for key in opts):
        raise ConfigError(f"{what}: Parameter 'addr' is missing")
    else:
        _address_type(what, kind, "addr", ("inet", "unix"))
        raise AssertionError(kind)  # inet and unix are read above
    return StreamNetdev(ident, address, listen=server, reconnect=float(reconnect or 1))


async def open_netdev(cfg: NetdevConfig, *, queues: int = 1, vnet_hdr: bool = True) -> tuple[list[FrameBackend], Any]:
    """Open ``cfg`` as ``queues`` backends (one per queue pair).

    :param vnet_hdr: False for a back end on a hub, whose frames carry no virtio-net header
        (a tap is then opened without IFF_VNET_HDR, the user network builds plain frames).

    :returns: the backends and an owner object whose ``close()`` (sync or
        async) releases what was made (tap, sockets, the user-mode stack).
    :raises ConfigError: when the netdev cannot carry ``queues`` pairs.
    :raises NetError: when the host refuses (no such bridge, port in use…).
    """
    if queues > 1 and not isinstance(cfg, TapNetdev | BridgeNetdev):
        raise ConfigError(f"netdev '{cfg.id}' of this type has one queue; mq needs a tap")
    if isinstance(cfg, TapNetdev | BridgeNetdev):
        from appliance.net.tap import Tap

        if isinstance(cfg, TapNetdev):
            if cfg.fds and queues > len(cfg.fds):
                raise ConfigError(f"netdev '{cfg.id}' has {len(cfg.fds)} tap queue(s) (fds=); "
                                  f"the NIC needs {queues}")
            if queues != cfg.queues and cfg.queues != 1:
                queues = cfg.queues
            tap = Tap(cfg.ifname, queues=max(queues, cfg.queues), vnet_hdr=cfg.vnet_hdr and vnet_hdr,
                      bridge=cfg.bridge, fds=cfg.fds, sndbuf=cfg.sndbuf, script=cfg.script,
                      downscript=cfg.downscript)
        else:
            tap = Tap(None, queues=queues, bridge=cfg.bridge, vnet_hdr=vnet_hdr)
        backends: list[FrameBackend] = list(await tap.open())
        return backends, tap
    if isinstance(cfg, DgramNetdev):
        from appliance.net.dgram import DgramLink

        link = DgramLink(cfg.local, cfg.remote)
        return [link], link
    if isinstance(cfg, StreamNetdev):
        from appliance.net.stream import StreamLink

        stream = StreamLink(cfg.address, listen=cfg.listen, reconnect=cfg.reconnect)
        await stream.start()
        return [stream], stream
    if not isinstance(cfg, UserNetdev):
        raise ConfigError(f"netdev '{cfg.id}' is a hub port or nothing; it has no host side to open")
    from appliance.nat.stack import UserNetwork

    # With virtio-net headers the NIC offers checksum/TSO offloads, which the stack takes and gives.
    user = UserNetwork(cfg.config, vnet_hdr=vnet_hdr)
    await user.start()
    return [user], user
