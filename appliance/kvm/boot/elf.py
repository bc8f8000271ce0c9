"""A parser for the ELF kernels we boot: PVH guests and Linux ``vmlinux``.

Only what loading needs is read: the program headers (PT_LOAD segments go to
their physical addresses, as Linux's and Xen's loaders do) and the notes, where a
Xen ``XEN_ELFNOTE_PHYS32_ENTRY`` (type 18, name ``"Xen"``) marks a kernel that
can be entered through PVH (Xen ``include/public/elfnote.h``; ``docs/misc/pvh.pandoc``).

The parser is pure (bytes in, :class:`ElfImage` out) and raises only
:class:`BootError`, so it can be fuzzed. Every offset and size from the file is
checked against the file before use.
"""

from __future__ import annotations

import struct

from appliance.bootpath import NamedTuple
from appliance.kvm.boot.errors import BootError

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
MAX_PHDRS = 512                   # real kernels have fewer than ten
MAX_SEGMENT = 1 << 40             # no PT_LOAD of a bootable kernel is a TiB

_EHDR32 = struct.Struct("<HHIIIIIHHHHHH")   # from e_type, after e_ident
_EHDR64 = struct.Struct("<HHIQQQIHHHHHH")
_PHDR32 = struct.Struct("<IIIIIIII")        # type, offset, vaddr, paddr, filesz, memsz, flags, align
_PHDR64 = struct.Struct("<IIQQQQQQ")        # type, flags, offset, vaddr, paddr, filesz, memsz, align
_NHDR = struct.Struct("<III")


class Segment(NamedTuple):
    """One PT_LOAD: ``filesz`` bytes from ``offset`` go to ``paddr``; the rest of ``memsz`` is zero."""

    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


class ElfImage(NamedTuple):
    """What the loaders need from an ELF kernel."""

    is64: bool
    machine: int
    entry: int
    segments: tuple[Segment, ...]
    pvh_entry: int | None

    def physical_entry(self) -> int:
        """``e_entry`` as a physical address.

        Linux's x86-64 ``vmlinux`` already declares a physical entry
        (``ENTRY(phys_startup_64)``); other kernels may give a virtual one, which
        is translated through the segment that contains it.
        """
        for seg in self.segments:
            if seg.paddr <= self.entry < seg.paddr + seg.memsz:
                return self.entry
        for seg in self.segments:
            if seg.vaddr <= self.entry < seg.vaddr + seg.memsz:
                return self.entry - seg.vaddr + seg.paddr
        raise BootError(f"ELF entry point {self.entry:#x} lies in no loadable segment")


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse_elf(data: bytes) -> ElfImage:
    """Parse an x86 ELF executable's program headers and Xen notes.

    :raises BootError: When the file is not a little-endian x86 ELF executable
        with sane, in-file program headers and loadable segments.
    """
    if len(data) < 16 or not is_elf(data):
        raise BootError("not an ELF file")
    cls, order = data[4], data[5]
    if order != ELFDATA2LSB:
        raise BootError("ELF kernel is not little-endian")
    if cls == ELFCLASS64:
        ehdr, phdr_fmt, min_phent = _EHDR64, _PHDR64, _PHDR64.size
    elif cls == ELFCLASS32:
        ehdr, phdr_fmt, min_phent = _EHDR32, _PHDR32, _PHDR32.size
    else:
        raise BootError(f"unknown ELF class {cls}")
    if len(data) < 16 + ehdr.size:
        raise BootError("ELF header is truncated")
    (_, machine, _, entry, phoff, _, _, _, phentsize, phnum, *_) = ehdr.unpack_from(data, 16)
    if machine not in (EM_386, EM_X86_64):
        raise BootError(f"ELF kernel is for machine {machine}, not x86")
    if phnum == 0 or phnum > MAX_PHDRS:
        raise BootError(f"ELF kernel has {phnum} program headers")
    if phentsize < min_phent:
        raise BootError("ELF program header entries are too small")
    if phoff + phnum * phentsize > len(data):
        raise BootError("ELF program headers lie outside the file")

    segments: list[Segment] = []
    notes: list[tuple[int, int]] = []
    for i in range(phnum):
        fields = phdr_fmt.unpack_from(data, phoff + i * phentsize)
        if cls == ELFCLASS64:
            p_type, _, offset, vaddr, paddr, filesz, memsz, _ = fields
        else:
            p_type, offset, vaddr, paddr, filesz, memsz, _, _ = fields
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        if offset + filesz > len(data):
            raise BootError(f"ELF segment {i} lies outside the file")
        if p_type == PT_NOTE:
            notes.append((offset, filesz))
            continue
        if filesz > memsz or memsz > MAX_SEGMENT:
            raise BootError(f"ELF segment {i} has impossible sizes")
        if memsz:
            segments.append(Segment(offset, vaddr, paddr, filesz, memsz))
    if not segments:
        raise BootError("ELF kernel has no loadable segments")
    return ElfImage(
        is64=cls == ELFCLASS64,
        machine=machine,
        entry=entry,
        segments=tuple(segments),
        pvh_entry=_find_pvh_entry(data, notes),
    )


def _find_pvh_entry(data: bytes, notes: list[tuple[int, int]]) -> int | None:
    """The PHYS32_ENTRY address from the Xen notes, if the kernel has one."""
    for start, size in notes:
        off, end = start, start + size
        while off + _NHDR.size <= end:
            namesz, descsz, ntype = _NHDR.unpack_from(data, off)
            name_off = off + _NHDR.size
            desc_off = name_off + _align4(namesz)
            next_off = desc_off + _align4(descsz)
            if next_off > end:
                break  # a truncated note ends the scan of this segment
            if ntype == XEN_ELFNOTE_PHYS32_ENTRY and data[name_off : name_off + namesz] == b"Xen\0":
                # Linux emits the address as a pointer-sized word, small guests as 32 bits.
                if descsz == 4:
                    return int(struct.unpack_from("<I", data, desc_off)[0])
                if descsz == 8:
                    value = int(struct.unpack_from("<Q", data, desc_off)[0])
                    if value >> 32:
                        raise BootError(f"PVH entry point {value:#x} is above 4 GiB")
                    return value
                raise BootError("Xen PHYS32_ENTRY note has a bad size")
            off = next_off
    return None


def _align4(n: int) -> int:
    return (n + 3) & ~3
