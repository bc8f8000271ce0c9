"""UDP links carry one frame per datagram; captures are pcaps tshark and scapy read."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

from appliance.nat import UserNetConfig, UserNetwork
from appliance.net.capture import CapturingBackend, open_capture
from appliance.net.dgram import DgramLink
from appliance.net.errors import NetError
from appliance.net.memory import MemoryLink
from appliance.nic import constants as C
from appliance.nic.virtio_net import VirtioNet
from appliance.virtio.testing import FakeDriver
from tests.nat.peer import GUEST_IP, GUEST_MAC, GW_IP
from tests.nic.test_virtio_net import post_rx, send_tx


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


async def pull(link, timeout: float = 2.0) -> bytes:
    """Take one frame, pulling only while we want one (as a device with one rx buffer would)."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    buf = bytearray(2048)

    def ready() -> None:
        if got.done():
            return
        n = link.recv_into([memoryview(buf)])
        if n > 0:
            got.set_result(bytes(buf[:n]))

    link.set_ready_callback(ready)
    try:
        return await asyncio.wait_for(got, timeout)
    finally:
        link.set_ready_callback(None)


async def test_two_udp_links_exchange_frames_both_ways() -> None:
    pa, pb = free_udp_port(), free_udp_port()
    a = DgramLink(("127.0.0.1", pa), ("127.0.0.1", pb))
    b = DgramLink(("127.0.0.1", pb), ("127.0.0.1", pa))
    try:
        f1 = bytes(Ether(src="52:54:00:00:00:01") / ARP(pdst="10.0.0.2"))
        assert a.send([memoryview(f1[:10]), memoryview(f1[10:])])
        assert await pull(b) == f1
        f2 = bytes(Ether(src="52:54:00:00:00:02") / IP(dst="10.0.0.1") / ICMP())
        assert b.send([memoryview(f2)])
        assert await pull(a) == f2
    finally:
        a.close()
        b.close()


async def test_datagrams_from_strangers_are_dropped_and_counted() -> None:
    pa, pb = free_udp_port(), free_udp_port()
    a = DgramLink(("127.0.0.1", pa), ("127.0.0.1", pb))
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        stranger.sendto(b"garbage" * 10, ("127.0.0.1", pa))
        with pytest.raises(TimeoutError):
            await pull(a, timeout=0.3)
        assert a.rx_foreign == 1 and a.rx_frames == 0
    finally:
        stranger.close()
        a.close()


