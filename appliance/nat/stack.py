"""``UserNetwork``: the user-mode stack as a :class:`~appliance.net.backend.FrameBackend`.

The guest's frames arrive through :meth:`UserNetwork.send` and are handled to
completion synchronously (ARP, DHCP, DNS, ICMP, UDP, TCP); what the stack has
for the guest waits in one bounded queue drained by :meth:`recv_into`. Host
sockets are served by the asyncio loop that :meth:`start` runs on. Nothing a
guest sends can raise out of :meth:`send`: malformed input is counted and
dropped, and any internal failure is caught at that boundary and counted too.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import struct
import time
from collections.abc import Callable, Sequence

from appliance.errors import ConfigError
from appliance.nat import arp, dhcp6
from appliance.nat.config import HostForward, UserNetConfig, inet_aton, parse_hostfwd, qemu_strtoi
from appliance.nat.dhcp import CLIENT_PORT, SERVER_PORT, DhcpServer
from appliance.nat.dns import DNS_PORT, DnsProxy
from appliance.nat.errors import NatError
from appliance.nat.frames import (
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IPV4,
    ETH_P_IPV6,
    IP_MF,
    IP_OFFMASK,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    SPECIAL_MAC_PREFIXES,
    Ipv4,
    build_ipv4,
    build_udp,
    parse_arp,
    parse_ipv4,
    parse_udp,
    pseudo_sum,
    special_mac,
    verify,
)
from appliance.nat.icmp import Icmp
from appliance.nat.ipv4 import Reassembler
from appliance.nat.ipv6 import Ipv6, build_l4_v6
from appliance.nat.stats import Counters, FlowInfo, format_flows
from appliance.nat.tcp import SYN, TIME_WAIT_STATE
from appliance.nat.tcp_nat import TcpNat
from appliance.nat.tftp import TFTP_PORT, TftpServer
from appliance.nat.udp_nat import UdpNat
from appliance.nic import constants as V

log = logging.getLogger(__name__)

DEFAULT_QUEUE_LIMIT = 2048
# Bytes the stack may hold for the guest: with TSO toward the guest a frame may
# be 64 KiB, so the frame count alone no longer bounds memory.
DEFAULT_QUEUE_BYTES = 4 << 20
MTU = 1500  # the guest's link MTU unless its NIC says otherwise (UserNetwork.set_mtu)
_LOOPBACK = b"\x7f\x00\x00\x01"
_IPPROTO_FRAGMENT = 44  # IPv6 Fragment header (RFC 8200 §4.5)
_LOOPBACK6 = bytes(15) + b"\x01"
_LOG_INTERVAL = 10.0
_ETH = struct.Struct("!6s6sH")
# Ethernet, a 20-byte IPv4 header and a TCP header in one unpack: the fast path (_tcp4_input).
_ETH_IP_TCP = struct.Struct("!6s6sHBxHxxHxBxx4s4sHHIIHH")
_NO_VNET_HDR = bytes(V.HDR_LEN)
# Header bits a guest may set on transmit (virtio 1.2 §5.1.6.2): checksum
# offload, and TCP segmentation offload with or without ECN.
_TX_FLAGS = V.HDR_F_NEEDS_CSUM | V.HDR_F_DATA_VALID
_TX_GSO = (V.GSO_NONE, V.GSO_TCPV4, V.GSO_TCPV6)


class UserNetwork:
    """The outside world of one guest NIC: a router, DHCP and DNS server, and NAT.

    Use::

        net = UserNetwork(UserNetConfig.parse(opts))
        await net.start()                  # binds hostfwd listeners; NatError if a port is taken
        net.set_ready_callback(device.rx_ready)
        net.send([frame_view])             # guest → stack, never raises
        n = net.recv_into([buffer_view])   # stack → guest, -1 when nothing is queued
        net.flows(); net.counters(); net.info()
        await net.stop()

    ``ready()`` is called (soon, on the loop) when the queue toward the guest
    goes from empty to non-empty, and when a callback is set while frames wait;
    a device without rx buffers pauses with ``set_ready_callback(None)``.

    With ``vnet_hdr=True`` every frame both ways starts with a 12-byte
    ``virtio_net_hdr_v1``, so the NIC offers checksum and TCP segmentation
    offloads: the guest may hand us 64 KiB TCP segments with a partial
    checksum (we terminate TCP, so a big segment is simply one segment), and
    once it accepts them (:meth:`set_offloads`) we hand it 64 KiB segments
    with ``gso_type`` TCPV4/TCPV6 instead of MSS-sized frames. Under an
    emulated guest CPU that is most of the per-byte cost on both sides.

    :param config: the parsed ``-netdev user`` options.
    :param queue_limit: frames the stack may hold for the guest before dropping.
    :param queue_bytes: bytes the stack may hold for the guest before dropping.
    :param vnet_hdr: carry virtio-net headers (offloads) on every frame.
    """

    def __init__(
        self,
        config: UserNetConfig | None = None,
        *,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        vnet_hdr: bool = False,
    ) -> None:
        self.config = config or UserNetConfig()
        self.vnet_hdr_len = V.HDR_LEN if vnet_hdr else 0
        # What the guest accepts on receive (set_offloads): partial checksums, TSO.
        self.guest_csum = False
        self.guest_tso4 = False
        self.guest_tso6 = False
        # The guest link's MTU: IPv4 datagrams toward the guest above it are fragmented (set_mtu).
        self.mtu = MTU
        # The frame being handled came with a partial or host-trusted L4 checksum.
        self.l4_csum_trusted = False
        cfg = self.config
        self.stats = Counters()
        # libslirp sends every IPv4 frame from the host address's MAC, whichever address it
        # comes from, and answers ARP for each address with that address's own (_arp_input).
        self.host_mac = cfg.host_mac or special_mac(cfg.host.packed)
        self.gateway_ip = cfg.host.packed
        self.dns_ip = cfg.dns.packed
        self.local_ips = {self.gateway_ip, self.dns_ip} | {g.server.packed for g in cfg.guestfwd}
        self._net_int = int(cfg.net.network_address)
        self._mask_int = int(cfg.net.netmask)
        self._bcast = cfg.net.broadcast_address.packed
        self._dhcp_dsts = (self.gateway_ip, b"\xff\xff\xff\xff")
        self.guest_mac: bytes | None = None
        self._last_src = b""
        self.arp_table = arp.ArpTable()
        self.queue_limit = queue_limit
        self.queue_bytes = queue_bytes
        # Frames for the guest; a tuple carries its own virtio-net header.
        self._out: collections.deque[bytes | bytearray | tuple[bytes, bytes | bytearray]] = collections.deque()
        self._out_bytes = 0
        self._ready: Callable[[], None] | None = None
        self._ready_pending = False  # frames wait that the device has not been woken for
        self._ready_scheduled = False  # a _call_ready is on the loop
        self._held = False  # inside send() or hold(): the wake-up is made at the end
        self._urgent = False  # a frame queued inside send() that the guest is blocked on
        self._in_send = False
        self._space_waiters: dict[object, Callable[[], None]] = {}
        self._kick_pending = False
        # Guest frames expected next that nothing waits on (see take_quiet_tx).
        self.quiet_tx = 0
        # Give the CPU up after waking a host peer the guest waits on (HostSocket._shutdown).
        # For a stack in its own process (net-daemon): with our own VM's vCPU threads in the
        # process, os.sched_yield() hands them the GIL for up to a switch interval.
        self.yield_after_host_wakeup = False
        self._ident = 0
        self._ident6 = 0  # IPv6 fragment identification (RFC 8200 §4.5)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._housekeeping: asyncio.TimerHandle | None = None
        self._last_log = 0.0
        self._closed = False
        self.reassembler = Reassembler()
        self.icmp = Icmp(self)
        self.dhcp = DhcpServer(self)
        self.dns = DnsProxy(self)
        # TFTP answers at the host address (port 69) only when tftp= names a directory.
        self.tftp = TftpServer(cfg.tftp, self._tftp_send) if cfg.tftp else None
        self.udp = UdpNat(self)
        self.tcp = TcpNat(self)
        self.ipv6 = Ipv6(self) if cfg.ipv6 else None
        # Stateless DHCPv6 (Information-request) at ff02::1:2 and the router, only with IPv6 on.
        self.dhcp6 = dhcp6.Dhcp6Server(self) if self.ipv6 is not None else None
        # TFTP at the host address of either family, as libslirp (the DHCPv6 boot URL names the v6 one).
        self._tftp_dsts = {self.gateway_ip} | ({self.ipv6.router} if self.ipv6 is not None else set())
        if self.ipv6 is not None:
            self.local_ips |= self.ipv6.local

    # -- lifecycle -------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def start(self) -> None:
        """Bind the ``hostfwd`` listeners and start timers on the running loop.

        :raises NatError: when a forward's host port cannot be bound.
        """
        self._loop = asyncio.get_running_loop()
        try:
            # QEMU sets the rules up last first (its list is built by prepending), so of two
            # rules that clash the earlier one is the one refused; each goes to the head of its
            # table, which so keeps the given order.
            for fwd in reversed(self.config.hostfwd):
                await self._listen(fwd)
        except BaseException:
            await self.stop()
            raise
        self._housekeeping = self._loop.call_later(1.0, self._tick)

    async def _listen(self, fwd: HostForward) -> None:
        try:
            if fwd.proto == "udp":
                self.udp.listen(fwd, first=True)
            else:
                await self.tcp.listen(fwd, first=True)
        except NatError as err:
            # QEMU names the rule as it was written.
            raise NatError(f"Could not set up host forwarding rule '{fwd.rule}'") from err.__cause__

    async def add_hostfwd(self, rule: str) -> HostForward:
        """Add a forward at run time, like QEMU's ``hostfwd_add`` (same rule syntax).

        :raises HostfwdError: when the rule is malformed (QEMU's reason in ``detail``).
        :raises NatError: when its host port cannot be bound.
        """
        fwd = parse_hostfwd(rule, self.config.dhcpstart, "hostfwd_add")
        await self._listen(fwd)  # libslirp lists its sockets newest first: it heads ``info usernet``
        return fwd

    def remove_hostfwd(self, rule: str) -> bool:
        """Remove a forward, like QEMU's ``hostfwd_remove [tcp|udp]:[hostaddr]:hostport``.

        Read as QEMU reads it: the address by ``inet_aton``, the port a whole
        decimal C int (``0x10`` is a bad format; ``99999`` is simply not found).

        :returns: False when no such forward exists.
        :raises ConfigError: when the rule is malformed.
        """
        bad = ConfigError(f"hostfwd_remove: invalid format '{rule}'")
        proto, sep, rest = rule.partition(":")
        if not sep or proto not in ("tcp", "udp", ""):
            raise bad
        addr_text, sep, port_text = rest.partition(":")
        addr = inet_aton(addr_text) if addr_text else 0
        port = qemu_strtoi(port_text, 10) if sep else None
        if addr is None or port is None:
            raise bad
        if port == 0:
            return False  # libslirp matches the bound port, which is never 0
        nat = self.udp if proto == "udp" else self.tcp
        return nat.unlisten(str(ipaddress.IPv4Address(addr)), port)

    async def stop(self) -> None:
        self.close()
        await self.tcp.wait_closed()

    async def __aenter__(self) -> UserNetwork:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        self.tcp.close()
        self.udp.close()
        self.icmp.close()
        self.dns.close()
        if self.tftp is not None:
            self.tftp.close()
        self._out.clear()
        self._out_bytes = 0

    def guest_gone(self) -> None:
        """The guest went away for good (its VMM exited): end what was the guest's.

        libslirp lives in QEMU's process: when QEMU dies the kernel closes its sockets, every
        host peer sees its connection end at once, and the next QEMU starts on a new stack. A
        stack that outlives its VMM (net-daemon, whose front ends come and go) does the same
        here. Without it the host peers of the guest's TCP connections (a client reading
        from the guest through a forward, a server the guest was connected to) waited forever,
        their sockets held and listed, or with data in flight toward the guest until the
        retransmissions gave up, minutes later; and a guest with another MAC was given
        10.0.2.16, not 10.0.2.15 where hostfwd rules point. So the guest's TCP connections are
        closed (the host sockets as the kernel closes a dead process's), its UDP and ping flows
        too, what waits for it is dropped (frames, DNS queries, TFTP transfers, fragments), and
        its leases and neighbours are forgotten, as a new libslirp would have none. The
        forwarding listeners stay.
        """
        for conn in list(self.tcp.conns.values()):
            conn.abort(send_rst=False)
        self.udp.expire(float("inf"))  # every flow, however recent
        self.icmp.close()
        # Its resolver's queries (an answer would go to the next guest at that address) and its
        # ports listed as UDP flows; its TFTP transfers (a file held open, blocks resent to it);
        # its half-reassembled datagrams (a next guest's fragment with the same id would meet them).
        self.dns.forget_queries()
        if self.tftp is not None:
            self.tftp.close()
        self.reassembler.expire(float("inf"))
        if self.ipv6 is not None:
            # Unsolicited Router Advertisements start again when a guest speaks IPv6 (Ipv6.input):
            # sent on to no one, they piled up in the queue for the next guest the whole time.
            self.ipv6.next_ra = None
        self._out.clear()
        self._out_bytes = 0
        self._space_waiters.clear()
        self.quiet_tx = 0  # the ACKs it owed will not come: the next guest's frames are not them
        self.dhcp = DhcpServer(self)
        self.arp_table = arp.ArpTable()
        self.guest_mac = None
        # Forgotten with the table: left set, a next guest at the same address whose first frame
        # set guest_mac (a DHCP request from 0.0.0.0) was never entered in the new table from its
        # IP packets, and every answer to it went out behind an ARP request until it answered one.
        self._last_src = b""

    def guest_left(self, mac: bytes) -> None:
        """One of several guests on this network is gone (its front end left a net-daemon hub
        the network is on): what :meth:`guest_gone` does for all, for its addresses alone.

        Its TCP connections end (their host peers see the close), its UDP and ping flows
        close, and its neighbour entries go. Its lease stays, so the same VM back gets the
        same address; the other guests' flows, and what waits for them, are untouched.
        """
        ips = set(self.arp_table.forget_mac(mac))
        lease = self.dhcp.leases.get(mac)
        if lease is not None:
            ips.add(lease.ip)
        for conn in [c for c in self.tcp.conns.values() if c.key[0] in ips]:
            conn.abort(send_rst=False)
        self.udp.close_guest(ips)
        self.icmp.close_guest(ips)
        if self.guest_mac == mac:
            self.guest_mac = None
            self._last_src = b""

    def _tick(self) -> None:
        now = time.monotonic()
        try:
            self.reassembler.expire(now)
            self.udp.expire(now)
            self.icmp.expire(now)
            self.dns.expire(now)
            if self.tftp is not None:
                self.tftp.expire(now)
            if self.ipv6 is not None:
                self.ipv6.expire(now)
            self.tcp.expire(now)
        except Exception:  # noqa: BLE001 - housekeeping must outlive any bug
            self._internal_error()
        if not self._closed:
            self._housekeeping = self.loop.call_later(1.0, self._tick)

    # -- FrameBackend ----------------------------------------------------
    def set_ready_callback(self, ready: Callable[[], None] | None) -> None:
        """Set (or with None, pause) the wake-up; frames already queued wake the new callback at once."""
        self._ready = ready
        if ready is not None and self._out and not self._ready_pending and self._loop is not None:
            self._ready_pending = True
            self._schedule_ready()

    def set_offloads(self, csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> None:
        """What the guest takes on receive; only used with ``vnet_hdr``.

        TSO needs checksum offload too (virtio 1.2 §5.1.3.1: GUEST_TSO4
        requires GUEST_CSUM), so TSO without it is treated as off.
        """
        on = bool(self.vnet_hdr_len) and csum
        self.guest_csum = on
        self.guest_tso4 = on and tso4
        self.guest_tso6 = on and tso6

    @property
    def max_frame(self) -> int:
        """The largest frame we hand the guest without segmentation offload: one at our MTU
        (virtio-net sizes its receive room by it)."""
        return ETH_HLEN + self.mtu

    def set_mtu(self, mtu: int) -> None:
        """The guest link's MTU, as its NIC has it (``host_mtu=``, or a vhost-user front end's
        NET_SET_MTU): no frame toward the guest carries more, except TSO segments the guest
        accepted (virtio 1.2 §5.1.6.3: with VIRTIO_NET_F_MTU the device passes nothing larger
        with gso_type NONE). Datagrams above it are fragmented and the router advertisement
        announces it. TCP follows it too: the MSS our SYNs announce is the MTU less the IP and TCP
        headers, and no segment we send exceeds the link, whatever MSS the guest announced
        (RFC 9293 §3.7.1, the smaller of the two). Both are fixed when a connection opens:
        connections already open keep the MTU they opened with.

        :raises ValueError: Below IPv4's minimum (RFC 791: 68) or above 65535.
        """
        if not 68 <= mtu <= 0xFFFF:
            raise ValueError(f"MTU {mtu} is outside 68..65535")
        self.mtu = mtu

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        if not self._out:
            return -1
        item = self._out.popleft()
        self.stats.tx_frames += 1
        frame: bytes | bytearray
        if self.vnet_hdr_len:
            if type(item) is tuple:
                hdr, frame = item
            else:
                hdr, frame = _NO_VNET_HDR, item  # type: ignore[assignment]
            n = len(frame)
            self._out_bytes -= n
            b = bufs[0]
            if len(b) >= V.HDR_LEN + n:
                b[: V.HDR_LEN] = hdr
                b[V.HDR_LEN : V.HDR_LEN + n] = frame
            else:
                _scatter(bufs, (hdr, frame))
            n += V.HDR_LEN
        else:
            frame = item  # type: ignore[assignment]
            n = len(frame)
            self._out_bytes -= n
            if len(bufs) == 1:
                b = bufs[0]
                k = min(len(b), n)
                b[:k] = memoryview(frame)[:k]
            else:
                _scatter(bufs, (frame,))
        if self._space_waiters and not self._kick_pending and self.tx_space() >= self.queue_limit // 2:
            self._kick_pending = True
            self.loop.call_soon(self._kick)
        return n

    def send(self, bufs: Sequence[memoryview]) -> bool:
        """Take one frame from the guest; True unless closed (refusals are in :meth:`counters`)."""
        if self._closed:
            return False
        frame = bytes(bufs[0]) if len(bufs) == 1 else b"".join(bufs)  # the one copy out of the guest
        self.stats.rx_frames += 1
        self._in_send = self._held = True
        try:
            if not self.vnet_hdr_len:
                self._input(memoryview(frame))
            elif len(frame) < V.HDR_LEN:
                self.stats.truncated += 1
            else:
                # The transmit header (virtio 1.2 §5.1.6.2). We end TCP here rather than forward
                # segments, so a TSO frame needs no splitting: it is one TCP segment however large,
                # and gso_size does not matter. What the header changes is the checksum: with
                # NEEDS_CSUM the L4 checksum field holds only the pseudo-header sum, so TCP/UDP
                # checksums are not verified for that frame (nor with DATA_VALID); the bytes come
                # straight from guest memory, there is no wire to corrupt them. Only flags and
                # gso_type steer anything, read from our copy (inline: this is every frame).
                flags = frame[0]
                gso_type = frame[1]
                if flags & ~_TX_FLAGS or gso_type & ~V.GSO_ECN not in _TX_GSO:
                    self.stats.bad_vnet_hdr += 1
                else:
                    if gso_type:
                        self.stats.rx_gso_frames += 1
                    self.l4_csum_trusted = bool(flags)
                    self._input(memoryview(frame)[V.HDR_LEN :])
        except Exception:  # noqa: BLE001 - no guest input may escape the frame boundary
            self._internal_error()
        finally:
            self.l4_csum_trusted = False
            self._in_send = self._held = False
        if self._urgent:
            self._urgent = False
            self.deliver_now()
        if self._ready_pending:
            self._schedule_ready()
        return True

    def take_quiet_tx(self) -> int:
        """How many of the guest's next frames are expected to need no prompt handling (and forget it).

        A TCP connection the guest closed first is answered with our FIN, and the
        guest's only reply is its ACK, which just ends the connection here. A NIC
        may let such frames wait for the next one the guest sends, sparing the
        guest a notification and itself a wake-up.
        """
        n, self.quiet_tx = self.quiet_tx, 0
        return n

    def hold(self) -> None:
        """Frames queued from now until :meth:`release` go to the device in one batch at the release."""
        self._held = True

    def release(self) -> None:
        """End :meth:`hold`: wake the device now for what was queued (see :meth:`deliver_now`)."""
        self._held = False
        self.deliver_now()
        if self._ready_pending:
            self._schedule_ready()

    @property
    def in_send(self) -> bool:
        """True while :meth:`send` is handling a guest frame."""
        return self._in_send

    def urgent(self) -> None:
        """What was just queued answers something the guest waits on (a SYN-ACK to its connect()).

        Inside :meth:`send` it is handed over as soon as that frame is done with, so it reaches the
        guest ahead of the device's transmit-done interrupt rather than a loop turn after it (one
        interrupt for both on a shared INTx line); elsewhere at once.
        """
        if self._in_send:
            self._urgent = True
        else:
            self.deliver_now()

    def deliver_now(self) -> None:
        """Wake the device now for what is queued, instead of on the next loop turn.

        For callers at the top of a loop callback (a host socket event): the frames their event
        queued go out in one batch without waiting behind the rest of the turn and the next poll.
        Inside :meth:`send` or a :meth:`hold` no ``call_soon`` was made for those frames, so a
        frame queued and delivered in one event costs no loop callback.
        """
        if self._ready_pending and self._out and self._ready is not None:
            self._ready_pending = False
            try:
                self._ready()
            except Exception:  # noqa: BLE001 - a device bug must not surface in our caller (send())
                self._internal_error()

    # -- output helpers used by the protocol modules ---------------------
    def output(self, frame: bytes | bytearray, vnet_hdr: bytes | None = None) -> bool:
        """Queue one frame for the guest; False (and counted) when the queue is full.

        :param vnet_hdr: the frame's virtio-net header (offloads); only when
            :attr:`guest_csum` says the guest takes them.
        """
        if len(self._out) >= self.queue_limit or self._out_bytes >= self.queue_bytes or self._closed:
            self.stats.tx_queue_drops += 1
            return False
        self._out.append(frame if vnet_hdr is None else (vnet_hdr, frame))
        self._out_bytes += len(frame)
        if len(self._out) == 1 and self._ready is not None and not self._ready_pending:
            self._ready_pending = True
            if not self._held:
                self._schedule_ready()
        return True

    def tx_space(self) -> int:
        """Room toward the guest, in frames of up to one MTU."""
        return min(self.queue_limit - len(self._out), (self.queue_bytes - self._out_bytes) // (ETH_HLEN + MTU))

    def tx_bytes_space(self) -> int:
        """Room toward the guest in bytes (what a TSO segment may use)."""
        return self.queue_bytes - self._out_bytes

    def wait_tx_space(self, who: object, wake: Callable[[], None]) -> None:
        """Call ``wake()`` once the guest has drained the queue to half."""
        self._space_waiters[who] = wake

    def _kick(self) -> None:
        self._kick_pending = False
        waiters, self._space_waiters = self._space_waiters, {}
        for wake in waiters.values():
            try:
                wake()
            except Exception:  # noqa: BLE001
                self._internal_error()

    def _schedule_ready(self) -> None:
        if not self._ready_scheduled:
            self._ready_scheduled = True
            self.loop.call_soon(self._call_ready)

    def _call_ready(self) -> None:
        self._ready_scheduled = False
        self._ready_pending = False
        if self._ready is not None and self._out:
            self._ready()

    def next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    def mac_for(self, ip: bytes) -> bytes | None:
        """The guest MAC for ``ip``; on a miss, ask with ARP and fall back to the last guest MAC."""
        mac = self.arp_table.lookup(ip)
        if mac is not None:
            return mac
        if len(ip) == 16:
            if self.ipv6 is not None:
                self.ipv6.solicit(ip)
        else:
            self.output(arp.request_for(self.host_mac, self.gateway_ip, ip))
        return self.guest_mac

    def learn_neighbor(self, ip: bytes, mac: bytes) -> None:
        known = self.arp_table.lookup(ip)
        if known != mac:
            self.arp_table.learn(ip, mac)
            if known is None:
                self.tcp.address_resolved(ip)
        self.guest_mac = mac

    def emit_ipv4(self, dst: bytes, src: bytes, proto: int, payload: bytes | bytearray) -> bool:
        mac = self.mac_for(dst)
        if mac is None:
            self.stats.tx_queue_drops += 1
            return False
        frame = build_ipv4(mac, self.host_mac, src, dst, proto, len(payload), ident=self.next_ident(), frag=0)
        frame += payload
        if len(frame) > ETH_HLEN + self.mtu:
            return self._output_fragments(frame)
        return self.output(frame)

    def emit_udp(self, dst: bytes, dport: int, src: bytes, sport: int, payload: bytes | bytearray) -> bool:
        mac = self.mac_for(dst)
        if mac is None:
            self.stats.tx_queue_drops += 1
            return False
        if len(payload) > 65535 - 48:
            self.stats.udp_dropped += 1
            return False
        if len(dst) == 16:
            msg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
            return self.output_v6(build_l4_v6(mac, special_mac(src), src, dst, IPPROTO_UDP, msg, 6))
        frame = build_udp(mac, self.host_mac, src, sport, dst, dport, payload, ident=self.next_ident())
        if len(frame) > ETH_HLEN + self.mtu:
            return self._output_fragments(frame)
        return self.output(frame)

    def _output_fragments(self, frame: bytearray) -> bool:
        """Split an IPv4 packet larger than the guest's MTU (RFC 791 §3.2, "fragmentation").

        Big UDP replies (EDNS0 DNS answers, for one) and large echo replies
        would otherwise be dropped by the guest's driver.
        """
        payload = memoryview(frame)[ETH_HLEN + 20 :]
        step = (self.mtu - 20) // 8 * 8
        count = -(-len(payload) // step)
        if not self._room_for(count, len(payload) + count * (ETH_HLEN + 20)):
            self.stats.tx_queue_drops += 1  # all or nothing: a partial datagram is useless
            return False
        hdr = bytes(frame[ETH_HLEN : ETH_HLEN + 20])
        ident = int.from_bytes(hdr[4:6], "big")
        for off in range(0, len(payload), step):
            chunk = payload[off : off + step]
            more = IP_MF if off + step < len(payload) else 0
            piece = build_ipv4(bytes(frame[:6]), self.host_mac, hdr[12:16], hdr[16:20], hdr[9], len(chunk),
                               ident=ident, frag=more | off // 8)  # fmt: skip
            piece += chunk
            self.output(piece)
        return True

    def _room_for(self, count: int, size: int) -> bool:
        """Whether ``count`` fragments of ``size`` bytes in all fit toward the guest now.

        :meth:`tx_space` counts frames of a 1500-byte MTU; on a larger link (host_mtu=9000)
        fragments are bigger, and the bytes decide.
        """
        return self.tx_space() >= count and self.tx_bytes_space() >= size

    def output_v6(self, frame: bytearray) -> bool:
        """Queue an IPv6 packet, split into fragments when it exceeds the guest's MTU.

        Only the source fragments in IPv6 (RFC 8200 §4.5): an answer larger than the link,
        such as a big EDNS0 DNS reply over UDP, would otherwise be dropped by the guest's
        driver. The fragment header follows the IPv6 header (our packets carry no other
        extension headers), each piece but the last holds a multiple of 8 bytes, and all
        share one identification.
        """
        if len(frame) <= ETH_HLEN + self.mtu:
            return self.output(frame)
        l3 = ETH_HLEN
        payload = memoryview(frame)[l3 + 40 :]
        step = (self.mtu - 48) // 8 * 8
        count = -(-len(payload) // step)
        if not self._room_for(count, len(payload) + count * (ETH_HLEN + 48)):
            self.stats.tx_queue_drops += 1  # all or nothing: a partial packet is useless
            return False
        self._ident6 = (self._ident6 + 1) & 0xFFFFFFFF
        head = bytes(frame[: l3 + 40])
        next_header = head[l3 + 6]
        for off in range(0, len(payload), step):
            chunk = payload[off : off + step]
            more = 1 if off + step < len(payload) else 0
            piece = bytearray(head)
            struct.pack_into("!HB", piece, l3 + 4, 8 + len(chunk), _IPPROTO_FRAGMENT)
            piece += struct.pack("!BBHI", next_header, 0, off | more, self._ident6)  # off is a multiple of 8
            piece += chunk
            self.output(piece)
        return True

    def in_net(self, ip: bytes) -> bool:
        return int.from_bytes(ip, "big") & self._mask_int == self._net_int

    def routable(self, dst: bytes) -> bool:
        """Whether guest traffic to ``dst`` may leave through a host socket."""
        if dst == self.gateway_ip:
            return True
        if len(dst) == 16:
            if self.ipv6 is None:
                return False
            if dst == self.ipv6.router:
                return True
            return not (
                dst[0] == 0xFF or dst[:2] == b"\xfe\x80" or self.ipv6.in_prefix(dst) or dst in (_LOOPBACK6, bytes(16))
            )
        if self.in_net(dst) or dst == b"\xff\xff\xff\xff" or dst[0] >= 224 or dst[0] == 0:
            return False
        return True

    def host_side(self, dst: bytes) -> bytes:
        """The address a host socket uses for ``dst``: the gateway means host loopback (as QEMU)."""
        if dst == self.gateway_ip:
            return _LOOPBACK
        if self.ipv6 is not None and dst == self.ipv6.router:
            return _LOOPBACK6
        return dst

    # -- input -----------------------------------------------------------
    def _input(self, frame: memoryview) -> None:
        if len(frame) >= 54 and self._tcp4_input(frame):
            return
        c = self.stats
        if len(frame) < ETH_HLEN:
            c.truncated += 1
            return
        dst_mac, src_mac, ethertype = _ETH.unpack_from(frame)
        if src_mac[0] & 1 or src_mac == self.host_mac or src_mac[:2] in SPECIAL_MAC_PREFIXES:
            # A group address cannot send, and ours are not the guest's: learnt as the guest's
            # MAC one would send every reply back to ourselves.
            c.not_for_us += 1
            return
        if (dst_mac != self.host_mac and dst_mac[:2] not in SPECIAL_MAC_PREFIXES
                and dst_mac != b"\xff\xff\xff\xff\xff\xff" and dst_mac[:2] != b"\x33\x33"):
            # Any 52:55 or 52:56 MAC is one of the emulated addresses' (special_mac): a guest may
            # send to 10.0.2.3's own, learnt from ARP or set by hand.
            c.not_for_us += 1
            return
        body = frame[ETH_HLEN:]
        if ethertype in (ETH_P_IPV4, ETH_P_ARP) and not self.config.ipv4:
            c.unsupported += 1  # ipv4=off, as libslirp without in_enabled
        elif ethertype == ETH_P_IPV4:
            self._ipv4_input(body, src_mac)
        elif ethertype == ETH_P_ARP:
            self._arp_input(body, src_mac)
        elif ethertype == ETH_P_IPV6 and self.ipv6 is not None:
            self.ipv6.input(body, src_mac)
        else:
            c.unsupported += 1

    def _tcp4_input(self, frame: memoryview) -> bool:
        """A TCP segment of a connection we have, from the guest's known MAC and address, unfragmented
        and with a 20-byte IP header: handed to its connection with one unpack; True if it was.

        This is most of what a guest sends, and the general path (``_input`` → ``_ipv4_input`` →
        ``l4_input`` → ``TcpNat.input``) checks the same things in five calls and an :class:`Ipv4`.
        Anything else, or anything that fails a check here (a bad checksum, a bad offset), returns
        False and takes the general path, which counts it.
        """
        dmac, smac, ethertype, vihl, total, frag, proto, src, dst, sport, dport, seq, ack, offflags, win = \
            _ETH_IP_TCP.unpack_from(frame)  # fmt: skip
        if (
            ethertype != ETH_P_IPV4
            or vihl != 0x45
            or proto != IPPROTO_TCP
            or frag & (IP_MF | IP_OFFMASK)
            or src != self._last_src
            or smac != self.guest_mac
            or dmac != self.host_mac
        ):
            return False
        conn = self.tcp.conns.get((src, sport, dst, dport))
        if offflags & SYN:
            # A SYN for a connection we have (a retransmission, or a new one over TIME-WAIT) goes the
            # general way; one opening a connection is checked below and opened without an Ipv4.
            if conn is not None:
                return False
        elif conn is None or conn.state == TIME_WAIT_STATE:
            return False
        doff = (offflags >> 12) * 4
        if not 40 <= total <= len(frame) - ETH_HLEN or doff < 20 or doff > total - 20:
            return False
        if not verify(frame[ETH_HLEN : ETH_HLEN + 20]):
            return False
        seg = frame[ETH_HLEN + 20 : ETH_HLEN + total]
        if not self.l4_csum_trusted and not verify(seg, pseudo_sum(src, dst, IPPROTO_TCP, total - 20)):
            return False
        if conn is None:
            self.tcp.no_conn(
                src, dst, sport, dport, seq, ack, offflags & 0x3F, win, seg[20:doff], total - 20 - doff, smac
            )
            return True
        conn.input(seq, ack, offflags & 0x3F, win, seg[doff:], seg[20:doff] if doff > 20 and conn.sack_ok else b"")
        return True

    def _arp_input(self, body: memoryview, src_mac: bytes) -> None:
        a = parse_arp(body)
        if a is None:
            self.stats.truncated += 1
            return
        if a.sha != src_mac:
            self.stats.not_for_us += 1
            return
        if self.in_net(a.spa) and a.spa not in self.local_ips:
            known = self.arp_table.lookup(a.spa)
            self.arp_table.learn(a.spa, a.sha)
            self.guest_mac = a.sha
            if known is None:
                self.tcp.address_resolved(a.spa)
        if a.op == arp.ARP_REQUEST and a.tpa in self.local_ips:
            self.stats.arp_replies += 1
            self.output(arp.reply_for(a.sha, a.spa, special_mac(a.tpa), a.tpa))

    def _ipv4_input(self, body: memoryview, src_mac: bytes) -> None:
        c = self.stats
        ip = parse_ipv4(body)
        if ip is None:
            if len(body) >= 20:
                c.bad_checksum += 1
            else:
                c.truncated += 1
            return
        if ip.src == b"\0\0\0\0":
            # Only a DHCP client without an address may send from 0.0.0.0 (RFC 2131 §4.1).
            if ip.proto == IPPROTO_UDP and not ip.frag & (IP_MF | IP_OFFMASK):
                u = parse_udp(ip, trusted=self.l4_csum_trusted)
                if u is not None and u[1] == SERVER_PORT:
                    self.guest_mac = src_mac
                    self.dhcp.input(u[2])
                    return
            c.not_for_us += 1
            return
        if not self.in_net(ip.src) or ip.src in self.local_ips or ip.src == self._bcast:
            c.not_for_us += 1
            return
        if ip.src != self._last_src or src_mac != self.guest_mac:
            self.arp_table.learn(ip.src, src_mac)
            self.guest_mac = src_mac
            self._last_src = ip.src
        if ip.frag & (IP_MF | IP_OFFMASK):
            whole = self.reassembler.add(ip)
            c.frag_dropped = self.reassembler.dropped
            if whole is None:
                return
            c.frag_reassembled += 1
            ip = whole
        if ip.proto == IPPROTO_ICMP:
            self.icmp.input(ip)
        else:
            self.l4_input(ip, src_mac)

    def l4_input(self, ip: Ipv4, src_mac: bytes) -> None:
        """TCP and UDP over either IP version."""
        if ip.proto == IPPROTO_TCP:
            self.tcp.input(ip, src_mac)
        elif ip.proto == IPPROTO_UDP:
            self._udp_input(ip)
        else:
            self.stats.unsupported += 1

    def _udp_input(self, ip: Ipv4) -> None:
        c = self.stats
        u = parse_udp(ip, trusted=self.l4_csum_trusted)
        if u is None:
            if len(ip.payload) >= 8:
                c.bad_checksum += 1
            else:
                c.truncated += 1
            return
        sport, dport, payload = u
        if dport == SERVER_PORT and len(ip.src) == 4 and (sport == CLIENT_PORT or ip.dst in self._dhcp_dsts):
            # A BOOTP relay sends from port 67; libslirp answers whatever reaches port 67
            # of the gateway or the broadcast address.
            self.dhcp.input(payload)
        elif dport == dhcp6.SERVER_PORT and self.dhcp6 is not None and ip.dst in self.dhcp6.addresses:
            self.dhcp6.input(ip.src, sport, payload)  # a local service: restrict=on keeps it, as DHCPv4
        elif dport == TFTP_PORT and self.tftp is not None and ip.dst in self._tftp_dsts:
            self.tftp.input(ip.src, sport, payload)
        elif ip.dst == self.dns_ip or (self.ipv6 is not None and ip.dst == self.ipv6.dns):
            if dport == DNS_PORT:
                self.dns.input(ip.src, sport, ip.dst, payload)
            else:
                c.not_for_us += 1
        else:
            self.udp.input(ip.src, sport, ip.dst, dport, payload)

    def _tftp_send(self, dst: bytes, dport: int, payload: bytes) -> None:
        src = self.ipv6.router if len(dst) == 16 and self.ipv6 is not None else self.gateway_ip
        self.emit_udp(dst, dport, src, TFTP_PORT, payload)

    def _internal_error(self) -> None:
        self.stats.errors += 1
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL:
            self._last_log = now
            log.exception("user-mode network: internal error handling a frame")

    # -- observability ---------------------------------------------------
    def flows(self) -> list[FlowInfo]:
        """The flow table (``info usernet``)."""
        return self.tcp.flows() + self.udp.flows(self.dns.flows()) + self.icmp.flows()

    def info(self) -> str:
        """The flow table as text, like QEMU's ``info usernet``."""
        return format_flows(self.flows())

    def counters(self) -> dict[str, int]:
        """Drop and error counters by name (see :class:`~appliance.nat.stats.Counters`)."""
        self.stats.frag_dropped = self.reassembler.dropped  # timeouts happen between frames
        return self.stats.as_dict()

    def queued(self) -> int:
        return len(self._out)


def _scatter(bufs: Sequence[memoryview], pieces: tuple[bytes | bytearray, ...]) -> None:
    """Copy ``pieces`` in order across ``bufs`` (a frame that spans several guest buffers)."""
    it = iter(bufs)
    b = next(it, None)
    boff = 0
    for piece in pieces:
        mv = memoryview(piece)
        while len(mv) and b is not None:
            k = min(len(b) - boff, len(mv))
            b[boff : boff + k] = mv[:k]
            mv = mv[k:]
            boff += k
            if boff == len(b):
                b = next(it, None)
                boff = 0
