"""HostSocket: the loop-driven host end of an outbound connection, checked against a plain socket pair."""

from __future__ import annotations

import asyncio
import socket

from appliance.nat import UserNetConfig, UserNetwork, tcp_nat
from appliance.nat.tcp import CLOSED, ESTABLISHED


class FakeConn:
    """Records what a HostSocket reports, as TcpConn would receive it."""

    def __init__(self) -> None:
        self.state = ESTABLISHED
        self.data = bytearray()
        self.eof = False
        self.lost: list[Exception | None] = []
        self.drained = 0

    def host_data(self, data: bytes) -> None:
        self.data += data

    def host_eof(self) -> None:
        self.eof = True

    def host_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def host_drained(self) -> None:
        self.drained += 1


async def until(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.002)


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback pair with small kernel buffers, so our own buffer fills quickly."""
    with socket.socket() as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        ours = socket.socket()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        ours.connect(lsock.getsockname())
        peer, _ = lsock.accept()
    ours.setblocking(False)
    peer.setblocking(False)
    return ours, peer


async def read_all(sock: socket.socket, until_eof: bool = True, limit: int = 1 << 30) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < limit:
        chunk = await loop.sock_recv(sock, 1 << 20)
        if not chunk:
            break
        out += chunk
    return bytes(out)


async def test_data_both_ways_eof_and_close_flush_the_buffer() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    ours, peer = pair()
    conn = FakeConn()
    try:
        hs = tcp_nat.HostSocket(net.tcp, conn, ours)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(peer, b"from host")
        await until(lambda: bytes(conn.data) == b"from host")
        # More than the kernel takes at once: the rest waits in our buffer until the peer reads.
        blob = bytes(range(256)) * (16 << 10)  # 4 MiB
        hs.write(blob)
        assert hs.get_write_buffer_size() > 0
        hs.write_eof()  # waits for the buffer to drain
        hs.close()  # still flushes first
        got = await read_all(peer)
        assert got == blob
        await until(lambda: conn.lost == [None])
        peer.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.02)
        assert not conn.eof  # closed: nothing more is reported
    finally:
        peer.close()
        await net.stop()


async def test_a_full_buffer_is_reported_drained_once_the_peer_reads() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    ours, peer = pair()
    conn = FakeConn()
    try:
        hs = tcp_nat.HostSocket(net.tcp, conn, ours)  # type: ignore[arg-type]
        blob = b"x" * (tcp_nat.WRITE_HIGH * 8)
        hs.write(blob)
        assert hs.get_write_buffer_size() > tcp_nat.WRITE_HIGH
        assert conn.drained == 0
        got = await read_all(peer, limit=len(blob))
        assert len(got) == len(blob)
        await until(lambda: conn.drained == 1 and hs.get_write_buffer_size() == 0)
    finally:
        peer.close()
        hs.abort()
        await net.stop()


async def test_host_eof_keeps_our_half_open_and_reset_is_reported_as_an_error() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    ours, peer = pair()
    conn = FakeConn()
    try:
        hs = tcp_nat.HostSocket(net.tcp, conn, ours)  # type: ignore[arg-type]
        peer.shutdown(socket.SHUT_WR)
        await until(lambda: conn.eof)
        hs.write(b"after eof")  # half-close: our direction still works
        loop = asyncio.get_running_loop()
        assert await loop.sock_recv(peer, 100) == b"after eof"
        # The peer resets: our next write fails and is reported on a later turn, not inside write().
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()
        await asyncio.sleep(0.02)
        for _ in range(3):
            hs.write(b"into a reset socket")
            assert conn.lost == []
            await asyncio.sleep(0.01)
            if conn.lost:
                break
        await until(lambda: len(conn.lost) == 1)
        assert isinstance(conn.lost[0], OSError)
    finally:
        await net.stop()


async def test_pause_and_abort() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    ours, peer = pair()
    conn = FakeConn()
    try:
        hs = tcp_nat.HostSocket(net.tcp, conn, ours)  # type: ignore[arg-type]
        hs.pause_reading()
        peer.send(b"held")
        await asyncio.sleep(0.03)
        assert conn.data == b""
        hs.resume_reading()
        await until(lambda: conn.data == b"held")
        hs.write(b"y" * (8 << 20))
        hs.abort()
        assert hs.is_closing() and ours.fileno() == -1
        conn.state = CLOSED
        await asyncio.sleep(0.02)
        assert conn.lost == []  # an abort is the caller's own doing: nothing reported
    finally:
        peer.close()
        await net.stop()


async def test_every_host_socket_is_served_by_one_epoll_and_leaves_it_when_closed() -> None:
    """Sockets are watched through the NAT's own epoll (one loop reader), and a closed socket is no
    longer watched, so its descriptor number can be reused by the next connection at once."""
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    loop = asyncio.get_running_loop()
    readers_before = len(loop._selector.get_map())  # type: ignore[attr-defined]
    pairs = [pair() for _ in range(4)]
    conns = [FakeConn() for _ in pairs]
    try:
        socks = [tcp_nat.HostSocket(net.tcp, c, ours) for c, (ours, _) in zip(conns, pairs, strict=True)]  # type: ignore[arg-type]
        poller = net.tcp.poller()
        assert len(poller) == 4
        assert len(loop._selector.get_map()) == readers_before + 1  # type: ignore[attr-defined]
        for i, (_, peer) in enumerate(pairs):
            peer.send(b"p%d" % i)
        await until(lambda: all(bytes(c.data) == b"p%d" % i for i, c in enumerate(conns)))
        socks[0].abort()
        assert len(poller) == 3
        ours, peer = pair()  # may take the number just freed
        late = FakeConn()
        tcp_nat.HostSocket(net.tcp, late, ours)  # type: ignore[arg-type]
        peer.send(b"late")
        await until(lambda: bytes(late.data) == b"late")
        assert conns[0].data == b"p0"
        peer.close()
    finally:
        for _, peer in pairs:
            peer.close()
        await net.stop()
    assert net.tcp.poller()._ep is None  # closed with the stack


async def test_a_failing_socket_callback_is_counted_and_the_others_are_still_served() -> None:
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    (a, pa), (b, pb) = pair(), pair()
    ca, cb = FakeConn(), FakeConn()

    def boom(data: bytes) -> None:
        raise RuntimeError("bug")

    ca.host_data = boom  # type: ignore[method-assign]
    try:
        tcp_nat.HostSocket(net.tcp, ca, a)  # type: ignore[arg-type]
        tcp_nat.HostSocket(net.tcp, cb, b)  # type: ignore[arg-type]
        pa.send(b"x")
        pb.send(b"y")
        await until(lambda: cb.data == b"y")
        assert net.counters()["errors"] >= 1
    finally:
        pa.close()
        pb.close()
        await net.stop()


async def test_hostfwd_listener_is_on_the_nats_epoll_and_its_socket_is_not_read_before_the_handshake() -> None:
    """A hostfwd listener adds no loop reader of its own; what the host client sends before the guest
    answers our SYN waits in the kernel (the accepted socket is not watched) and arrives after it."""
    from .peer import Guest

    loop = asyncio.get_running_loop()
    net = UserNetwork(UserNetConfig.from_string("user,hostfwd=tcp:127.0.0.1:0-:7000"))
    readers_before = len(loop._selector.get_map())  # type: ignore[attr-defined]
    await net.start()
    try:
        assert len(loop._selector.get_map()) == readers_before + 1  # type: ignore[attr-defined]  # the poller's epoll only
        async with Guest(net) as g:
            g.listen(7000)
            held = []
            real = g.handle

            def hold_syn(frame: bytes) -> None:
                held.append(frame)  # the guest does not answer yet

            g.handle = hold_syn  # type: ignore[method-assign]
            r, w = await asyncio.open_connection("127.0.0.1", net.tcp.listener_ports()[0])
            w.write(b"early bytes")
            await until(lambda: bool(held))
            (conn,) = net.tcp.conns.values()
            assert conn.state_name == "SYN_SENT" and len(net.tcp.poller()) == 1  # the listener alone
            g.handle = real  # type: ignore[method-assign]
            for f in held:
                real(f)
            await until(lambda: bool(g.listeners[7000]) and g.listeners[7000][0].rx == b"early bytes")
            w.close()
    finally:
        await net.stop()


class _ListenerStandIn:
    """Stands in for a hostfwd listener's socket: TCP_INFO from the real one; ``_accept`` is the test's."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes:
        return self.real.getsockopt(level, option, buflen)


