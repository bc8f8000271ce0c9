"""The KVM ABI: kernel structs declared once with cffi, ioctl numbers derived from them.

cffi runs in ABI mode (no compiler at import time): ``ffi.new`` allocates a
struct, ``ffi.buffer`` hands it to :func:`fcntl.ioctl` as a mutable buffer, and
``fcntl.ioctl`` releases the GIL for the duration of the call, so a vCPU thread
sitting in ``KVM_RUN`` does not stop the loop. The layouts are those of
``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``; ioctl
numbers are computed from ``ffi.sizeof`` so that a struct and its ioctl cannot
disagree. This module is the only place kernel structs are declared: other
packages add what they need here, additively.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import zlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    from typing import Any

CDEF = """
    struct kvm_regs {
        uint64_t rax, rbx, rcx, rdx;
        uint64_t rsi, rdi, rsp, rbp;
        uint64_t r8, r9, r10, r11;
        uint64_t r12, r13, r14, r15;
        uint64_t rip, rflags;
    };

    struct kvm_segment {
        uint64_t base;
        uint32_t limit;
        uint16_t selector;
        uint8_t type;
        uint8_t present, dpl, db, s, l, g, avl;
        uint8_t unusable;
        uint8_t padding;
    };

    struct kvm_dtable {
        uint64_t base;
        uint16_t limit;
        uint16_t padding[3];
    };

    struct kvm_sregs {
        struct kvm_segment cs, ds, es, fs, gs, ss;
        struct kvm_segment tr, ldt;
        struct kvm_dtable gdt, idt;
        uint64_t cr0, cr2, cr3, cr4, cr8;
        uint64_t efer;
        uint64_t apic_base;
        uint64_t interrupt_bitmap[4];
    };

    struct kvm_fpu {
        uint8_t fpr[8][16];
        uint16_t fcw;
        uint16_t fsw;
        uint8_t ftwx;
        uint8_t pad1;
        uint16_t last_opcode;
        uint64_t last_ip;
        uint64_t last_dp;
        uint8_t xmm[16][16];
        uint32_t mxcsr;
        uint32_t pad2;
    };

    struct kvm_msr_entry {
        uint32_t index;
        uint32_t reserved;
        uint64_t data;
    };

    struct kvm_msrs {
        uint32_t nmsrs;
        uint32_t pad;
        struct kvm_msr_entry entries[];
    };

    struct kvm_msr_list {
        uint32_t nmsrs;
        uint32_t indices[];
    };

    struct kvm_cpuid_entry2 {
        uint32_t function;
        uint32_t index;
        uint32_t flags;
        uint32_t eax;
        uint32_t ebx;
        uint32_t ecx;
        uint32_t edx;
        uint32_t padding[3];
    };

    struct kvm_cpuid2 {
        uint32_t nent;
        uint32_t padding;
        struct kvm_cpuid_entry2 entries[];
    };

    struct kvm_userspace_memory_region {
        uint32_t slot;
        uint32_t flags;
        uint64_t guest_phys_addr;
        uint64_t memory_size;
        uint64_t userspace_addr;
    };

    struct kvm_irq_level {
        uint32_t irq;
        uint32_t level;
    };

    struct kvm_irq_routing_irqchip {
        uint32_t irqchip;
        uint32_t pin;
    };

    struct kvm_irq_routing_msi {
        uint32_t address_lo;
        uint32_t address_hi;
        uint32_t data;
        uint32_t devid;
    };

    struct kvm_irq_routing_entry {
        uint32_t gsi;
        uint32_t type;
        uint32_t flags;
        uint32_t pad;
        union {
            struct kvm_irq_routing_irqchip irqchip;
            struct kvm_irq_routing_msi msi;
            uint32_t pad[8];
        } u;
    };

    struct kvm_irq_routing {
        uint32_t nr;
        uint32_t flags;
        struct kvm_irq_routing_entry entries[];
    };

    struct kvm_irqfd {
        uint32_t fd;
        uint32_t gsi;
        uint32_t flags;
        uint32_t resamplefd;
        uint8_t pad[16];
    };

    struct kvm_ioeventfd {
        uint64_t datamatch;
        uint64_t addr;
        uint32_t len;
        int32_t fd;
        uint32_t flags;
        uint8_t pad[36];
    };

    struct kvm_pit_config {
        uint32_t flags;
        uint32_t pad[15];
    };

    struct kvm_mp_state {
        uint32_t mp_state;
    };

    struct kvm_lapic_state {
        char regs[1024];
    };

    struct kvm_msi {
        uint32_t address_lo;
        uint32_t address_hi;
        uint32_t data;
        uint32_t flags;
        uint32_t devid;
        uint8_t pad[12];
    };

    struct kvm_run_io {
        uint8_t direction;
        uint8_t size;
        uint16_t port;
        uint32_t count;
        uint64_t data_offset;
    };

    struct kvm_run_mmio {
        uint64_t phys_addr;
        uint8_t data[8];
        uint32_t len;
        uint8_t is_write;
    };

    struct kvm_run_internal {
        uint32_t suberror;
        uint32_t ndata;
        uint64_t data[16];
    };

    struct kvm_run_system_event {
        uint32_t type;
        uint32_t ndata;
        uint64_t data[16];
    };

    struct kvm_run_fail_entry {
        uint64_t hardware_entry_failure_reason;
        uint32_t cpu;
    };

    struct kvm_run_ex {
        uint32_t exception;
        uint32_t error_code;
    };

    struct kvm_run {
        uint8_t request_interrupt_window;
        uint8_t immediate_exit;
        uint8_t padding1[6];
        uint32_t exit_reason;
        uint8_t ready_for_interrupt_injection;
        uint8_t if_flag;
        uint16_t flags;
        uint64_t cr8;
        uint64_t apic_base;
        union {
            struct { uint64_t hardware_exit_reason; } hw;
            struct kvm_run_fail_entry fail_entry;
            struct kvm_run_ex ex;
            struct kvm_run_io io;
            struct kvm_run_mmio mmio;
            struct kvm_run_internal internal;
            struct kvm_run_system_event system_event;
            char padding[256];
        };
    };
