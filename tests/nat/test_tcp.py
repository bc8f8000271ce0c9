"""TCP NAT end to end: the test guest's TCP against loopback servers through the stack."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from appliance.nat import UserNetConfig, UserNetwork, tcp_nat
from appliance.nat import tcp as tcpmod

from .peer import ACK, FIN, GW_IP, PSH, SYN, Guest, GuestTcp, tcp_flags

MB = 1 << 20


class Sink:
    """A loopback server that hashes everything it receives, then closes."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.n = 0
        self.done = asyncio.Event()
        self.eof_then: bytes = b""

    async def handler(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while chunk := await r.read(MB):
            self.hash.update(chunk)
            self.n += len(chunk)
        if self.eof_then:
            w.write(self.eof_then)
            await w.drain()
        w.close()
        self.done.set()


async def serve(handler) -> tuple[asyncio.Server, int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@pytest.fixture
async def net() -> AsyncIterator[UserNetwork]:
    n = UserNetwork(UserNetConfig.from_string("user,hostfwd=tcp:127.0.0.1:0-:7777"))
    await n.start()
    yield n
    await n.stop()


async def established(c: GuestTcp) -> None:
    await c.wait(lambda: c.state == "ESTABLISHED" or c.reset, 10)
    assert c.state == "ESTABLISHED"


@contextlib.asynccontextmanager
async def connected_to_sink(
    net: UserNetwork, sink: Sink | None = None, *, vnet: bool = False
) -> AsyncIterator[tuple[Guest, GuestTcp, Sink]]:
    """A test guest on ``net`` with an established connection to ``sink`` (a new one by default)
    served on loopback through the gateway; the server is closed after, the guest stopped."""
    sink = sink if sink is not None else Sink()
    srv, port = await serve(sink.handler)
    try:
        async with Guest(net, vnet=vnet) as g:
            c = g.connect(GW_IP, port)
            await established(c)
            yield g, c, sink
    finally:
        srv.close()


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


async def test_upload_50mb_to_loopback_server_matches_sha256_and_closes(net: UserNetwork) -> None:
    sink = Sink()
    srv, port = await serve(sink.handler)
    data = os.urandom(50 * MB)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await established(c)
        c.write(data)
        c.shutdown()
        await asyncio.wait_for(sink.done.wait(), 60)
        assert sink.n == len(data)
        assert sink.hash.hexdigest() == hashlib.sha256(data).hexdigest()
        await c.wait(lambda: c.fin_rcvd and c.fin_acked, 10)
    await asyncio.sleep(0.05)
    # Only the hostfwd listener is left (listed, as QEMU's info usernet lists it).
    assert [f for f in net.flows() if f.state not in ("TIME_WAIT", "CLOSED", "LISTEN")] == []
    assert net.counters()["errors"] == 0
    srv.close()


async def test_download_50mb_from_loopback_server_matches_sha256(net: UserNetwork) -> None:
    data = os.urandom(50 * MB)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(data)
        await w.drain()
        w.close()

    srv, port = await serve(handler)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        h = hashlib.sha256()
        c.on_data = h.update
        await c.wait(lambda: c.fin_rcvd, 60)
        assert c.rcv_nxt - 2 == len(data)
        assert h.hexdigest() == hashlib.sha256(data).hexdigest()
        c.shutdown()
        await c.wait(lambda: c.fin_acked, 10)
    srv.close()


async def test_segments_respect_the_guest_mss(net: UserNetwork) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"z" * 20000)
        await w.drain()
        w.close()

    srv, port = await serve(handler)
    async with Guest(net) as g:
        sizes: list[int] = []
        c = g.connect(GW_IP, port, mss=536)
        c.on_data = lambda d: sizes.append(len(d))
        await c.wait(lambda: c.fin_rcvd, 10)
        assert max(sizes) <= 536 and sum(sizes) == 20000
    srv.close()


async def test_connection_refused_becomes_rst(net: UserNetwork) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await c.wait(lambda: c.reset, 10)
    assert net.counters()["tcp_refused"] == 1
    assert net.tcp.conns == {}


async def test_host_side_accepts_once_the_guests_syn_ack_is_out_without_its_ack(net: UserNetwork) -> None:
    # The host socket's last handshake ACK is held while we answer the guest's SYN, so the
    # loopback server's accept() does not run inside our connect() ahead of the SYN-ACK; it is
    # sent on the next loop turn, so the server accepts while the guest takes its SYN-ACK, not
    # only once the guest's ACK arrives (which this test never lets through).
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    lst.setblocking(False)
    port = lst.getsockname()[1]
    try:
        async with Guest(net) as g:
            held: list[bytes] = []
            to_stack = g.link.to_stack

            def hold_acks(frame: bytes) -> None:
                if frame[47] == 0x10:  # a pure ACK: the end of a guest handshake
                    held.append(frame)
                    return
                to_stack(frame)

            g.link.to_stack = hold_acks  # type: ignore[method-assign]
            loop = asyncio.get_running_loop()
            delays: list[float] = []
            # Up to three connections, the quickest counted: a loaded machine can hold this
            # process up past 20 ms once, where a delayed ACK (>= 40 ms) would be late every time.
            for _ in range(3):
                start = loop.time()
                c = g.connect(GW_IP, port)  # the SYN is handled (and connect()ed) in here
                sent = loop.time()
                if _readable(lst):
                    # Accepted already: inside our connect() unless this process stalled long
                    # enough for a delayed ACK (>= 40 ms) to go out meanwhile.
                    assert sent - start > 0.03, "the host handshake completed inside the SYN's handling"
                async with asyncio.timeout(5):
                    while not _readable(lst):
                        await asyncio.sleep(0.001)
                delays.append(loop.time() - sent)
                await established(c)  # the guest had its SYN-ACK
                peer, _ = lst.accept()
                peer.close()
                if delays[-1] < 0.02:
                    break
            assert min(delays) < 0.02, delays
            assert held  # the guest's handshake ACKs never reached the stack
    finally:
        lst.close()


async def test_guest_fin_to_a_peer_done_sending_leaves_after_the_guests_pass(net: UserNetwork) -> None:
    # A hostfwd client that sent its request and its FIN waits only for our FIN; it goes out a
    # loop turn after the guest's frames are handled (and the guest signalled), so the woken
    # client does not run ahead of the rest of the stack's pass.
    async with Guest(net) as g:
        accepted = g.listen(7777)
        client = socket.create_connection(("127.0.0.1", net.tcp.listener_ports()[0]), timeout=5)
        try:
            client.sendall(b"q")
            client.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(10):
                while not accepted:
                    await asyncio.sleep(0.005)
            gc = accepted[0]
            await gc.wait(lambda: gc.fin_rcvd and gc.read() == b"q")
            gc.shutdown()  # the guest's FIN: handled (net.send) before this returns
            assert not _readable(client)
            async with asyncio.timeout(5):
                while not _readable(client):
                    await asyncio.sleep(0)
            assert client.recv(16) == b""
            await gc.wait(lambda: gc.fin_acked)
        finally:
            client.close()


async def test_guest_fin_to_a_peer_still_sending_leaves_inside_the_guests_pass(net: UserNetwork) -> None:
    # A peer that has not closed answers our FIN with its own, which the guest waits for: that
    # FIN is not held back to the end of the pass.
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    try:
        async with Guest(net) as g:
            c = g.connect(GW_IP, lst.getsockname()[1])
            await established(c)
            lst.settimeout(5)
            peer, _ = lst.accept()
            with peer:
                c.shutdown()
                # No loop turn since the guest's FIN (a blocking wait runs none: a loaded host
                # may hand loopback's softirq to ksoftirqd, so the FIN can take a moment).
                assert select.select([peer], [], [], 2)[0]
                assert peer.recv(16) == b""
                peer.close()
                await c.wait(lambda: c.fin_rcvd and c.fin_acked, 10)
    finally:
        lst.close()


async def test_hostfwd_connection_reaches_guest_listener_both_ways(net: UserNetwork) -> None:
    async with Guest(net) as g:
        accepted = g.listen(7777)
        hp = net.tcp.listener_ports()[0]
        r, w = await asyncio.open_connection("127.0.0.1", hp)
        w.write(b"hello guest")
        async with asyncio.timeout(10):
            while not accepted:
                await asyncio.sleep(0.01)
        gc = accepted[0]
        await gc.wait(lambda: len(gc.rx) >= 11)
        assert gc.read() == b"hello guest"
        assert gc.rip == GW_IP
        assert any(f.proto == "TCP[HOST_FORWARD]" and f.state == "ESTABLISHED" for f in net.flows())
        big = os.urandom(3 * MB)
        gc.write(big)
        gc.shutdown()
        got = await asyncio.wait_for(r.read(), 20)
        assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
        w.write(b"bye")
        w.write_eof()
        await gc.wait(lambda: gc.fin_rcvd and gc.fin_acked)
        assert gc.read() == b"bye"
        w.close()


@pytest.mark.parametrize("seed", [1, 2])
async def test_transfers_complete_with_5pct_drop_dup_reorder_each_way(net: UserNetwork, seed: int) -> None:
    sink = Sink()
    down = os.urandom(MB)
    sink.eof_then = down
    srv, port = await serve(sink.handler)
    up = os.urandom(MB)
    async with Guest(net, loss=0.05, seed=seed) as g:
        c = g.connect(GW_IP, port)
        await established(c)
        h = hashlib.sha256()
        c.on_data = h.update
        c.write(up)
        c.shutdown()
        await asyncio.wait_for(sink.done.wait(), 60)
        assert sink.hash.hexdigest() == hashlib.sha256(up).hexdigest()
        await c.wait(lambda: c.fin_rcvd, 60)
        assert h.hexdigest() == hashlib.sha256(down).hexdigest()
    assert net.counters()["tcp_retransmits"] + net.counters()["tcp_timeouts"] > 0
    srv.close()


async def test_half_close_guest_keeps_receiving_after_its_fin(net: UserNetwork) -> None:
    sink = Sink()
    sink.eof_then = b"after your FIN" * 1000
    srv, port = await serve(sink.handler)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await established(c)
        c.write(b"request")
        c.shutdown()
        await c.wait(lambda: c.fin_rcvd, 10)
        assert bytes(c.rx) == sink.eof_then
        assert sink.n == 7
    srv.close()


async def test_half_close_host_eof_still_accepts_guest_data(net: UserNetwork) -> None:
    got = bytearray()
    done = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"banner")
        w.write_eof()
        while chunk := await r.read(MB):
            got.extend(chunk)
        w.close()
        done.set()

    srv, port = await serve(handler)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await c.wait(lambda: c.fin_rcvd, 10)
        assert c.read() == b"banner"
        c.write(b"x" * 100000)
        c.shutdown()
        await asyncio.wait_for(done.wait(), 10)
        assert bytes(got) == b"x" * 100000
    srv.close()


