"""`appliance img check` on images whose snapshot table is damaged, against `qemu-img check`.

A normal open refuses these images; check reads the table itself (as qemu-img
does) and reports, or with ``-r all`` repairs: too much extra data in an entry,
too many entries, a misaligned or far-away table, version 3 entries missing
their mandatory extra data, and snapshot L1 tables that are misaligned or too
large. Plain check and ``-r leaks`` must print what qemu-img prints with its
exit code; ``-r all`` must also leave an image qemu-img finds clean, with the
same snapshots and data as qemu-img's repair.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import needs_qemu_img
from tests.qcow2.helpers import qemu_img, qemu_io
from tests.qcow2.test_check_parity import _same, ours, theirs

pytestmark = needs_qemu_img

_ENTRY = struct.Struct(">QIHHIIQII")


def _entries(f: object) -> list[int]:
    f.seek(60)  # type: ignore[attr-defined]
    nb, off = struct.unpack(">IQ", f.read(12))  # type: ignore[attr-defined]
    out = []
    for _ in range(nb):
        off = (off + 7) & ~7
        f.seek(off)  # type: ignore[attr-defined]
        e = _ENTRY.unpack(f.read(_ENTRY.size))  # type: ignore[attr-defined]
        out.append(off)
        off += _ENTRY.size + e[8] + e[2] + e[3]
    return out


def _put(f: object, off: int, fmt: str, v: int) -> None:
    f.seek(off)  # type: ignore[attr-defined]
    f.write(struct.pack(fmt, v))  # type: ignore[attr-defined]


def _no_extra(f: object) -> None:
    # Entry 2 rewritten with no extra data at all (a version 3 image must have 16 bytes).
    e1 = _entries(f)[1]
    f.seek(e1)  # type: ignore[attr-defined]
    e = list(_ENTRY.unpack(f.read(_ENTRY.size)))  # type: ignore[attr-defined]
    f.seek(e1 + _ENTRY.size + e[8])  # type: ignore[attr-defined]
    names = f.read(e[2] + e[3])  # type: ignore[attr-defined]
    e[8] = 0
    f.seek(e1)  # type: ignore[attr-defined]
    f.write(_ENTRY.pack(*e) + names)  # type: ignore[attr-defined]


def _l1_of_first(f: object, delta: int) -> None:
    e0 = _entries(f)[0]
    f.seek(e0)  # type: ignore[attr-defined]
    _put(f, e0, ">Q", struct.unpack(">Q", f.read(8))[0] + delta)  # type: ignore[attr-defined]


DAMAGE: dict[str, Callable[[object], None]] = {
    "extra_too_large": lambda f: _put(f, _entries(f)[0] + 36, ">I", 1025),
    "too_many": lambda f: _put(f, 60, ">I", 70000),
    "entry_incomplete": _no_extra,
    "l1_unaligned": lambda f: _l1_of_first(f, 512),
    "l1_too_large": lambda f: _put(f, _entries(f)[0] + 8, ">I", 0x4000000),
    "table_unaligned": lambda f: _put(f, 64, ">Q", struct.unpack(">IQ", (f.seek(60), f.read(12))[1])[1] + 8),
    "table_far_away": lambda f: _put(f, 64, ">Q", 1 << 40),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("snaps")
    out = {}
    for compat in ("1.1", "0.10"):
        p = d / f"base-{compat}.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", f"compat={compat}", str(p), "64M")
        qemu_io(p, "write -P 0x11 0 128k")
        qemu_img("snapshot", "-c", "s1", str(p))
        qemu_img("snapshot", "-c", "s2", str(p))
        out[compat] = p
    return out


def damaged(src: Path, where: Path, kind: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    p = where / "img.qcow2"
    shutil.copy(src, p)
    with open(p, "r+b") as f:
        DAMAGE[kind](f)


@pytest.mark.parametrize("kind", sorted(DAMAGE))
@pytest.mark.parametrize("mode", [None, "leaks"])
def test_check_reports_a_damaged_snapshot_table_as_qemu_img(pristine: dict[str, Path], tmp_path: Path,
                                                            kind: str, mode: str | None) -> None:
    a, q = tmp_path / "a", tmp_path / "q"
    damaged(pristine["1.1"], a, kind)
    damaged(pristine["1.1"], q, kind)
    args = ["check", *(["-r", mode] if mode else []), "img.qcow2"]
    _same(ours(*args, cwd=a), theirs(*args, cwd=q), (kind, mode))


@pytest.mark.parametrize("kind", ["extra_too_large", "entry_incomplete", "l1_unaligned", "l1_too_large",
                                  "table_far_away", "v2_extra_too_large"])
def test_repair_of_a_damaged_snapshot_table_matches_qemu_img(pristine: dict[str, Path], tmp_path: Path,
                                                             kind: str) -> None:
    a, q = tmp_path / "a", tmp_path / "q"
    src = pristine["0.10"] if kind.startswith("v2_") else pristine["1.1"]
    kind = kind.removeprefix("v2_")
    damaged(src, a, kind)
    damaged(src, q, kind)
    mine, want = ours("check", "-r", "all", "img.qcow2", cwd=a), theirs("check", "-r", "all", "img.qcow2", cwd=q)
    if kind == "table_far_away":
        # Where the rewritten table goes is the allocator's choice: only the end offset differs.
        mine.stdout = "\n".join(x for x in mine.stdout.split("\n") if not x.startswith("Image end offset"))
        want.stdout = "\n".join(x for x in want.stdout.split("\n") if not x.startswith("Image end offset"))
    _same(mine, want, kind)
    # Afterwards qemu-img judges both alike (a bad snapshot L1 table stays an error: no
    # repair can invent its contents), lists the same snapshots and reads the same data.
    after = theirs("check", "img.qcow2", cwd=q)
    if kind != "table_far_away":
        _same(theirs("check", "img.qcow2", cwd=a), after, (kind, "after"))
    assert theirs("snapshot", "-l", "img.qcow2", cwd=a).stdout == theirs("snapshot", "-l", "img.qcow2", cwd=q).stdout
    if after.returncode in (0, 3):
        assert theirs("compare", "-q", str(a / "img.qcow2"), str(q / "img.qcow2"), cwd=tmp_path).returncode == 0


def test_too_many_snapshots_are_cut_to_the_limit_and_the_image_left_consistent(
        pristine: dict[str, Path], tmp_path: Path) -> None:
    # qemu-img 7.2 fails this repair itself: its new table overlaps the unread old one and it
    # marks the image corrupt. Ours cuts the count to 65536, rewrites the table, and the image
    # checks clean afterwards with its data intact.
    damaged(pristine["1.1"], tmp_path, "too_many")
    r = ours("check", "-r", "all", "img.qcow2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.startswith("Discarding 4464 overhanging snapshots\n")
    # Each qemu-img run takes ~5 s to open an image with 65536 snapshots: the three read-only
    # runs share the image lock and go side by side.
    with ThreadPoolExecutor(3) as pool:
        check, listing, compare = pool.map(lambda args: theirs(*args, cwd=tmp_path), [
            ("check", "img.qcow2"), ("snapshot", "-l", "img.qcow2"),
            ("compare", "-q", str(pristine["1.1"]), "img.qcow2")])
    assert check.returncode == 0
    rows = listing.stdout.splitlines()
    assert len(rows) == 2 + 65536 and rows[2].split()[:2] == ["1", "s1"]
    assert compare.returncode == 0
