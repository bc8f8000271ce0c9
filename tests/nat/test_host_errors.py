"""Host resources that fail under a guest connection: the guest is told, and nothing leaks."""

from __future__ import annotations

import asyncio
import errno
import socket

from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether

from appliance.nat import UserNetConfig, UserNetwork

from .conftest import GUEST_MAC, GW_MAC, drain, feed


async def test_a_host_socket_that_cannot_be_made_refuses_the_syn_and_frees_its_connect_slot(
    net: UserNetwork, monkeypatch
) -> None:
    # Out of descriptors (EMFILE: a guest holding ~1000 connections under the default limit of
    # 1024) is the host's failure, not the guest's: its SYN is refused, and the connect slot is
    # given back, or after MAX_CONNECTING such SYNs no connection could ever be opened again.
    def no_descriptors(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    syn = Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.2") / TCP(
        sport=41000, dport=9, flags="S", seq=1000
    )
    with monkeypatch.context() as m:
        m.setattr(socket, "socket", no_descriptors)
        feed(net, bytes(syn))
    [rst] = [Ether(f) for f in drain(net) if TCP in Ether(f)]
    assert rst[TCP].flags == "RA" and rst[TCP].ack == 1001 and rst[TCP].dport == 41000
    assert net.counters()["errors"] == 0
    assert net.tcp._connecting == 0 and not net.tcp.conns


async def test_a_ping_socket_that_fails_for_want_of_descriptors_is_tried_again_next_time(
    net: UserNetwork, monkeypatch
) -> None:
    # Only a refusal (ping_group_range: EACCES) says ping sockets are not for us; running out
    # of descriptors once must not turn echo forwarding off for the rest of the VM's life.
    tries = []

    def no_descriptors(*args: object, **kwargs: object) -> socket.socket:
        tries.append(args)
        raise OSError(errno.EMFILE, "Too many open files")

    echo = Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="192.0.2.1") / ICMP(type=8, id=7, seq=1)
    with monkeypatch.context() as m:
        m.setattr(socket, "socket", no_descriptors)
        feed(net, bytes(echo))
        feed(net, bytes(echo))
    assert len(tries) == 2
    assert net.counters()["icmp_unpermitted"] == 0 and net.counters()["errors"] == 0


async def test_a_guestfwd_command_without_descriptors_for_its_socketpair_refuses_the_syn(monkeypatch) -> None:
    net = UserNetwork(UserNetConfig.from_string("user,guestfwd=tcp:10.0.2.100:1234-cmd:cat"))
    await net.start()
    try:

        def no_descriptors(*args: object, **kwargs: object) -> tuple[socket.socket, socket.socket]:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(socket, "socketpair", no_descriptors)
        syn = Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.15", dst="10.0.2.100") / TCP(
            sport=41001, dport=1234, flags="S", seq=2000
        )
        feed(net, bytes(syn))
        got: list[Ether] = []
        for _ in range(200):  # the command starts in a task
            await asyncio.sleep(0.01)
            got += [f for f in map(Ether, drain(net)) if TCP in f]
            if got:
                break
        monkeypatch.undo()
        assert [str(f[TCP].flags) for f in got] == ["RA"]
        assert net.tcp._connecting == 0 and not net.tcp.conns
    finally:
        await net.stop()
