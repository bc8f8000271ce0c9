"""Outbound connection setup: how fast a guest SYN is answered, and connects that never finish."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

from appliance.nat import UserNetConfig, UserNetwork, tcp_nat

from .conftest import drain, full_listener
from .peer import GUEST_IP, GW_IP, Guest, tcp_flags, tcp_frame

SYN, ACK, RST, FIN = 0x02, 0x10, 0x04, 0x01


def syn(port: int, sport: int = 40100) -> bytes:
    return tcp_frame(GUEST_IP, sport, GW_IP, port, 5000, 0, SYN, 0xFFFF, opts=struct.pack("!BBH", 2, 4, 1460))


@contextlib.asynccontextmanager
async def stack_and_listener() -> AsyncIterator[tuple[UserNetwork, socket.socket, int]]:
    """A started stack and a loopback listener for its guest's connections; both closed after."""
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    try:
        with socket.socket() as lsock:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(8)
            yield net, lsock, lsock.getsockname()[1]
    finally:
        await net.stop()


async def test_syn_to_a_loopback_listener_is_answered_before_send_returns() -> None:
    """A loopback connect finishes inside connect(), so the SYN-ACK is queued without a loop turn."""
    async with stack_and_listener() as (net, lsock, port):
        for i in range(5):
            net.send([memoryview(syn(port, sport=40100 + i))])
            got = drain(net)
            if net.tcp._pending:
                # The host kernel deferred the handshake (a loaded machine): it comes a bit later.
                async with asyncio.timeout(5):
                    while not any(tcp_flags(f) == SYN | ACK for f in got):
                        await asyncio.sleep(0.001)
                        got += drain(net)
                continue
            assert [tcp_flags(f) for f in got] == [SYN | ACK]
        assert net.counters()["errors"] == 0


async def test_connect_that_never_completes_times_out_into_rst(monkeypatch) -> None:
    """A listener whose accept queue is full drops SYNs; after CONNECT_TIMEOUT the guest gets a RST."""
    # Well above the 0.1 s before the pending check: a stall of the test past the timeout would
    # let it fire first (its timer is due before the check's is run).
    monkeypatch.setattr(tcp_nat, "CONNECT_TIMEOUT", 1.0)
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    try:
        async with full_listener() as port:
            net.send([memoryview(syn(port))])
            await asyncio.sleep(0.1)
            assert not [f for f in drain(net) if tcp_flags(f) >= 0], "nothing is sent while the connect is pending"
            assert net.tcp._pending, "the connect is in progress"
            await asyncio.sleep(1.0)  # the timeout's timer is due first, whatever the test's delay
            flags = [tcp_flags(f) for f in drain(net)]
            assert RST | ACK in flags
            counts = net.counters()
            assert counts["tcp_refused"] == 1 and counts["errors"] == 0
            assert not net.tcp._pending and net.tcp._connecting == 0 and not net.tcp.conns
    finally:
        await net.stop()


async def test_stop_closes_connects_in_progress(monkeypatch) -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    async with full_listener() as port:
        net.send([memoryview(syn(port))])
        assert net.tcp._pending
        socks = [s for s, _ in net.tcp._pending.values()]
        await net.stop()
        assert not net.tcp._pending and all(s.fileno() == -1 for s in socks)


