"""Large sequential writes allocate a whole run of clusters at once (convert's case)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from appliance.qcow2 import open_image
from appliance.qcow2.create import CreateOptions, create_image
from appliance.qcow2.image import Qcow2Image
from tests.qcow2.helpers import check_clean, oracle_raw, qemu_img

KiB = 1024
MiB = 1 << 20


async def test_run_writes_land_contiguous_and_read_back(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[bool] = []
    real = Qcow2Image._fast_alloc_run

    async def spy(self: Qcow2Image, offset: int, buf: memoryview, n: int) -> bool:
        taken.append(await real(self, offset, buf, n))
        return taken[-1]

    monkeypatch.setattr(Qcow2Image, "_fast_alloc_run", spy)
    # 4 KiB clusters: one L2 table maps 2 MiB, so the 3 MiB write crosses a table
    # and takes the planner; the image ends mid-cluster so the last run does too.
    size = 8 * MiB + 1536
    p = tmp_path / "r.qcow2"
    await create_image(p, CreateOptions(size=size, cluster_size=4 * KiB))
    model = bytearray(size)
    rng = random.Random(7)
    img = await open_image(p, read_only=False, fmt="qcow2")
    spans = [(0, 4 * KiB), (4 * KiB, 1 * MiB), (1 * MiB + 4 * KiB, 3 * MiB),
             (6 * MiB, 2 * MiB + 1536)]
    for off, n in spans:
        data = rng.randbytes(n)
        model[off : off + n] = data
        await img.writev(off, [memoryview(data)])
    # Overwrite inside an allocated run: the clusters must be the run's own.
    patch = rng.randbytes(64 * KiB)
    model[300 * KiB : 364 * KiB] = patch
    await img.writev(300 * KiB, [memoryview(patch)])
    await img.close()
    assert True in taken and False in taken  # the run path, and the planner for the rest
    check_clean(p)
    assert oracle_raw(p, tmp_path) == bytes(model)
    # The 1 MiB write went to one host run.
    m = json.loads(qemu_img("map", "--output", "json", str(p)).stdout)
    ext = [e for e in m if e["start"] <= 4 * KiB < e["start"] + e["length"]]
    assert ext and ext[0]["data"] and ext[0]["start"] + ext[0]["length"] >= 1 * MiB + 4 * KiB


async def test_small_writes_racing_a_run_all_land(tmp_path: Path) -> None:
    """Allocating writes next to an in-flight run get their own clusters; all land."""
    p = tmp_path / "s.qcow2"
    await create_image(p, CreateOptions(size=4 * MiB))
    img = await open_image(p, read_only=False, fmt="qcow2")
    model = bytearray(4 * MiB)
    big = bytes([0xA5]) * (2 * MiB)
    model[0 : 2 * MiB] = big
    smalls = []
    for i in range(16):
        off = 2 * MiB + i * 128 * KiB + 512
        d = bytes([i + 1]) * 4096
        smalls.append((off, d))
    # The small writes find the run's clusters taken and the allocator moved on.
    run = asyncio.ensure_future(img.writev(0, [memoryview(big)]))
    await asyncio.sleep(0)
    for off, d in smalls:
        model[off : off + len(d)] = d
    await asyncio.gather(run, *(img.writev(off, [memoryview(d)]) for off, d in smalls))
    await img.close()
    check_clean(p)
    assert oracle_raw(p, tmp_path) == bytes(model)