async def test_host_reset_becomes_guest_rst(net: UserNetwork) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(5)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    srv, port = await serve(handler)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await established(c)
        c.write(b"hello")
        await c.wait(lambda: c.reset, 10)
    srv.close()


async def test_guest_reset_closes_host_socket(net: UserNetwork) -> None:
    closed = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.read()
        except ConnectionError:
            pass
        closed.set()

    srv, port = await serve(handler)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await established(c)
        c.abort()
        await asyncio.wait_for(closed.wait(), 5)
    assert net.tcp.conns == {}
    srv.close()


async def test_zero_window_is_probed_and_host_reading_pauses(net: UserNetwork, monkeypatch) -> None:
    """The guest closes its window; the stack probes, stops reading the host, and resumes when it opens."""
    monkeypatch.setattr(tcpmod, "MAX_RTO", 0.5)
    data = os.urandom(24 * MB)  # more than loopback socket buffers can absorb
    writer_done = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(data)
        await w.drain()
        w.close()
        writer_done.set()

    srv, port = await serve(handler)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await established(c)
        c.window_override = 0
        c._send(0x10, c.snd_nxt)
        [conn] = net.tcp.conns.values()
        async with asyncio.timeout(20):  # polled, not slept: CI machines can be slow
            while not (conn.host_paused and net.counters()["tcp_window_probes"] >= 2 and c.probes_seen >= 2):
                await asyncio.sleep(0.05)
        assert conn.send_queue() <= tcpmod.SNDBUF + 256 * 1024
        assert conn.state == tcpmod.ESTABLISHED
        assert net.counters()["tcp_window_probes"] >= 2 and c.probes_seen >= 2
        assert not writer_done.is_set()
        c.window_override = None
        h = hashlib.sha256()
        h.update(c.read())
        c.on_data = h.update
        c._send(0x10, c.snd_nxt)
        await c.wait(lambda: c.fin_rcvd, 30)
        assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    srv.close()


