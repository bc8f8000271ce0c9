"""The cffi declarations match the kernel ABI (sizes, offsets, ioctl numbers from <linux/kvm.h>)."""

from __future__ import annotations

import pytest

from appliance.kvm import ffi as k
from appliance.kvm.ffi import ffi


@pytest.mark.parametrize(
    ("ctype", "size"),
    [
        ("struct kvm_regs", 144),
        ("struct kvm_sregs", 312),
        ("struct kvm_fpu", 416),
        ("struct kvm_segment", 24),
        ("struct kvm_userspace_memory_region", 32),
        ("struct kvm_cpuid_entry2", 40),
        ("struct kvm_irq_routing_entry", 48),
        ("struct kvm_irqfd", 32),
        ("struct kvm_ioeventfd", 64),
        ("struct kvm_pit_config", 64),
        ("struct kvm_lapic_state", 1024),
        ("struct kvm_msi", 32),
    ],
)
def test_struct_sizes_match_kernel(ctype: str, size: int) -> None:
    assert ffi.sizeof(ctype) == size


def test_kvm_run_union_starts_at_32() -> None:
    assert ffi.offsetof("struct kvm_run", "exit_reason") == 8
    assert ffi.offsetof("struct kvm_run", "io") == 32
    assert ffi.offsetof("struct kvm_run", "mmio") == 32


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (k.KVM_GET_API_VERSION, 0xAE00),
        (k.KVM_CREATE_VM, 0xAE01),
        (k.KVM_RUN, 0xAE80),
        (k.KVM_SET_USER_MEMORY_REGION, 0x4020AE46),
        (k.KVM_GET_REGS, 0x8090AE81),
        (k.KVM_SET_SREGS, 0x4138AE84),
        (k.KVM_GET_SUPPORTED_CPUID, 0xC008AE05),
        (k.KVM_SET_CPUID2, 0x4008AE90),
        (k.KVM_IRQFD, 0x4020AE76),
        (k.KVM_IOEVENTFD, 0x4040AE79),
        (k.KVM_SET_GSI_ROUTING, 0x4008AE6A),
        (k.KVM_CREATE_PIT2, 0x4040AE77),
        (k.KVM_IRQ_LINE, 0x4008AE61),
        (k.KVM_SET_MSRS, 0x4008AE89),
        (k.KVM_GET_LAPIC, 0x8400AE8E),
    ],
)
def test_ioctl_numbers_match_linux_headers(value: int, expected: int) -> None:
    assert value == expected
