"""A virtual CPU: its set-up (CPUID, MSRs, LAPIC, boot registers) and its KVM_RUN loop.

Each vCPU runs :meth:`Vcpu.run` on its own thread. ``fcntl.ioctl(KVM_RUN)``
releases the GIL, so the guest runs while the asyncio loop and the other vCPUs
carry on. Port I/O and MMIO exits are dispatched synchronously to the buses;
every other exit that ends the run is returned as a :class:`VcpuExit` for the
machine to act on (on its loop). :meth:`Vcpu.kick` stops a vCPU from another
thread: it sets ``immediate_exit`` and signals the thread, which makes a
KVM_RUN in progress return ``EINTR`` (KVM API, "KVM_CAP_IMMEDIATE_EXIT").
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal
import struct
import threading

from appliance.bootpath import NamedTuple
from appliance.kvm import KvmError
from appliance.kvm import ffi as k
from appliance.kvm.boot.plan import BootPlan, Segment
from appliance.kvm.bus import Bus
from appliance.kvm.ffi import ffi
from appliance.kvm.system import CpuidEntry, ioctl
from appliance.kvm.vm import Vm
from appliance.log import get_logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    from typing import Any, Literal

log = get_logger(__name__)

# A real-time signal nobody else uses: its only job is to interrupt KVM_RUN.
KICK_SIGNAL = signal.SIGRTMIN + 3

_EXIT_REASON = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")       # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")     # phys_addr, data, len, is_write
_RUN_EXIT_REASON_OFF = 8
_RUN_UNION_OFF = ffi.offsetof("struct kvm_run", "io")

# MSR numbers (Intel SDM vol. 4).
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WB = 6

# The boot MSRs Linux expects a firmware to have left: fast strings on, MTRRs
# on with write-back default, syscall MSRs cleared.
BOOT_MSRS: tuple[tuple[int, int], ...] = (
    (MSR_IA32_SYSENTER_CS, 0),
    (MSR_IA32_SYSENTER_ESP, 0),
    (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (MSR_IA32_TSC, 0),
    (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
)

# Local APIC register offsets and delivery modes (Intel SDM vol. 3 §11.5.1).
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class VcpuExit(NamedTuple):
    """Why :meth:`Vcpu.run` returned.

    ``kind``: ``stopped`` (kicked), ``poweroff`` / ``reset`` (KVM system event),
    ``shutdown`` (triple fault: PCs reset on it), ``error`` (internal error,
    failed entry, unexpected exit; ``detail`` says which).
    """

    kind: Literal["stopped", "poweroff", "reset", "shutdown", "error"]
    detail: str = ""


def cpuid_for(supported: tuple[CpuidEntry, ...], apic_id: int, num_cpus: int) -> list[CpuidEntry]:
    """The CPUID table for one vCPU, from KVM_GET_SUPPORTED_CPUID.

    The hypervisor's own leaves (0x40000000 and up) are passed through: PVM
    guests find the hypervisor by them. Topology leaves get this vCPU's APIC
    id: leaf 1 EBX[31:24] and the x2APIC id in EDX of every subleaf of 0xB and
    0x1F (Intel SDM vol. 2A, CPUID). All vCPUs are cores of one package.
    """
    core_bits = max(0, (num_cpus - 1).bit_length())
    out: list[CpuidEntry] = []
    for e in supported:
        f = e.function
        if f == 1:
            ebx = (e.ebx & 0x0000_FFFF) | (min(num_cpus, 255) << 16) | ((apic_id & 0xFF) << 24)
            edx = e.edx | (1 << 28) if num_cpus > 1 else e.edx & ~(1 << 28)
            out.append(CpuidEntry(f, e.index, e.flags, e.eax, ebx, e.ecx, edx))
        elif f in (0xB, 0x1F):
            if e.index != 0:
                continue
            flags = e.flags | KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            # Subleaf 0: SMT level (one thread per core); 1: core level; 2: end.
            out.append(CpuidEntry(f, 0, flags, 0, 1, (1 << 8) | 0, apic_id))
            out.append(CpuidEntry(f, 1, flags, core_bits, num_cpus, (2 << 8) | 1, apic_id))
            out.append(CpuidEntry(f, 2, flags, 0, 0, 2, apic_id))
        elif f == 4:
            # EAX[31:26]: addressable core ids in the package, minus one.
            eax = (e.eax & 0x03FF_FFFF) | (((1 << core_bits) - 1) << 26)
            out.append(CpuidEntry(f, e.index, e.flags, eax, e.ebx, e.ecx, e.edx))
        else:
            out.append(e)
    return out


def _install_kick_handler() -> bool:
    """Make KICK_SIGNAL interrupt syscalls instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None)
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None, signal.SIG_IGN):
        signal.signal(KICK_SIGNAL, lambda _sig, _frame: None)
    signal.siginterrupt(KICK_SIGNAL, True)
    return True