async def test_slow_host_reader_closes_the_guest_window(net: UserNetwork) -> None:
    """A host server that does not read: the stack's buffering stays bounded by its window."""
    release = asyncio.Event()
    sink = Sink()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await release.wait()
        await sink.handler(r, w)

    srv, port = await serve(handler)
    data = os.urandom(16 * MB)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await established(c)
        c.write(data)
        c.shutdown()
        await asyncio.sleep(1.0)
        [conn] = net.tcp.conns.values()
        assert conn.recv_queue() <= tcpmod.RCVBUF + 64 * 1024
        assert c.unacked() > 2 * MB  # the guest is held back by the window
        release.set()
        await asyncio.wait_for(sink.done.wait(), 30)
        assert sink.hash.hexdigest() == hashlib.sha256(data).hexdigest()
    srv.close()


async def test_many_parallel_connections_each_complete(net: UserNetwork) -> None:
    sinks: list[Sink] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        s = Sink()
        sinks.append(s)
        await s.handler(r, w)

    srv, port = await serve(handler)
    payloads = [os.urandom(100_000 + i) for i in range(20)]
    async with Guest(net) as g:
        conns = [g.connect(GW_IP, port) for _ in payloads]
        for c, p in zip(conns, payloads, strict=True):
            await established(c)
            c.write(p)
            c.shutdown()
        for c in conns:
            await c.wait(lambda c=c: c.fin_rcvd, 20)
    assert sorted(s.n for s in sinks) == sorted(len(p) for p in payloads)
    assert {s.hash.hexdigest() for s in sinks} == {hashlib.sha256(p).hexdigest() for p in payloads}
    srv.close()


