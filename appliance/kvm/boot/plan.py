"""What a loaded kernel needs from the boot vCPU: the register state at entry.

The loaders (PVH ELF, bzImage, vmlinux) fill guest memory and return a
:class:`BootPlan`; the vCPU code turns it into KVM_SET_REGS/SREGS. Keeping the
plan as plain data lets loaders be unit-tested without /dev/kvm.
"""

from __future__ import annotations

from appliance.bootpath import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    from typing import Literal


class Segment(NamedTuple):
    """A segment register as KVM's ``struct kvm_segment`` describes it."""

    selector: int
    base: int = 0
    limit: int = 0xFFFFFFFF
    type: int = 0          # code/data type nibble (e.g. 0xB exec/read/accessed, 0x3 read/write/accessed)
    present: int = 1
    dpl: int = 0
    db: int = 0            # 32-bit default operand size
    s: int = 1             # code/data (1) or system (0)
    l: int = 0             # noqa: E741  64-bit code segment
    g: int = 1             # 4 KiB granularity
    avl: int = 0
    unusable: int = 0


class BootPlan(NamedTuple):
    """Entry state for the boot processor.

    ``kind`` names the protocol: ``pvh`` enters 32-bit protected mode with paging
    off and ``rbx`` pointing at ``hvm_start_info``; ``linux64`` enters 64-bit
    long mode with ``rsi`` pointing at ``boot_params`` (Linux boot protocol,
    "64-bit Boot Protocol").
    """

    kind: Literal["pvh", "linux64"]
    rip: int
    rsp: int
    rsi: int
    rbx: int
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: Segment
    ds: Segment            # loaded into ds, es, fs, gs and ss
    tr: Segment
    gdt_base: int
    gdt_limit: int
    # Human summary for logs / `appliance run -d`.
    description: str = ""
