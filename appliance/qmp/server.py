"""A QMP server for one :class:`~appliance.machine.machine.Machine` (QEMU's docs/interop/qmp-spec.rst).

The command table is a parameter: the machine's (:data:`appliance.qmp.commands.COMMANDS`)
by default, the storage daemon's (:mod:`appliance.qmp.daemon_commands`) for
``appliance storage-daemon --monitor``.

Every connection is a :class:`Session`: the server greets it (§2.2), accepts
only ``qmp_capabilities`` until negotiation is done (§4), then runs commands
one at a time in the order they arrive and echoes each ``id`` (§2.3).
Events (§2.4.3) go to every negotiated session with a wall-clock timestamp.
No out-of-band execution is offered, so the greeting lists no capabilities.

Requests are a stream of JSON objects with or without newlines between
them (qemu.qmp sends none), split by :class:`JsonSplitter` the way QEMU's
json-streamer does: by bracket depth outside strings. QEMU's parser also
takes single-quoted strings (``{'execute':'query-status'}``, as shell
scripts write them), so ours does. Text that is not valid
JSON gets a ``GenericError`` reply and the session goes on, as QEMU's does. Replies are
written without waiting for the client to read them; a client that lets
more than :data:`MAX_BACKLOG` bytes pile up is dropped rather than letting
the VMM's memory grow.

Message handling (:meth:`Session.handle`) is a pure function of the bytes
received and the session state, so it is fuzzed directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError
from appliance.machine.config import ChardevConfig
from appliance.qmp import commands
from appliance.qmp.errors import CommandError, CommandNotFound, GenericError

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20          # one request; QEMU's JSON lexer stops tokens at 64 MiB, we stop lines far sooner
MAX_BACKLOG = 16 << 20      # unread output per client before it is dropped
MAX_DEPTH = 64              # nesting accepted in a request (QEMU's parser allows 1024; no command needs 3)

_ALLOWED_KEYS = ("execute", "arguments", "id", "exec-oob", "control")


def _reject_constant(name: str) -> Any:
    # JSON has no NaN or Infinity; Python's decoder would accept them.
    raise ValueError(f"invalid keyword '{name}'")


def _depth(value: Any, limit: int) -> bool:
    """True if ``value`` nests deeper than ``limit``."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return False


