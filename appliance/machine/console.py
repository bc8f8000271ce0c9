"""The serial console: guest output history with ``expect``, input, and the host-side chardev.

Bytes the guest transmits arrive on vCPU threads; :meth:`Console.guest_output`
only appends them to a pending buffer and schedules one flush on the loop, so
a burst of output costs one wake-up. On the loop the bytes go to the history
(which :meth:`Console.expect` searches) and to the chardev backend (terminal,
socket, file). Input from the backend or from :meth:`Console.send` goes into
the UART's receive queue; what the UART cannot take yet waits here until the
guest drains it.

Before the loop exists (:meth:`Console.start_early`, the machine's pre-loop
boot), output cannot wait for a loop turn: it is written straight to the
backend from the vCPU thread, under the console lock so bytes keep their
order, and recorded in the history. :meth:`Console.start` hands over to the
loop path atomically; no byte is lost, repeated or reordered across it.

Lock order: a vCPU thread holds the UART's lock when it calls
:meth:`Console.guest_output` or :meth:`Console.rx_drained`, which take the
console lock; so nothing may take the UART's lock while holding the console's
(see :meth:`Console._push_input`).

The console outlives reboots: the machine re-attaches it to each new UART.
asyncio is imported only by the methods that run on the loop: the pre-loop
boot must not wait for it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
from collections.abc import Callable

from appliance.errors import ConfigError
from appliance.log import get_logger
from appliance.machine.config import ChardevConfig

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    import asyncio
    import re
    from typing import Any, Protocol

log = get_logger(__name__)

HISTORY_LIMIT = 4 << 20
CTRL_A = 0x01


class ConsoleTimeout(TimeoutError):  # asyncio.TimeoutError is TimeoutError since 3.11
    """``expect`` ran out of time; ``output`` holds what the guest printed meanwhile."""

    def __init__(self, pattern: str, output: str) -> None:
        super().__init__(f"timed out waiting for {pattern!r}; console tail: {output[-400:]!r}")
        self.pattern = pattern
        self.output = output


if TYPE_CHECKING:

    class UartSink(Protocol):
        def receive(self, data: bytes) -> int: ...

    class Backend(Protocol):
        async def start(self, console: Console) -> None: ...

        def write(self, data: bytes) -> None: ...

        async def close(self) -> None: ...

    class MuxMonitor(Protocol):
        """The human monitor sharing a muxed stdio (Ctrl-A c gives it the keyboard)."""

        def focus_in(self) -> None: ...

        def focus_out(self) -> None: ...

        def feed(self, data: bytes) -> None: ...


# A backend that can also run before the loop exists has ``open_sync() ->
# writer`` (does what ``start`` would, synchronously, and returns a function
# that writes output at once) and ``close_sync()`` (undoes it).
DirectWriter = Callable[[bytes], None]


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
        self._changed: asyncio.Event | None = None
        # Set by start_early() until start() hands over to the loop.
        self._direct: DirectWriter | None = None
        self._uart: UartSink | None = None
        self._input = bytearray()
        self._input_scheduled = False
        self.on_quit: Callable[[], None] = lambda: None
        # Called on a vCPU thread when the guest starts polling the UART for input.
        self.on_input_poll: Callable[[], None] = lambda: None

    # --- wiring -----------------------------------------------------------------

    def start_early(self) -> bool:
        """Deliver output before the loop exists; False when the backend cannot.

        Output then goes to the backend synchronously on the vCPU thread that
        produced it (as QEMU's chardevs write), until :meth:`start`. Only
        backends that need nothing from the loop can (terminal, file, null);
        a socket cannot.
        """
        if self._backend is None:
            writer: DirectWriter = _discard
        else:
            open_sync = getattr(self._backend, "open_sync", None)
            if open_sync is None:
                return False
            writer = open_sync()
        with self._lock:
            self._direct = writer
        return True

    def close_early(self) -> None:
        """Undo :meth:`start_early` when the loop never came (start-up failed)."""
        with self._lock:
            self._direct = None
        close_sync = getattr(self._backend, "close_sync", None)
        if close_sync is not None:
            close_sync()

    async def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        import asyncio

        loop = loop or asyncio.get_running_loop()
        if self._changed is None:
            self._changed = asyncio.Event()
        if self._backend is not None:
            await self._backend.start(self)
        with self._lock:
            # The hand-over: output written directly so far is out and in the
            # history; from here on it goes through _pending and the loop.
            self._loop = loop
            self._direct = None
            schedule = bool(self._pending) and not self._flush_scheduled
            self._flush_scheduled |= schedule
        if schedule:
            loop.call_soon(self._flush)

    def attach_monitor(self, monitor: MuxMonitor) -> bool:
        """Share the console's stdio with ``monitor`` (``-nographic``, ``-serial mon:stdio``);
        False when the console is not a muxed stdio."""
        if isinstance(self._backend, StdioBackend) and self._backend.mux:
            self._backend.monitor = monitor
            return True
        return False

    def write_host(self, data: bytes) -> None:
        """Bytes for the terminal that are not the guest's (the muxed monitor's): past the
        console's history, so ``expect`` never sees them. Called on the loop."""
        self._flush()  # the guest's output so far first, in the order the terminal got it
        if self._backend is not None:
            self._backend.write(data)

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
            direct = self._direct
            if direct is not None:
                # No loop yet: out at once, in order (we hold the lock), and
                # into the history for expect/output once the loop runs.
                self._history += data
                try:
                    direct(data)
                except Exception:
                    log.exception("console backend write failed")
                return
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
        if self._changed is not None:
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
        import asyncio
        import re

        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        loop = asyncio.get_running_loop()
        if self._changed is None:
            self._changed = asyncio.Event()
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
            with contextlib.suppress(TimeoutError):
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

    def input_polled(self) -> None:
        """Called on a vCPU thread when the guest polls the UART for input (see Uart16550)."""
        self.on_input_poll()

    def rx_drained(self) -> None:
        """Called on a vCPU thread when the guest emptied the UART receive queue."""
        with self._lock:
            if not self._input or self._input_scheduled or self._loop is None:
                return
            self._input_scheduled = True
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._push_input)


