"""SYN option parsing: the one-unpack path for Linux's layout agrees with the general walk."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.nat import tcp as tcpmod

LINUX = bytes.fromhex("020405b40402080a0000000100000000" + "01030307")


def _walk(opts: bytes) -> tuple[int | None, int | None, bool]:
    mss = ws = None
    sack = False
    for kind, i, length in tcpmod._options(opts):
        if kind == 2 and length == 4:
            mss = int.from_bytes(opts[i + 2 : i + 4], "big")
        elif kind == 3 and length == 3:
            ws = min(opts[i + 2], 14)
        elif kind == 4 and length == 2:
            sack = True
    return mss, ws, sack


def test_linux_syn_options() -> None:
    assert tcpmod.parse_options(LINUX) == (1460, 7, True)
    assert tcpmod.parse_options(LINUX[:19] + b"\x20") == (1460, 14, True)  # shifts above 14 count as 14


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 19), st.integers(0, 255)), max_size=4), st.integers(16, 24))
def test_any_change_to_the_linux_layout_parses_as_the_general_walk(edits: list[tuple[int, int]], size: int) -> None:
    opts = bytearray(LINUX[:size].ljust(size, b"\x00"))
    for at, value in edits:
        opts[at % size] = value
    assert tcpmod.parse_options(bytes(opts)) == _walk(bytes(opts))
