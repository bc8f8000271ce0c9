"""The zero-block scan `convert` uses to keep its output sparse."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.qcow2.img_ops import _copy_file_chunk, _nonzero_runs


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


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 3 << 18), pokes=st.lists(st.integers(0, (3 << 18) - 1), max_size=6),
       host=st.integers(0, 1 << 16), length=st.integers(1, 3 << 18))
def test_file_chunk_copy_writes_the_data_runs_piece_by_piece(
        tmp_path_factory: pytest.TempPathFactory, size: int, pokes: list[int], host: int,
        length: int) -> None:
    # Pieces of SCAN_SLICE each: runs that cross a piece boundary come out joined.
    d = tmp_path_factory.mktemp("chunk")
    data = bytearray(size)
    for at in pokes:
        if at < size:
            data[at] = 0x5A
    (d / "src").write_bytes(data)
    src = os.open(d / "src", os.O_RDONLY)
    dst = os.open(d / "dst", os.O_RDWR | os.O_CREAT)
    try:
        runs = _copy_file_chunk(src, host, dst, 0, length, 4096, threading.Lock())
        want = bytes(data[host : host + length]).ljust(length, b"\0")
        assert runs == _reference(want, 4096)
        got = os.pread(dst, length, 0).ljust(length, b"\0")
        assert got == want
    finally:
        os.close(src)
        os.close(dst)


def test_a_source_that_shrank_reads_as_zeroes_not_sigbus(tmp_path: Path) -> None:
    # convert learns the extents first and copies later; a file truncated in
    # between must give zeroes (a mapped page past EOF would raise SIGBUS).
    (tmp_path / "src").write_bytes(b"\x11" * 8192)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
    try:
        os.truncate(tmp_path / "src", 4096)
        runs = _copy_file_chunk(src, 0, dst, 0, 1 << 20, 4096, threading.Lock())
        assert runs == [(0, 4096)]
        assert os.pread(dst, 8192, 0) == b"\x11" * 4096
    finally:
        os.close(src)
        os.close(dst)
