"""Refcount-table growth whose new table reaches past the refcount blocks that exist.

With 512-byte clusters and 16-bit refcounts a refcount block covers 256
clusters and a table cluster 64 blocks, so the table grows every few MiB of
file. When the grown table's own clusters run into the range of a block not
made yet, placing the table makes that block; the block the growth was for
must then be that one, not a fresh empty one, or the table's clusters lose
their counts and are handed out again as data (qemu-img check: "refcount=1
reference=2", and the data reads back wrong).
"""

from __future__ import annotations

from pathlib import Path

from appliance.qcow2 import open_image
from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import qemu_img

pytestmark = needs_qemu_img

# Guest regions written in pieces of at most 32 KiB (each piece its own request).
REGIONS = [(0, 30 << 20), (100 << 20, 100 << 10), (520 << 20, 4 << 10), (600 << 20, 3 << 20)]
PIECE = 32 << 10


async def test_table_growth_into_a_missing_block_keeps_every_count(tmp_path: Path) -> None:
    img_path, model = tmp_path / "small.qcow2", tmp_path / "model.raw"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(img_path), "1G")
    img = await open_image(img_path, read_only=False, fmt="qcow2")
    with open(model, "wb") as m:
        m.truncate(1 << 30)
        for off, n in REGIONS:
            data = memoryview(bytes([5 + off % 7]) * n)
            m.seek(off)
            m.write(data)
            pos = 0
            while pos < n:
                k = min(n - pos, PIECE - (off + pos) % PIECE)
                await img.writev(off + pos, [data[pos : pos + k]])
                pos += k
    await img.close()
    check = qemu_img("check", str(img_path), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(model), str(img_path), check=False).returncode == 0
