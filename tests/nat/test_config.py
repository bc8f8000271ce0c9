"""``-netdev user`` option parsing: QEMU's names, defaults and one-line errors."""

from __future__ import annotations

import ipaddress

import pytest

from appliance.cli.options import parse_option
from appliance.errors import ConfigError
from appliance.nat import UserNetConfig


def test_defaults_are_slirps() -> None:
    c = UserNetConfig.from_string("user")
    assert str(c.net) == "10.0.2.0/24"
    assert str(c.host) == "10.0.2.2" and str(c.dns) == "10.0.2.3" and str(c.dhcpstart) == "10.0.2.15"
    assert c.host_mac is None  # the stack takes special_mac(host): 52:55:0a:00:02:02
    assert c.lease_time == 86400 and not c.restrict and c.hostfwd == ()


def test_net_option_moves_every_default_address() -> None:
    c = UserNetConfig.from_string("user,net=192.168.76.0/24")
    assert (str(c.host), str(c.dns), str(c.dhcpstart)) == ("192.168.76.2", "192.168.76.3", "192.168.76.15")
    c = UserNetConfig.from_string("user,net=10.9.0.0/255.255.0.0,host=10.9.0.1,dns=10.9.0.53,dhcpstart=10.9.1.10")
    assert c.net.prefixlen == 16 and str(c.host) == "10.9.0.1" and str(c.dhcpstart) == "10.9.1.10"


def test_all_options_parse() -> None:
    c = UserNetConfig.from_string(
        "user,id=n0,hostname=guest1,domainname=lab.test,dnssearch=a.test,dnssearch=b.test,restrict=on,"
        "hostfwd=tcp:127.0.0.1:2222-10.0.2.15:22,hostfwd=udp::6000-:53,hostfwd=::8080-:80,"
        "guestfwd=tcp:10.0.2.100:1234-tcp:127.0.0.1:5555,ipv6=off"
    )
    assert c.id == "n0" and c.hostname == "guest1" and c.domainname == "lab.test"
    assert c.dnssearch == ("a.test", "b.test") and c.restrict and not c.ipv6
    assert c.ipv6_net == ipaddress.IPv6Network("fec0::/64")
    f0, f1, f2 = c.hostfwd
    assert (f0.proto, f0.host_addr, f0.host_port, str(f0.guest_addr), f0.guest_port) == (
        "tcp", "127.0.0.1", 2222, "10.0.2.15", 22,
    )  # fmt: skip
    assert (f1.proto, f1.host_addr, f1.host_port, str(f1.guest_addr), f1.guest_port) == (
        "udp",
        "0.0.0.0",  # QEMU's INADDR_ANY: IPv4 only
        6000,
        "10.0.2.15",
        53,
    )
    assert (f2.proto, f2.host_port, f2.guest_port) == ("tcp", 8080, 80)
    [g] = c.guestfwd
    assert (str(g.server), g.port, g.target_host, g.target_port) == ("10.0.2.100", 1234, "127.0.0.1", 5555)