class JsonSplitter:
    """Cuts a byte stream into top-level JSON texts by ``{}``/``[]`` depth outside strings.

    Strings are QEMU's (qobject/json-lexer.c): in double or single quotes,
    the other quote plain inside. A top-level scalar ends at white space or
    where an object or array begins, as QEMU's lexer ends a token there: junk
    typed before a request (``xyz{"execute": …}``) gets its own error and
    the request still runs.

    Only the boundaries are found here; :meth:`Session.handle` parses each
    piece. A piece longer than ``limit`` comes out once as ``None`` and the
    rest of it is skipped (its brackets still counted, so the next request
    is found), so no request can grow the buffer without bound.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._size = 0
        self._depth = 0
        self._quote = 0  # the open string's quote character, 0 outside strings
        self._esc = False
        self._skipping = False

    def _end(self, out: list[bytes | None]) -> None:
        if not self._skipping:
            out.append(bytes(self._buf))
        self._buf.clear()
        self._size = 0
        self._depth = 0
        self._quote = 0
        self._esc = self._skipping = False

    def feed(self, data: bytes) -> list[bytes | None]:
        out: list[bytes | None] = []
        for c in data:
            if c in b"{[" and not self._quote and self._depth == 0 and self._size:
                self._end(out)  # the top-level scalar before it ends here
            self._size += 1
            if not self._skipping:
                self._buf.append(c)
            if self._quote:
                if self._esc:
                    self._esc = False
                elif c == 0x5C:  # backslash
                    self._esc = True
                elif c == self._quote:
                    self._quote = 0
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._depth <= 0:
                    # A negative depth is a stray bracket: it goes out as an
                    # invalid text to get its parse error.
                    self._end(out)
            elif c in b"\"'":
                self._quote = c
            elif c in b" \t\r\n":
                if self._depth == 0:
                    self._buf = self._buf[:-1]
                    self._size -= 1
                    if self._size:
                        self._end(out)  # a top-level scalar ends at white space
            if self._size > self.limit and not self._skipping:
                out.append(None)
                self._skipping = True
                self._buf.clear()
        return out


_STRING_SPECIAL = re.compile(r"[\"'\\]")


def standard_json(text: str) -> str:
    """``text`` with QEMU's JSON extensions rewritten as standard JSON, for Python's parser.

    QEMU's lexer (qobject/json-lexer.c) also takes strings in single quotes,
    where ``"`` needs no escape, and the escape ``\\'`` in any string. Only
    quotes and backslashes are looked at, so a long request costs little.
    """
    if "'" not in text:
        return text
    out: list[str] = []
    done = 0  # text[:done] is in out
    quote = ""  # the open string's quote, "" outside strings
    escaped = -1  # the index of the character after a backslash
    for m in _STRING_SPECIAL.finditer(text):
        i = m.start()
        if i == escaped:
            continue
        c = text[i]
        replacement = None
        if c == "\\":
            escaped = i + 1
            if quote and text[i + 1:i + 2] == "'":
                out += (text[done:i], "'")
                done = i + 2
            continue
        if not quote:
            quote = c
            replacement = '"'
        elif c == quote:
            quote = ""
            replacement = '"'
        elif quote == "'":
            replacement = '\\"'  # a double quote inside single quotes
        if replacement is not None:
            out += (text[done:i], replacement)
            done = i + 1
    out.append(text[done:])
    return "".join(out)


def timestamp() -> dict[str, int]:
    now = time.time_ns() // 1000
    return {"seconds": now // 1_000_000, "microseconds": now % 1_000_000}


class Session:
    """One client connection.

    :param monitor: the server it belongs to (machine, event fan-out).
    """

    def __init__(self, monitor: QmpServer, reader: asyncio.StreamReader | None = None,
                 writer: asyncio.StreamWriter | None = None) -> None:
        self.monitor = monitor
        self.machine = monitor.machine
        self.negotiated = False
        self.reader = reader
        self.writer = writer
        self.closed = False
        # Clear while a request is being answered (QmpServer.close waits for it).
        self.idle = asyncio.Event()
        self.idle.set()

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        self.monitor.emit(event, data)

    # --- messages -----------------------------------------------------------------

    async def handle(self, line: bytes) -> dict[str, Any] | None:
        """The reply to one request line (``None`` for a blank line); never raises.

        Errors in the request become ``{"error": …}`` replies, as qmp-spec.rst
        §2.4.2 describes; a bug in a command becomes a GenericError too, so a
        client can never take the VMM down.
        """
        if not line.strip():
            return None
        ident: Any = None
        has_id = False
        try:
            try:
                text = standard_json(line.decode("utf-8"))
                msg = json.loads(text, parse_constant=_reject_constant)
            except (UnicodeDecodeError, ValueError, RecursionError) as err:
                raise GenericError(f"JSON parse error, {_parse_reason(err)}") from None
            if not isinstance(msg, dict):
                raise GenericError("QMP input must be a JSON object")
            if "id" in msg:
                ident, has_id = msg["id"], True
            if _depth(msg, MAX_DEPTH):
                raise GenericError("JSON parse error, too many nested data structures")
            result = await self._execute(msg)
            reply: dict[str, Any] = {"return": {} if result is None else result}
        except CommandError as err:
            reply = {"error": err.to_json()}
        except Exception as err:  # a bug of ours: the session and the VM go on
            log.exception("QMP command failed")
            reply = {"error": GenericError(f"internal error: {type(err).__name__}").to_json()}
        if has_id:
            reply["id"] = ident
        return reply

    async def _execute(self, msg: dict[str, Any]) -> Any:
        for key in msg:
            if key not in _ALLOWED_KEYS or key == "exec-oob" or key == "control":
                # exec-oob is only valid once 'oob' is negotiated, which we never offer.
                raise GenericError(f"QMP input member '{key}' is unexpected")
        if "execute" not in msg:
            raise GenericError("QMP input lacks member 'execute'")
        name = msg["execute"]
        if not isinstance(name, str):
            raise GenericError("QMP input member 'execute' must be a string")
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            raise GenericError("QMP input member 'arguments' must be an object")
        if not self.negotiated and name != "qmp_capabilities":
            raise CommandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'")
        cmd = self.monitor.table.get(name)
        if cmd is None:
            raise CommandNotFound(f"The command {name} has not been found")
        return await cmd.handler(self, commands.check_args(cmd, args))

    # --- the stream ---------------------------------------------------------------

    def send(self, obj: dict[str, Any]) -> None:
        writer = self.writer
        if writer is None or self.closed or writer.is_closing():
            return
        text = json.dumps(obj, indent=4 if self.monitor.pretty else None)
        writer.write(text.encode() + b"\r\n")
        if writer.transport.get_write_buffer_size() > MAX_BACKLOG:
            log.warning("QMP client does not read its replies; dropping it")
            self.closed = True
            writer.transport.abort()

    async def run(self) -> None:
        """Greet the client and serve it until it hangs up."""
        assert self.reader is not None and self.writer is not None
        greeting = {"QMP": {"version": (await self.monitor.table["query-version"].handler(self, {})),
                            "capabilities": []}}
        self.send(greeting)
        splitter = JsonSplitter()
        try:
            while not self.closed:
                data = await self.reader.read(65536)
                if not data:
                    break  # an unfinished request at EOF has no one to answer
                for piece in splitter.feed(data):
                    self.idle.clear()
                    try:
                        await self._answer(piece)
                    finally:
                        self.idle.set()
                    if self.closed:
                        break
                with contextlib.suppress(ConnectionError):
                    await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            await self.close()

    async def _answer(self, piece: bytes | None) -> None:
        if piece is None:
            reply: dict[str, Any] | None = {"error": GenericError("JSON parse error, request too long").to_json()}
        else:
            reply = await self.handle(piece)
        if reply is not None:
            self.send(reply)

    async def close(self) -> None:
        self.monitor.sessions.discard(self)
        writer = self.writer
        self.closed = True
        if writer is None or writer.is_closing():
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), 1.0)
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


def _parse_reason(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return err.msg.lower()
    if isinstance(err, RecursionError):
        return "too many nested data structures"
    if isinstance(err, UnicodeDecodeError):
        return "invalid UTF-8 sequence"
    return str(err)


async def open_qmp_server(target: Any, cd: ChardevConfig, *, pretty: bool, what: str, prog: str,
                          table: dict[str, commands.Command] | None = None, wait: bool = True,
                          server: QmpServer | None = None) -> QmpServer:
    """A QMP server over ``target`` on socket chardev ``cd``: listening, or
    connected out (``server=off``); with the chardev's ``wait=on`` (and
    ``wait``), returned once a client is in.

    :param what: the option it came from, for messages; :param prog: who says them.
    :param server: one made already (the human monitor's); by default a QMP one.
    :raises ConfigError: When the socket cannot be opened.
    """
    server = server or QmpServer(target, pretty=pretty, table=table)
    try:
        if cd.backend == "stdio":
            try:
                await server.serve_stdio()
            except OSError as err:
                await server.close()
                raise ConfigError(f"{what}: {err}") from None
            return server
        if not cd.server:
            await server.connect(cd)
        elif cd.path is not None:
            await server.listen_unix(Path(cd.path))
        else:
            assert cd.port is not None
            await server.listen_tcp(cd.host, cd.port)
    except OSError as err:
        await server.close()
        where = cd.path if cd.path is not None else f"{cd.host or ''}:{cd.port}"
        raise ConfigError(f"{what}: cannot open socket '{where}': {err.strerror or err}") from None
    if wait:
        await wait_for_first_client(server, cd, what=what, prog=prog)
    return server


async def wait_for_first_client(server: QmpServer, cd: ChardevConfig, *, what: str, prog: str) -> None:
    """With ``wait=on`` on a listening chardev: say so and wait for the first client."""
    if cd.server and cd.wait:
        print(f"{prog}: {what}: waiting for connection on {cd.path or f'{cd.host}:{cd.port}'}",
              flush=True, file=sys.stderr)
        await server.wait_for_client()


class QmpServer:
    """The monitor of ``machine``: listens, talks QMP, turns machine events into QMP events.

    ::

        server = QmpServer(machine)
        await server.listen_unix(Path("qmp.sock"))
        ...
        await server.close()

    :param pretty: indent replies and events (``-mon …,pretty=on``).
    :param table: the commands offered (the machine's by default); handlers
        get ``machine`` as ``ctx.machine``, whatever object it is. Machine
        events become QMP events only when it has an ``observers`` list.
    """

    def __init__(self, machine: Any, *, pretty: bool = False,
                 table: dict[str, commands.Command] | None = None) -> None:
        self.machine = machine
        self.pretty = pretty
        self.table = commands.COMMANDS if table is None else table
        self.sessions: set[Session] = set()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._unlink: list[Path] = []
        self._connected = asyncio.Event()
        self._observers: list[Any] | None = getattr(machine, "observers", None)
        if self._observers is not None:
            self._observers.append(self._on_machine)

    # --- events -----------------------------------------------------------------

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send ``event`` to every negotiated session (events before negotiation are not sent, §4)."""
        msg: dict[str, Any] = {"event": event}
        if data is not None:
            msg["data"] = data
        msg["timestamp"] = timestamp()
        for s in list(self.sessions):
            if s.negotiated:
                s.send(msg)

    def _on_machine(self, kind: str, detail: str) -> None:
        if kind == "stop":
            self.emit("STOP")
        elif kind == "resume":
            self.emit("RESUME")
        elif kind == "poweroff":
            self.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        elif kind in ("reset", "shutdown"):
            host = detail == commands.HOST_RESET
            data = {"guest": not host, "reason": detail if host else "guest-reset"}
            self.emit("SHUTDOWN" if self.machine.config.no_reboot else "RESET", data)
        elif kind == "quit":
            if detail == commands.HOST_QUIT:
                reason = "host-qmp-quit"
            elif detail.startswith("terminating on signal"):
                reason = "host-signal"
            else:
                reason = "host-ui"
            self.emit("SHUTDOWN", {"guest": False, "reason": reason})
        elif kind == "error":
            self.emit("SHUTDOWN", {"guest": False, "reason": "host-error"})

    # --- sockets ----------------------------------------------------------------

    def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Session:
        """The session a new client gets (the human monitor's server makes another kind)."""
        return Session(self, reader, writer)

    def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> asyncio.Task[None]:
        session = self._session(reader, writer)
        self.sessions.add(session)
        self._connected.set()
        task = asyncio.ensure_future(session.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve(reader, writer)

    async def listen_unix(self, path: Path) -> None:
        """Accept clients on a unix socket at ``path`` (an old socket file there is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            if path.is_socket():
                path.unlink()
        server = await asyncio.start_unix_server(self._on_connect, str(path), limit=MAX_LINE)
        self._servers.append(server)
        self._unlink.append(path)

    async def listen_tcp(self, host: str | None, port: int) -> int:
        """Accept clients on TCP ``host:port``; returns the port (useful with port 0)."""
        server = await asyncio.start_server(self._on_connect, host or None, port, limit=MAX_LINE,
                                            reuse_address=True)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def serve_stdio(self) -> None:
        """One session on the process's stdin and stdout (``-qmp stdio``)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE, loop=loop)
        try:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
        except ValueError as err:  # a regular file: asyncio takes pipes, sockets and terminals
            raise OSError(f"stdin/stdout: {err}") from None
        self._serve(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    async def connect(self, chardev: ChardevConfig) -> None:
        """Client mode (``server=off``): connect out and serve that one connection."""
        if chardev.path is not None:
            reader, writer = await asyncio.open_unix_connection(str(chardev.path), limit=MAX_LINE)
        else:
            reader, writer = await asyncio.open_connection(chardev.host or "localhost", chardev.port, limit=MAX_LINE)
        self._serve(reader, writer)

    async def _commands_answered(self, timeout: float = 1.0) -> None:
        """Wait (a little) for the sessions' commands under way to send their replies.

        As QEMU's monitor_cleanup waits for its dispatcher: the ``quit`` or
        ``system_reset`` that ended the VM still gets its reply, after the
        SHUTDOWN event. A command stuck on something else is not waited for long.
        """
        waits = [asyncio.ensure_future(s.idle.wait()) for s in self.sessions
                 if isinstance(s, Session) and not s.idle.is_set()]
        if not waits:
            return
        _, late = await asyncio.wait(waits, timeout=timeout)
        for w in late:
            w.cancel()

    @property
    def tcp_ports(self) -> list[int]:
        """The TCP ports listened on (what ``tcp:HOST:0`` got)."""
        return [int(sock.getsockname()[1]) for srv in self._servers for sock in srv.sockets
                if sock.family in (socket.AF_INET, socket.AF_INET6)]

    async def wait_for_client(self) -> None:
        await self._connected.wait()

    async def close(self) -> None:
        """Stop listening, let commands under way answer, send what is queued (the
        SHUTDOWN event), hang up every client."""
        for server in self._servers:
            server.close()
        self._servers.clear()
        await self._commands_answered()
        for s in list(self.sessions):
            await s.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for path in self._unlink:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unlink.clear()
        if self._observers is not None:
            with contextlib.suppress(ValueError):
                self._observers.remove(self._on_machine)


@dataclass(eq=False)
class QmpSpec:
    """A QMP monitor as a machine DeviceSpec (``-qmp``, ``-mon chardev=,mode=control``).

    The machine hands itself over (``bind_machine``) before ``open()``, which
    starts listening (and with ``wait=on`` waits for the first client, as
    QEMU does); ``close()`` at the end flushes the SHUTDOWN event.
    """

    chardev: ChardevConfig
    pretty: bool = False
    name: str = "qmp"
    machine: Any = field(default=None, repr=False)
    server: QmpServer | None = field(default=None, repr=False)

    def bind_machine(self, machine: Any) -> None:
        self.machine = machine

    def _new_server(self) -> QmpServer | None:
        return None  # open_qmp_server's own: QMP

    async def open(self) -> None:
        if self.machine is None:
            raise ConfigError(f"{self.name}: no machine to monitor")
        # Kept before any wait=on wait, so close() can end the wait.
        self.server = self._new_server()
        self.server = await open_qmp_server(self.machine, self.chardev, pretty=self.pretty,
                                            what=self.name, prog="appliance run", wait=False,
                                            server=self.server)
        await wait_for_first_client(self.server, self.chardev, what=self.name, prog="appliance run")

    def attach(self, builder: Any, inst: Any) -> None:
        pass  # nothing on the guest's side

    async def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.close()
