"""Random and mutated kernel images: the loaders answer BootError or a plan, nothing else.

The kernel file is user input; a truncated download or a wrong file must give
a one-line error, never a traceback. Inputs Hypothesis found interesting are
kept below as named tests.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.kvm import layout
from appliance.kvm.boot import BootError, BootPlan, load_kernel
from appliance.kvm.boot.bzimage import parse_setup_header
from appliance.kvm.boot.elf import parse_elf
from appliance.kvm.memory import GuestMemory
from tests.boot import images

MiB = 1 << 20
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID_BZIMAGE = images.bzimage()
VALID_PVH = images.pvh_elf()
VALID_VMLINUX = images.vmlinux_elf()


@pytest.fixture(scope="module")
def fuzz_env() -> Iterator[tuple[GuestMemory, Path]]:
    mem = GuestMemory.anonymous(layout.ram_ranges(64 * MiB))
    with tempfile.TemporaryDirectory() as d:
        yield mem, Path(d)
    mem.close()


def _try_load(env: tuple[GuestMemory, Path], data: bytes) -> BootPlan | None:
    mem, d = env
    kernel = d / "kernel"
    kernel.write_bytes(data)
    try:
        return load_kernel(mem, kernel, initrd=None, cmdline="console=ttyS0", num_cpus=1, rsdp_addr=0)
    except BootError as err:
        assert "\n" not in str(err)
        return None


def _mutate(base: bytes, patches: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(base)
    for off, value in patches:
        data[off % len(data)] = value
    return bytes(data[:cut] if cut is not None else data)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash_the_parsers(data: bytes) -> None:
    for parse in (parse_elf, parse_setup_header):
        try:
            parse(data)
        except BootError:
            pass


@FUZZ
@given(
    st.sampled_from(["bz", "pvh", "vmlinux"]),
    st.lists(st.tuples(st.integers(0, 0x2FF), st.integers(0, 255)), max_size=12),
    st.one_of(st.none(), st.integers(0, 0x1400)),
)
def test_mutated_headers_load_or_raise_boot_error(
    fuzz_env: tuple[GuestMemory, Path], kind: str, patches: list[tuple[int, int]], cut: int | None
) -> None:
    base = {"bz": VALID_BZIMAGE, "pvh": VALID_PVH, "vmlinux": VALID_VMLINUX}[kind]
    _try_load(fuzz_env, _mutate(base, patches, cut))


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_behind_a_valid_magic_never_crash(fuzz_env: tuple[GuestMemory, Path], tail: bytes) -> None:
    _try_load(fuzz_env, b"\x7fELF" + tail)
    _try_load(fuzz_env, VALID_BZIMAGE[:0x202] + b"HdrS" + tail)


# --- Kept cases ------------------------------------------------------------


def test_truncated_bzimage_header_is_refused(fuzz_env: tuple[GuestMemory, Path]) -> None:
    assert _try_load(fuzz_env, VALID_BZIMAGE[:0x210]) is None


def test_bzimage_that_is_only_setup_sectors_is_refused(fuzz_env: tuple[GuestMemory, Path]) -> None:
    assert _try_load(fuzz_env, VALID_BZIMAGE[: 5 * 512]) is None


def test_elf_with_program_headers_past_the_end_is_refused() -> None:
    data = bytearray(VALID_VMLINUX)
    struct.pack_into("<Q", data, 32, 0xFFFF_FFFF_FFFF_FF00)   # e_phoff
    with pytest.raises(BootError, match="program headers lie outside"):
        parse_elf(bytes(data))


def test_elf_with_huge_bss_is_refused(fuzz_env: tuple[GuestMemory, Path]) -> None:
    data = bytearray(VALID_VMLINUX)
    struct.pack_into("<Q", data, 64 + 40, 1 << 39)             # p_memsz of the first PT_LOAD
    assert _try_load(fuzz_env, bytes(data)) is None


def test_xen_note_with_oversized_name_ends_the_note_scan() -> None:
    data = bytearray(VALID_PVH)
    phoff = 52
    note_offset = struct.unpack_from("<I", data, phoff + 4)[0]  # PT_NOTE is the first phdr
    struct.pack_into("<I", data, note_offset, 0xFFFFFFF0)       # namesz of the first note
    assert parse_elf(bytes(data)).pvh_entry is None


def test_pvh_entry_above_4gib_is_refused() -> None:
    with pytest.raises(BootError, match="above 4 GiB"):
        parse_elf(images.pvh_elf(entry=1 << 33, desc_size=8, is64=True))