async def test_guestfwd_sends_guest_connections_to_the_configured_host_service() -> None:
    sink = Sink()
    srv, port = await serve(sink.handler)
    net = UserNetwork(UserNetConfig.from_string(f"user,guestfwd=tcp:10.0.2.100:1234-tcp:127.0.0.1:{port}"))
    await net.start()
    try:
        async with Guest(net) as g:
            c = g.connect(bytes([10, 0, 2, 100]), 1234)
            await established(c)
            c.write(b"via guestfwd")
            c.shutdown()
            await asyncio.wait_for(sink.done.wait(), 10)
        assert sink.n == len(b"via guestfwd")
    finally:
        await net.stop()
        srv.close()


async def test_guestfwd_cmd_runs_the_command_for_each_connection() -> None:
    # QEMU's guestfwd=…-cmd:: each connection talks to a new run of the command,
    # split into words as a shell would but run without one; its stdin, stdout
    # and stderr are the connection. A comma is written doubled on the command line.
    net = UserNetwork(UserNetConfig.from_string(
        "user,guestfwd=tcp:10.0.2.100:1234-cmd:sh -c 'tr a-z A-Z; echo done,,ok; echo oops >&2'"))
    await net.start()
    try:
        async with Guest(net) as g:
            for word in (b"first", b"second"):
                c = g.connect(bytes([10, 0, 2, 100]), 1234)
                await established(c)
                c.write(word + b"\n")
                c.shutdown()
                await c.wait(lambda c=c: c.fin_rcvd, 10)
                assert bytes(c.rx) == word.upper() + b"\ndone,ok\noops\n"
    finally:
        await net.stop()


async def test_guestfwd_cmd_processes_end_with_their_connection_and_are_capped() -> None:
    import os
    import subprocess

    from appliance.nat.tcp_nat import MAX_COMMANDS

    marker = f"appliance-guestfwd-{os.getpid()}"
    net = UserNetwork(UserNetConfig.from_string(
        f"user,guestfwd=tcp:10.0.2.100:1234-cmd:sh -c 'sleep 600; : {marker}'"))
    await net.start()

    def running() -> int:
        out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
        return len(out.split())

    try:
        async with Guest(net) as g:
            conns = [g.connect(bytes([10, 0, 2, 100]), 1234) for _ in range(MAX_COMMANDS + 2)]
            for c in conns[:MAX_COMMANDS]:
                await established(c)
            for c in conns[MAX_COMMANDS:]:
                await c.wait(lambda c=c: c.reset, 10)  # refused: too many running
            for _ in range(100):  # a loaded machine may not have exec'd them all yet
                if running() == MAX_COMMANDS:
                    break
                await asyncio.sleep(0.05)
            assert running() == MAX_COMMANDS
            conns[0].abort()  # a RST from the guest ends that one's command
            for _ in range(100):
                if running() == MAX_COMMANDS - 1:
                    break
                await asyncio.sleep(0.05)
            assert running() == MAX_COMMANDS - 1
    finally:
        await net.stop()
    for _ in range(100):
        if running() == 0:
            break
        await asyncio.sleep(0.05)
    assert running() == 0  # none outlives the network


async def test_restrict_on_refuses_outbound_tcp_but_keeps_hostfwd() -> None:
    sink = Sink()
    srv, port = await serve(sink.handler)
    net = UserNetwork(UserNetConfig.from_string("user,restrict=on,hostfwd=tcp:127.0.0.1:0-:7777"))
    await net.start()
    try:
        async with Guest(net) as g:
            c = g.connect(GW_IP, port)
            await c.wait(lambda: c.reset, 5)
            assert sink.n == 0 and net.counters()["restricted"] == 1
            accepted = g.listen(7777)
            r, w = await asyncio.open_connection("127.0.0.1", net.tcp.listener_ports()[0])
            async with asyncio.timeout(5):
                while not accepted:
                    await asyncio.sleep(0.01)
            await established(accepted[0])
            w.close()
    finally:
        await net.stop()
        srv.close()