def test_parse_consumes_keys_from_a_shared_option_dict() -> None:
    opts = parse_option("-netdev", "user,id=u1,hostfwd=tcp::1-:2", implied="type")
    c = UserNetConfig.parse(opts)
    assert c.id == "u1" and len(opts) == 0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("user,net=10.0.2.0/33", "net"),
        ("user,net=banana", "banana"),
        ("user,host=10.0.3.2", "10.0.3.2"),
        ("user,dns=10.0.2.2", "DNS must be different from host"),
        ("user,dhcpstart=10.0.2.3", "DHCP must be different from host and DNS"),
        ("user,hostfwd=tcp:127.0.0.1:22", "'tcp:127.0.0.1:22' (Bad host port separator)"),
        ("user,hostfwd=sctp::1-:2", "'sctp::1-:2' (Bad protocol name)"),
        ("user,hostfwd=tcp::22-:0", "'tcp::22-:0' (Bad guest port)"),
        ("user,hostfwd=tcp:1.2.3.4.5:22-:22", "'tcp:1.2.3.4.5:22-:22' (Bad host address)"),
        ("user,hostfwd=tcp::22-10.0.2.300:22", "'tcp::22-10.0.2.300:22' (Bad guest address)"),
        ("user,restrict=ON", "'ON'"),
        ("user,domainname=", "domainname"),
        ("user,hostname=" + "h" * 256, "hostname"),
        ("user,ipv6-net=zz::/64", "zz::"),
        ("user,ipv6-net=fd00::/127", "between 0 and 126"),
        ("user,ipv6-net=fd00::/64,ipv6-host=fd01::2", "fd01::2"),
        ("user,ipv6=off,ipv6-net=fd00::/64", "IPv6 disabled"),
        ("user,ipv4=off,ipv6=off", "IPv4 and IPv6 disabled"),
        ("user,ipv4=off,net=10.0.3.0/24", "IPv4 disabled"),
        ("user,net=10.0.3.0/255.0.255.0", "non-contiguous"),
        ("user,guestfwd=tcp:10.0.2.2:1-cmd:cat", "Conflicting/invalid"),
        ("user,smb=/srv", "smb"),
        ("user,smbserver=x", "smbserver=x"),
        ("tap,ifname=x", "tap"),
    ],
)
def test_bad_values_raise_one_line_config_error_naming_them(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        UserNetConfig.from_string(text)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_ipv6_addresses_follow_the_prefix_and_take_qemus_spellings() -> None:
    c = UserNetConfig.from_string("user,ipv6-net=fd00:1::/64")
    assert (str(c.ipv6_host), str(c.ipv6_dns)) == ("fd00:1::2", "fd00:1::3")
    c = UserNetConfig.from_string("user,ipv6-prefix=fd00:2::,ipv6-prefixlen=48,ipv6-host=fd00:2::1,ipv6-dns=fd00:2::53")
    assert str(c.ipv6_net) == "fd00:2::/48" and str(c.ipv6_host) == "fd00:2::1" and str(c.ipv6_dns) == "fd00:2::53"


@pytest.mark.parametrize(
    ("text", "net", "host", "dns", "dhcp"),
    [
        # A bare address takes its class's mask and the defaults are ORed in under it
        # (QEMU net_slirp_init), so 10.0.3.0 is 10.0.0.0/8 with the usual 10.0.2.x addresses.
        ("user,net=10.0.3.0", "10.0.0.0/8", "10.0.2.2", "10.0.2.3", "10.0.2.15"),
        ("user,net=172.16.5.0", "172.16.0.0/12", "172.16.2.2", "172.16.2.3", "172.16.2.15"),
        ("user,net=192.168.76.0", "192.168.0.0/16", "192.168.2.2", "192.168.2.3", "192.168.2.15"),
        ("user,net=10.0.3.5/24", "10.0.3.0/24", "10.0.3.2", "10.0.3.3", "10.0.3.15"),
        ("user,net=10.0.3.0/4", "0.0.0.0/4", "0.0.2.2", "0.0.2.3", "0.0.2.15"),
        ("user,net=10.1", "10.0.0.0/8", "10.0.2.2", "10.0.2.3", "10.0.2.15"),  # inet_aton's short form
        ("user,host=10.0.2.0,dns=10.9.9.9", "10.0.2.0/24", "10.0.2.0", "10.9.9.9", "10.0.2.15"),
    ],
)
def test_addresses_are_derived_as_qemu_derives_them(text: str, net: str, host: str, dns: str, dhcp: str) -> None:
    c = UserNetConfig.from_string(text)
    assert (str(c.net), str(c.host), str(c.dns), str(c.dhcpstart)) == (net, host, dns, dhcp)


def test_ipv6_defaults_are_the_prefix_with_its_last_byte_ored() -> None:
    c = UserNetConfig.from_string("user,ipv6-net=fd00::1/64")
    assert (str(c.ipv6_net), str(c.ipv6_host), str(c.ipv6_dns)) == ("fd00::/64", "fd00::3", "fd00::3")
    c = UserNetConfig.from_string("user,ipv6-net=fd00::/0")  # 0 means the default 64
    assert c.ipv6_net.prefixlen == 64


def test_ports_and_addresses_read_as_c_reads_them() -> None:
    [f] = UserNetConfig.from_string("user,hostfwd=tcp:0x7f000001:0x8ae-10.1:010").hostfwd
    assert (f.host_addr, f.host_port, str(f.guest_addr), f.guest_port) == ("127.0.0.1", 2222, "10.0.0.1", 8)
    [f] = UserNetConfig.from_string("user,hostfwd=::-:+22").hostfwd
    assert (f.proto, f.host_addr, f.host_port, f.guest_port) == ("tcp", "0.0.0.0", 0, 22)


def test_bare_keys_are_on_and_no_keys_off_for_netdev_user() -> None:
    from appliance.net.netdev import UserNetdev, parse_netdev

    cfg = parse_netdev("user,id=n0,restrict,noipv6")
    assert isinstance(cfg, UserNetdev) and cfg.config.restrict and not cfg.config.ipv6


async def test_ipv4_off_drops_the_guests_ipv4_and_arp() -> None:
    from scapy.layers.l2 import ARP, Ether

    from appliance.nat import UserNetwork
    from tests.nat.conftest import GUEST_MAC, drain, feed

    arp = bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=GUEST_MAC, psrc="10.0.2.15",
                                                                   pdst="10.0.2.2"))
    for ipv4, answered in ((True, True), (False, False)):
        net = UserNetwork(UserNetConfig.from_string(f"user,ipv4={'on' if ipv4 else 'off'}"))
        await net.start()
        try:
            feed(net, arp)
            assert bool(drain(net)) is answered
        finally:
            await net.stop()


