"""``-netdev user`` options, with QEMU's names and defaults (QEMU docs, "-netdev user").

Defaults are libslirp's: network 10.0.2.0/24, host (gateway) 10.0.2.2, DNS
10.0.2.3, first DHCP lease 10.0.2.15.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from appliance.cli.options import OptionDict, parse_option
from appliance.errors import ConfigError

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")


@dataclass(frozen=True, slots=True)
class HostForward:
    """One ``hostfwd=``: a host listener whose connections/datagrams go to the guest."""

    proto: Literal["tcp", "udp"]
    host_addr: str  # "" = all addresses, as QEMU
    host_port: int
    guest_addr: ipaddress.IPv4Address
    guest_port: int


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
    host_mac: bytes = b"\x52\x55\x0a\x00\x02\x02"

    @classmethod
    def from_string(cls, text: str, option: str = "-netdev") -> UserNetConfig:
        """Parse ``user,hostfwd=…`` (the leading ``user`` is optional)."""
        opts = parse_option(option, text, implied="type")
        return cls.parse(opts)

    @classmethod
    def parse(cls, opts: OptionDict) -> UserNetConfig:
        """Build from parsed options, consuming every key; callers take their own keys first.

        :raises ConfigError: naming the first bad or unknown value.
        """
        what = opts.option
        kind = opts.take("type", "user")
        if kind != "user":
            raise ConfigError(f"{what}: type '{kind}' is not user")
        ident = opts.take("id")
        if not opts.take_bool("ipv4", True):
            raise ConfigError(f"{what}: 'ipv4=off' is not supported")
        net = _parse_net(opts.take("net", "10.0.2.0/24") or "", what)
        host = _addr_in(opts.take("host"), net, 2, "host", what)
        dhcp = _addr_in(opts.take("dhcpstart"), net, 15, "dhcpstart", what)
        dns = _addr_in(opts.take("dns"), net, 3, "dns", what)
        if host in (dns, dhcp) or dns == dhcp:
            raise ConfigError(f"{what}: 'host', 'dns' and 'dhcpstart' must differ")
        hostname = _name(opts.take("hostname"), "hostname", what)
        domain = _name(opts.take("domainname"), "domainname", what)
        search = tuple(_name(s, "dnssearch", what) or "" for s in opts.take_all("dnssearch"))
        restrict = opts.take_bool("restrict", False)
        fwds = tuple(parse_hostfwd(v, dhcp, what) for v in opts.take_all("hostfwd"))
        gfwds = tuple(_parse_guestfwd(v, what) for v in opts.take_all("guestfwd"))
        ipv6 = opts.take_bool("ipv6", True)
        v6net_text = opts.take("ipv6-net")
        prefix, plen = opts.take("ipv6-prefix"), opts.take("ipv6-prefixlen")  # QEMU's older spelling
        if v6net_text is None:
            v6net_text = f"{prefix or 'fec0::'}/{plen or 64}"
        elif prefix is not None or plen is not None:
            raise ConfigError(f"{what}: 'ipv6-net' and 'ipv6-prefix' are mutually exclusive")
        try:
            v6net = ipaddress.IPv6Network(v6net_text if "/" in v6net_text else v6net_text + "/64", strict=False)
        except ValueError:
            raise ConfigError(f"{what}: invalid ipv6-net '{v6net_text}'") from None
        if v6net.prefixlen > 126:
            raise ConfigError(f"{what}: ipv6-net '{v6net_text}' is too small")
        v6host = _addr6_in(opts.take("ipv6-host"), v6net, 2, "ipv6-host", what)
        v6dns = _addr6_in(opts.take("ipv6-dns"), v6net, 3, "ipv6-dns", what)
        if v6host == v6dns:
            raise ConfigError(f"{what}: 'ipv6-host' and 'ipv6-dns' must differ")
        tftp = opts.take("tftp")
        if tftp is not None and not os.path.isdir(tftp):
            raise ConfigError(f"{what}: tftp '{tftp}' is not a directory")
        bootfile = opts.take("bootfile") or None
        if bootfile is not None and len(bootfile.encode()) > 127:
            raise ConfigError(f"{what}: bootfile '{bootfile}' is longer than 127 bytes")
        server_name = opts.take("tftp-server-name") or None
        if server_name is not None and len(server_name.encode()) > 255:
            raise ConfigError(f"{what}: tftp-server-name is longer than 255 bytes")
        for key in ("smb", "smbserver"):
            if opts.take(key) is not None:
                raise ConfigError(f"{what}: '{key}' is not supported (no Samba share here)")
        opts.finish()
        return cls(
            net=net,
            host=host,
            dhcpstart=dhcp,
            dns=dns,
            hostname=hostname,
            domainname=domain,
            dnssearch=search,
            restrict=restrict,
            hostfwd=fwds,
            guestfwd=gfwds,
            ipv6=ipv6,
            ipv6_net=v6net,
            ipv6_host=v6host,
            ipv6_dns=v6dns,
            id=ident,
            tftp=tftp,
            bootfile=bootfile,
            tftp_server_name=server_name,
        )


def _parse_net(text: str, what: str) -> ipaddress.IPv4Network:
    try:
        # QEMU: a bare address means a /24 (or the class default; /24 covers its examples).
        net = ipaddress.IPv4Network(text if "/" in text else text + "/24", strict=False)
    except ValueError:
        raise ConfigError(f"{what}: invalid net '{text}'") from None
    if net.prefixlen > 30:
        raise ConfigError(f"{what}: net '{text}' is too small")
    return net


def _addr_in(text: str | None, net: ipaddress.IPv4Network, offset: int, key: str, what: str) -> ipaddress.IPv4Address:
    if text is None:
        return net.network_address + offset
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise ConfigError(f"{what}: invalid {key} '{text}'") from None
    if addr not in net or addr in (net.network_address, net.broadcast_address):
        raise ConfigError(f"{what}: {key} '{text}' is not a host address in {net}")
    return addr


def _addr6_in(text: str | None, net: ipaddress.IPv6Network, offset: int, key: str, what: str) -> ipaddress.IPv6Address:
    if text is None:
        return net.network_address + offset
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        raise ConfigError(f"{what}: invalid {key} '{text}'") from None
    if addr not in net:
        raise ConfigError(f"{what}: {key} '{text}' is not in {net}")
    return addr


def _name(text: str | None, key: str, what: str) -> str | None:
    if text is None:
        return None
    if len(text) > 253 or not _HOSTNAME.match(text):
        raise ConfigError(f"{what}: invalid {key} '{text}'")
    return text.rstrip(".")


def _port(text: str, key: str, what: str, *, allow_zero: bool = False) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise ConfigError(f"{what}: invalid {key} port '{text}'") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ConfigError(f"{what}: invalid {key} port '{text}'")
    return port


def parse_hostfwd(text: str, default_guest: ipaddress.IPv4Address, what: str) -> HostForward:
    """``[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`` (QEMU's slirp_hostfwd)."""
    proto = "tcp"
    rest = text
    head, sep, tail = text.partition(":")
    if sep and head in ("tcp", "udp", ""):
        proto = head or "tcp"
        rest = tail
    host_part, sep, guest_part = rest.partition("-")
    if not sep or host_part.count(":") != 1 or guest_part.count(":") != 1:
        raise ConfigError(f"{what}: invalid hostfwd '{text}'")
    haddr, hport = host_part.split(":")
    gaddr, gport = guest_part.split(":")
    if haddr:
        try:
            ipaddress.IPv4Address(haddr)
        except ValueError:
            raise ConfigError(f"{what}: invalid hostfwd host address '{haddr}'") from None
    try:
        guest = ipaddress.IPv4Address(gaddr) if gaddr else default_guest
    except ValueError:
        raise ConfigError(f"{what}: invalid hostfwd guest address '{gaddr}'") from None
    return HostForward(
        "udp" if proto == "udp" else "tcp",
        haddr,
        _port(hport, "hostfwd host", what, allow_zero=True),
        guest,
        _port(gport, "hostfwd guest", what),
    )


def _parse_guestfwd(text: str, what: str) -> GuestForward:
    cmd = re.fullmatch(r"(?:tcp)?:([0-9.]+):(\d+)-cmd:(.+)", text, re.S)
    m = cmd or re.fullmatch(r"(?:tcp)?:([0-9.]+):(\d+)-tcp:([^:]+):(\d+)", text)
    if not m:
        raise ConfigError(f"{what}: invalid guestfwd '{text}' "
                          "(tcp:addr:port-tcp:host:port or tcp:addr:port-cmd:command)")
    try:
        server = ipaddress.IPv4Address(m.group(1))
    except ValueError:
        raise ConfigError(f"{what}: invalid guestfwd address '{m.group(1)}'") from None
    port = _port(m.group(2), "guestfwd", what)
    if cmd is not None:
        return GuestForward(server, port, "", 0, command=cmd.group(3))
    return GuestForward(server, port, m.group(3), _port(m.group(4), "guestfwd", what))
