"""Tell whether a Linux kernel image was built as a PVM guest (``CONFIG_PVM_GUEST``).

On a PVM host only such a kernel runs at native speed; any other one runs under
KVM's instruction emulator. There is no header flag for it, so we look for
what the PVM guest support compiles into the kernel (virt-pvm/linux,
``arch/x86/include/uapi/asm/pvm_para.h`` and ``arch/x86/kernel/pvm.c``):

1. the *synthetic CPUID* instruction pair ``invlpg 0xffffffffff4d5650; cpuid``
   (bytes ``0f 01 3c 25 50 56 4d ff 0f a2``), which a PVM guest uses instead of
   plain CPUID in ``pvm_detect()``/``pvm_cpuid()``; no other kernel has a reason
   to emit an ``invlpg`` of that odd absolute address;
2. the ``"pvm-guest: "`` prefix of the guest's log messages;
3. ``CONFIG_PVM_GUEST=y`` in an embedded configuration (``CONFIG_IKCONFIG``,
   the gzip blob between ``IKCFG_ST`` and ``IKCFG_ED``).

A bzImage's payload is decompressed first (with the kit's decompressor:
gzip, xz, zstd or the legacy LZ4 Debian uses). Anything unreadable counts as
"not PVM-capable": the caller only uses the answer to print a warning.
"""

from __future__ import annotations

import zlib

from appliance.errors import ApplianceError
from appliance.kvm.boot import bzimage

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    from appliance.machine.config import StrPath

PVM_SYNTHETIC_CPUID = bytes.fromhex("0f013c2550564dff0fa2")
PVM_LOG_PREFIX = b"pvm-guest: "
IKCONFIG_START = b"IKCFG_ST"
IKCONFIG_END = b"IKCFG_ED"
MAX_KERNEL_FILE = 512 << 20


def kernel_is_pvm_capable(path: StrPath) -> bool:
    """Whether the kernel at ``path`` (bzImage or ELF vmlinux) has PVM guest support."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KERNEL_FILE)
    except OSError:
        return False
    if bzimage.is_bzimage(data):
        data = _decompressed(data) or data
    return _has_pvm_markers(data)


def _has_pvm_markers(data: bytes) -> bool:
    if PVM_SYNTHETIC_CPUID in data or PVM_LOG_PREFIX in data:
        return True
    config = _embedded_config(data)
    return config is not None and b"\nCONFIG_PVM_GUEST=y" in b"\n" + config


def _embedded_config(data: bytes) -> bytes | None:
    start = data.find(IKCONFIG_START)
    if start < 0:
        return None
    end = data.find(IKCONFIG_END, start)
    if end < 0:
        return None
    try:
        import gzip  # only for Linux kernels; not on every boot's start-up path

        return gzip.decompress(data[start + len(IKCONFIG_START) : end])
    except (OSError, EOFError, zlib.error):
        return None


def _decompressed(image: bytes) -> bytes | None:
    """The vmlinux inside a bzImage, or ``None`` when it cannot be unpacked."""
    try:
        from appliance.kit.bzimage import extract_vmlinux
    except ImportError:  # pragma: no cover - the kit's codecs are project dependencies
        return None
    try:
        return extract_vmlinux(image)
    except ApplianceError:
        return None
