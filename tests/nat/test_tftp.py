"""TFTP at the host address (-netdev user,tftp=DIR): RFC 1350 reads with the
RFC 2347-2349 options, through the real stack with scapy-built frames."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from appliance.errors import ConfigError
from appliance.nat import UserNetConfig, UserNetwork
from appliance.nat.tftp import MAX_SESSIONS, TftpServer, resolve

from .conftest import GUEST_MAC, GW_MAC, drain, feed
from .test_dhcp import dhcp_frame, replies

GUEST_IP = "10.0.2.15"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "tftp"
    (r / "pxelinux.cfg").mkdir(parents=True)
    (r / "pxelinux.cfg" / "default").write_text("DEFAULT linux\n")
    (r / "big.bin").write_bytes(os.urandom(300_000))
    (r / "exact.bin").write_bytes(os.urandom(1024))
    (r / "empty").write_bytes(b"")
    (tmp_path / "secret").write_text("outside the root")
    (r / "escape").symlink_to(tmp_path / "secret")
    return r


@pytest.fixture
async def tnet(root: Path) -> AsyncIterator[UserNetwork]:
    cfg = UserNetConfig.from_string(f"user,tftp={root},bootfile=pxelinux.0,tftp-server-name=boot.lab")
    n = UserNetwork(cfg)
    await n.start()
    yield n
    await n.stop()


def udp(payload: bytes, sport: int = 2000, dport: int = 69) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src=GUEST_IP, dst="10.0.2.2")
                 / UDP(sport=sport, dport=dport) / payload)


def rrq(name: str, *opts: str, mode: str = "octet") -> bytes:
    return b"\0\1" + b"".join(s.encode() + b"\0" for s in (name, mode, *opts))


def answers(net: UserNetwork, sport: int = 2000) -> list[bytes]:
    out = []
    for raw in drain(net):
        pkt = Ether(raw)
        if UDP in pkt and pkt[UDP].dport == sport:
            assert pkt[IP].src == "10.0.2.2" and pkt[UDP].sport == 69
            out.append(bytes(pkt[UDP].payload))
    return out


def fetch(net: UserNetwork, name: str, *opts: str, sport: int = 2000) -> bytes:
    """A whole client: RRQ, then ACK every block until a short one."""
    feed(net, udp(rrq(name, *opts), sport))
    data = bytearray()
    [first] = answers(net, sport)
    if first[:2] == b"\0\6":  # OACK: acknowledge block 0
        feed(net, udp(b"\0\4\0\0", sport))
        [first] = answers(net, sport)
    pkt, blksize = first, dict(zip(opts[::2], opts[1::2], strict=True)).get("blksize", "512")
    while True:
        assert pkt[:2] == b"\0\3", pkt
        data += pkt[4:]
        feed(net, udp(b"\0\4" + pkt[2:4], sport))
        if len(pkt) - 4 < int(blksize):
            assert answers(net, sport) == []  # nothing after the last ACK
            return bytes(data)
        [pkt] = answers(net, sport)


async def test_files_come_back_whole_with_and_without_options(tnet: UserNetwork, root: Path) -> None:
    for name in ("pxelinux.cfg/default", "/big.bin", "exact.bin", "empty"):
        want = (root / name.lstrip("/")).read_bytes()
        assert hashlib.sha256(fetch(tnet, name)).digest() == hashlib.sha256(want).digest()
        got = fetch(tnet, name, "blksize", "1024", "tsize", "0", sport=2001)
        assert got == want


async def test_options_are_answered_in_an_oack(tnet: UserNetwork) -> None:
    feed(tnet, udp(rrq("big.bin", "tsize", "0", "blksize", "9000", "timeout", "3", "color", "red")))
    [oack] = answers(tnet)
    # blksize capped to one frame's worth (RFC 2348 lets the server lower it); unknown options left out.
    assert oack == b"\0\6tsize\x00300000\0blksize\x001468\0timeout\x003\0"


async def test_a_lost_block_goes_again_on_our_timeout_not_on_a_repeated_ack(tnet: UserNetwork) -> None:
    import time

    feed(tnet, udp(rrq("big.bin")))
    [b1] = answers(tnet)
    feed(tnet, udp(b"\0\4\0\1"))
    [b2] = answers(tnet)
    assert b2[:4] == b"\0\3\0\2"
    # Block 2 never arrived and the client repeats its ACK of block 1: no answer
    # to that (RFC 1123 §4.2.3.1, the Sorcerer's Apprentice), but the block goes
    # again once the timeout passes, and the transfer carries on.
    feed(tnet, udp(b"\0\4\0\1"))
    assert answers(tnet) == []
    tftp = tnet.tftp
    assert tftp is not None
    tftp.expire(time.monotonic() + 1.5)
    assert answers(tnet) == [b2]
    feed(tnet, udp(b"\0\4\0\2"))
    assert answers(tnet)[0][:4] == b"\0\3\0\3"
    # A client that stays silent is given up on after a few tries.
    for i in range(10):
        tftp.expire(time.monotonic() + 1.5 * (i + 2))
    assert len(tftp) == 0


async def test_absurd_option_values_are_ignored_and_leak_nothing(tnet: UserNetwork) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    for port in range(4000, 4015):
        feed(tnet, udp(rrq("big.bin", "tsize", "0" * 4400, "blksize", "9" * 30), port))
        [first] = answers(tnet, port)
        assert first[:4] == b"\0\3\0\1"  # no option taken: plain data, no OACK
    tftp = tnet.tftp
    assert tftp is not None
    tftp.close()
    assert len(os.listdir("/proc/self/fd")) <= fds
    assert tnet.counters()["errors"] == 0


@pytest.mark.parametrize(("name", "code"), [
    ("missing", 1), ("../secret", 2), ("pxelinux.cfg/../../secret", 2), ("escape", 2),
    ("pxelinux.cfg", 1), ("pxelinux.cfg/", 2),
])
async def test_names_outside_the_root_or_missing_get_errors(tnet: UserNetwork, name: str,
                                                            code: int) -> None:
    feed(tnet, udp(rrq(name)))
    [err] = answers(tnet)
    assert err[:4] == bytes([0, 5, 0, code])
    assert b"outside" not in err


async def test_writes_and_other_modes_are_refused(tnet: UserNetwork) -> None:
    feed(tnet, udp(b"\0\2new\0octet\0"))
    assert answers(tnet)[0][:4] == b"\0\5\0\2"
    feed(tnet, udp(rrq("big.bin", mode="netascii")))
    assert answers(tnet)[0][:4] == b"\0\5\0\4"


async def test_sessions_are_bounded_and_expire(tnet: UserNetwork) -> None:
    for port in range(3000, 3000 + MAX_SESSIONS + 1):
        feed(tnet, udp(rrq("big.bin"), port))
    last = answers(tnet, 3000 + MAX_SESSIONS)
    assert last[0][:2] == b"\0\5"
    tftp = tnet.tftp
    assert tftp is not None and len(tftp) == MAX_SESSIONS
    import time

    tftp.expire(time.monotonic() + 60)
    assert len(tftp) == 0


async def test_dhcp_offers_the_boot_file_and_server_name(tnet: UserNetwork) -> None:
    feed(tnet, dhcp_frame(GUEST_MAC, "discover"))
    [(offer, opts)] = replies(tnet)
    assert offer[BOOTP].file.rstrip(b"\0") == b"pxelinux.0"
    assert offer[BOOTP].siaddr == "10.0.2.2"
    assert opts["tftp_server_name"] == (b"boot.lab",)


async def test_without_tftp_port_69_is_ordinary_nat(net: UserNetwork) -> None:
    assert net.tftp is None


def test_tftp_option_takes_a_missing_directory_as_qemu_does(tmp_path: Path) -> None:
    # QEMU 7.2 starts with tftp= naming nothing; its requests then fail one by one.
    assert UserNetConfig.from_string(f"user,tftp={tmp_path / 'nope'}").tftp == str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="smb"):
        UserNetConfig.from_string("user,smb=/tmp")


def test_resolve_keeps_to_the_root(root: Path) -> None:
    assert resolve(root, "/pxelinux.cfg/default") == (root / "pxelinux.cfg/default").resolve()
    assert resolve(root, "missing") == (root / "missing").resolve()  # absent, but inside
    for bad in ("..", "a/../../x", "escape", "./big.bin", "", "/", "big.bin/"):
        assert resolve(root, bad) is None


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600), port=st.integers(1, 65535))
def test_any_datagram_is_answered_or_ignored_never_raises(tmp_path_factory: pytest.TempPathFactory,
                                                         data: bytes, port: int) -> None:
    d = tmp_path_factory.getbasetemp() / "fuzzroot"
    d.mkdir(exist_ok=True)
    (d / "f").write_bytes(b"x" * 700)
    sent: list[bytes] = []
    srv = TftpServer(d, lambda ip, p, payload: sent.append(bytes(payload)))
    srv.input(b"\x0a\0\2\x0f", port, data)
    srv.input(b"\x0a\0\2\x0f", port, b"\0\4\0\0")
    srv.input(b"\x0a\0\2\x0f", port, b"\0\4\0\1")
    assert all(len(p) <= 4 + 1468 for p in sent)
    srv.close()
