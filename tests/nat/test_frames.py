"""The Internet checksum and header builders against an independent reference."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from appliance.nat import frames
from appliance.nat.dhcp import OPT_DOMAIN_SEARCH, _option, encode_search

from .peer import csum


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_checksum_matches_rfc1071_reference(data: bytes) -> None:
    assert frames.checksum(data) == csum(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=2, max_size=600).filter(lambda b: len(b) % 2 == 0))
def test_verify_accepts_data_with_its_own_checksum(data: bytes) -> None:
    c = frames.checksum(data)
    assert frames.verify(data + struct.pack("!H", c))


def test_all_zero_data_checksums_to_ffff() -> None:
    assert frames.checksum(bytes(40)) == 0xFFFF == csum(bytes(40))


def test_build_udp_matches_scapy() -> None:
    f = frames.build_udp(
        b"\x01" * 6, b"\x02" * 6, bytes([10, 0, 2, 2]), 53, bytes([10, 0, 2, 15]), 999, b"hello!!", ident=7
    )
    p = Ether(bytes(f))
    ref = Ether(bytes(f))
    del ref[IP].chksum, ref[UDP].chksum
    ref = Ether(bytes(ref))
    assert (p[IP].chksum, p[UDP].chksum) == (ref[IP].chksum, ref[UDP].chksum)
    assert p[UDP].sport == 53 and p[UDP].dport == 999 and bytes(p[UDP].payload) == b"hello!!"


def test_long_dhcp_options_are_split_per_rfc3396() -> None:
    names = tuple(f"{'x' * 40}{i}.example" for i in range(10))
    value = encode_search(names)
    assert len(value) > 255
    encoded = _option(OPT_DOMAIN_SEARCH, value)
    parts, i = [], 0
    while i < len(encoded):
        assert encoded[i] == OPT_DOMAIN_SEARCH
        n = encoded[i + 1]
        parts.append(encoded[i + 2 : i + 2 + n])
        i += 2 + n
    assert len(parts) >= 2 and b"".join(parts) == value
