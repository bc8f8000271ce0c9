"""Kernel modules for the initramfs: find them, read their dependencies, order them.

A Debian kernel package ships no ``modules.dep`` (``depmod`` runs at install
time), so dependencies come from each module's own ``.modinfo`` ELF section:
NUL-separated ``key=value`` strings, of which ``depends=`` lists the modules
that must be loaded first. Module names treat ``-`` and ``_`` alike
(``virtio-rng.ko`` is module ``virtio_rng``). Modules listed in
``modules.builtin`` are part of the kernel image and need no loading.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from appliance.kit.errors import ModuleError

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(filename: str) -> str:
    """Canonical module name of a ``.ko`` file name or a ``depends=`` entry."""
    for suffix in MODULE_SUFFIXES:
        if filename.endswith(suffix):
            filename = filename[: -len(suffix)]
            break
    return filename.replace("-", "_")


def read_module(path: Path) -> bytes:
    """The uncompressed ELF object of a module file (``.ko`` or compressed)."""
    data = path.read_bytes()
    try:
        if path.name.endswith(".xz"):
            return lzma.decompress(data)
        if path.name.endswith(".zst"):
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        if path.name.endswith(".gz"):
            return gzip.decompress(data)
    except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as err:
        raise ModuleError(f"cannot decompress {path.name}") from err
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a 64-bit little-endian ELF relocatable object.

    :raises ModuleError: When the data is not such an ELF or has no ``.modinfo``.
    """
    if elf[:4] != b"\x7fELF" or len(elf) < 64 or elf[4] != 2 or elf[5] != 1:
        raise ModuleError("module is not a 64-bit little-endian ELF object")
    e_shoff, = struct.unpack_from("<Q", elf, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if e_shentsize < 64 or e_shoff + e_shnum * e_shentsize > len(elf) or e_shstrndx >= e_shnum:
        raise ModuleError("module section headers are out of bounds")

    def section(i: int) -> tuple[int, int, int]:
        base = e_shoff + i * e_shentsize
        name, = struct.unpack_from("<I", elf, base)
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        if offset + size > len(elf):
            raise ModuleError("module section lies outside the file")
        return name, offset, size

    _, stroff, strsize = section(e_shstrndx)
    for i in range(e_shnum):
        name_off, offset, size = section(i)
        if name_off >= strsize:
            continue
        end = elf.find(b"\0", stroff + name_off, stroff + strsize)
        if end < 0 or elf[stroff + name_off : end] != b".modinfo":
            continue
        info: dict[str, list[str]] = {}
        for entry in elf[offset : offset + size].split(b"\0"):
            key, sep, value = entry.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
        return info
    raise ModuleError("module has no .modinfo section")


def depends(info: dict[str, list[str]]) -> list[str]:
    """Module names a module's ``depends=`` entry lists."""
    return [module_name(d) for v in info.get("depends", []) for d in v.split(",") if d]


@dataclass(frozen=True, slots=True)
class Module:
    name: str
    path: Path
    depends: tuple[str, ...]


class ModuleTree:
    """The modules of one kernel's ``/lib/modules/<version>`` directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, Path] = {}
        for p in sorted(root.joinpath("kernel").rglob("*")):
            if p.name.endswith(MODULE_SUFFIXES):
                self.files.setdefault(module_name(p.name), p)
        builtin = root / "modules.builtin"
        self.builtin = (
            {module_name(Path(line).name) for line in builtin.read_text().split()}
            if builtin.exists()
            else set()
        )
        self._cache: dict[str, Module] = {}

    def module(self, name: str) -> Module:
        name = module_name(name)
        if name not in self._cache:
            path = self.files.get(name)
            if path is None:
                raise ModuleError(f"module {name} is not in {self.root.name}")
            self._cache[name] = Module(name, path, tuple(depends(modinfo(read_module(path)))))
        return self._cache[name]

    def load_order(self, wanted: Iterable[str]) -> list[Module]:
        """``wanted`` and everything they depend on, each after its dependencies.

        Built-in modules are left out; a wanted module that is built in is not
        an error. Missing loadable modules raise :class:`ModuleError`.
        """
        order: list[Module] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(name: str) -> None:
            name = module_name(name)
            if name in done or name in self.builtin and name not in self.files:
                return
            if name in visiting:
                raise ModuleError(f"module dependency cycle through {name}")
            visiting.add(name)
            mod = self.module(name)
            for dep in mod.depends:
                visit(dep)
            visiting.discard(name)
            done.add(name)
            order.append(mod)

        for name in wanted:
            visit(name)
        return order
