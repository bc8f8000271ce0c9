"""Module dependencies from .modinfo, and the load order the initramfs uses."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from appliance.kit.errors import ModuleError
from appliance.kit.modules import ModuleTree, modinfo, module_name


def fake_ko(depends: str, name: str = "m") -> bytes:
    """A minimal ELF64 relocatable object with .shstrtab and .modinfo sections."""
    shstr = b"\0.shstrtab\0.modinfo\0"
    info = b"license=GPL\0" + f"depends={depends}\0name={name}\0".encode()
    data_off = 64
    shoff = data_off + len(shstr) + len(info)
    shoff += -shoff % 8
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 0x28, shoff)
    struct.pack_into("<HHH", hdr, 0x3A, 64, 3, 1)
    body = bytes(hdr) + shstr + info
    body += bytes(shoff - len(body))

    def sh(name_off: int, off: int, size: int) -> bytes:
        s = bytearray(64)
        struct.pack_into("<I", s, 0, name_off)
        struct.pack_into("<QQ", s, 0x18, off, size)
        return bytes(s)

    return body + bytes(64) + sh(1, data_off, len(shstr)) + sh(11, data_off + len(shstr), len(info))


def make_tree(tmp_path: Path, mods: dict[str, str], builtin: list[str] = ()) -> ModuleTree:
    root = tmp_path / "6.1.0-test"
    for fname, deps in mods.items():
        p = root / "kernel" / "drivers" / fname
        p.parent.mkdir(parents=True, exist_ok=True)
        data = fake_ko(deps, module_name(fname))
        p.write_bytes(lzma.compress(data) if fname.endswith(".xz") else data)
    root.mkdir(parents=True, exist_ok=True)
    (root / "modules.builtin").write_text("".join(f"kernel/x/{b}.ko\n" for b in builtin))
    return ModuleTree(root)


def test_modinfo_reads_depends_and_other_keys() -> None:
    info = modinfo(fake_ko("virtio,virtio_ring"))
    assert info["depends"] == ["virtio,virtio_ring"]
    assert info["license"] == ["GPL"]


def test_dependencies_load_before_their_users(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {
        "virtio_ring.ko": "",
        "virtio.ko": "virtio_ring",
        "virtio_pci.ko": "virtio_ring,virtio",
        "virtio-rng.ko.xz": "virtio,virtio_ring",
    })
    order = [m.name for m in tree.load_order(["virtio_rng", "virtio_pci"])]
    assert order == ["virtio_ring", "virtio", "virtio_rng", "virtio_pci"]


def test_builtin_modules_are_skipped(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {"a.ko": "crc16"}, builtin=["crc16", "ext4"])
    assert [m.name for m in tree.load_order(["ext4", "a"])] == ["a"]


def test_missing_module_is_an_error(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {"a.ko": "nowhere"})
    with pytest.raises(ModuleError, match="nowhere"):
        tree.load_order(["a"])


def test_dependency_cycle_is_an_error(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {"a.ko": "b", "b.ko": "a"})
    with pytest.raises(ModuleError, match="cycle"):
        tree.load_order(["a"])


@pytest.mark.parametrize("data", [b"", b"MZ" + bytes(100), fake_ko("x")[:80]])
def test_malformed_objects_raise_module_error(data: bytes) -> None:
    with pytest.raises(ModuleError):
        modinfo(data)