class Vcpu:
    """One vCPU of ``vm``; ``index`` is both its KVM vcpu id and its APIC id."""

    def __init__(self, vm: Vm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = vm.create_vcpu_fd(index)
        try:
            size = vm.kvm.vcpu_mmap_size
            self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._run_buf = ffi.from_buffer(self._mm)
        self._run_struct = ffi.cast("struct kvm_run *", self._run_buf)
        self._stop = threading.Event()
        self._thread_id: int | None = None
        self._can_kick = _install_kick_handler()
        self.exits = 0
        self.device_errors = 0

    # --- set-up -----------------------------------------------------------------

    def configure(self, num_cpus: int) -> None:
        """CPUID, boot MSRs, FPU and LAPIC LINT pins, as firmware would leave them."""
        self.set_cpuid(cpuid_for(self.vm.kvm.supported_cpuid, self.index, num_cpus))
        self.set_msrs(BOOT_MSRS)
        fpu = ffi.new("struct kvm_fpu *", {"fcw": 0x37F, "mxcsr": 0x1F80})
        ioctl(self.fd, k.KVM_SET_FPU, fpu, "KVM_SET_FPU")
        self._set_lint()

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        raw = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2"))
        table = ffi.cast("struct kvm_cpuid2 *", raw)
        table.nent = len(entries)
        for i, e in enumerate(entries):
            d = table.entries[i]
            d.function, d.index, d.flags = e.function, e.index, e.flags
            d.eax, d.ebx, d.ecx, d.edx = e.eax, e.ebx, e.ecx, e.edx
        ioctl(self.fd, k.KVM_SET_CPUID2, raw, "KVM_SET_CPUID2")

    def set_msrs(self, msrs: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> int:
        """Set MSRs one at a time; returns how many KVM accepted (others are logged)."""
        done = 0
        for index, value in msrs:
            raw = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + ffi.sizeof("struct kvm_msr_entry"))
            m = ffi.cast("struct kvm_msrs *", raw)
            m.nmsrs = 1
            m.entries[0].index = index
            m.entries[0].data = value
            n = ioctl(self.fd, k.KVM_SET_MSRS, raw, "KVM_SET_MSRS")
            if n == 1:
                done += 1
            else:
                log.debug("vCPU %d: KVM refused MSR %#x", self.index, index)
        return done

    def get_msr(self, index: int) -> int | None:
        raw = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + ffi.sizeof("struct kvm_msr_entry"))
        m = ffi.cast("struct kvm_msrs *", raw)
        m.nmsrs = 1
        m.entries[0].index = index
        n = ioctl(self.fd, k.KVM_GET_MSRS, raw, "KVM_GET_MSRS")
        return int(m.entries[0].data) if n == 1 else None

    def _set_lint(self) -> None:
        # LINT0 as ExtINT and LINT1 as NMI: the "virtual wire" mode a PC BIOS
        # leaves, so the PIC reaches the BSP before the guest programs its APIC
        # (MP spec 1.4 §3.6.2.2).
        lapic = ffi.new("struct kvm_lapic_state *")
        ioctl(self.fd, k.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        regs = ffi.buffer(lapic.regs)
        for off, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
            (v,) = struct.unpack_from("<I", regs, off)
            struct.pack_into("<I", regs, off, (v & ~0x700) | (mode << 8))
        ioctl(self.fd, k.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def get_regs(self) -> Any:
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, k.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def get_sregs(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, k.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def mp_state(self) -> int:
        st = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, k.KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return int(st.mp_state)

    def apply_boot_plan(self, plan: BootPlan) -> None:
        """Load the entry state a boot loader computed into this (boot) vCPU."""
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, k.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        _load_segment(sregs.cs, plan.cs)
        for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _load_segment(seg, plan.ds)
        _load_segment(sregs.tr, plan.tr)
        sregs.gdt.base = plan.gdt_base
        sregs.gdt.limit = plan.gdt_limit
        sregs.cr0 = plan.cr0
        sregs.cr3 = plan.cr3
        sregs.cr4 = plan.cr4
        sregs.efer = plan.efer
        ioctl(self.fd, k.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")
        regs = ffi.new("struct kvm_regs *")
        regs.rip = plan.rip
        regs.rsp = plan.rsp
        regs.rsi = plan.rsi
        regs.rbx = plan.rbx
        regs.rflags = plan.rflags | 0x2  # bit 1 is reserved and reads as one
        ioctl(self.fd, k.KVM_SET_REGS, regs, "KVM_SET_REGS")

    # --- running ----------------------------------------------------------------

    def kick(self) -> None:
        """Make :meth:`run` return ``stopped`` soon; callable from any thread."""
        self._stop.set()
        if self.fd < 0:
            return  # closed: kvm_run is unmapped
        self._run_struct.immediate_exit = 1
        tid = self._thread_id
        if tid is not None and self._can_kick:
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def rearm(self) -> None:
        """Undo :meth:`kick` so :meth:`run` can be called again (resume after pause)."""
        if self.fd < 0:
            raise KvmError(f"vCPU {self.index} is closed")
        self._stop.clear()
        self._run_struct.immediate_exit = 0

    def run(self, pio_bus: Bus, mmio_bus: Bus) -> VcpuExit:
        """Run the guest until it stops on something the machine must handle.

        Must be called on the thread that owns this vCPU. Device errors are
        logged and the guest continues: a broken device model must not take
        the vCPU down with it.
        """
        self._thread_id = threading.get_ident()
        mm = self._mm
        fd = self.fd
        run_req = k.KVM_RUN
        union = _RUN_UNION_OFF
        while not self._stop.is_set():
            try:
                fcntl.ioctl(fd, run_req, 0)
            except OSError as err:
                if err.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                return VcpuExit("error", f"KVM_RUN failed: {os.strerror(err.errno or 0)}")
            self.exits += 1
            (reason,) = _EXIT_REASON.unpack_from(mm, _RUN_EXIT_REASON_OFF)
            if reason == k.KVM_EXIT_IO:
                direction, size, port, count, off = _IO.unpack_from(mm, union)
                try:
                    if direction == k.KVM_EXIT_IO_OUT:
                        for i in range(count):
                            p = off + i * size
                            pio_bus.write(port, mm[p : p + size])
                    else:
                        for i in range(count):
                            p = off + i * size
                            mm[p : p + size] = _fit(pio_bus.read(port, size), size)
                except Exception:
                    self._device_failed("port", port)
            elif reason == k.KVM_EXIT_MMIO:
                addr, data, length, is_write = _MMIO.unpack_from(mm, union)
                if not 0 < length <= 8:
                    continue
                try:
                    if is_write:
                        mmio_bus.write(addr, data[:length])
                    else:
                        mm[union + 8 : union + 8 + length] = _fit(mmio_bus.read(addr, length), length)
                except Exception:
                    self._device_failed("MMIO", addr)
            elif reason == k.KVM_EXIT_INTR:
                continue
            elif reason == k.KVM_EXIT_HLT:
                # Only without an in-kernel LAPIC; we always have one. Treat as idle.
                continue
            elif reason == k.KVM_EXIT_SHUTDOWN:
                return VcpuExit("shutdown", "triple fault")
            elif reason == k.KVM_EXIT_SYSTEM_EVENT:
                ev = self._run_struct.system_event.type
                if ev == k.KVM_SYSTEM_EVENT_SHUTDOWN:
                    return VcpuExit("poweroff", "system event")
                if ev == k.KVM_SYSTEM_EVENT_RESET:
                    return VcpuExit("reset", "system event")
                return VcpuExit("error", f"system event {ev} (guest crash)")
            elif reason == k.KVM_EXIT_INTERNAL_ERROR:
                ie = self._run_struct.internal
                data = " ".join(f"{ie.data[i]:#x}" for i in range(min(ie.ndata, 16)))
                return VcpuExit("error", f"KVM internal error, suberror {ie.suberror} [{data}]{self._where()}")
            elif reason == k.KVM_EXIT_FAIL_ENTRY:
                fe = self._run_struct.fail_entry
                return VcpuExit("error", f"VM entry failed, reason {fe.hardware_entry_failure_reason:#x}")
            else:
                return VcpuExit("error", f"unexpected KVM exit {reason}{self._where()}")
        return VcpuExit("stopped")

    def _device_failed(self, space: str, addr: int) -> None:
        # A guest can hit a broken device in a loop: log the first few
        # failures in full, then one line per thousand.
        self.device_errors += 1
        n = self.device_errors
        if n <= 5:
            log.exception("vCPU %d: %s %#x device failed", self.index, space, addr)
        elif n % 1000 == 0:
            log.error("vCPU %d: %d device failures so far (last at %s %#x)", self.index, n, space, addr)

    def _where(self) -> str:
        try:
            regs = self.get_regs()
            return f" at rip {regs.rip:#x}"
        except KvmError:
            return ""

    def close(self) -> None:
        if self.fd >= 0:
            # The kvm_run page keeps the vCPU (and so the VM) alive until unmapped.
            ffi.release(self._run_buf)
            try:
                self._mm.close()
            except BufferError:
                log.debug("vCPU %d: kvm_run page still referenced", self.index)
            os.close(self.fd)
            self.fd = -1


def _fit(data: bytes, size: int) -> bytes:
    if len(data) == size:
        return data
    return (bytes(data) + b"\xff" * size)[:size]


def _load_segment(dst: Any, seg: Segment) -> None:
    d = dst
    d.base = seg.base
    d.limit = seg.limit
    d.selector = seg.selector
    d.type = seg.type
    d.present = seg.present
    d.dpl = seg.dpl
    d.db = seg.db
    d.s = seg.s
    d.l = seg.l
    d.g = seg.g
    d.avl = seg.avl
    d.unusable = seg.unusable
