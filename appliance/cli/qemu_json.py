"""JSON laid out the way QEMU's tools print it (qemu-img --output=json).

Scripts diff and grep that output, so the layout is part of the interface:
four spaces an indent level, ``", "`` never used between items, empty lists
and objects still opened on one line and closed on the next, every
character outside printable ASCII written as an upper-case ``\\uXXXX``
(pairs beyond the BMP).
"""

from __future__ import annotations

from typing import Any

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
            "\t": "\\t"}


def _string(s: str) -> str:
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0x20 <= cp < 0x7F:
            out.append(ch)
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        else:
            out.append(f"\\u{cp:04X}")
    out.append('"')
    return "".join(out)


def dumps(obj: Any, indent: int = 0) -> str:
    """``obj`` (dicts, lists, str, int, float, bool, None) as QEMU pretty-prints it."""
    pad = "    " * indent
    inner = "    " * (indent + 1)
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, str):
        return _string(obj)
    if isinstance(obj, dict):
        items = [f"\n{inner}{_string(str(k))}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{" + ",".join(items) + f"\n{pad}}}"
    if isinstance(obj, list | tuple):
        items = [f"\n{inner}{dumps(v, indent + 1)}" for v in obj]
        return "[" + ",".join(items) + f"\n{pad}]"
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