"""


def _load_ffi() -> Any:
    """The FFI for :data:`CDEF`, without parsing C at every start when possible.

    Parsing the declarations (pycparser) costs tens of milliseconds of every
    `appliance run`. cffi's out-of-line ABI mode serialises the parsed types
    into a small Python module; we generate it once into ``__pycache__`` (keyed
    by the declarations' checksum) and import that, with its bytecode written
    explicitly (PYTHONDONTWRITEBYTECODE would otherwise recompile it at every
    start). Where that directory is not writable, we parse in-line as before.
    """
    raw = CDEF.encode()
    digest = f"{zlib.crc32(raw):08x}{len(raw):08x}"
    cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__", f"kvm_abi_{digest}.py")
    try:
        if not os.path.exists(cache):
            import cffi

            builder = cffi.FFI()
            builder.cdef(CDEF)
            builder.set_source(f"kvm_abi_{digest}", None)
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp"
            with contextlib.redirect_stdout(io.StringIO()):   # cffi says "generating …"
                builder.emit_python_code(tmp)
            os.replace(tmp, cache)
        if not os.path.exists(importlib.util.cache_from_source(cache)):
            import py_compile

            py_compile.compile(cache, doraise=True)
    except Exception:
        if not os.path.exists(cache):
            import cffi

            inline = cffi.FFI()
            inline.cdef(CDEF)
            return inline
    spec = importlib.util.spec_from_file_location(f"appliance.kvm._kvm_abi_{digest}", cache)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi


ffi = _load_ffi()

# --- ioctl numbers (include/uapi/asm-generic/ioctl.h) --------------------------

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, ctype: str) -> int:
    return _ioc(_IOC_WRITE, nr, ffi.sizeof(ctype))


def _ior(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ffi.sizeof(ctype))


# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
KVM_SET_GSI_ROUTING = _iow(0x6A, "struct kvm_irq_routing")
KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
KVM_SIGNAL_MSI = _iow(0xA5, "struct kvm_msi")
# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")

# --- constants ---------------------------------------------------------------

KVM_API_VERSION = 12

# Capabilities (KVM_CHECK_EXTENSION).
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136

# Exit reasons (kvm_run.exit_reason).
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_PIT_SPEAKER_DUMMY = 1


def new(ctype: str, init: object = None) -> Any:
    """``ffi.new`` with the type spelled once (``new("struct kvm_regs *")``)."""
    return ffi.new(ctype, init)
