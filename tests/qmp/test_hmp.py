"""The human monitor on a socket (-monitor tcp:/telnet:, -mon mode=readline):
the same bytes as QEMU's for what scripts type, and the commands drive a
running test guest. Also the telnet serial console (-serial telnet:)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.machine.telnet import TelnetInput
from appliance.qmp.hmp import LineEditor
from tests.conftest import needs_kvm, needs_qemu
from tests.ports import free_port
from tests.qmp.test_machine_qmp import GUEST, ex, machine

needs_guest = pytest.mark.skipif(not GUEST.exists(), reason="test guest not built (appliance kit build)")


async def _read_prompt(r: asyncio.StreamReader, timeout: float = 10) -> bytes:
    return await asyncio.wait_for(r.readuntil(b"(qemu) "), timeout)


@contextlib.asynccontextmanager
async def qemu_monitor(kind: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """QEMU's own monitor (no guest at all) to compare bytes with."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
        "-monitor", f"{kind}:127.0.0.1:{port},server=on,wait=off",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(400):  # up to 20 s on a loaded machine
            with contextlib.suppress(OSError):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("QEMU's monitor never listened")
        yield r, w
        w.close()
    finally:
        proc.kill()
        await proc.wait()


# What scripts type; the replies must be QEMU's byte for byte (the version aside).
TYPED = [b"info status\n", b"bogus word\n", b"ab\x7fc\n", b"\x1b[Ainfo kvm\n", b"help stop\n",
         b"xy\x1b[D\x1b[Dz\x1b[C\x1b[3~\n", b"help info status\n", b"info bogus\n", b"set_link\n",
         b"set_link a\n", b"system_reset now\n", b"help nonexist\n", b"object_del x\n",
         b"info status x\n", b"object_del a b\n", b'hostfwd_add "tcp::1-:22\n', b'object_del "x\\y"\n',
         # QEMU quotes an unknown name from the line's start, reads names without quotes, stops them at "/".
         b"  bogus word\n", b"info  bogus x\n", b'info "status\n', b"bogus/x y\n", b"quit x\n"]


def _same(text: bytes) -> bytes:
    return re.sub(rb"QEMU \d+\.\d+\.\d+", b"QEMU x", text)


@needs_qemu
@needs_kvm
@needs_guest
@pytest.mark.parametrize("kind", ["tcp", "telnet"])
async def test_the_prompt_echo_and_answers_are_qemus(tmp_path: Path, kind: str) -> None:
    port = free_port()
    async with machine(tmp_path, "-monitor", f"{kind}:127.0.0.1:{port},server=on,wait=off"):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        async with qemu_monitor(kind) as (qr, qw):
            assert _same(await _read_prompt(r)) == _same(await _read_prompt(qr))
            for line in TYPED:
                # telnet clients end lines with CR NUL; raw tcp ones with LF.
                data = line.replace(b"\n", b"\r\0") if kind == "telnet" else line
                w.write(data)
                qw.write(data)
                assert await _read_prompt(r) == await _read_prompt(qr), line
        w.close()


@needs_kvm
@needs_guest
async def test_hmp_commands_drive_the_running_guest(tmp_path: Path) -> None:
    port, fwd = free_port(), free_port()
    uuid = "6f3a2f5e-1234-4e8b-9c3d-123456789abc"
    async with machine(tmp_path, "-name", "lab1", "-uuid", uuid, "-netdev", "user,id=n0",
                       "-device", "virtio-net-pci,netdev=n0,id=nic0",
                       "-chardev", f"socket,id=m0,host=127.0.0.1,port={port},server=on,wait=off",
                       "-mon", "chardev=m0") as m:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await _read_prompt(r)

        async def hmp(line: str) -> str:
            w.write(line.encode() + b"\n")
            out = (await _read_prompt(r)).decode()
            # Drop the echo (up to the CR LF that ends it) and the prompt.
            return out.split("\r\n", 1)[1].removesuffix("(qemu) ")

        assert await hmp("info name") == "lab1\r\n"
        assert await hmp("info uuid") == f"{uuid}\r\n"
        assert await ex(m.qmp, "query-uuid") == {"UUID": uuid}
        assert await hmp("stop") == ""
        assert await hmp("info status") == "VM status: paused\r\n"
        assert (await ex(m.qmp, "query-status"))["status"] == "paused"
        assert await hmp("c") == ""
        assert await hmp("info status") == "VM status: running\r\n"
        assert await hmp("set_link nic0 off") == ""
        assert (await m.guest("net info", "NET info"))["link"] == "down"
        assert await hmp("set_link nic0 on") == ""
        assert await hmp("set_link nope on") == "Error: Device 'nope' not found\r\n"
        assert await hmp("stop now") == ('stop|s: extraneous characters at the end of line\r\n'
                                         'Try "help stop" for more information\r\n')
        assert "nic0: index=0,type=nic,model=virtio-net-pci" in await hmp("info network")
        # A forward added at run time listens on the host, and goes away again.
        assert await hmp(f"hostfwd_add n0 tcp:127.0.0.1:{fwd}-:22") == ""
        _, fw = await asyncio.open_connection("127.0.0.1", fwd)
        fw.close()
        assert "HOST_FORWARD" in await hmp("info usernet")
        assert await hmp(f"hostfwd_remove n0 tcp:127.0.0.1:{fwd}") == \
            f"host forwarding rule for tcp:127.0.0.1:{fwd} removed\r\n"
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", fwd)
        pcap = tmp_path / "h.pcap"
        assert await hmp(f"object_add filter-dump,id=f0,netdev=n0,file={pcap}") == ""
        assert await hmp("object_del f0") == ""
        assert pcap.read_bytes()[:4] == b"\xd4\xc3\xb2\xa1"
        w.close()