async def test_connection_to_an_unused_lan_address_is_reset(net: UserNetwork) -> None:
    async with Guest(net) as g:
        c = g.connect(bytes([10, 0, 2, 99]), 80)
        await c.wait(lambda: c.reset, 5)


async def test_info_rows_read_as_libslirps(net: UserNetwork) -> None:
    """libslirp's slirp_connection_info: a flow the guest started reads guest -> the address it
    used; a hostfwd connection reads the accepted socket's own address -> guest; both above the
    listeners; a datagram on a UDP forward adds no row of its own."""
    await net.add_hostfwd("udp:127.0.0.1:0-:5353")
    udp_port = net.udp._listeners[0][0].getsockname()[1]
    sink = Sink()
    srv, port = await serve(sink.handler)
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await established(c)
        g.send_udp(GW_IP, 40000, echo.getsockname()[1], b"x")
        accepted = g.listen(7777)
        hp = net.tcp.listener_ports()[0]
        _r, w = await asyncio.open_connection("127.0.0.1", hp)
        async with asyncio.timeout(10):
            while not accepted or accepted[0].state != "ESTABLISHED":
                await asyncio.sleep(0.01)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.sendto(b"q", ("127.0.0.1", udp_port))
        async with asyncio.timeout(10):
            while not g.udp or len(net.udp._flows) < 2:  # the guest's flow and the forwarded one
                await asyncio.sleep(0.01)
        lines = net.info().splitlines()
        rows = [ln.split() for ln in lines[1:]]
        assert lines[0].startswith("  Protocol[State]")
        kinds = [r[0] for r in rows]
        assert kinds == ["TCP[ESTABLISHED]", "TCP[ESTABLISHED]", "TCP[HOST_FORWARD]", kinds[3], "UDP[HOST_FORWARD]"]
        assert kinds[3].startswith("UDP[") and rows[3][1] == "sec]", lines
        fwd_row, out_row = rows[0], rows[1]  # newest first: the hostfwd connection came second
        assert fwd_row[2:6] == ["127.0.0.1", str(hp), "10.0.2.15", "7777"], lines
        assert out_row[2:6] == ["10.0.2.15", str(c.lport), "10.0.2.2", str(port)], lines
        assert rows[2][2:6] == ["127.0.0.1", str(hp), "10.0.2.15", "7777"]
        # The JSON rows also name the outside client of the forwarded connection.
        [fwd_flow] = [f for f in net.flows() if f.proto == "TCP[HOST_FORWARD]" and f.state == "ESTABLISHED"]
        assert (fwd_flow.peer_addr, fwd_flow.peer_port) == w.get_extra_info("sockname")[:2]
        udp_row = rows[3]
        assert udp_row[3:7] == ["10.0.2.15", "40000", "10.0.2.2", str(echo.getsockname()[1])], lines
        assert rows[4][2:6] == ["127.0.0.1", str(udp_port), "10.0.2.15", "5353"], lines
        c.abort()
        w.close()
        client.close()
    echo.close()
    srv.close()


async def test_small_guest_queue_backpressures_downloads_without_loss() -> None:
    """With a 16-frame queue toward the guest, the sender waits for the guest to drain it."""
    net = UserNetwork(UserNetConfig(), queue_limit=16)
    await net.start()
    data = os.urandom(4 * MB)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(data)
        await w.drain()
        w.close()

    srv, port = await serve(handler)
    try:
        async with Guest(net) as g:
            c = g.connect(GW_IP, port)
            h = hashlib.sha256()
            c.on_data = h.update
            await c.wait(lambda: c.fin_rcvd, 30)
            assert h.hexdigest() == hashlib.sha256(data).hexdigest()
        assert net.queued() <= 16
    finally:
        await net.stop()
        srv.close()


async def test_reconnect_from_same_port_during_time_wait_starts_a_new_connection(net: UserNetwork) -> None:
    async def closer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()  # the host closes first, so the stack's side ends in TIME-WAIT

    srv, port = await serve(closer)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await c.wait(lambda: c.fin_rcvd)
        c.shutdown()
        await c.wait(lambda: c.fin_acked)
        [old] = net.tcp.conns.values()
        assert old.state == tcpmod.TIME_WAIT_STATE
        del g.tcp[(c.lport, c.rip, c.rport)]
        g._next_port = c.lport - 1  # same source port again
        c2 = g.connect(GW_IP, port)
        assert c2.lport == c.lport
        # The SYN went through send() synchronously: the TIME-WAIT entry is already replaced.
        assert net.tcp.conns[old.key] is not old and old.state == tcpmod.CLOSED
        await established(c2)
        c2.abort()
    srv.close()


