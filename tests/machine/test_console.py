"""Console: output history and expect cursor, input backpressure, Ctrl-A escapes, socket chardev."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.machine.config import ChardevConfig
from appliance.machine.console import Console, ConsoleTimeout, SocketBackend, StdioBackend


class FakeUart:
    def __init__(self, room: int) -> None:
        self.room = room
        self.got = bytearray()

    def receive(self, data: bytes) -> int:
        take = data[: self.room]
        self.got += take
        self.room -= len(take)
        return len(take)


async def test_expect_consumes_matches_in_order() -> None:
    c = Console()
    await c.start()
    c.guest_output(b"one\ntwo\none\n")
    assert (await c.expect("one", timeout=1)).start() == 0
    await c.expect("two", timeout=1)
    m = await c.expect("one", timeout=1)
    assert m.group(0) == "one"
    with pytest.raises(ConsoleTimeout):
        await c.expect("one", timeout=0.05)
    assert c.output == "one\ntwo\none\n"


async def test_expect_wakes_on_output_from_another_thread() -> None:
    c = Console()
    await c.start()
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, lambda: loop.run_in_executor(None, c.guest_output, b"late line\n"))
    await c.expect(r"late line\n", timeout=10)


async def test_input_waits_until_the_uart_drains() -> None:
    c = Console()
    await c.start()
    uart = FakeUart(room=3)
    c.attach_uart(uart)
    c.send("abcdef")
    assert bytes(uart.got) == b"abc"
    uart.room = 10
    c.rx_drained()
    await asyncio.sleep(0.01)
    assert bytes(uart.got) == b"abcdef"


async def test_ctrl_a_x_quits_and_ctrl_a_ctrl_a_sends_one(capfd: pytest.CaptureFixture[str]) -> None:
    quits: list[int] = []
    c = Console()
    await c.start()
    uart = FakeUart(room=100)
    c.attach_uart(uart)
    c.on_quit = lambda: quits.append(1)
    b = StdioBackend(mux=True)
    b._console = c
    b._demux(b"ab\x01\x01c")
    b._demux(b"\x01")
    b._demux(b"x")
    assert bytes(uart.got) == b"ab\x01c"
    assert quits == [1]
    assert capfd.readouterr().out == "QEMU: Terminated\n\r"


class Keys:
    """A muxed monitor that records what reaches it."""

    def __init__(self) -> None:
        self.log: list[object] = []

    def focus_in(self) -> None:
        self.log.append("in")

    def focus_out(self) -> None:
        self.log.append("out")

    def feed(self, data: bytes) -> None:
        self.log.append(data)


async def test_ctrl_a_c_moves_the_keyboard_between_guest_and_monitor(capfd: pytest.CaptureFixture[str]) -> None:
    c = Console()
    await c.start()
    uart = FakeUart(room=100)
    c.attach_uart(uart)
    keys = Keys()
    b = StdioBackend(mux=True)
    b._console = c
    assert c.attach_monitor(keys) is False  # not this console's backend
    b.monitor = keys
    b._demux(b"ls\x01cinfo\x01")
    b._demux(b"\x01 x\x01cpwd")
    assert bytes(uart.got) == b"lspwd"
    assert keys.log == ["in", b"info", b"\x01 x", "out"]
    b._demux(b"\x01h")
    assert "C-a c    switch between console and monitor" in capfd.readouterr().out


async def test_unix_socket_server_passes_bytes_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "s"
    backend = SocketBackend(ChardevConfig("socket", path=path, server=True, wait=False))
    c = Console(backend)
    await c.start()
    uart = FakeUart(room=100)
    c.attach_uart(uart)
    reader, writer = await asyncio.open_unix_connection(str(path))
    # Output with no client is dropped (wait=off, as QEMU): print once the server has taken
    # us, a few loop turns after our connect() returned (a fixed 20 ms could be too few).
    await asyncio.wait_for(backend._connected.wait(), 10)
    c.guest_output(b"hello\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"hello\n"
    writer.write(b"typed")
    await writer.drain()
    for _ in range(1000):
        if uart.got:
            break
        await asyncio.sleep(0.01)
    assert bytes(uart.got) == b"typed"
    writer.close()
    await c.close()
    assert not path.exists()


async def test_pty_chardev_names_its_terminal_and_passes_bytes_both_ways(
        capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import re

    from appliance.cli.run import parse_serial
    from appliance.machine.console import make_backend

    cfg = parse_serial("pty", {}, nographic=False)
    assert cfg is not None and cfg.backend == "pty"
    c = Console(make_backend(cfg))
    await c.start()
    m = re.search(r"char device redirected to (/dev/pts/\d+) \(label serial0\)", capsys.readouterr().err)
    assert m, "QEMU's line names the terminal"
    fd = os.open(m.group(1), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        uart = FakeUart(room=100)
        c.attach_uart(uart)
        c.guest_output(b"login: ")
        got = b""
        for _ in range(500):
            try:
                got += os.read(fd, 100)
            except BlockingIOError:
                pass
            if got == b"login: ":
                break
            await asyncio.sleep(0.01)
        assert got == b"login: "
        os.write(fd, b"root\r")
        for _ in range(500):
            if uart.got:
                break
            await asyncio.sleep(0.01)
        assert bytes(uart.got) == b"root\r"  # raw: no line discipline between
    finally:
        os.close(fd)
        await c.close()


def test_chardev_pty_parses() -> None:
    from appliance.cli.run import parse_args

    a = parse_args(["-chardev", "pty,id=charserial0", "-serial", "chardev:charserial0", "-kernel", "/bin/true"])
    assert a.chardevs["charserial0"].backend == "pty"