# --- chardev backends ---------------------------------------------------------------


def _discard(data: bytes) -> None:
    pass


class NullBackend:
    def open_sync(self) -> DirectWriter:
        return self.write

    def close_sync(self) -> None:
        pass

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

    def open_sync(self) -> DirectWriter:
        if self._fd < 0:
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if self._append else os.O_TRUNC)
            try:
                self._fd = os.open(self._path, flags, 0o644)
            except OSError as err:
                raise ConfigError(f"chardev file {self._path}: {os.strerror(err.errno or 0)}") from None
        return self.write

    def close_sync(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def start(self, console: Console) -> None:
        self.open_sync()

    def write(self, data: bytes) -> None:
        if self._fd >= 0:
            os.write(self._fd, data)

    async def close(self) -> None:
        self.close_sync()


def raw_terminal(*, signals: bool) -> list[Any] | None:
    """Put a terminal on stdin in raw mode, as QEMU's stdio chardev does (``signals``: Ctrl-C
    and Ctrl-Z still act on the process); returns what restore_terminal needs, or None if
    stdin is no terminal."""
    if not os.isatty(0):
        return None
    import termios
    import tty

    saved = termios.tcgetattr(0)
    tty.setraw(0)
    if signals:
        attrs = termios.tcgetattr(0)
        attrs[3] |= termios.ISIG
        termios.tcsetattr(0, termios.TCSANOW, attrs)
    return saved


def restore_terminal(saved: list[Any] | None) -> None:
    if saved is not None:
        import termios

        with contextlib.suppress(OSError):
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


class StdioBackend:
    """This process's stdin/stdout; a terminal is put in raw mode while the VM runs.

    With ``mux`` (``-nographic``) the keys of QEMU's mux chardev work: Ctrl-A x quits,
    Ctrl-A c switches the keyboard between the guest and the human monitor (if one is
    attached), Ctrl-A h lists them and Ctrl-A Ctrl-A sends one Ctrl-A; with ``signal``
    off, Ctrl-C goes to the guest.
    """

    def __init__(self, *, mux: bool = False, signal: bool = True) -> None:
        self.mux = mux
        self.monitor: MuxMonitor | None = None
        self._on_monitor = False
        self._signal = signal and not mux
        self._saved: list[Any] | None = None
        self._console: Console | None = None
        self._escape = False
        self._reading = False
        self._opened = False

    def open_sync(self) -> DirectWriter:
        """Put a terminal on stdin in raw mode; returns the output writer."""
        if not self._opened:
            self._opened = True
            self._saved = raw_terminal(signals=self._signal)
        return self.write

    def close_sync(self) -> None:
        saved, self._saved = self._saved, None
        restore_terminal(saved)

    async def start(self, console: Console) -> None:
        import asyncio

        self._console = console
        loop = asyncio.get_running_loop()
        self.open_sync()
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
            import asyncio

            asyncio.get_running_loop().remove_reader(0)
            self._reading = False
            return
        if self.mux:
            self._demux(data)
        else:
            self._console.send(data)

    def _demux(self, data: bytes) -> None:
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b == ord("x"):
                    assert self._console is not None
                    self.write(b"QEMU: Terminated\n\r")  # QEMU's words, which scripts wait for
                    self._console.on_quit()
                elif b == CTRL_A:
                    out.append(CTRL_A)
                elif b == ord("c") and self.monitor is not None:
                    self._deliver(out)  # what came before the switch, to where it was typed
                    out = bytearray()
                    self._on_monitor = not self._on_monitor
                    if self._on_monitor:
                        self.monitor.focus_in()
                    else:
                        self.monitor.focus_out()
                elif b == ord("h"):
                    self.write(self._mux_help())
            elif b == CTRL_A:
                self._escape = True
            else:
                out.append(b)
        self._deliver(out)

    def _deliver(self, data: bytearray) -> None:
        if not data:
            return
        if self._on_monitor and self.monitor is not None:
            self.monitor.feed(bytes(data))
        else:
            assert self._console is not None
            self._console.send(bytes(data))

    def _mux_help(self) -> bytes:
        """QEMU's Ctrl-A h list (chardev/char-mux.c), the keys we have."""
        keys = [("h   ", "print this help"), ("x   ", "exit emulator")]
        if self.monitor is not None:
            keys.append(("c   ", "switch between console and monitor"))
        keys.append(("C-a ", "sends C-a"))
        return b"\n\r" + b"".join(f"C-a {k} {what}\n\r".encode() for k, what in keys)

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
        import asyncio

        if self._reading:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(0)
            self._reading = False
        self.close_sync()


class SocketBackend:
    """A unix or TCP socket, as server (one client at a time) or client."""

    def __init__(self, cfg: ChardevConfig) -> None:
        import asyncio

        self._cfg = cfg
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._console: Console | None = None
        self._connected = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, console: Console) -> None:
        import asyncio

        self._console = console
        cfg = self._cfg
        try:
            if cfg.server:
                if cfg.path is not None:
                    path = os.fspath(cfg.path)
                    with contextlib.suppress(FileNotFoundError):
                        if stat.S_ISSOCK(os.stat(path).st_mode):
                            os.unlink(path)
                    self._server = await asyncio.start_unix_server(self._on_client, path=path)
                else:
                    self._server = await asyncio.start_server(self._on_client, cfg.host, cfg.port)
                if cfg.wait:
                    await self._connected.wait()
            else:
                if cfg.path is not None:
                    reader, writer = await asyncio.open_unix_connection(str(cfg.path))
                else:
                    reader, writer = await asyncio.open_connection(cfg.host or "localhost", cfg.port)
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
        import asyncio

        if self._cfg.telnet:
            from appliance.machine.telnet import OFFER

            writer.write(OFFER)
        task = asyncio.ensure_future(self._pump(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        telnet = None
        if self._cfg.telnet:
            from appliance.machine.telnet import TelnetInput

            telnet = TelnetInput()
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    break
                if telnet is not None:
                    data = telnet.feed(data)
                assert self._console is not None
                if data:
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
                os.unlink(self._cfg.path)


class PtyBackend:
    """A new pseudo-terminal; a terminal program on its other end is the console.

    The name goes to stderr at start, in QEMU's words ("char device redirected
    to /dev/pts/N (label ID)"). We keep the terminal end open ourselves, so
    output before anyone attaches is buffered by the kernel up to its limit
    and dropped past it rather than blocking the VM.
    """

    def __init__(self, label: str) -> None:
        self._label = label
        self._master = -1
        self._slave = -1
        self._console: Console | None = None
        self.name = ""

    def open_sync(self) -> DirectWriter:
        if self._master < 0:
            import tty

            self._master, self._slave = os.openpty()
            tty.setraw(self._slave)  # bytes as they are, as QEMU sets its pty
            os.set_blocking(self._master, False)
            os.set_inheritable(self._master, False)
            os.set_inheritable(self._slave, False)
            self.name = os.ttyname(self._slave)
            print(f"char device redirected to {self.name} (label {self._label or 'serial0'})",
                  file=sys.stderr, flush=True)
        return self.write

    def close_sync(self) -> None:
        for fd in (self._master, self._slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = -1

    async def start(self, console: Console) -> None:
        import asyncio

        self._console = console
        self.open_sync()
        asyncio.get_running_loop().add_reader(self._master, self._on_input)

    def _on_input(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, OSError):
            return
        if data and self._console is not None:
            self._console.send(data)

    def write(self, data: bytes) -> None:
        if self._master < 0:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._master, data)  # nobody reading and the buffer full: dropped

    async def close(self) -> None:
        import asyncio

        if self._master >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._master)
        self.close_sync()


def make_backend(cfg: ChardevConfig | None) -> Backend | None:
    if cfg is None:
        return None
    if cfg.backend == "pty":
        return PtyBackend(cfg.id)
    if cfg.backend == "stdio":
        return StdioBackend(mux=cfg.mux, signal=cfg.signal)
    if cfg.backend == "file":
        assert cfg.path is not None
        return FileBackend(cfg.path, cfg.append)
    if cfg.backend == "socket":
        return SocketBackend(cfg)
    return NullBackend()