async def test_non_utf8_command_line_bytes_in_names_are_sent_as_given() -> None:
    """A byte that is not UTF-8 on the command line (read as a lone surrogate) is counted and
    sent as that byte, not a traceback; 256 such bytes are one too many, as QEMU counts them."""
    from appliance.nat import UserNetwork

    raw = b"h\xff".decode("utf-8", "surrogateescape")
    cfg = UserNetConfig.from_string(f"user,hostname={raw},domainname={raw},tftp-server-name={raw},bootfile={raw}")
    net = UserNetwork(cfg)
    await net.start()
    try:
        assert b"\x0c\x02h\xff" in net.dhcp._common and b"\x0f\x02h\xff" in net.dhcp._common
        assert net.dhcp._file.startswith(b"h\xff\0")
    finally:
        await net.stop()
    with pytest.raises(ConfigError, match="'hostname' parameter cannot exceed 255 bytes"):
        UserNetConfig.from_string("user,hostname=" + "\udcff" * 256)


@pytest.mark.parametrize(
    ("text", "port_or_net"),
    [
        ("hostfwd=tcp::4294967318-:4294967318", (22, 22)),  # strtol's long, kept in a C int: 22
        ("hostfwd=udp::18446744073709551638-:22", None),  # strtol clamps to LONG_MAX: int -1
        ("guestfwd=tcp:10.0.2.100:4294967318-cmd:true", 22),
        ("net=10.0.0.0/4294967304", "10.0.0.0/8"),
        ("net=10.0.0.0/18446744073709551624", None),  # clamped, then -1: not 4-32
    ],
)
def test_out_of_range_numbers_wrap_or_clamp_as_qemu_7_2_reads_them(text: str, port_or_net: object) -> None:
    """Each checked against qemu-system-x86_64 7.2 (``info usernet`` / its refusal)."""
    if port_or_net is None:
        with pytest.raises(ConfigError):
            UserNetConfig.from_string("user," + text)
        return
    c = UserNetConfig.from_string("user," + text)
    if text.startswith("hostfwd"):
        assert (c.hostfwd[0].host_port, c.hostfwd[0].guest_port) == port_or_net
    elif text.startswith("guestfwd"):
        assert c.guestfwd[0].port == port_or_net
    else:
        assert str(c.net) == port_or_net


@pytest.mark.parametrize(
    ("text", "ipv4", "ipv6"),
    [
        ("user", True, True),
        ("user,ipv4=on", True, False),  # one family named on, the other not named: only it
        ("user,ipv6=on", False, True),
        ("user,ipv4=on,ipv6=on", True, True),
        ("user,ipv4=off", False, True),  # one named off: the other stays on
        ("user,ipv6=off", True, False),
        ("user,ipv4=off,ipv6=on", False, True),
    ],
)
def test_ipv4_and_ipv6_flags_combine_as_qemu_does(text: str, ipv4: bool, ipv6: bool) -> None:
    c = UserNetConfig.from_string(text)
    assert (c.ipv4, c.ipv6) == (ipv4, ipv6)


def test_legacy_ip_is_net_with_24_bits_and_net_wins() -> None:
    c = UserNetConfig.from_string("user,ip=10.0.3.9")
    assert str(c.net) == "10.0.3.0/24" and str(c.host) == "10.0.3.2" and str(c.dhcpstart) == "10.0.3.15"
    assert str(UserNetConfig.from_string("user,ip=10.0.3.0,net=10.0.4.0/24").net) == "10.0.4.0/24"
    with pytest.raises(ConfigError, match="ip=bogus"):
        UserNetConfig.from_string("user,ip=bogus")
    # net= given: its own value is the one named, whatever ip= says.
    with pytest.raises(ConfigError, match="net=bogus/24"):
        UserNetConfig.from_string("user,ip=bogus,net=bogus/24")
