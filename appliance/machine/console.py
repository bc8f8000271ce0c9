"""The serial console: guest output history with ``expect``, input, and the host-side chardev.

Bytes the guest transmits arrive on vCPU threads; :meth:`Console.guest_output`
only appends them to a pending buffer and schedules one flush on the loop, so
a burst of output costs one wake-up. On the loop the bytes go to the history
(which :meth:`Console.expect` searches) and to the chardev backend (terminal,
socket, file). Input from the backend or from :meth:`Console.send` goes into
the UART's receive queue; what the UART cannot take yet waits here until the
guest drains it.

The console outlives reboots: the machine re-attaches it to each new UART.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import termios
import threading
import tty
from collections.abc import Callable
from typing import Any, Protocol

from appliance.errors import ConfigError
from appliance.machine.config import ChardevConfig

log = logging.getLogger(__name__)

HISTORY_LIMIT = 4 << 20
CTRL_A = 0x01


class ConsoleTimeout(asyncio.TimeoutError):
    """``expect`` ran out of time; ``output`` holds what the guest printed meanwhile."""

    def __init__(self, pattern: str, output: str) -> None:
        super().__init__(f"timed out waiting for {pattern!r}; console tail: {output[-400:]!r}")
        self.pattern = pattern
        self.output = output


class UartSink(Protocol):
    def receive(self, data: bytes) -> int: ...


class Backend(Protocol):
    async def start(self, console: Console) -> None: ...

    def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class Console:
    """Guest console of one machine.

    ``expect`` consumes: each match moves a cursor past it, so successive
    ``expect`` calls see successive output, as in pexpect.
    """

    def __init__(self, backend: Backend | None = None) -> None:
        self._backend = backend
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._flush_scheduled = False
        self._history = bytearray()
        self._base = 0          # absolute offset of _history[0]
        self._cursor = 0        # absolute offset where expect searches from
        self._changed = asyncio.Event()
        self._uart: UartSink | None = None
        self._input = bytearray()
        self._input_scheduled = False
        self.on_quit: Callable[[], None] = lambda: None

    # --- wiring -----------------------------------------------------------------

    async def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        if self._backend is not None:
            await self._backend.start(self)

    def attach_uart(self, uart: UartSink | None) -> None:
        """Point input at a (new) UART, e.g. after a reboot; pending input is dropped."""
        with self._lock:
            self._uart = uart
            self._input.clear()

    async def close(self) -> None:
        self._flush()
        if self._backend is not None:
            await self._backend.close()

    # --- guest → host --------------------------------------------------------------

    def guest_output(self, data: bytes) -> None:
        """Called on vCPU threads with bytes the guest transmitted."""
        with self._lock:
            self._pending += data
            if self._flush_scheduled or self._loop is None:
                return
            self._flush_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:
            pass  # loop closed: the machine is going away

    def _flush(self) -> None:
        with self._lock:
            data = bytes(self._pending)
            self._pending.clear()
            self._flush_scheduled = False
        if not data:
            return
        self._history += data
        if len(self._history) > HISTORY_LIMIT:
            drop = len(self._history) - HISTORY_LIMIT // 2
            del self._history[:drop]
            self._base += drop
            self._cursor = max(self._cursor, self._base)
        if self._backend is not None:
            try:
                self._backend.write(data)
            except Exception:
                log.exception("console backend write failed")
        self._changed.set()

    @property
    def output(self) -> str:
        """Everything the guest printed (up to the last few MiB), decoded leniently."""
        self._flush()
        return self._history.decode(errors="replace")

    def clear(self) -> None:
        """Forget output so far for ``expect`` (history is kept for :attr:`output`)."""
        self._flush()
        self._cursor = self._base + len(self._history)

    async def expect(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait until the guest prints something matching ``pattern`` (a regex).

        Output arrives in pieces, so a pattern that ends in a variable part
        (``cpus=(\\d+)``) may match half a number: end such patterns with
        ``\\r?\\n``.

        :returns: the match; the search position moves past it.
        :raises ConsoleTimeout: When ``timeout`` seconds pass without a match.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._flush()
            start = self._cursor - self._base
            text = self._history[start:].decode(errors="replace")
            m = rx.search(text)
            if m is not None:
                # Advance by the matched bytes, not characters.
                self._cursor += len(text[: m.end()].encode(errors="replace"))
                return m
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ConsoleTimeout(rx.pattern, text)
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    # --- host → guest --------------------------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Type ``data`` on the console (the UART's receive side)."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        with self._lock:
            self._input += raw
        self._push_input()

    def _push_input(self) -> None:
        with self._lock:
            self._input_scheduled = False
            uart = self._uart
            if uart is None or not self._input:
                return
            data = bytes(self._input)
        # Never hold our lock while taking the UART's: a vCPU thread holds the
        # UART's lock when it calls back into us (guest_output, rx_drained),
        # so taking them in the other order here deadlocks. Only this method
        # removes from the front of the input, and it runs on the loop thread.
        n = uart.receive(data)
        with self._lock:
            del self._input[:n]

    def rx_drained(self) -> None:
        """Called on a vCPU thread when the guest emptied the UART receive queue."""
        with self._lock:
            if not self._input or self._input_scheduled or self._loop is None:
                return
            self._input_scheduled = True
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._push_input)


# --- chardev backends ---------------------------------------------------------------


class NullBackend:
    async def start(self, console: Console) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    async def close(self) -> None:
        pass


class FileBackend:
    def __init__(self, path: os.PathLike[str] | str, append: bool = False) -> None:
        self._path = path
        self._append = append
        self._fd = -1

    async def start(self, console: Console) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if self._append else os.O_TRUNC)
        try:
            self._fd = os.open(self._path, flags, 0o644)
        except OSError as err:
            raise ConfigError(f"chardev file {self._path}: {os.strerror(err.errno or 0)}") from None

    def write(self, data: bytes) -> None:
        if self._fd >= 0:
            os.write(self._fd, data)

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StdioBackend:
    """This process's stdin/stdout; a terminal is put in raw mode while the VM runs.

    With ``mux`` (``-nographic``) Ctrl-A x quits and Ctrl-A Ctrl-A sends one
    Ctrl-A, as in QEMU; with ``signal`` off, Ctrl-C goes to the guest.
    """

    def __init__(self, *, mux: bool = False, signal: bool = True) -> None:
        self._mux = mux
        self._signal = signal and not mux
        self._saved: list[Any] | None = None
        self._console: Console | None = None
        self._escape = False
        self._reading = False

    async def start(self, console: Console) -> None:
        self._console = console
        loop = asyncio.get_running_loop()
        if os.isatty(0):
            self._saved = termios.tcgetattr(0)
            tty.setraw(0)
            if self._signal:
                attrs = termios.tcgetattr(0)
                attrs[3] |= termios.ISIG
                termios.tcsetattr(0, termios.TCSANOW, attrs)
        try:
            loop.add_reader(0, self._on_input)
            self._reading = True
        except (ValueError, OSError, NotImplementedError):
            pass  # stdin is a regular file or closed: output only

    def _on_input(self) -> None:
        assert self._console is not None
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(0)
            self._reading = False
            return
        if self._mux:
            data = self._demux(data)
        if data:
            self._console.send(data)

    def _demux(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b == ord("x"):
                    assert self._console is not None
                    self._console.on_quit()
                elif b == CTRL_A:
                    out.append(CTRL_A)
            elif b == CTRL_A:
                self._escape = True
            else:
                out.append(b)
        return bytes(out)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(1, view)
            except BlockingIOError:
                continue
            except OSError:
                return
            view = view[n:]
        with contextlib.suppress(Exception):
            sys.stdout.flush()

    async def close(self) -> None:
        if self._reading:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(0)
            self._reading = False
        if self._saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, self._saved)
            self._saved = None


class SocketBackend:
    """A unix or TCP socket, as server (one client at a time) or client."""

    def __init__(self, cfg: ChardevConfig) -> None:
        self._cfg = cfg
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._console: Console | None = None
        self._connected = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, console: Console) -> None:
        self._console = console
        cfg = self._cfg
        try:
            if cfg.server:
                if cfg.path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        if cfg.path.is_socket():
                            cfg.path.unlink()
                    self._server = await asyncio.start_unix_server(self._on_client, path=str(cfg.path))
                else:
                    self._server = await asyncio.start_server(self._on_client, cfg.host, cfg.port)
                if cfg.wait:
                    await self._connected.wait()
            else:
                if cfg.path is not None:
                    reader, writer = await asyncio.open_unix_connection(str(cfg.path))
                else:
                    reader, writer = await asyncio.open_connection(cfg.host, cfg.port)
                await self._on_client(reader, writer, keep=False)
        except OSError as err:
            where = cfg.path if cfg.path is not None else f"{cfg.host}:{cfg.port}"
            raise ConfigError(f"chardev socket {where}: {os.strerror(err.errno or 0)}") from None

    async def _on_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keep: bool = True
    ) -> None:
        if self._writer is not None:
            writer.close()  # one client at a time, as QEMU's socket chardev
            return
        self._writer = writer
        self._connected.set()
        task = asyncio.ensure_future(self._pump(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    break
                assert self._console is not None
                self._console.send(data)
        except (ConnectionError, OSError):
            pass
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()

    def write(self, data: bytes) -> None:
        w = self._writer
        if w is not None and not w.is_closing():
            w.write(data)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for t in list(self._tasks):
            t.cancel()
        if self._cfg.server and self._cfg.path is not None:
            with contextlib.suppress(OSError):
                self._cfg.path.unlink()


def make_backend(cfg: ChardevConfig | None) -> Backend | None:
    if cfg is None:
        return None
    if cfg.backend == "stdio":
        return StdioBackend(mux=cfg.mux, signal=cfg.signal)
    if cfg.backend == "file":
        assert cfg.path is not None
        return FileBackend(cfg.path, cfg.append)
    if cfg.backend == "socket":
        return SocketBackend(cfg)
    return NullBackend()
