"""``-netdev user`` options, with QEMU's names, defaults and checks (QEMU 7.2, "-netdev user").

Defaults are libslirp's: network 10.0.2.0/24, host (gateway) 10.0.2.2, DNS
10.0.2.3, first DHCP lease 10.0.2.15.

What QEMU accepts is accepted here and what it refuses is refused, with its
words: addresses are read by the C library's ``inet_aton`` (so ``10.1``,
``0x7f000001`` and ``127.0.0.1 junk`` mean what they mean to QEMU), ports by
``strtol`` as QEMU 7.2 reads them (``0x16``, ``010``, ``+22``; an empty host
port is 0), a bare ``net=`` address takes its class's mask, and the default
host/DNS/DHCP addresses are the network ORed with ``.2.2``/``.2.3``/``.2.15``
under the mask, as ``net_slirp_init`` computes them. Deliberate differences,
each refused with its own message: a non-contiguous netmask, ``smb=`` (no
Samba here), and ``guestfwd`` targets other than ``tcp:host:port`` and
``cmd:command``. A ``guestfwd`` tcp target is connected per guest
connection, so unlike QEMU (which connects once at start-up and refuses to
start when nothing listens) a target that is not up yet is not an error.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from appliance.cli.options import OptionDict, parse_option
from appliance.errors import ConfigError

log = logging.getLogger(__name__)

# Every key of -netdev user; QEMU's option parser also takes each bare ("restrict" is
# restrict=on, "noipv6" is ipv6=off), with a deprecation warning.
KEYS = ("ipv4", "ipv6", "net", "ip", "host", "restrict", "hostname", "dhcpstart", "dns", "domainname",
        "dnssearch", "hostfwd", "guestfwd", "ipv6-net", "ipv6-prefix", "ipv6-prefixlen", "ipv6-host",
        "ipv6-dns", "tftp", "bootfile", "tftp-server-name", "smb", "smbserver")


class HostfwdError(ConfigError):
    """A ``hostfwd`` rule QEMU calls invalid; ``detail`` is QEMU's own line for it."""

    def __init__(self, what: str, rule: str, reason: str) -> None:
        self.detail = f"Invalid host forwarding rule '{rule}' ({reason})"
        super().__init__(f"{what}: {self.detail}")


@dataclass(frozen=True, slots=True)
class HostForward:
    """One ``hostfwd=``: a host listener whose connections/datagrams go to the guest."""

    proto: Literal["tcp", "udp"]
    host_addr: str  # dotted IPv4; "0.0.0.0" (QEMU's INADDR_ANY) when the rule leaves it empty
    host_port: int
    guest_addr: ipaddress.IPv4Address
    guest_port: int
    rule: str = field(default="", compare=False)  # the text as given, for QEMU's messages


@dataclass(frozen=True, slots=True)
class GuestForward:
    """One ``guestfwd=tcp:server:port-tcp:host:port``: guest connections to server:port reach
    host:port; or ``…-cmd:command``: each connection talks to a new run of ``command`` (its
    standard input and output), as QEMU spawns one per connection."""

    server: ipaddress.IPv4Address
    port: int
    target_host: str
    target_port: int
    command: str | None = None