async def test_capture_holds_both_directions_in_order(tmp_path: Path) -> None:
    pa, pb = free_udp_port(), free_udp_port()
    a = CapturingBackend(DgramLink(("127.0.0.1", pa), ("127.0.0.1", pb)))
    b = DgramLink(("127.0.0.1", pb), ("127.0.0.1", pa))
    pcap = tmp_path / "cap.pcap"
    a.writers.append(open_capture(pcap))
    frames = [
        bytes(Ether(src="52:54:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc="10.0.0.1", pdst="10.0.0.2")),
        bytes(Ether(src="52:54:00:00:00:02", dst="52:54:00:00:00:01") / ARP(op=2, psrc="10.0.0.2", pdst="10.0.0.1")),
        bytes(
            Ether(src="52:54:00:00:00:01", dst="52:54:00:00:00:02")
            / IP(src="10.0.0.1", dst="10.0.0.2")
            / ICMP(type=8)
        ),
    ]
    try:
        assert a.send([memoryview(frames[0])])
        assert await pull(b) == frames[0]
        assert b.send([memoryview(frames[1])])
        assert await pull(a) == frames[1]
        assert a.send([memoryview(frames[2])])
        assert await pull(b) == frames[2]
    finally:
        a.close()
        b.close()
    assert [bytes(p) for p in rdpcap(str(pcap))] == frames
    if shutil.which("tshark"):
        out = subprocess.run(
            ["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.protocols"],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        assert out == ["eth:ethertype:arp", "eth:ethertype:arp", "eth:ethertype:ip:icmp"]


def test_capture_truncates_to_maxlen_and_keeps_original_length(tmp_path: Path) -> None:
    pcap = tmp_path / "short.pcap"
    w = open_capture(pcap, maxlen=64)
    frame = bytes(Ether() / IP() / (b"z" * 500))
    w.write(frame)
    w.close()
    (pkt,) = rdpcap(str(pcap))
    assert len(bytes(pkt)) == 64 and pkt.wirelen == len(frame)


async def test_stream_link_frames_are_length_prefixed_like_qemu(tmp_path: Path) -> None:
    from appliance.net.stream import StreamLink

    path = str(tmp_path / "link.sock")
    listener = StreamLink(path, listen=True)
    await listener.start()
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(path)
    try:
        frame = bytes(Ether(src="52:54:00:00:00:09") / IP(dst="10.9.9.9") / ICMP())
        # Two frames in one write, then one split across writes: framing must hold.
        peer.sendall(len(frame).to_bytes(4, "big") + frame + len(frame).to_bytes(4, "big") + frame)
        assert await pull(listener) == frame
        assert await pull(listener) == frame
        blob = len(frame).to_bytes(4, "big") + frame
        peer.sendall(blob[:7])
        await asyncio.sleep(0.05)
        peer.sendall(blob[7:])
        assert await pull(listener) == frame
        assert listener.send([memoryview(frame)])
        peer.settimeout(2)
        got = peer.recv(4 + len(frame), socket.MSG_WAITALL)
        assert got == len(frame).to_bytes(4, "big") + frame
    finally:
        peer.close()
        listener.close()


async def test_stream_link_drops_a_peer_claiming_a_giant_frame(tmp_path: Path) -> None:
    from appliance.net.stream import StreamLink

    path = str(tmp_path / "bad.sock")
    listener = StreamLink(path, listen=True)
    await listener.start()
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(path)
    try:
        peer.sendall((1 << 31).to_bytes(4, "big") + b"junk")
        with pytest.raises(TimeoutError):
            await pull(listener, timeout=0.3)
        assert listener.rx_errors == 1 and listener.sock is None
    finally:
        peer.close()
        listener.close()


async def test_stream_connect_side_reaches_a_listener_started_later(tmp_path: Path) -> None:
    from appliance.net.stream import StreamLink

    path = str(tmp_path / "late.sock")
    client = StreamLink(path, listen=False, reconnect=0.05)
    await client.start()
    await asyncio.sleep(0.1)
    server = StreamLink(path, listen=True)
    await server.start()
    try:
        for _ in range(100):
            if client.sock is not None and server.sock is not None:
                break
            await asyncio.sleep(0.02)
        frame = bytes(Ether() / ARP())
        assert client.send([memoryview(frame)])
        assert await pull(server) == frame
    finally:
        client.close()
        server.close()


async def test_unix_datagram_pair_exchanges_frames_and_cleans_up(tmp_path: Path) -> None:
    pa, pb = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    (tmp_path / "a.sock").write_bytes(b"")  # not a socket: never removed for us
    with pytest.raises(NetError, match="not a socket"):
        DgramLink(pa, pb)
    (tmp_path / "a.sock").unlink()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(pb)  # a socket left by an earlier run is replaced, as QEMU does
    stale.close()
    a, b = DgramLink(pa, pb), DgramLink(pb, pa)
    try:
        frame = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src="52:54:00:00:00:01") / ARP(pdst="10.0.0.2"))
        assert a.send([memoryview(frame)])
        assert await pull(b) == frame
        assert b.send([memoryview(frame[::-1])])
        assert await pull(a) == frame[::-1]
        # Only the peer's path is heard on a point-to-point link.
        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        stranger.bind(str(tmp_path / "c.sock"))
        stranger.sendto(b"x" * 60, pb)
        assert a.send([memoryview(frame)])
        assert await pull(b) == frame and b.rx_foreign == 1
        stranger.close()
    finally:
        a.close()
        b.close()
    assert not (tmp_path / "a.sock").exists() and not (tmp_path / "b.sock").exists()


@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is needed for a test namespace")
async def test_multicast_group_is_a_shared_segment_inside_a_namespace() -> None:
    from tests.net.netns import inside, namespace, ns_exec

    with namespace() as ns:
        ns_exec(ns, "ip", "link", "set", "lo", "up")
        ns_exec(ns, "ip", "link", "set", "lo", "multicast", "on")
        group = ("239.255.77.1", free_udp_port())
        with inside(ns):
            links = [DgramLink(("127.0.0.1", 0), group) for _ in range(3)]
        try:
            frame = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src="52:54:00:00:00:07") / ARP(pdst="10.0.0.9"))
            assert links[0].send([memoryview(frame)])
            # Every member hears it, the sender too (loopback on, as QEMU's members do).
            for link in links:
                assert await pull(link) == frame
            assert all(link.rx_foreign == 0 for link in links)
        finally:
            for link in links:
                link.close()


