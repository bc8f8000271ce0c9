"""A Hypothesis state machine over one TCP connection through the stack.

Rules are what the guest, the host and the wire can do: send data either
way, lose/duplicate/reorder frames for a while, close and reopen the guest's
window, and inject blind RSTs and SYNs with wrong sequence numbers. The
invariants: nothing escapes, the queue toward the guest stays bounded, and each
side only ever receives a prefix of what the other sent. At the end the wire
heals and every byte must arrive.
"""

from __future__ import annotations

import asyncio
import os
import time

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from appliance.nat import UserNetConfig, UserNetwork

from .peer import GUEST_IP, GW_IP, Guest, tcp_frame


class TcpThroughStack(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.to_host = bytearray()  # what the guest sent
        self.to_guest = bytearray()  # what the host sent
        self.host_got = bytearray()
        self.guest_got = bytearray()
        self.loop.run_until_complete(self._setup())

    async def _setup(self) -> None:
        self.writer: asyncio.StreamWriter | None = None

        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.writer = w
            while chunk := await r.read(1 << 20):
                self.host_got += chunk

        self.server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.net = UserNetwork(UserNetConfig(), queue_limit=64)
        await self.net.start()
        self.guest = Guest(self.net, seed=int.from_bytes(os.urandom(2), "big"))
        self.conn = self.guest.connect(GW_IP, port)
        self.conn.on_data = self.guest_got.extend
        await self._pump(lambda: self.conn.state == "ESTABLISHED" and self.writer is not None, 5.0)
        assert self.conn.state == "ESTABLISHED"

    async def _pump(self, until, limit: float) -> None:
        end = time.monotonic() + limit
        while time.monotonic() < end and not until():
            self.guest.poll()
            await asyncio.sleep(0.001)

    def _run(self, seconds: float) -> None:
        self.loop.run_until_complete(self._pump(lambda: False, seconds))

    @rule(n=st.integers(1, 60_000))
    def guest_sends(self, n: int) -> None:
        data = os.urandom(n)
        self.to_host += data
        self.conn.write(data)

    @rule(n=st.integers(1, 60_000))
    def host_sends(self, n: int) -> None:
        data = os.urandom(n)
        self.to_guest += data
        assert self.writer is not None
        self.writer.write(data)

    @rule(ms=st.integers(1, 40))
    def time_passes(self, ms: int) -> None:
        self._run(ms / 1000)

    @rule(rate=st.sampled_from([0.0, 0.05, 0.2]))
    def wire_quality(self, rate: float) -> None:
        self.guest.link.loss = rate

    @rule(closed=st.booleans())
    def guest_window(self, closed: bool) -> None:
        self.conn.window_override = 0 if closed else None
        self.conn._send(0x10, self.conn.snd_nxt)

    @rule(flags=st.sampled_from([0x04, 0x02, 0x14, 0x12]), seq=st.integers(0, 2**32 - 1))
    def blind_injection(self, flags: int, seq: int) -> None:
        c = self.conn
        if (seq - c.iss - c.snd_nxt) & 0xFFFFFFFF == 0:
            return  # an exact RST is a real reset, not a blind one
        self.guest.link.to_stack(tcp_frame(GUEST_IP, c.lport, GW_IP, c.rport, seq, c.irs + c.rcv_nxt, flags, 100))

    @invariant()
    def nothing_escaped_and_prefixes_hold(self) -> None:
        assert self.net.counters()["errors"] == 0
        assert self.net.queued() <= 64
        assert self.to_host.startswith(self.host_got)
        assert self.to_guest.startswith(self.guest_got)
        assert not self.conn.reset

    def teardown(self) -> None:
        try:
            self.guest.link.loss = 0.0
            self.conn.window_override = None
            self.conn._send(0x10, self.conn.snd_nxt)
            self.loop.run_until_complete(
                self._pump(
                    lambda: len(self.host_got) == len(self.to_host) and len(self.guest_got) == len(self.to_guest), 30.0
                )
            )
            assert bytes(self.host_got) == bytes(self.to_host)
            assert bytes(self.guest_got) == bytes(self.to_guest)
        finally:
            self.loop.run_until_complete(self.net.stop())
            self.server.close()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()


TcpThroughStack.TestCase.settings = settings(
    max_examples=int(os.environ.get("NAT_FUZZ_EXAMPLES", "25")), stateful_step_count=15, deadline=None
)
test_tcp_through_stack = TcpThroughStack.TestCase
