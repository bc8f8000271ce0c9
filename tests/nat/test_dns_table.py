"""The DNS proxy's rows in the flow table: one per guest port that asked, with libslirp's
timeouts, bounded however many ports a guest asks from (tests/nat/test_dns_rows.py
compares the rows with QEMU's)."""

from __future__ import annotations

import time

from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from appliance.nat import UserNetwork, udp_nat

from .conftest import GUEST_MAC, GW_MAC, drain, feed


def query(sport: int, name: str = "gateway") -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.3")
                 / UDP(sport=sport, dport=53) / DNS(id=1, rd=1, qd=DNSQR(qname=name)))  # fmt: skip


def dns_rows(net: UserNetwork) -> list[tuple[str, int, str, int, str]]:
    return [(f.guest_addr, f.guest_port, f.peer_addr, f.peer_port, f.label)
            for f in net.flows() if f.peer_port == 53]  # fmt: skip


async def test_a_locally_answered_query_is_listed_for_10_s(net: UserNetwork) -> None:
    feed(net, query(5000))
    assert len(drain(net)) == 1
    [(gip, gport, dst, dport, label)] = dns_rows(net)
    assert (gip, gport, dst, dport) == ("10.0.2.15", 5000, "10.0.2.3", 53)
    assert label in ("UDP[10 sec]", "UDP[9 sec]")
    assert "10.0.2.15  5000        10.0.2.3    53" in net.info()
    net.dns.expire(time.monotonic() + udp_nat.ANSWERED_DNS_TIMEOUT + 1)
    assert dns_rows(net) == []


async def test_each_asking_port_is_one_row_newest_first(net: UserNetwork) -> None:
    for port in (5001, 5002, 5001):
        feed(net, query(port))
    drain(net)
    assert [r[1] for r in dns_rows(net)] == [5002, 5001]


async def test_a_guest_asking_from_every_port_does_not_grow_the_table(net: UserNetwork) -> None:
    for port in range(1000, 1000 + udp_nat.MAX_FLOWS + 300):
        feed(net, query(port))
        drain(net)
    rows = dns_rows(net)
    assert len(rows) == udp_nat.MAX_FLOWS
    # The ports that asked last are the ones kept.
    assert rows[0][1] == 1000 + udp_nat.MAX_FLOWS + 299
    assert min(r[1] for r in rows) == 1300


async def test_closing_the_stack_forgets_them(net: UserNetwork) -> None:
    feed(net, query(5003))
    drain(net)
    assert dns_rows(net)
    net.dns.close()
    assert dns_rows(net) == []