async def test_guest_window_probe_into_our_closed_window_is_answered(net: UserNetwork) -> None:
    """When our receive window is closed, a probe at RCV.NXT is not taken but answered with window 0."""
    sink = Sink()
    srv, port = await serve(sink.handler)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await established(c)
        [conn] = net.tcp.conns.values()
        conn._adv_edge = conn.rcv_nxt  # as if the host reader had stalled and the window closed
        conn._rcv_space = lambda: 0  # type: ignore[method-assign]
        c.peer_wnd = 1
        c.write(b"P")
        async with asyncio.timeout(5):
            while c.peer_wnd != 0:  # until the ACK restating a closed window comes back
                await asyncio.sleep(0.005)
        assert conn.rcv_nxt == 1  # and the byte was not taken
        del conn._rcv_space  # the window opens again; the stack says so
        conn.send_ack()
        await c.wait(lambda: c.unacked() == 0, 5)
        c.shutdown()
        await asyncio.wait_for(sink.done.wait(), 5)
        assert sink.n == 1
    srv.close()


async def test_window_closing_under_data_in_flight_probes_instead_of_timing_out(net: UserNetwork, monkeypatch) -> None:
    """The guest closes its window with our data in flight and keeps it closed: no abort, no timeouts."""
    monkeypatch.setattr(tcpmod, "MAX_RETRIES", 2)
    monkeypatch.setattr(tcpmod, "MAX_RTO", 0.2)
    data = os.urandom(2 * MB)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(data)
        await w.drain()
        w.close()

    srv, port = await serve(handler)
    async with Guest(net) as g:
        c = g.connect(GW_IP, port)
        await established(c)
        c.window_override = 0  # refuse everything from now on, acking with a zero window
        await asyncio.sleep(2.5)  # past the first RTO (1 s, no RTT sample yet) and its backoffs
        [conn] = net.tcp.conns.values()
        assert conn.state == tcpmod.ESTABLISHED and not c.reset
        assert net.counters()["tcp_timeouts"] == 0  # the in-flight data was taken back, then probed
        c.window_override = None
        h = hashlib.sha256()
        h.update(c.read())
        c.on_data = h.update
        c._send(0x10, c.snd_nxt)
        await c.wait(lambda: c.fin_rcvd, 30)
        assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    srv.close()


async def test_dns_over_tcp_to_the_dns_address_reaches_the_upstream_resolver() -> None:
    sink = Sink()
    srv, port = await serve(sink.handler)
    net = UserNetwork(UserNetConfig(nameservers=(("127.0.0.1", port),)))
    await net.start()
    try:
        async with Guest(net) as g:
            c = g.connect(bytes([10, 0, 2, 3]), 53)
            await established(c)
            c.write(b"\x00\x05query")
            c.shutdown()
            await asyncio.wait_for(sink.done.wait(), 10)
            assert sink.n == 7
            other = g.connect(bytes([10, 0, 2, 3]), 80)  # only port 53 is served there
            await other.wait(lambda: other.reset, 5)
    finally:
        await net.stop()
        srv.close()


async def test_hostfwd_added_and_removed_at_run_time(net: UserNetwork) -> None:
    async with Guest(net) as g:
        accepted = g.listen(8080)
        fwd = await net.add_hostfwd("tcp:127.0.0.1:0-:8080")
        assert fwd.guest_port == 8080
        port = net.tcp.listener_ports()[0]  # the newest first, as libslirp lists them
        r, w = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            while not accepted:
                await asyncio.sleep(0.01)
        await established(accepted[0])
        w.close()
        assert net.remove_hostfwd(f"tcp:127.0.0.1:{port}") is True
        assert net.remove_hostfwd(f"tcp:127.0.0.1:{port}") is False
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)


async def test_lost_fin_and_lost_fin_retransmissions_are_sent_again(net: UserNetwork) -> None:
    """Fuzz finding (lossy transfer, seed 23): after the tail-loss probe resent a lost FIN, no timer was
    left running, so losing that copy too stalled the close forever."""

    async def closer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"last words")
        await w.drain()
        w.close()

    srv, port = await serve(closer)
    async with Guest(net) as g:
        dropped = []

        def drop_first_fins(frame: bytes) -> bool:
            flags = tcp_flags(frame)
            is_fin = flags >= 0 and flags & FIN
            if is_fin and len(dropped) < 3:
                dropped.append(frame)
                return True
            return False

        g.link.drop_from_stack = drop_first_fins
        c = g.connect(GW_IP, port)
        await c.wait(lambda: c.fin_rcvd, 30)
        assert len(dropped) == 3 and bytes(c.rx) == b"last words"
    srv.close()