async def test_data_and_fin_sent_before_the_host_transport_is_attached_reach_the_host() -> None:
    """The guest answers the SYN-ACK with data and FIN in the same loop turn; the host still gets both."""
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    got = asyncio.get_running_loop().create_future()

    async def reader(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.set_result(await r.read())  # up to EOF
        w.close()

    srv = await asyncio.start_server(reader, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        net.send([memoryview(syn(port, sport=40200))])
        frames = drain(net)
        if not frames:  # a deferred host handshake: nothing to race, wait for the SYN-ACK
            async with asyncio.timeout(5):
                while not frames:
                    await asyncio.sleep(0.001)
                    frames = drain(net)
        sa = frames[0]
        assert tcp_flags(sa) == SYN | ACK
        their_seq = int.from_bytes(sa[38:42], "big")
        ack = 0x10
        net.send([memoryview(tcp_frame(GUEST_IP, 40200, GW_IP, port, 5001, their_seq + 1, ack, 0xFFFF))])
        net.send([memoryview(tcp_frame(GUEST_IP, 40200, GW_IP, port, 5001, their_seq + 1, ack | 0x08, 0xFFFF,
                                       b"early bytes"))])  # fmt: skip
        net.send([memoryview(tcp_frame(GUEST_IP, 40200, GW_IP, port, 5012, their_seq + 1, ack | 0x01, 0xFFFF))])
        assert await asyncio.wait_for(got, 5) == b"early bytes"
        assert net.counters()["errors"] == 0
    finally:
        srv.close()
        await net.stop()


async def test_guestfwd_target_given_by_name_is_connected_through_the_resolver() -> None:
    """A guestfwd target named 'localhost' (not an address) still connects; the guest's data arrives."""
    got = asyncio.get_running_loop().create_future()

    async def reader(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.set_result(await r.read())
        w.close()

    srv = await asyncio.start_server(reader, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    net = UserNetwork(UserNetConfig.from_string(f"user,guestfwd=tcp:10.0.2.100:1234-tcp:localhost:{port}"))
    await net.start()
    try:
        async with Guest(net) as g:
            c = g.connect(bytes([10, 0, 2, 100]), 1234)
            await c.wait(lambda: c.state == "ESTABLISHED" or c.reset, 10)
            c.write(b"by name")
            c.shutdown()
            assert await asyncio.wait_for(got, 10) == b"by name"
    finally:
        await net.stop()
        srv.close()


async def test_syn_ack_reaches_the_device_before_send_returns() -> None:
    """The guest waits in connect(): its SYN-ACK goes to the device inside send(), ahead of the
    device's transmit-done interrupt, not on a later loop turn."""
    async with stack_and_listener() as (net, lsock, port):
        calls: list[bool] = []
        inside = False

        def ready() -> None:
            calls.append(inside)
            drain(net)

        net.set_ready_callback(ready)
        for i in range(5):
            inside = True
            net.send([memoryview(syn(port, sport=40200 + i))])
            inside = False
            if net.tcp._pending:
                continue  # the host kernel deferred the handshake (a loaded machine)
            assert calls and calls[-1] is True
            break
        else:
            raise AssertionError("no connect finished inside connect()")


def payload(frame: bytes) -> bytes:
    """The TCP payload of an IPv4 frame to the guest."""
    ihl = (frame[14] & 0x0F) * 4
    total = int.from_bytes(frame[16:18], "big")
    doff = (frame[14 + ihl + 12] >> 4) * 4
    return bytes(frame[14 + ihl + doff : 14 + total])


async def test_host_socket_is_watched_a_loop_turn_after_the_syn_ack() -> None:
    """Inside send() the SYN-ACK goes to the device with the socket not yet watched; on the next
    loop turn it is, before the guest's ACK. What the host sends meanwhile waits for that ACK
    (nothing but the SYN-ACK before it), then reaches the guest; data the guest sends with its
    ACK reaches the host."""
    async with stack_and_listener() as (net, lsock, port):
        seen: list[int] = []
        to_guest: list[bytes] = []

        def ready() -> None:
            seen.append(len(net.tcp._attaching))
            to_guest.extend(drain(net))

        net.set_ready_callback(ready)
        for i in range(5):
            sport = 40300 + i
            to_guest.clear()
            net.send([memoryview(syn(port, sport=sport))])
            if net.tcp._pending:
                continue  # the host kernel deferred the handshake (a loaded machine)
            assert seen and seen[-1] == 1, "the SYN-ACK left before the socket was watched"
            conn = next(c for c in net.tcp.conns.values() if c.gport == sport)
            assert conn.transport is None
            await asyncio.sleep(0)
            assert conn.transport is not None and not net.tcp._attaching
            assert conn.state_name == "SYN_RCVD"
            host, _ = lsock.accept()
            with host:
                host.sendall(b"early")
                async with asyncio.timeout(5):
                    while conn.send_queue() < 5:
                        await asyncio.sleep(0.001)
                assert [tcp_flags(f) for f in to_guest] == [SYN | ACK], "data went out before the ACK"
                assert conn.host_paused, "a half-open connection reads once, then leaves the rest to the host"
                ack = tcp_frame(GUEST_IP, sport, GW_IP, port, 5001, conn.iss + 1, ACK | 0x08, 0xFFFF, b"with ack")
                net.send([memoryview(ack)])
                async with asyncio.timeout(5):
                    while b"early" not in [payload(f) for f in to_guest]:
                        await asyncio.sleep(0.001)
                assert not conn.host_paused
                host.sendall(b"later")
                async with asyncio.timeout(5):
                    while b"later" not in [payload(f) for f in to_guest]:
                        await asyncio.sleep(0.001)
                host.settimeout(5)
                assert await asyncio.to_thread(host.recv, 100) == b"with ack"
            break
        else:
            raise AssertionError("no connect finished inside connect()")
        assert net.counters()["errors"] == 0


async def test_guest_ack_in_the_syn_ack_turn_attaches_the_socket() -> None:
    """A guest ACK handled before the loop turns (in the SYN's own batch, as a host-driven peer can)
    attaches the socket itself; the deferred set-up then leaves it alone."""
    async with stack_and_listener() as (net, lsock, port):
        for i in range(5):
            sport = 40350 + i
            net.send([memoryview(syn(port, sport=sport))])
            if net.tcp._pending:
                continue
            conn = next(c for c in net.tcp.conns.values() if c.gport == sport)
            ack = tcp_frame(GUEST_IP, sport, GW_IP, port, 5001, conn.iss + 1, ACK | 0x08, 0xFFFF, b"x")
            net.send([memoryview(ack)])
            transport = conn.transport
            assert transport is not None and conn.state_name == "ESTABLISHED"
            await asyncio.sleep(0)
            assert conn.transport is transport
            host, _ = lsock.accept()
            with host:
                host.settimeout(5)
                assert await asyncio.to_thread(host.recv, 100) == b"x"
            break
        else:
            raise AssertionError("no connect finished inside connect()")
        assert net.counters()["errors"] == 0


async def test_guest_reset_before_the_socket_is_watched_closes_it() -> None:
    """A RST right behind the SYN (same loop turn) ends the connection; the connected socket is closed."""
    async with stack_and_listener() as (net, lsock, port):
        for i in range(5):
            sport = 40400 + i
            net.send([memoryview(syn(port, sport=sport))])
            if not net.tcp._attaching:
                await asyncio.sleep(0.05)
                continue  # the host kernel deferred the handshake (a loaded machine)
            sock = next(iter(net.tcp._attaching.values()))
            frames = drain(net)
            their_seq = int.from_bytes(frames[0][38:42], "big")
            net.send([memoryview(tcp_frame(GUEST_IP, sport, GW_IP, port, 5001, their_seq + 1, RST, 0))])
            assert not net.tcp.conns
            await asyncio.sleep(0)
            assert not net.tcp._attaching and sock.fileno() == -1
            assert net.counters()["errors"] == 0
            break
        else:
            raise AssertionError("no connect finished inside connect()")


async def test_stop_closes_sockets_not_yet_watched() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(8)
        for i in range(5):
            net.send([memoryview(syn(lsock.getsockname()[1], sport=40500 + i))])
            if net.tcp._attaching:
                break
            await asyncio.sleep(0.05)
        else:
            await net.stop()
            raise AssertionError("no connect finished inside connect()")
        socks = list(net.tcp._attaching.values())
        await net.stop()
        assert not net.tcp._attaching and all(s.fileno() == -1 for s in socks)


async def test_frames_from_a_host_event_reach_the_device_in_it_without_a_loop_callback() -> None:
    """The host's data and then its EOF (our FIN) are each handed to the device inside the socket
    event that produced them; no wake-up is left scheduled for a later turn."""
    async with stack_and_listener() as (net, lsock, port):
        got: list[tuple[int, bool]] = []

        def ready() -> None:
            for f in drain(net):
                got.append((tcp_flags(f), net._ready_scheduled))

        net.set_ready_callback(ready)
        net.send([memoryview(syn(port, sport=40700))])
        async with asyncio.timeout(5):
            while not got:
                await asyncio.sleep(0.001)
        assert got[0][0] == SYN | ACK
        conn = next(iter(net.tcp.conns.values()))
        iss = conn.iss
        net.send([memoryview(tcp_frame(GUEST_IP, 40700, GW_IP, port, 5001, iss + 1, ACK, 0xFFFF))])
        host, _ = lsock.accept()
        with host:
            await asyncio.sleep(0.01)
            got.clear()
            host.sendall(b"hello")
            async with asyncio.timeout(5):
                while not got:
                    await asyncio.sleep(0)
            assert got == [(ACK | 0x08, False)]
            host.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(5):
                while len(got) < 2:
                    await asyncio.sleep(0)
            assert got[1] == (ACK | 0x01, False)
            assert not net._ready_scheduled


async def test_socket_that_cannot_be_watched_resets_the_connection(monkeypatch) -> None:
    """If registering the host socket fails (a loop turn after the SYN-ACK), the guest gets a RST
    and the socket is closed; the guest's ACK then finds no connection and is answered by RST."""
    closed: list[socket.socket] = []

    def refuse(nat: object, conn: object, sock: socket.socket, **_kw: object) -> None:
        closed.append(sock)
        raise OSError(12, "no memory for epoll")

    monkeypatch.setattr(tcp_nat, "HostSocket", refuse)
    async with stack_and_listener() as (net, lsock, port):
        net.send([memoryview(syn(port, sport=40800))])
        async with asyncio.timeout(5):
            while not (frames := drain(net)):
                await asyncio.sleep(0.001)
        assert tcp_flags(frames[0]) == SYN | ACK
        their_seq = int.from_bytes(frames[0][38:42], "big")
        async with asyncio.timeout(5):
            while not (frames := frames[1:] + drain(net)):
                await asyncio.sleep(0.001)
        assert tcp_flags(frames[-1]) & RST
        assert not net.tcp.conns and closed and closed[0].fileno() == -1
        net.send([memoryview(tcp_frame(GUEST_IP, 40800, GW_IP, port, 5001, their_seq + 1, ACK, 0xFFFF))])
        await asyncio.sleep(0)
        assert [tcp_flags(f) for f in drain(net)] == [RST]
        assert net.counters()["errors"] == 0


async def test_peer_closing_while_we_yield_has_its_fin_in_the_guests_pass(monkeypatch) -> None:
    """In net-daemon our FIN to the host yields the CPU to the peer (yield_after_host_wakeup). A peer
    that closed meanwhile has its EOF read at once: the guest gets our FIN with the frames of the
    pass that took its own FIN, not after a poll of the host sockets on a later turn."""
    async with stack_and_listener() as (net, lsock, port):
        net.yield_after_host_wakeup = True
        peer: list[socket.socket] = []
        def peer_runs() -> None:  # what our yield lets the peer do: close
            for s in peer:
                s.close()

        monkeypatch.setattr(tcp_nat.os, "sched_yield", peer_runs)
        to_guest: list[bytes] = []

        def ready() -> None:
            to_guest.extend(drain(net))

        net.set_ready_callback(ready)
        try:
            sport = 40900
            net.send([memoryview(syn(port, sport=sport))])
            async with asyncio.timeout(5):
                while not to_guest:
                    await asyncio.sleep(0.001)
            conn = next(iter(net.tcp.conns.values()))
            await asyncio.sleep(0)  # the socket is watched now
            peer.append(lsock.accept()[0])
            net.send([memoryview(tcp_frame(GUEST_IP, sport, GW_IP, port, 5001, conn.iss + 1, ACK, 0xFFFF))])
            to_guest.clear()
            net.send([memoryview(tcp_frame(GUEST_IP, sport, GW_IP, port, 5001, conn.iss + 1, ACK | FIN, 0xFFFF))])
            assert [tcp_flags(f) for f in to_guest] == [FIN | ACK]
            assert conn.state_name == "LAST_ACK"
            assert net.counters()["errors"] == 0
        finally:
            for s in peer:
                s.close()


async def test_ecn_setup_syn_gets_a_plain_syn_ack_and_ece_data_is_taken() -> None:
    """A guest that asks for ECN (SYN with ECE and CWR, RFC 3168 §6.1.1) gets a SYN-ACK without
    ECE, the answer of a host that does not do ECN, and its data with ECE set still arrives."""
    ece, cwr, psh = 0x40, 0x80, 0x08
    async with stack_and_listener() as (net, lsock, port):
        opts = struct.pack("!BBH", 2, 4, 1460)
        net.send([memoryview(tcp_frame(GUEST_IP, 40950, GW_IP, port, 5000, 0, SYN | ece | cwr, 0xFFFF, opts=opts))])
        got = drain(net)
        async with asyncio.timeout(5):
            while not got:
                await asyncio.sleep(0.001)
                got += drain(net)
        assert [tcp_flags(f) for f in got] == [SYN | ACK]
        iss = struct.unpack_from("!I", got[0], 14 + 20 + 4)[0]
        data = tcp_frame(GUEST_IP, 40950, GW_IP, port, 5001, iss + 1, ACK | psh | ece, 0xFFFF, b"hello")
        net.send([memoryview(data)])
        loop = asyncio.get_running_loop()
        lsock.setblocking(False)
        peer, _ = await loop.sock_accept(lsock)
        with peer:
            async with asyncio.timeout(5):
                assert await loop.sock_recv(peer, 100) == b"hello"
                acks = drain(net)
                while not acks:  # the data's ACK goes with the stack's next flush
                    await asyncio.sleep(0.001)
                    acks += drain(net)
        assert [tcp_flags(f) for f in acks] == [ACK]
        assert net.counters()["errors"] == 0 and net.counters()["tcp_bad"] == 0
