"""The zero-block scan `convert` uses to keep its output sparse."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.qcow2.img_ops import _nonzero_runs


def _reference(buf: bytes, gran: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for pos in range(0, len(buf), gran):
        end = min(len(buf), pos + gran)
        if any(buf[pos:end]):
            if runs and runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((pos, end))
    return runs


@settings(max_examples=200, deadline=None)
@given(gran=st.sampled_from([512, 1024, 4096]), blocks=st.integers(0, 12),
       tail=st.integers(0, 511), pokes=st.lists(st.tuples(st.integers(0, 1 << 16),
                                                          st.integers(1, 255)), max_size=8))
def test_nonzero_runs_match_a_block_by_block_scan(gran: int, blocks: int, tail: int,
                                                  pokes: list[tuple[int, int]]) -> None:
    buf = bytearray(blocks * gran + tail)
    for at, val in pokes:
        if buf:
            buf[at % len(buf)] = val
    assert _nonzero_runs(memoryview(buf), gran) == _reference(bytes(buf), gran)


def test_a_zero_block_with_data_only_in_its_middle_is_data() -> None:
    buf = bytearray(3 * 4096)
    buf[4096 + 2000] = 7
    assert _nonzero_runs(memoryview(buf), 4096) == [(4096, 8192)]


def test_dense_data_is_one_run_and_zero_blocks_split_it() -> None:
    buf = bytearray(b"\x01" * (8 * 4096))
    assert _nonzero_runs(memoryview(buf), 4096) == [(0, 8 * 4096)]
    buf[2 * 4096 : 3 * 4096] = bytes(4096)
    buf[7 * 4096 :] = bytes(4096)
    assert _nonzero_runs(memoryview(buf), 4096) == [(0, 8192), (3 * 4096, 7 * 4096)]


def test_engine_aio_opcodes_match_the_aio_module() -> None:
    # image.py keeps its own copies so page-cache opens need not import ctypes.
    from appliance.qcow2 import image
    from appliance.storage import aio

    assert (image.IOCB_CMD_PREADV, image.IOCB_CMD_PWRITEV) == (aio.IOCB_CMD_PREADV,
                                                                aio.IOCB_CMD_PWRITEV)