@dataclass(frozen=True, slots=True)
class UserNetConfig:
    SYNTAX: ClassVar[str] = (
        "user[,id=str][,ipv4=on|off][,net=addr[/mask]][,host=addr][,restrict=on|off]"
        "[,hostname=name][,dhcpstart=addr][,dns=addr][,domainname=dom][,dnssearch=dom]..."
        "[,hostfwd=[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport]..."
        "[,guestfwd=tcp:server:port-tcp:host:port|cmd:command]...[,ipv6=on|off][,ipv6-net=addr[/len]]"
        "[,ipv6-host=addr][,ipv6-dns=addr][,tftp=dir][,bootfile=f][,tftp-server-name=name]"
    )

    net: ipaddress.IPv4Network = ipaddress.IPv4Network("10.0.2.0/24")
    ipv4: bool = True  # ipv4=off: the guest's IPv4 and ARP frames are dropped
    host: ipaddress.IPv4Address = ipaddress.IPv4Address("10.0.2.2")
    dhcpstart: ipaddress.IPv4Address = ipaddress.IPv4Address("10.0.2.15")
    dns: ipaddress.IPv4Address = ipaddress.IPv4Address("10.0.2.3")
    hostname: str | None = None
    domainname: str | None = None
    dnssearch: tuple[str, ...] = ()
    restrict: bool = False
    hostfwd: tuple[HostForward, ...] = ()
    guestfwd: tuple[GuestForward, ...] = ()
    ipv6: bool = True
    ipv6_net: ipaddress.IPv6Network = ipaddress.IPv6Network("fec0::/64")
    ipv6_host: ipaddress.IPv6Address = ipaddress.IPv6Address("fec0::2")
    ipv6_dns: ipaddress.IPv6Address = ipaddress.IPv6Address("fec0::3")
    id: str | None = None
    tftp: str | None = None  # directory served read-only by TFTP at the host address
    bootfile: str | None = None  # BOOTP file name offered to PXE clients
    tftp_server_name: str | None = None  # DHCP option 66
    # Not a QEMU option: extra names the DNS proxy answers itself (Python API).
    hosts: dict[str, ipaddress.IPv4Address] = field(default_factory=dict)
    # Not a QEMU option: upstream resolvers; None = the host's /etc/resolv.conf.
    nameservers: tuple[tuple[str, int], ...] | None = None
    lease_time: int = 86400
    # Not a QEMU option: the MAC of the stack's IPv4 frames; None = libslirp's, 52:55 and the
    # host address (special_mac).
    host_mac: bytes | None = None

    @classmethod
    def from_string(cls, text: str, option: str = "-netdev") -> UserNetConfig:
        """Parse ``user,hostfwd=…`` (the leading ``user`` is optional)."""
        opts = parse_option(option, text, implied="type", flags=KEYS, warn_flags=True)
        return cls.parse(opts)

    @classmethod
    def parse(cls, opts: OptionDict) -> UserNetConfig:
        """Build from parsed options, consuming every key; callers take their own keys first.

        Checks in QEMU 7.2's order (``net_init_slirp``, then ``net_slirp_init``),
        so the first complaint is QEMU's first complaint.

        :raises ConfigError: naming the first bad or unknown value.
        """
        what = opts.option
        kind = opts.take("type", "user")
        if kind != "user":
            raise ConfigError(f"{what}: type '{kind}' is not user")
        ident = opts.take("id")
        given4 = _bool(opts, "ipv4", None)
        given6 = _bool(opts, "ipv6", None)
        # As QEMU's net_init_slirp: naming one family on (and not the other) means that
        # family only; naming one off leaves the other on.
        ipv4 = given4 is not False and not (given6 is True and given4 is None)
        ipv6 = given6 is not False and not (given4 is True and given6 is None)
        restrict = bool(_bool(opts, "restrict", False))
        v6plen_text = opts.take("ipv6-prefixlen")
        v6plen = 0
        if v6plen_text is not None:
            n = _strtol_whole(v6plen_text, 0, empty_ok=False)
            if n is None or not -(1 << 63) <= n < (1 << 63):
                raise ConfigError(f"{what}: Parameter 'ipv6-prefixlen' expects an int64 value, "
                                  f"not '{v6plen_text}'")
            v6plen = _c_int(n)  # QEMU hands it on as a C int
        v6prefix = opts.take("ipv6-prefix")
        v6net = opts.take("ipv6-net")
        if v6net is not None:  # ipv6-net wins over ipv6-prefix/ipv6-prefixlen
            if not v6net:
                raise ConfigError(f"{what}: Parameter 'ipv6-net' expects a valid IPv6 prefix, not ''")
            v6prefix, sep, plen_text = v6net.partition("/")
            v6plen = 64
            if sep:
                n = qemu_strtoi(plen_text, 10)
                if n is None:
                    raise ConfigError(f"{what}: Parameter 'ipv6-prefixlen' expects a number, "
                                      f"not '{plen_text}' (ipv6-net={v6net})")
                v6plen = n
        vnet, vhost, vdns, vdhcp = opts.take("net"), opts.take("host"), opts.take("dns"), opts.take("dhcpstart")
        legacy_ip = opts.take("ip")  # QEMU's old spelling of net=ADDR/24; net= wins over it
        from_ip = vnet is None and legacy_ip is not None
        if from_ip:
            vnet = f"{legacy_ip}/24"
        v6host, v6dns = opts.take("ipv6-host"), opts.take("ipv6-dns")
        if not ipv4 and (vnet is not None or vhost is not None or vdns is not None):
            raise ConfigError(f"{what}: IPv4 disabled but netmask/host/dns provided")
        if not ipv6 and (v6prefix is not None or v6host is not None or v6dns is not None):
            raise ConfigError(f"{what}: IPv6 disabled but prefix/host6/dns6 provided")
        if not ipv4 and not ipv6:
            raise ConfigError(f"{what}: IPv4 and IPv6 disabled")

        net, mask = 0x0A000200, 0xFFFFFF00
        host, dhcp, dns = 0x0A000202, 0x0A00020F, 0x0A000203
        if vnet is not None:
            try:
                net, mask = _parse_net(vnet, what)
            except ConfigError as err:
                if from_ip:
                    raise ConfigError(str(err).replace(f"net={vnet}:", f"ip={legacy_ip}:", 1)) from None
                raise
            host = net | (0x0202 & ~mask)
            dhcp = net | (0x020F & ~mask)
            dns = net | (0x0203 & ~mask)
        if vhost is not None:
            host = _aton(vhost, f"{what}: host={vhost}: Failed to parse host")
        if host & mask != net:
            raise ConfigError(f"{what}: host={_dotted(host)}: Host doesn't belong to network")
        if vdns is not None:
            dns = _aton(vdns, f"{what}: dns={vdns}: Failed to parse DNS")
        if restrict and dns & mask != net:
            raise ConfigError(f"{what}: dns={_dotted(dns)}: DNS doesn't belong to network")
        if dns == host:
            raise ConfigError(f"{what}: dns={_dotted(dns)}: DNS must be different from host")
        if vdhcp is not None:
            dhcp = _aton(vdhcp, f"{what}: dhcpstart={vdhcp}: Failed to parse DHCP start address")
        if dhcp & mask != net:
            raise ConfigError(f"{what}: dhcpstart={_dotted(dhcp)}: DHCP doesn't belong to network")
        if dhcp in (host, dns):
            raise ConfigError(f"{what}: dhcpstart={_dotted(dhcp)}: DHCP must be different from host and DNS")
        smbserver = opts.take("smbserver")
        if smbserver is not None:
            _aton(smbserver, f"{what}: smbserver={smbserver}: Failed to parse SMB address")

        prefix_text = "fec0::" if v6prefix is None else v6prefix
        prefix = _pton6(prefix_text, f"{what}: ipv6-prefix={prefix_text}: Failed to parse IPv6 prefix")
        if v6plen == 0:
            v6plen = 64
        if not 0 <= v6plen <= 126:
            raise ConfigError(f"{what}: ipv6 prefix length {v6plen}: Invalid IPv6 prefix provided "
                              "(IPv6 prefix length must be between 0 and 126)")
        v6mask = ((1 << 128) - 1) ^ ((1 << (128 - v6plen)) - 1)
        if v6host is not None:
            ip6_host = _pton6(v6host, f"{what}: ipv6-host={v6host}: Failed to parse IPv6 host")
            if (ip6_host ^ prefix) & v6mask:
                raise ConfigError(f"{what}: ipv6-host={v6host}: IPv6 Host doesn't belong to network")
        else:
            ip6_host = prefix | 2  # the last byte ORed, as QEMU does (not prefix + 2)
        if v6dns is not None:
            ip6_dns = _pton6(v6dns, f"{what}: ipv6-dns={v6dns}: Failed to parse IPv6 DNS")
            if restrict and (ip6_dns ^ prefix) & v6mask:
                raise ConfigError(f"{what}: ipv6-dns={v6dns}: IPv6 DNS doesn't belong to network")
        else:
            ip6_dns = prefix | 3

        domain = opts.take("domainname")
        if domain is not None and not domain:
            raise ConfigError(f"{what}: 'domainname' parameter cannot be empty")
        hostname = opts.take("hostname")
        server_name = opts.take("tftp-server-name")
        for key, value in (("domainname", domain), ("hostname", hostname), ("tftp-server-name", server_name)):
            if value is not None and len(raw_bytes(value)) > 255:
                raise ConfigError(f"{what}: '{key}' parameter cannot exceed 255 bytes")
        bootfile = opts.take("bootfile") or None
        if bootfile is not None and len(raw_bytes(bootfile)) > 127:
            # libslirp asserts on it and QEMU dies; refused here instead.
            raise ConfigError(f"{what}: bootfile '{bootfile[:40]}…' is longer than 127 bytes")
        search = _search_list(opts.take_all("dnssearch"))
        tftp = opts.take("tftp") or None

        if not _contiguous(mask):
            raise ConfigError(f"{what}: net={vnet}: a non-contiguous netmask "
                              f"({_dotted(mask)}) is not supported")
        v4net = ipaddress.IPv4Network((net, 32 - (~mask & 0xFFFFFFFF).bit_length()))
        v4 = ipaddress.IPv4Address
        fwds = tuple(parse_hostfwd(v, v4(dhcp), what) for v in opts.take_all("hostfwd"))
        gfwds = tuple(_parse_guestfwd(v, v4net, host, dns, what) for v in opts.take_all("guestfwd"))
        for key in ("smb",):
            if opts.take(key) is not None:
                raise ConfigError(f"{what}: '{key}' is not supported (no Samba share here)")
        opts.finish()
        return cls(
            net=v4net,
            ipv4=ipv4,
            host=v4(host),
            dhcpstart=v4(dhcp),
            dns=v4(dns),
            hostname=hostname or None,
            domainname=domain,
            dnssearch=search,
            restrict=restrict,
            hostfwd=fwds,
            guestfwd=gfwds,
            ipv6=ipv6,
            ipv6_net=ipaddress.IPv6Network((prefix, v6plen), strict=False),
            ipv6_host=ipaddress.IPv6Address(ip6_host),
            ipv6_dns=ipaddress.IPv6Address(ip6_dns),
            id=ident,
            tftp=tftp,
            bootfile=bootfile,
            tftp_server_name=server_name or None,
        )