async def test_unix_link_hears_its_peer_however_the_paths_are_spelled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    a = DgramLink("a.sock", str(tmp_path / "b.sock"))  # relative here, absolute there
    b = DgramLink(str(tmp_path / "b.sock"), "./a.sock")
    try:
        frame = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src="52:54:00:00:00:03") / ARP(pdst="10.0.0.3"))
        assert a.send([memoryview(frame)]) and await pull(b) == frame
        assert b.send([memoryview(frame)]) and await pull(a) == frame
        assert a.rx_foreign == b.rx_foreign == 0
    finally:
        a.close()
        b.close()


async def test_capture_of_the_user_stack_reads_no_further_than_the_stack_itself() -> None:
    """The user-mode stack tells virtio-net how many frames it holds (queued()), sparing a read
    that finds none; a capture in between passes that on. Was: under filter-dump the NIC
    read once more per receive batch and got nothing."""
    assert not hasattr(CapturingBackend(MemoryLink()), "queued")  # nothing to pass on: read to empty
    net = UserNetwork(UserNetConfig(nameservers=()))
    await net.start()
    reads: list[int] = []
    real_recv = net.recv_into

    def counted(bufs):  # type: ignore[no-untyped-def]
        n = real_recv(bufs)
        reads.append(n)
        return n

    net.recv_into = counted  # type: ignore[method-assign]
    dev = VirtioNet([CapturingBackend(net)], GUEST_MAC, control_queue=False)
    drv = FakeDriver(dev, queue_size=64, mem_size=8 << 20, event_idx=True)
    drv.activate()
    try:
        post_rx(drv, 0, 2048, count=8)
        drv.kick(0)
        reads.clear()  # the buffers' kick: a read with nothing queued yet, as without a capture
        # The guest asks for the gateway's MAC: one answer, and nothing after it.
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, GUEST_IP, bytes(6), GW_IP)
        send_tx(drv, 1, bytes(C.HDR_LEN) + b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + arp)
        drv.kick(1)
        await drv.wait_used(0)
        await asyncio.sleep(0.05)  # any loop turn a read would come in
        assert len(reads) == 1 and reads[0] > 0
    finally:
        dev.reset()
        await net.stop()


async def test_stream_and_dgram_take_abstract_unix_names_and_ipv6(tmp_path: Path) -> None:
    """``addr.abstract=on`` is Linux's abstract namespace (QEMU's tight form: no file at all), and
    a stream's ``addr.host`` may be IPv6, as QEMU 7.2 takes them."""
    from appliance.net.netdev import DgramNetdev, StreamNetdev, parse_netdev
    from appliance.net.stream import StreamLink

    name = f"appliance-test-{tmp_path.name}"
    cfg = parse_netdev(f"stream,id=s0,server=on,addr.type=unix,addr.path={name},addr.abstract=on", "-netdev")
    assert isinstance(cfg, StreamNetdev) and cfg.address == "\0" + name
    listener = StreamLink(cfg.address, listen=True)
    await listener.start()
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        peer.connect("\0" + name)
        frame = bytes(Ether(src="52:54:00:00:00:09") / IP(dst="10.9.9.9") / ICMP())
        peer.sendall(len(frame).to_bytes(4, "big") + frame)
        assert await pull(listener) == frame
    finally:
        peer.close()
        listener.close()
    assert not Path(name).exists()

    d = parse_netdev(f"dgram,id=d0,local.type=unix,local.path={name}-a,local.abstract=on,"
                     f"remote.type=unix,remote.path={name}-b,remote.abstract=on", "-netdev")
    assert isinstance(d, DgramNetdev) and (d.local, d.remote) == ("\0" + name + "-a", "\0" + name + "-b")
    a, b = DgramLink(d.local, d.remote), DgramLink(d.remote, d.local)
    try:
        assert a.send([memoryview(frame)])
        assert await pull(b) == frame
    finally:
        a.close()
        b.close()

    v6 = parse_netdev("stream,id=s1,server=on,addr.type=inet,addr.host=::1,addr.port=0", "-netdev")
    assert isinstance(v6, StreamNetdev) and v6.address == ("::1", 0)
    listener = StreamLink(v6.address, listen=True)
    try:
        await listener.start()
    except NetError:
        pytest.skip("no IPv6 loopback on this host")
    assert listener._server is not None
    port = listener._server.getsockname()[1]
    peer = socket.create_connection(("::1", port))
    try:
        peer.sendall(len(frame).to_bytes(4, "big") + frame)
        assert await pull(listener) == frame
    finally:
        peer.close()
        listener.close()
