"""A process whose serial console is its stdin/stdout, driven from asyncio.

Used for QEMU (``-serial stdio``) and for ``appliance run`` alike: a reader
task appends everything the process prints to one buffer (``\\r`` removed);
:meth:`ConsoleProcess.expect` searches it from a cursor that only moves
forward, so consecutive calls see consecutive output. Errors quote the tail
of the console and the process's stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from appliance.kit.errors import TcgError, TcgTimeout

TAIL = 3000  # characters of console output quoted in errors


def _threads(pid: int) -> str:
    """Where each thread of a process that should have answered is: a hang's first clue
    (a thread blocked in a read of a vhost-user socket, say, shows syscall 0 and its fd)."""
    lines = []
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError as err:
        return f"({err.strerror})"
    for tid in tids:
        parts = []
        for name in ("comm", "wchan", "syscall"):
            try:
                with open(f"/proc/{pid}/task/{tid}/{name}", encoding="ascii", errors="replace") as f:
                    parts.append(f.read().strip()[:80] or "-")
            except OSError:
                parts.append("?")
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "?"
        lines.append(f"{tid} {parts[0]} {state} {parts[1]} [{parts[2]}]")
    return "\n".join(lines)


class ConsoleProcess:
    """Runs ``argv`` with its console on pipes.

    ::

        async with ConsoleProcess(["qemu-system-x86_64", ...]) as p:
            await p.expect(r"TESTGUEST-READY cpus=(\\d+) mem=(\\d+)\\n")
            await p.write("poweroff\\n")
            assert await p.wait() == 0

    :param argv: the command line.
    :param console_log: also write everything the console prints to this file.
    """

    def __init__(self, argv: list[str] | None = None, *, console_log: Path | None = None) -> None:
        self._argv = list(argv or [])
        self.console_log = console_log
        self.proc: asyncio.subprocess.Process | None = None
        self._buf = ""
        self._pos = 0
        self._changed = asyncio.Event()
        self._eof = False
        self._reader: asyncio.Task[None] | None = None
        self._stderr_task: asyncio.Task[bytes] | None = None
        self._log: IO[str] | None = None

    def argv(self) -> list[str]:
        """The command line to run (subclasses build theirs)."""
        return self._argv

    async def spawn(self, argv: list[str]) -> None:
        """Start ``argv`` with stdin/stdout/stderr on pipes, in its own session."""
        if self.console_log is not None:
            self._log = open(self.console_log, "w", encoding="utf-8")  # noqa: SIM115
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read_console())
        assert self.proc.stderr is not None
        self._stderr_task = asyncio.create_task(self.proc.stderr.read())

    async def start(self) -> None:
        await self.spawn(self.argv())

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the process if it still runs (SIGTERM, then SIGKILL) and release everything."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in (self._reader, self._stderr_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._log is not None:
            self._log.close()
            self._log = None

    async def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit; returns its exit status."""
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise TcgTimeout(f"process still running after {timeout:g} s{self.tail()}") from None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    @property
    def output(self) -> str:
        """Everything the console printed so far (``\\r`` removed)."""
        return self._buf

    @property
    def stderr(self) -> str:
        """What the process wrote to stderr (complete once it has exited)."""
        task = self._stderr_task
        if task is None or not task.done() or task.cancelled() or task.exception():
            return ""
        return task.result().decode("utf-8", "replace")

    async def _read_console(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while chunk := await self.proc.stdout.read(65536):
                text = chunk.decode("utf-8", "replace").replace("\r", "")
                self._buf += text
                if self._log is not None:
                    self._log.write(text)
                    self._log.flush()
                self._changed.set()
        finally:
            self._eof = True
            self._changed.set()

    def _search_end(self) -> int:
        """Where :meth:`expect` stops searching: everything received so far."""
        return len(self._buf)

    def tail(self) -> str:
        """The end of the console output and stderr, for error messages."""
        text = f"\n--- console (last {TAIL} chars) ---\n{self._buf[-TAIL:]}"
        if err := self.stderr.strip():
            text += f"\n--- stderr ---\n{err[-TAIL:]}"
        if self.proc is not None and self.proc.returncode is None:
            text += f"\n--- threads (name state wchan syscall) ---\n{_threads(self.proc.pid)}"
        return text

    async def expect(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait until ``pattern`` appears in console output after the cursor.

        :raises TcgTimeout: When the text does not appear in ``timeout`` seconds.
        :raises TcgError: When the process exits first.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            m = rx.search(self._buf, self._pos, self._search_end())
            if m is not None:
                self._pos = m.end()
                return m
            if self._eof:
                if self._stderr_task is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(self._stderr_task), 2)
                raise TcgError(f"process exited before {rx.pattern!r} appeared{self.tail()}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TcgTimeout(f"{rx.pattern!r} did not appear within {timeout:g} s{self.tail()}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def write(self, text: str) -> None:
        """Type ``text`` on the console."""
        if self.proc is None or self.proc.stdin is None or self.proc.returncode is not None:
            raise TcgError(f"process is not running{self.tail()}")
        self.proc.stdin.write(text.encode())
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await self.proc.stdin.drain()


class GuestConsole(ConsoleProcess):
    """The test guest's line protocol on top of a console process.

    ``argv`` boots ``testguest.elf`` (QEMU ``-kernel``, or ``appliance run``).
    """

    READY = re.compile(r"TESTGUEST-READY cpus=(\d+) mem=(\d+)\n")

    def _search_end(self) -> int:
        # The guest answers in whole lines, so only whole lines are searched: a
        # pattern ending in a number (``p99_us=(\d+)``) must not match while
        # only the number's first digits have arrived.
        return self._buf.rfind("\n") + 1

    async def ready(self, timeout: float = 30.0) -> tuple[int, int]:
        """Wait for the readiness line; returns ``(cpus, mem_mib)``."""
        m = await self.expect(self.READY, timeout)
        return int(m.group(1)), int(m.group(2))

    async def command(self, line: str, reply: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Send one command line and wait for the reply pattern."""
        await self.write(line + "\n")
        return await self.expect(reply, timeout)

    async def info(self, timeout: float = 30.0) -> dict[str, str]:
        """The ``info`` command's ``key=value`` fields."""
        return await self.fields("info", "INFO", timeout)

    async def fields(self, line: str, prefix: str, timeout: float = 30.0) -> dict[str, str]:
        """Send ``line``; parse the ``key=value`` words of the reply starting with ``prefix``.

        :raises TcgError: When the guest answers with an ``ERR`` line instead.
        """
        rx = re.compile(rf"(?:{re.escape(prefix)} (.*)|(ERR .*))\n")
        m = await self.command(line, rx, timeout)
        if m.group(2):
            raise TcgError(f"guest answered {line!r} with: {m.group(2)}")
        return dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)

    async def blk_read(self, sector: int, count: int, timeout: float = 60.0) -> int:
        """CRC-32 (zlib's) of ``count`` sectors read from ``sector``."""
        f = await self.fields(f"blk read {sector} {count}", "BLK read", timeout)
        return int(f["crc32"], 16)

    async def blk_bench(self, mode: str, bs: int, qd: int, seconds: int) -> dict[str, str]:
        """``blk bench``: mode, bs, qd, ios, mbps, iops, p50_us, p99_us, per_queue, tsc_khz."""
        return await self.fields(f"blk bench {mode} {bs} {qd} {seconds}", "BLK bench", seconds + 60)

    async def net_bench(
        self, direction: str, seconds: int, size: int | None = None, mac: str | None = None
    ) -> dict[str, str]:
        """``net bench tx|rx|tso``: frames, fps, gbps (and bytes or payload_bytes).

        :param direction: ``tx`` (needs ``size``), ``rx`` or ``tso``.
        :param mac: destination MAC for ``tx``/``tso`` (broadcast if omitted).
        """
        words = ["net bench", direction]
        if size is not None:
            words.append(str(size))
        words.append(str(seconds))
        if mac:
            words.append(mac)
        return await self.fields(" ".join(words), f"NET bench dir={direction}", seconds + 60)
