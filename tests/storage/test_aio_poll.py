"""The loop polls AIO completion rings before it blocks (appliance.storage.poll).

Requests must complete with the right data whether the spin sees the
completion or runs out and the loop blocks on the eventfd; the window must
grow while waits are short and drop to 0 when they are long; other fds must
still be served; the knob must take 0 and refuse bad values.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.storage import poll
from appliance.storage.aio import IOCB_CMD_PREADV, IOCB_CMD_PWRITEV, AioUnavailable, LinuxAio

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_knob(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from the default, whatever the environment says."""
    monkeypatch.delenv(poll.ENV, raising=False)
    monkeypatch.setattr(poll, "_max_ns", None)
    yield


class FakeRing:
    """A poll source whose ring fills when the test says so; its fd is a pipe."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.pending = 0
        self.filled = False
        self.reaped: list[int] = []
        self.looks = 0  # calls of ring_ready()
        self.fill_at = 0  # fill the ring at this look (0: only when the test sets filled)
        self.signal_at = 0  # write the pipe at this look (0: never)

    @property
    def fd(self) -> int:
        return self.r

    def in_flight(self) -> bool:
        return self.pending > 0

    def ring_ready(self) -> bool:
        self.looks += 1
        if self.fill_at and self.looks >= self.fill_at:
            self.filled = True
        if self.signal_at and self.looks == self.signal_at:
            os.write(self.w, b"x")  # the eventfd's wake-up, without the ring showing it
        return self.filled

    def fill_on_look(self, n: int) -> None:
        """Show the completion from the ``n``-th look on: select() looks once before it
        spins, so n >= 2 lands it inside the spin whatever the machine's speed (a timer
        thread racing the spin did not, on a loaded machine)."""
        self.looks, self.fill_at = 0, n

    def signal_on_look(self, n: int) -> None:
        """Write the pipe at the ``n``-th look (n >= 2: during the spin), never filling the ring."""
        self.looks, self.signal_at = 0, n

    def reap(self) -> None:
        try:
            os.read(self.r, 64)
        except BlockingIOError:
            pass
        if self.filled:
            self.reaped.append(self.pending)
            self.pending = 0
            self.filled = False

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _direct_file(tmp_path: Path, size: int) -> int:
    p = tmp_path / "data"
    p.write_bytes(bytes(range(256)) * (size // 256))
    # Out of the page cache: O_DIRECT I/O on cached or dirty pages may finish inside io_submit.
    with open(p, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        return os.open(p, os.O_RDWR | os.O_DIRECT)
    except OSError:
        pytest.skip("no O_DIRECT here")


def _aio() -> LinuxAio:
    try:
        aio = LinuxAio(depth=8)
    except AioUnavailable:
        pytest.skip("no kernel AIO here")
    if aio._ring_u32 is None:
        aio.close()
        pytest.skip("the kernel's event ring layout is not the known one")
    return aio


async def _run(aio: LinuxAio, opcode: int, fd: int, buf: memoryview, off: int) -> int:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    def done(_t: object, res: int, err: BaseException | None) -> None:
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(res)

    aio.start(opcode, fd, [buf], off, done, None, eager=True)
    return await asyncio.wait_for(fut, 10)


def _ignore_contention(poller: poll.LoopPoller, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spin even on a busy test machine: these tests are about the ring, not the neighbours."""
    if poller._schedstat is not None:
        os.close(poller._schedstat)
        poller._schedstat = None
    monkeypatch.setattr(poll, "PREEMPTED_NS", 10**12)