def _listen_watcher(net: UserNetwork) -> tuple[tcp_nat._ListenSocket, socket.socket]:
    """The first hostfwd listener's watcher and its real socket."""
    (listener, _fwd) = net.tcp._servers[0]
    watcher = listener._watchers[0]
    return watcher, watcher._sock


async def test_a_listener_out_of_descriptors_pauses_accepting_then_resumes(monkeypatch) -> None:
    """EMFILE from accept() (level-triggered readiness would spin the loop) stops the listener for
    ACCEPT_BACKOFF; the pending connection is accepted afterwards."""
    # 0.5 s, not 0.05: the "not retried" check 10 ms after the failure must come before the
    # backoff ends even when a loaded machine holds the test up (0.05 s left a 40 ms margin).
    monkeypatch.setattr(tcp_nat, "ACCEPT_BACKOFF", 0.5)
    net = UserNetwork(UserNetConfig.from_string("user,hostfwd=tcp:127.0.0.1:0-:7000"))
    await net.start()
    try:
        watcher, real_sock = _listen_watcher(net)
        fails = [0]

        class Emfile(_ListenerStandIn):
            def _accept(self) -> tuple[int, object]:
                fails[0] += 1
                raise OSError(24, "Too many open files")

        watcher._sock = Emfile(real_sock)  # type: ignore[assignment]
        r, w = await asyncio.open_connection("127.0.0.1", net.tcp.listener_ports()[0])
        await until(lambda: fails[0] == 1)
        assert len(net.tcp.poller()) == 0
        await asyncio.sleep(0.01)
        assert fails[0] == 1  # not retried while backing off
        watcher._sock = real_sock
        await until(lambda: len(net.tcp.conns) == 1)
        w.close()
    finally:
        await net.stop()