async def test_hostfwd_transfer_completes_with_5pct_drop_dup_reorder_each_way(net: UserNetwork) -> None:
    up, down = os.urandom(MB), os.urandom(MB)
    async with Guest(net, loss=0.05, seed=6) as g:
        accepted = g.listen(7777)
        r, w = await asyncio.open_connection("127.0.0.1", net.tcp.listener_ports()[0])
        async with asyncio.timeout(60):
            while not accepted:
                await asyncio.sleep(0.01)
            c = accepted[0]
            h = hashlib.sha256()
            c.on_data = h.update
            w.write(up)
            w.write_eof()
            await c.wait(lambda: c.state in ("ESTABLISHED", "CLOSE_WAIT"))
            c.write(down)
            c.shutdown()
            got = await r.read()
            await c.wait(lambda: c.fin_rcvd)
        assert hashlib.sha256(got).digest() == hashlib.sha256(down).digest()
        assert h.digest() == hashlib.sha256(up).digest()
        w.close()


@pytest.mark.parametrize("own_process", [False, True])
async def test_shutting_the_host_socket_down_yields_only_in_a_stack_of_its_own(
    net: UserNetwork, own_process: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # net-daemon gives the CPU to the host peer it just sent our EOF to; in a VM's own process
    # the yield would hand the GIL to its vCPU threads instead.
    yields: list[int] = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(1))
    net.yield_after_host_wakeup = own_process
    async with connected_to_sink(net) as (_g, c, sink):
        c.write(b"x")
        c.shutdown()
        await asyncio.wait_for(sink.done.wait(), 10)
        await c.wait(lambda: c.fin_rcvd, 10)
    assert sink.n == 1
    assert yields == ([1] if own_process else [])


