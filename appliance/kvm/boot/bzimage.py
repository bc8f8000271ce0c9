"""The Linux bzImage setup header, as the x86 boot protocol defines it.

Offsets are those of ``Documentation/arch/x86/boot.rst`` ("The Real-Mode Kernel
Header"), counted from the start of the file, which are also their offsets in
``struct boot_params`` (the header is copied there verbatim). We only take the
64-bit entry, so we need protocol 2.12+ (``xloadflags``) with ``XLF_KERNEL_64``.

:func:`parse_setup_header` is pure and raises only :class:`BootError`.
"""

from __future__ import annotations

import struct

from appliance.bootpath import NamedTuple
from appliance.kvm.boot.errors import BootError

# Setup header field offsets (boot.rst; also offsets within boot_params).
SETUP_HEADER_START = 0x1F1
SETUP_SECTS = 0x1F1
BOOT_FLAG = 0x1FE
JUMP = 0x200
HEADER = 0x202
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
CODE32_START = 0x214
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
RELOCATABLE_KERNEL = 0x234
MIN_ALIGNMENT = 0x235
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
HARDWARE_SUBARCH = 0x23C
PAYLOAD_OFFSET = 0x248
PAYLOAD_LENGTH = 0x24C
SETUP_DATA = 0x250
PREF_ADDRESS = 0x258
INIT_SIZE = 0x260
SETUP_HEADER_END = 0x290          # struct setup_header ends where edd_mbr_sig_buffer starts

BOOT_FLAG_MAGIC = 0xAA55
HDRS = b"HdrS"
MIN_VERSION = 0x020C              # 2.12: xloadflags, the 64-bit entry
LOADED_HIGH = 1 << 0              # loadflags: protected-mode code loads at 0x100000
XLF_KERNEL_64 = 1 << 0            # xloadflags: has the 64-bit entry at load + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
ENTRY_64_OFFSET = 0x200
LOADER_TYPE_UNDEFINED = 0xFF      # "boot loader ID 0xFF: undefined" (boot.rst)


class SetupHeader(NamedTuple):
    """The fields of a bzImage's setup header that the loader acts on."""

    version: int
    setup_sects: int
    loadflags: int
    xloadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    cmdline_size: int
    pref_address: int
    init_size: int
    raw: bytes                    # the header bytes to copy into boot_params at 0x1F1

    @property
    def setup_size(self) -> int:
        """Bytes before the protected-mode kernel: the boot sector plus the setup sectors."""
        return (self.setup_sects + 1) * 512


def is_bzimage(data: bytes) -> bool:
    """Whether ``data`` carries the ``HdrS`` signature of a Linux boot-protocol kernel."""
    return len(data) >= HEADER + 4 and data[HEADER : HEADER + 4] == HDRS


def parse_setup_header(data: bytes) -> SetupHeader:
    """Check and read the setup header of a bzImage.

    :raises BootError: When ``data`` is not a bzImage we can enter in 64-bit mode.
    """
    if len(data) < SETUP_HEADER_END or not is_bzimage(data):
        raise BootError("not a bzImage (no 'HdrS' setup header)")
    (boot_flag,) = struct.unpack_from("<H", data, BOOT_FLAG)
    if boot_flag != BOOT_FLAG_MAGIC:
        raise BootError(f"bzImage boot_flag is {boot_flag:#06x}, not 0xaa55")
    (version,) = struct.unpack_from("<H", data, VERSION)
    if version < MIN_VERSION:
        raise BootError(
            f"bzImage boot protocol {version >> 8}.{version & 0xFF} is older than 2.12 "
            "(no 64-bit entry)"
        )
    loadflags = data[LOADFLAGS]
    (xloadflags,) = struct.unpack_from("<H", data, XLOADFLAGS)
    if not xloadflags & XLF_KERNEL_64:
        raise BootError("bzImage has no 64-bit entry point (XLF_KERNEL_64 clear)")
    if not loadflags & LOADED_HIGH:
        raise BootError("zImage kernels (not loaded high) are not supported")
    setup_sects = data[SETUP_SECTS] or 4   # 0 means 4, for compatibility (boot.rst)
    (initrd_addr_max, kernel_alignment) = struct.unpack_from("<II", data, INITRD_ADDR_MAX)
    relocatable = bool(data[RELOCATABLE_KERNEL])
    (cmdline_size,) = struct.unpack_from("<I", data, CMDLINE_SIZE)
    (pref_address,) = struct.unpack_from("<Q", data, PREF_ADDRESS)
    (init_size,) = struct.unpack_from("<I", data, INIT_SIZE)
    if relocatable and (kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1)):
        raise BootError(f"bzImage kernel_alignment {kernel_alignment:#x} is not a power of two")
    if (setup_sects + 1) * 512 >= len(data):
        raise BootError("bzImage has no protected-mode kernel after its setup sectors")
    # The header's own length is 0x202 plus the byte offset of its leading jump;
    # a 2.12+ header reaches at least past init_size, which the kernel's
    # decompressor reads back from boot_params.
    end = min(max(HEADER + data[JUMP + 1], INIT_SIZE + 4), SETUP_HEADER_END)
    return SetupHeader(
        version=version,
        setup_sects=setup_sects,
        loadflags=loadflags,
        xloadflags=xloadflags,
        initrd_addr_max=initrd_addr_max,
        kernel_alignment=kernel_alignment,
        relocatable=relocatable,
        cmdline_size=cmdline_size,
        pref_address=pref_address,
        init_size=init_size,
        raw=bytes(data[SETUP_HEADER_START:end]),
    )