async def test_queued_hostfwd_connections_are_taken_without_an_accept_that_fails() -> None:
    """A listener takes as many connections as its accept queue holds (TCP_INFO) in one event, and
    no accept() runs into EAGAIN: with a TCG guest's cold caches the raise and catch cost more
    than the accept (see _ListenSocket)."""
    from .peer import Guest

    net = UserNetwork(UserNetConfig.from_string("user,hostfwd=tcp:127.0.0.1:0-:7000"))
    await net.start()
    try:
        watcher, real_sock = _listen_watcher(net)
        calls: list[str] = []

        class Counting(_ListenerStandIn):
            def _accept(self) -> tuple[int, object]:
                try:
                    got: tuple[int, object] = real_sock._accept()  # type: ignore[attr-defined]
                except BlockingIOError:
                    calls.append("EAGAIN")
                    raise
                calls.append("ok")
                return got

        watcher._sock = Counting(real_sock)  # type: ignore[assignment]
        async with Guest(net) as g:
            accepted = g.listen(7000)
            port = net.tcp.listener_ports()[0]
            # Queued before the loop looks at the listener: blocking connects complete in the kernel.
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
            try:
                await until(lambda: len(accepted) == 5)
                assert calls == ["ok"] * 5
            finally:
                for c in clients:
                    c.close()
                watcher._sock = real_sock
    finally:
        await net.stop()