# --- the C library's readings, as QEMU 7.2 uses them -----------------------------------

_C_SPACE = " \t\n\v\f\r"
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def c_strtol(text: str, base: int) -> tuple[int | None, str]:
    """C ``strtol(text, &end, base)``: (value, text from ``end`` on); value None when nothing
    was converted (``end`` is then ``text`` itself). Range is not clamped."""
    i, n = 0, len(text)
    while i < n and text[i] in _C_SPACE:
        i += 1
    sign = 1
    if i < n and text[i] in "+-":
        sign = -1 if text[i] == "-" else 1
        i += 1
    if base in (0, 16) and text[i:i + 2] in ("0x", "0X") and i + 2 < n and text[i + 2].lower() in _DIGITS[:16]:
        i, base = i + 2, 16
    elif base == 0:
        base = 8 if text[i:i + 1] == "0" else 10
    digits = _DIGITS[:base]
    j = i
    while j < n and len(text[j].lower()) == 1 and text[j].lower() in digits:
        j += 1
    if j == i:
        return None, text
    return sign * int(text[i:j], base), text[j:]


def _strtol_whole(text: str, base: int, *, empty_ok: bool = True) -> int | None:
    """``strtol`` that must reach the end of ``text`` (QEMU 7.2's ``*end != '\\0'`` check);
    with ``empty_ok`` an empty string reads as 0, as that check lets it."""
    value, rest = c_strtol(text, base)
    if rest:
        return None
    if value is None:
        return 0 if empty_ok else None
    return value