async def test_hostfwd_data_written_before_the_handshake_goes_out_with_its_ack(
    net: UserNetwork, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host client that writes (and closes) at once: what it sent is read in the guest's pass
    # that completes the handshake, so it reaches the guest in the same batch as the ACK (one
    # interrupt) instead of a loop turn later; its socket, read to EOF, is never put in the epoll.
    # The ACK, the data and the FIN are one segment (RFC 9293 §3.10.7.3 lets the ACK carry them).
    async with Guest(net) as g:
        accepted = g.listen(7777)
        to_stack = g.link.to_stack
        with_ack: list[bytes] = []
        watched: list[bool] = []
        registered: list[int] = []  # descriptors the NAT's epoll was asked to watch for something
        watch = tcp_nat.HostPoller.watch

        def counting_watch(self: tcp_nat.HostPoller, fd: int, who: object, mask: int) -> None:
            if mask:
                registered.append(fd)
            watch(self, fd, who, mask)  # type: ignore[arg-type]

        monkeypatch.setattr(tcp_nat.HostPoller, "watch", counting_watch)

        def watch_syn_ack(frame: bytes) -> None:
            to_stack(frame)
            if tcp_flags(frame) == SYN | ACK and frame[34:36] == (7777).to_bytes(2, "big"):
                watched.extend(c.transport._fd in registered for c in net.tcp.conns.values())  # type: ignore[union-attr]
                # Everything the stack queued while handling the SYN-ACK, before any loop turn.
                frames = g.link.from_stack()
                with_ack.extend(frames)
                for f in frames:
                    g.handle(f)

        g.link.to_stack = watch_syn_ack  # type: ignore[method-assign]
        r, w = await asyncio.open_connection("127.0.0.1", net.tcp.listener_ports()[0])
        w.write(b"hello guest")
        w.write_eof()
        async with asyncio.timeout(10):
            while not accepted:
                await asyncio.sleep(0.01)
        gc = accepted[0]
        await gc.wait(lambda: gc.fin_rcvd)
        assert gc.read() == b"hello guest"
        segments = [(tcp_flags(f), _payload(f)) for f in with_ack if tcp_flags(f) >= 0]
        assert segments == [(ACK | PSH | FIN, b"hello guest")], with_ack
        assert watched == [False]
        gc.shutdown()
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()


async def test_hostfwd_segment_with_data_and_fin_is_resent_whole(net: UserNetwork) -> None:
    # The host's data and FIN went in one segment; when the guest loses it, what is resent
    # (the tail loss probe, then the RTO's go-back-N) carries both again.
    async with Guest(net) as g:
        accepted = g.listen(7777)
        sent: list[tuple[int, bytes]] = []

        def drop_first_data_fin(frame: bytes) -> bool:
            if tcp_flags(frame) >= 0 and frame[36:38] == (7777).to_bytes(2, "big"):
                if _payload(frame):
                    sent.append((tcp_flags(frame), _payload(frame)))
                    return len(sent) == 1
            return False

        g.link.drop_from_stack = drop_first_data_fin
        r, w = await asyncio.open_connection("127.0.0.1", net.tcp.listener_ports()[0])
        w.write(b"once more")
        w.write_eof()
        async with asyncio.timeout(10):
            while not accepted or not accepted[0].fin_rcvd:
                await asyncio.sleep(0.01)
        gc = accepted[0]
        assert gc.read() == b"once more"
        assert len(sent) >= 2, sent
        assert all(flags & FIN and data == b"once more" for flags, data in sent), sent
        gc.shutdown()
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()


async def test_hostfwd_stream_and_fin_sent_before_the_handshake_reach_the_guest_whole(net: UserNetwork) -> None:
    # The pass that completes the handshake reads the start of the stream inline (a greeting is
    # read with its FIN); the rest comes through the poller, paced by the guest's window, and the
    # FIN comes once, after the last byte.
    blob = os.urandom(3 * tcp_nat.RECV_SIZE)
    async with Guest(net) as g:
        accepted = g.listen(7777)
        to_stack = g.link.to_stack
        queued: list[int] = []
        fins: list[bytes] = []

        def watch_syn_ack(frame: bytes) -> None:
            to_stack(frame)
            if tcp_flags(frame) == SYN | ACK:
                queued.extend(c.send_queue() for c in net.tcp.conns.values())

        g.link.to_stack = watch_syn_ack  # type: ignore[method-assign]
        # The first SYN is lost: the client has written all and closed when the guest answers
        # the one resent (INITIAL_RTO later).
        syns: list[bytes] = []

        def drop_first_syn(frame: bytes) -> bool:
            flags = tcp_flags(frame)
            if flags >= 0:
                if flags & FIN:
                    fins.append(frame)
                if flags == SYN:
                    syns.append(frame)
                    return len(syns) == 1
            return False

        g.link.drop_from_stack = drop_first_syn
        r, w = await asyncio.open_connection("127.0.0.1", net.tcp.listener_ports()[0])
        w.write(blob)
        await w.drain()
        w.write_eof()
        async with asyncio.timeout(20):
            while not accepted or not accepted[0].fin_rcvd:
                await asyncio.sleep(0.01)
        gc = accepted[0]
        assert gc.read() == blob
        assert len(syns) == 2
        assert len(queued) == 1 and 0 < queued[0] < len(blob), queued  # some read inline, not all
        # One FIN, after the last byte (on that byte's segment only if read together).
        assert len(fins) == 1 and (_payload(fins[0]) == b"" or _payload(fins[0]).endswith(blob[-16:])), fins
        gc.shutdown()
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()


def _payload(frame: bytes) -> bytes:
    """The TCP payload of an IPv4 frame without options in its IP header."""
    total = int.from_bytes(frame[16:18], "big")
    return frame[14 + 20 + (frame[46] >> 4) * 4 : 14 + total]


async def test_hostfwd_syn_goes_to_the_device_in_the_accepting_callback(net: UserNetwork) -> None:
    # The guest waits in accept(): the SYN for a forwarded connection is handed to the device
    # while the listener's event is handled, not from a call_soon a loop turn later.
    import inspect

    from appliance.nat.tcp_nat import _ListenSocket

    async with Guest(net) as g:
        accepted = g.listen(7777)
        port = net.tcp.listener_ports()[0]
        wake = g.link.ready.set
        from_listener: list[bool] = []

        def ready() -> None:
            from_listener.append(any(isinstance(f.frame.f_locals.get("self"), _ListenSocket) for f in inspect.stack()))
            wake()

        net.set_ready_callback(ready)
        for n in (1, 2):  # the first also resolves the guest's MAC (ARP)
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(10):
                while len(accepted) < n:
                    await asyncio.sleep(0.01)
            w.close()
        assert any(from_listener), from_listener


async def test_host_sockets_of_both_directions_have_tcp_nodelay(net: UserNetwork) -> None:
    # HostSocket sets no options itself: an outbound socket gets TCP_NODELAY where it is made,
    # a hostfwd one from its listener (Linux's accepted sockets inherit it).
    async with connected_to_sink(net) as (g, _c, _sink):
        accepted = g.listen(7777)
        r, w = await asyncio.open_connection("127.0.0.1", net.tcp.listener_ports()[0])
        async with asyncio.timeout(10):
            while not accepted:
                await asyncio.sleep(0.01)
        socks = [conn.transport._sock for conn in net.tcp.conns.values()]  # type: ignore[union-attr]
        assert len(socks) == 2
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)
        w.close()
