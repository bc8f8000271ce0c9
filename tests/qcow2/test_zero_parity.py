"""Discard and write-zeroes leave what QEMU's qcow2 driver leaves (as `qemu-img map` shows it).

The same operations go through qemu-io on one image and through our engine on
another; `qemu-img map --output=json` must then agree on every extent's
present/zero/data flags (host offsets may differ: placement is the
allocator's choice), the data must compare equal and both images check clean.
Version 3: write-zeroes marks clusters zero in this layer even where nothing
was allocated; a discard does so where a cluster was allocated or a backing
file would show through. Version 2 has no zero flag.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.qcow2 import open_image
from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import qemu_img, qemu_io

pytestmark = needs_qemu_img

K = 1024
CASES = {
    "discard_alloc": ["write -P 1 0 128k", "discard 0 64k"],
    "discard_unalloc": ["discard 0 64k"],
    "zero_alloc": ["write -P 1 0 128k", "write -z 0 64k"],
    "zero_unalloc": ["write -z 0 64k"],
    "zero_unmap_alloc": ["write -P 1 0 128k", "write -z -u 0 64k"],
    "zero_unmap_unalloc": ["write -z -u 0 64k"],
    "zero_far": ["write -z 8M 64k"],
}


def _size(text: str) -> int:
    return int(text[:-1]) * {"k": K, "M": K * K}[text[-1]] if text[-1] in "kM" else int(text)


async def _ours(path: Path, cmds: list[str]) -> None:
    img = await open_image(path, read_only=False, fmt="qcow2")
    for c in cmds:
        w = c.split()
        off, n = _size(w[-2]), _size(w[-1])
        if w[0] == "discard":
            await img.discard(off, n)
        elif w[1] == "-z":
            await img.write_zeroes(off, n, may_unmap="-u" in w)
        else:
            await img.writev(off, [memoryview(bytes([int(w[2])]) * n)])
    await img.close()


def _flags(path: Path) -> list[tuple[int, int, int, bool, bool, bool]]:
    m = json.loads(qemu_img("map", "--output=json", str(path)).stdout)
    return [(e["start"], e["length"], e["depth"], e["present"], e["zero"], e["data"]) for e in m]


@pytest.mark.parametrize("layout", ["v3", "v2", "extended_l2", "backing"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_discard_and_zeroes_match_qemu(tmp_path: Path, case: str, layout: str) -> None:
    opts = {"v3": [], "v2": ["-o", "compat=0.10"], "extended_l2": ["-o", "extended_l2=on,cluster_size=64k"],
            "backing": []}[layout]
    paths = {}
    if layout == "backing":
        base = tmp_path / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
        qemu_io(base, "write -P 9 0 256k", "write -P 8 8M 128k")
    for who in ("qemu", "ours"):
        p = tmp_path / f"{who}.qcow2"
        back = ["-b", str(tmp_path / "base.qcow2"), "-F", "qcow2"] if layout == "backing" else []
        qemu_img("create", "-q", "-f", "qcow2", *opts, *back, str(p), "16M")
        paths[who] = p
    qemu_io(paths["qemu"], *CASES[case])
    await _ours(paths["ours"], CASES[case])
    assert _flags(paths["ours"]) == _flags(paths["qemu"])
    assert qemu_img("compare", "-q", str(paths["ours"]), str(paths["qemu"]), check=False).returncode == 0
    for p in paths.values():
        assert qemu_img("check", "-q", str(p), check=False).returncode == 0