def qemu_strtoi(text: str, base: int) -> int | None:
    """QEMU's ``qemu_strtoi(text, NULL, base, &n)``: all of it, at least one digit, a C int."""
    value, rest = c_strtol(text, base)
    if value is None or rest or not -(1 << 31) <= value < (1 << 31):
        return None
    return value


def raw_bytes(text: str) -> bytes:
    """The bytes a command-line value was given as: Python reads bytes that are not UTF-8 as
    lone surrogates (PEP 383), and QEMU takes and sends the bytes themselves."""
    return text.encode("utf-8", "surrogateescape")


def domain_labels(name: str) -> tuple[bytes, ...] | None:
    """``name``'s labels as the bytes they were given (one trailing dot is the root), or None
    when it is no domain name on the wire: an empty label ("a..b", "."), a label over 63 bytes,
    or over 255 bytes encoded (RFC 1035 §2.3.4)."""
    labels = tuple(raw_bytes(lab) for lab in (name[:-1] if name.endswith(".") else name).split("."))
    if any(not lab or len(lab) > 63 for lab in labels) or sum(len(lab) + 1 for lab in labels) + 1 > 255:
        return None
    return labels


def _c_long(n: int) -> int:
    """What ``strtol`` returns for ``n``: out of range, LONG_MIN or LONG_MAX (ERANGE)."""
    return max(-(1 << 63), min(n, (1 << 63) - 1))