async def test_spin_catches_completions_and_data_is_right(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a window far longer than a request, the spin sees the completions in the ring.

    Rounds of 16 writes and 16 reads until a spin has seen one (20 s at most): one full
    ``make test`` run saw none in a single round (cause not found; a round sees none when
    each of its requests outlasts the 10 ms window, which then resets, or completes before
    the wait, where there is nothing to spin for)."""
    poll.set_max_ns(poll.LIMIT_MAX_NS)
    fd = _direct_file(tmp_path, 1 << 20)
    aio = _aio()
    loop = asyncio.get_running_loop()
    poller = poll.poller_of(loop)
    assert poller is not None and aio in poller.sources
    _ignore_contention(poller, monkeypatch)
    buf = memoryview(mmap.mmap(-1, 4096))
    deadline = loop.time() + 20
    try:
        while True:
            for i in range(16):
                buf[:] = bytes([i]) * 4096
                assert await _run(aio, IOCB_CMD_PWRITEV, fd, buf, i * 4096) == 4096
            for i in range(16):
                assert await _run(aio, IOCB_CMD_PREADV, fd, buf, i * 4096) == 4096
                assert bytes(buf) == bytes([i]) * 4096
            if poller.hits or loop.time() > deadline:
                break
        assert poller.hits > 0, (poller.misses, poller.contended)
    finally:
        aio.close()
        os.close(fd)
    assert aio not in poller.sources
    # The last source gone, the loop's selector is its own again.
    assert poll.poller_of(asyncio.get_running_loop()) is None
    assert "select" not in poller.selector.__dict__


async def test_requests_complete_when_the_spin_never_sees_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ring that never shows the completion: every spin runs out and the eventfd wakes the loop."""
    poll.set_max_ns(2_000_000)
    fd = _direct_file(tmp_path, 1 << 20)
    aio = _aio()
    monkeypatch.setattr(aio, "ring_ready", lambda: False)
    poller = poll.poller_of(asyncio.get_running_loop())
    assert poller is not None
    buf = memoryview(mmap.mmap(-1, 4096))
    try:
        for i in range(12):
            poller.ns = poller.max_ns  # spin (and run out) whenever the loop would block
            assert await _run(aio, IOCB_CMD_PREADV, fd, buf, i * 4096) == 4096
            assert bytes(buf) == (bytes(range(256)) * 16)
        assert poller.hits == 0
    finally:
        aio.close()
        os.close(fd)


@pytest.fixture
def bare(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[poll.LoopPoller, FakeRing]]:
    """A poller on a selector of its own watching one fake ring: driven by hand, no loop."""
    sel = selectors.DefaultSelector()
    ring = FakeRing()
    sel.register(ring.fd, selectors.EVENT_READ, "ring")
    poller = poll.LoopPoller(sel, 10_000_000_000)
    poller.sources.append(ring)
    _ignore_contention(poller, monkeypatch)
    yield poller, ring
    poller.detach()
    sel.close()
    ring.close()


def test_no_spin_without_requests_in_flight(bare: tuple[poll.LoopPoller, FakeRing]) -> None:
    poller, ring = bare
    poller.ns = poller.max_ns
    ring.filled = True  # not in flight: the ring is not looked at
    assert poller.select(0.001) == []
    assert poller.hits == poller.misses == 0


def test_spin_returns_the_ring_fd_as_readable(bare: tuple[poll.LoopPoller, FakeRing]) -> None:
    """A completion seen in the ring while spinning makes its fd readable although nothing signalled it."""
    poller, ring = bare
    poller.ns = 5_000_000_000
    ring.pending = 1
    ring.fill_on_look(3)
    t0 = time.monotonic()
    events = poller.select(5)  # (a poller that did not spin would sleep it out and return nothing)
    assert time.monotonic() - t0 < 2.5
    assert [(key.fd, key.data, mask) for key, mask in events] == [
        (ring.fd, "ring", selectors.EVENT_READ)]
    assert poller.hits == 1 and poller.misses == 0


def test_a_completion_already_in_the_ring_is_returned_at_once(
        bare: tuple[poll.LoopPoller, FakeRing], monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing to wait for: no spin, no look at the CPU, not even with the window at 0."""
    poller, ring = bare
    monkeypatch.setattr(poller, "_shared_cpu", lambda: pytest.fail("looked at the CPU"))
    ring.pending = 1
    ring.filled = True
    for ns in (0, 1_000_000):
        poller.ns = ns
        assert [key.fd for key, _ in poller.select(None)] == [ring.fd]
    assert poller.hits == poller.misses == 0


def test_window_grows_to_a_short_wait(bare: tuple[poll.LoopPoller, FakeRing]) -> None:
    """Nothing was polled (window 0) and the wait took ~2 ms: the next window covers it."""
    poller, ring = bare
    ring.pending = 1
    assert poller.select(0.002) == []
    assert poller.ns >= 2_000_000
    assert poller.hits == poller.misses == 0


def test_window_drops_to_zero_after_a_long_wait(bare: tuple[poll.LoopPoller, FakeRing]) -> None:
    poller, ring = bare
    poller.max_ns = poller.ns = 1_000_000
    ring.pending = 1
    assert poller.select(0.02) == []
    assert poller.misses == 1 and poller.ns == 0
    # With the window at 0 a long wait costs no spinning at all.
    spun = poller.spun_ns
    assert poller.select(0.02) == []
    assert poller.spun_ns == spun and poller.ns == 0


def test_a_missed_spin_still_returns_the_fd_when_it_is_signalled(
        bare: tuple[poll.LoopPoller, FakeRing]) -> None:
    """The ring never shows the completion but the eventfd is written: the blocking select gets it."""
    poller, ring = bare
    poller.ns = 1_000_000
    ring.pending = 1
    ring.signal_on_look(2)
    events = poller.select(5)
    assert [key.fd for key, _ in events] == [ring.fd]
    assert poller.misses == 1 and poller.hits == 0


def test_other_fds_are_served_before_spinning(bare: tuple[poll.LoopPoller, FakeRing]) -> None:
    """An fd that is ready when the loop would block is returned, not kept waiting a window."""
    poller, ring = bare
    poller.ns = 5_000_000_000
    ring.pending = 1  # in flight, never completes
    r, w = os.pipe()
    poller.selector.register(r, selectors.EVENT_READ, "other")
    try:
        os.write(w, b"ping")
        t0 = time.monotonic()
        events = poller.select(None)
        assert time.monotonic() - t0 < 2.5
        assert [key.data for key, _ in events] == ["other"]
    finally:
        poller.selector.unregister(r)
        os.close(r)
        os.close(w)


def test_zero_turns_polling_off(bare: tuple[poll.LoopPoller, FakeRing]) -> None:
    poller, ring = bare
    poller.max_ns = 0
    ring.pending = 1
    ring.filled = True
    assert poller.select(0.002) == []
    assert poller.hits == poller.misses == 0 and poller.ns == 0


def test_set_max_ns_reaches_loops_already_polling(bare: tuple[poll.LoopPoller, FakeRing]) -> None:
    loop = asyncio.new_event_loop()
    try:
        poller = poll.register(bare[1], loop)
        assert poller is not None
        poller.ns = poller.max_ns
        poll.set_max_ns(0)
        assert poller.max_ns == 0 and poller.ns == 0
    finally:
        poll.unregister(bare[1], loop)
        loop.close()


@pytest.mark.parametrize("text", ["", "abc", "-1", "10000001", "1.5", "0x10"])
def test_bad_values_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="poll-max-ns"):
        poll.parse_max_ns(text)


def test_environment_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(poll.ENV, "20000")
    assert poll.max_ns() == 20000


def test_bad_environment_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(poll.ENV, "soon")
    with pytest.raises(ConfigError, match=poll.ENV):
        poll.max_ns()


@pytest.mark.parametrize(("args", "env", "word"), [
    (["--poll-max-ns", "abc"], {}, "--poll-max-ns"),
    ([], {poll.ENV: "-5"}, poll.ENV),
])
def test_img_bench_refuses_bad_knob_with_exit_2(
        tmp_path: Path, args: list[str], env: dict[str, str], word: str) -> None:
    img = tmp_path / "x.raw"
    img.write_bytes(bytes(1 << 16))
    r = subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "img", "bench", "-f", "raw", "-c", "1",
         "-d", "1", "-t", "none", *args, str(img)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and word in r.stderr


def test_a_shared_cpu_stops_spinning_for_a_quiet_spell(
        bare: tuple[poll.LoopPoller, FakeRing], monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop thread waited on a run queue since the last wait: it blocks instead of spinning."""
    poller, ring = bare
    # Quiet spells far longer than this test: a preempted test thread must not outlast one.
    monkeypatch.setattr(poll, "QUIET_NS", 60 * 10**9)
    monkeypatch.setattr(poll, "QUIET_MAX_NS", 60 * 10**9)
    delay = [0]
    poller._schedstat = os.open(os.devnull, os.O_RDONLY)  # read through the fake below
    monkeypatch.setattr(poller, "_read_run_delay", lambda: delay[0])
    poller._run_delay = 0
    poller.ns = 5_000_000_000
    ring.pending = 1
    delay[0] = 5 * poll.CONTENDED_NS
    t0 = time.monotonic()
    assert poller.select(0.002) == []
    assert time.monotonic() - t0 < 2.5
    assert poller.contended == 1 and poller.hits == poller.misses == 0 and poller.ns == 0
    # Inside the quiet spell a short wait does not grow the window back.
    assert poller.select(0.001) == []
    assert poller.ns == 0 and poller.hits == poller.misses == 0
    # After it, with the CPU to ourselves again, the spin is back.
    poller._quiet_until = 0
    poller.ns = 1_000_000_000
    ring.fill_on_look(3)
    assert [key.fd for key, _ in poller.select(1)] == [ring.fd]
    assert poller.hits == 1 and poller.contended == 1


def test_a_spin_that_lost_the_cpu_blocks_instead(
        bare: tuple[poll.LoopPoller, FakeRing], monkeypatch: pytest.MonkeyPatch) -> None:
    """A turn of the spin that took longer than PREEMPTED_NS ends the spin and starts a quiet spell."""
    poller, ring = bare
    monkeypatch.setattr(poll, "PREEMPTED_NS", 30_000)
    clock = [10**12]

    def now() -> int:
        clock[0] += 1_000 if clock[0] < 10**12 + 50_000 else poll.PREEMPTED_NS * 2
        return clock[0]

    monkeypatch.setattr(poll, "_now_ns", now)
    poller.ns = 1_000_000_000
    ring.pending = 1  # never completes
    assert poller.select(0.001) == []
    assert poller.contended == 1 and poller.misses == 1 and poller.ns == 0
    assert poller._quiet_until > clock[0] - poll.PREEMPTED_NS * 4


def test_contention_that_keeps_coming_back_lengthens_the_quiet_spell(
        bare: tuple[poll.LoopPoller, FakeRing]) -> None:
    poller = bare[0]
    poller._back_off(10**12)
    first = poller._quiet_ns
    poller._back_off(poller._quiet_until + 1)
    assert poller._quiet_ns == 2 * first
    poller._back_off(poller._quiet_until + 10 * poller._quiet_ns)
    assert poller._quiet_ns == poll.QUIET_NS


async def test_raw_backend_with_native_aio_polls_by_default(tmp_path: Path) -> None:
    """Not only the qcow2 engine: any LinuxAio user (the raw backend, aio=native) is polled."""
    from tests.storage.backends import make_raw_native

    b = await make_raw_native(tmp_path, 1 << 20)
    buf = memoryview(mmap.mmap(-1, 4096))
    try:
        buf[:] = b"\xa5" * 4096
        assert await b.writev(8192, [buf]) == 4096
        buf[:] = bytes(4096)
        assert await b.readv(8192, [buf]) == 4096
        assert bytes(buf) == b"\xa5" * 4096
        poller = poll.poller_of(asyncio.get_running_loop())
        if poller is None:
            pytest.skip("no kernel AIO (or its ring) here")
        assert poller.max_ns == poll.DEFAULT_MAX_NS
    finally:
        await b.close()
    assert poll.poller_of(asyncio.get_running_loop()) is None
