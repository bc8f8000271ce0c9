"""The little of telnet (RFC 854) a ``telnet:`` chardev speaks, as QEMU's does.

On connect the server offers to echo and to suppress go-ahead (RFC 857,
858) and asks for binary both ways (RFC 856), so a telnet client sends
keystrokes one at a time and leaves echo to the far end; afterwards the
client's commands are removed from what it types.
"""

from __future__ import annotations

# IAC WILL ECHO, IAC WILL SUPPRESS-GO-AHEAD, IAC WILL BINARY, IAC DO BINARY.
OFFER = b"\xff\xfb\x01\xff\xfb\x03\xff\xfb\x00\xff\xfd\x00"
IAC, SB, SE = 0xFF, 0xFA, 0xF0
_WITH_OPTION = (0xFB, 0xFC, 0xFD, 0xFE)  # WILL, WONT, DO, DONT
_MAX_SUBNEG = 512


class TelnetInput:
    """Bytes from a telnet client -> the data in them (commands dropped, IAC IAC -> 0xff)."""

    def __init__(self) -> None:
        self._cmd: bytearray | None = None  # a command being read, after its IAC

    def feed(self, data: bytes) -> bytes:
        if self._cmd is None and IAC not in data:
            return data
        out = bytearray()
        for b in data:
            cmd = self._cmd
            if cmd is None:
                if b == IAC:
                    self._cmd = bytearray()
                else:
                    out.append(b)
                continue
            cmd.append(b)
            if len(cmd) == 1:
                if b == IAC:
                    out.append(IAC)
                    self._cmd = None
                elif b != SB and b not in _WITH_OPTION:
                    self._cmd = None  # a two-byte command (NOP, AYT, ...)
            elif cmd[0] == SB:
                # Subnegotiation runs to IAC SE; a peer that never ends one is cut off.
                if (len(cmd) >= 3 and cmd[-2] == IAC and cmd[-1] == SE) or len(cmd) > _MAX_SUBNEG:
                    self._cmd = None
            else:
                self._cmd = None  # WILL/WONT/DO/DONT and their option byte
        return bytes(out)