def _int_of_strtol(n: int | None) -> int | None:
    """``int x = strtol(…)`` as QEMU 7.2 writes it: clamped to a long, then cut to a C int."""
    return None if n is None else _c_int(_c_long(n))


def _c_int(n: int) -> int:
    return ((n + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def inet_aton(text: str) -> int | None:
    """The C library's ``inet_aton`` (``10.1``, ``0x7f.1``, text after a space ignored)."""
    try:
        return int.from_bytes(socket.inet_aton(text), "big")
    except (OSError, ValueError):
        return None


def _aton(text: str, error: str) -> int:
    addr = inet_aton(text)
    if addr is None:
        raise ConfigError(error)
    return addr


def _pton6(text: str, error: str) -> int:
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except (OSError, ValueError):
        raise ConfigError(error) from None


def _dotted(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr & 0xFFFFFFFF))


def _contiguous(mask: int) -> bool:
    inv = ~mask & 0xFFFFFFFF
    return inv & (inv + 1) == 0


def _class_mask(addr: int) -> int:
    """The mask QEMU gives a ``net=`` address without one."""
    if not addr & 0x80000000:
        return 0xFF000000  # class A
    if addr & 0xFFF00000 == 0xAC100000:
        return 0xFFF00000  # 172.16.0.0/12
    if addr & 0xC0000000 == 0x80000000:
        return 0xFFFF0000  # class B
    if addr & 0xFFFF0000 == 0xC0A80000:
        return 0xFFFF0000  # 192.168.0.0/16
    if addr & 0xFFFF0000 == 0xC6120000:
        return 0xFFFE0000  # 198.18.0.0/15
    if addr & 0xE0000000 == 0xE0000000:
        return 0xFFFFFF00  # class C (as QEMU has it)
    return 0xFFFFFFF0


def _parse_net(text: str, what: str) -> tuple[int, int]:
    """``net=addr[/bits|/mask]`` as (network, mask), the network already masked."""
    addr_text, sep, mask_text = text.partition("/")
    if not sep:
        addr = _aton(text, f"{what}: net={text}: Failed to parse netmask")
        mask = _class_mask(addr)
    else:
        # QEMU copies the address into a 20-byte buffer first.
        addr = _aton(addr_text[:19], f"{what}: net={text}: Failed to parse netmask")
        shift, rest = c_strtol(mask_text, 10)
        if rest:
            mask = _aton(mask_text, f"{what}: net={text}: Failed to parse netmask (trailing chars)")
        else:
            bits = _c_int(_c_long(shift or 0))
            if not 4 <= bits <= 32:
                raise ConfigError(f"{what}: net={text}: Invalid netmask provided (must be in range 4-32)")
            mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
    return addr & mask, mask


def _bool(opts: OptionDict, key: str, default: bool | None) -> bool | None:
    """QEMU's boolean option values (case matters there: ``ON`` is refused)."""
    value = opts.take(key)
    if value is None:
        return default
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise ConfigError(f"{opts.option}: Parameter '{key}' expects 'on' or 'off', not '{value}'")


def _search_list(names: list[str]) -> tuple[str, ...]:
    """``dnssearch=`` values: QEMU takes any text; libslirp drops the whole option (DHCP 119)
    when a name cannot be encoded, and so do we, rather than send a broken one."""
    for name in names:
        if not name.isascii() or any(len(label) > 63 for label in name.split(".")):
            log.warning("dnssearch '%s' cannot be encoded; no domain search list is offered", name)
            return ()
    return tuple(names)


def parse_hostfwd(text: str, default_guest: ipaddress.IPv4Address, what: str) -> HostForward:
    """``[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport``, read as QEMU 7.2 reads it.

    :raises HostfwdError: with QEMU's reason ("Bad host port", …).
    """

    def bad(reason: str) -> HostfwdError:
        return HostfwdError(what, text, reason)

    proto, sep, rest = text.partition(":")
    if not sep:
        raise bad("No : separators")
    if proto not in ("tcp", "udp", ""):
        raise bad("Bad protocol name")
    haddr, sep, rest = rest.partition(":")
    if not sep:
        raise bad("Missing : separator")
    host = inet_aton(haddr[:255]) if haddr else 0
    if host is None:
        raise bad("Bad host address")
    hport_text, sep, rest = rest.partition("-")
    if not sep:
        raise bad("Bad host port separator")
    hport = _int_of_strtol(_strtol_whole(hport_text[:255], 0))
    if hport is None or not 0 <= hport <= 65535:
        raise bad("Bad host port")
    gaddr, sep, gport_text = rest.partition(":")
    if not sep:
        raise bad("Missing guest address")
    guest = inet_aton(gaddr[:255]) if gaddr else 0
    if guest is None:
        raise bad("Bad guest address")
    gport = _int_of_strtol(_strtol_whole(gport_text, 0))
    if gport is None or not 1 <= gport <= 65535:
        raise bad("Bad guest port")
    return HostForward(
        "udp" if proto == "udp" else "tcp",
        _dotted(host),
        hport,
        ipaddress.IPv4Address(guest) if guest else default_guest,  # libslirp: 0 is the first lease
        gport,
        rule=text,
    )


def _parse_guestfwd(text: str, net: ipaddress.IPv4Network, host: int, dns: int, what: str) -> GuestForward:
    """``[tcp]:[server]:port-cmd:command`` or ``…-tcp:host:port`` (QEMU's slirp_guestfwd)."""
    invalid = ConfigError(f"{what}: Invalid guest forwarding rule '{text}'")
    proto, sep, rest = text.partition(":")
    if not sep or proto not in ("tcp", ""):
        raise invalid
    saddr, sep, rest = rest.partition(":")
    if not sep:
        raise invalid
    server = inet_aton(saddr[:255]) if saddr else 0
    if server is None:
        raise invalid
    port_text, sep, target = rest.partition("-")
    port = _int_of_strtol(_strtol_whole(port_text[:255], 10)) if sep else None
    if port is None or not 1 <= port <= 65535:
        raise invalid
    netaddr, mask = int(net.network_address), int(net.netmask)
    if not server:
        server = netaddr | (0x0204 & ~mask)  # libslirp's default guestfwd address
    if server & mask != netaddr or server in (host, dns):
        raise ConfigError(f"{what}: Conflicting/invalid host:port in guest forwarding rule '{text}'")
    addr = ipaddress.IPv4Address(server)
    if target.startswith("cmd:"):
        return GuestForward(addr, port, "", 0, command=target[4:])
    kind, _, spec = target.partition(":")
    thost, sep, tport_text = spec.rpartition(":")
    tport = _strtol_whole(tport_text, 10, empty_ok=False) if kind == "tcp" and sep and thost else None
    if tport is None or not 1 <= tport <= 65535 or "," in spec:
        raise ConfigError(f"{what}: guestfwd target '{target}' is not supported here "
                          f"(tcp:host:port or cmd:command) in '{text}'")
    return GuestForward(addr, port, thost, tport)
