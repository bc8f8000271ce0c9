"""Typing test-guest commands on an in-process Machine's console."""

from __future__ import annotations

from appliance.machine import Machine


def reply_fields(line: str) -> dict[str, str]:
    """The ``key=value`` words of one reply line of the test guest."""
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


async def ask(vm: Machine, text: str, reply: str, timeout: float = 20) -> dict[str, str]:
    """Type ``text``; wait for the line starting with the regex ``reply`` and return its fields.

    An ``ERR`` line instead fails the calling test.
    """
    vm.console.send(text + "\n")
    m = await vm.console.expect(rf"(?m)^((?:{reply}|ERR)[^\r\n]*)\r?\n", timeout=timeout)
    line = m.group(1)
    assert not line.startswith("ERR"), f"{text!r} -> {line!r}"
    return reply_fields(line)