@needs_kvm
@needs_guest
async def test_telnet_serial_console_reaches_the_guest(tmp_path: Path) -> None:
    from appliance.cli.run import parse_args, to_config
    from appliance.machine.machine import Machine

    port = free_port()
    # server (wait=on, QEMU's default): the guest starts only once a client is
    # on, so nothing it prints before our connect is dropped. With nowait a
    # loaded machine could let the guest print its banner before we were on.
    config = to_config(parse_args(["-kernel", str(GUEST), "-nodefaults",
                                   "-serial", f"telnet:127.0.0.1:{port},server"]))

    async def client() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        for _ in range(200):
            try:
                return await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError("the telnet chardev never listened")

    connecting = asyncio.ensure_future(client())
    async with Machine(config) as vm:
        r, w = await asyncio.wait_for(connecting, 5)
        assert await asyncio.wait_for(r.readexactly(12), 5) == \
            b"\xff\xfb\x01\xff\xfb\x03\xff\xfb\x00\xff\xfd\x00"
        await asyncio.wait_for(r.readuntil(b"TESTGUEST-READY"), 30)
        # The client's own negotiation is not typed at the guest.
        w.write(b"\xff\xfd\x01\xff\xfb\x18echo over-telnet\r\n")
        await asyncio.wait_for(r.readuntil(b"\nover-telnet"), 10)
        w.write(b"poweroff\r\n")
        assert await asyncio.wait_for(vm.wait(), 20) == 0
        w.close()


def test_line_editor_redraws_like_qemus_readline() -> None:
    echo, lines = LineEditor().feed(b"ab\x7fc\r")
    assert echo == b"a\x1b[K\x1b[Dab\x1b[K\x1b[D\x1b[Da\x1b[K\x1b[Dac\x1b[K\r\n"
    assert lines == ["ac"]
    echo, lines = LineEditor(telnet=True).feed(b"\xff\xfb\x18\xff\xfa\x18\x00xterm\xff\xf0x\x1b[Dy\r\0")
    assert lines == ["yx"]  # the left arrow moved the cursor before x


def test_telnet_input_drops_commands_across_reads() -> None:
    t = TelnetInput()
    data = b"a\xff\xfd\x01b\xff\xff\xff\xfa\x1f\x00\x50\xff\xf0c\xff\xf1d"
    assert b"".join(t.feed(data[i:i + 1]) for i in range(len(data))) == b"ab\xffcd"


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=20), telnet=st.booleans())
def test_any_bytes_at_the_prompt_give_bounded_lines_and_never_raise(chunks: list[bytes], telnet: bool) -> None:
    from appliance.qmp.hmp import MAX_LINE

    editor = LineEditor(telnet=telnet)
    for chunk in chunks:
        echo, lines = editor.feed(chunk)
        assert all(len(line.encode()) < MAX_LINE * 4 for line in lines)
        assert len(editor.buf) < MAX_LINE and 0 <= editor.pos <= len(editor.buf)
        assert len(echo) <= 8 * MAX_LINE * (len(chunk) + 1)


def test_arguments_are_read_as_qemus_get_str_reads_them() -> None:
    from appliance.qmp.hmp import hmp_words

    assert hmp_words(' n0  "tcp::1-:22" ') == ["n0", "tcp::1-:22"]
    assert hmp_words(r'"a b\"c\\d\n\r\'"x') == ["a b\"c\\d\n\r'", "x"]  # a word may follow a quote
    assert hmp_words('a"b" c') == ['a"b"', "c"]  # a quote inside a word is a character
    assert hmp_words('"open') is None
    assert hmp_words(r'"\q"') is None
    assert hmp_words('"ends in a backslash\\') is None
    assert hmp_words("") == []


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_any_command_line_splits_or_is_refused_and_never_raises(text: str) -> None:
    from appliance.qmp.hmp import hmp_words

    words = hmp_words(text)
    if '"' not in text:
        assert words == [w for w in re.split("[ \t\n\v\f\r]+", text) if w]  # C's isspace()
    elif words is not None:
        assert sum(len(w) for w in words) <= len(text)
