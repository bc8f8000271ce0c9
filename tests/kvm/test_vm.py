"""Vm and Vcpu against the real /dev/kvm: exits reach the buses, eventfds bypass them."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.kvm import KvmError, layout
from appliance.kvm.system import Kvm, host_kind
from appliance.kvm.vcpu import cpuid_for
from appliance.kvm.vm import Vm
from tests.conftest import needs_kvm
from tests.kvm.guestcode import DONE_PORT, CodeVm, assemble

pytestmark = needs_kvm


class Recorder:
    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return (self.reply + bytes(8))[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


@pytest.fixture
def code_vm(tmp_path: Path) -> Iterator[object]:
    vms: list[CodeVm] = []

    def make(source: str, num_cpus: int = 1) -> CodeVm:
        vm = CodeVm(assemble(tmp_path, source + f"\n mov ${DONE_PORT}, %dx\n out %al, %dx\n jmp .\n"), num_cpus)
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        vm.close()


def test_kvm_reports_capabilities_and_cpuid() -> None:
    with Kvm() as kvm:
        assert kvm.vcpu_mmap_size >= 4096
        assert kvm.max_vcpus >= 1
        functions = {e.function for e in kvm.supported_cpuid}
        assert {0, 1}.issubset(functions)


def test_host_kind_is_pvm_or_hardware_here() -> None:
    assert host_kind() in ("pvm", "hardware")


def test_host_kind_reads_sysfs_and_cpuinfo(tmp_path: Path) -> None:
    (tmp_path / "mods" / "kvm_pvm").mkdir(parents=True)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 lm\n")
    assert host_kind(tmp_path / "mods", cpuinfo) == "pvm"
    cpuinfo.write_text("flags\t\t: fpu vmx lm\n")
    assert host_kind(tmp_path / "mods", cpuinfo) == "hardware"
    assert host_kind(tmp_path / "none", tmp_path / "missing") == "unknown"


def test_cpuid_gives_each_vcpu_its_apic_id_and_keeps_hypervisor_leaves() -> None:
    with Kvm() as kvm:
        supported = kvm.supported_cpuid
    for apic_id in (0, 3):
        table = cpuid_for(supported, apic_id, 4)
        leaf1 = next(e for e in table if e.function == 1)
        assert leaf1.ebx >> 24 == apic_id
        assert leaf1.ebx >> 16 & 0xFF == 4
        topo = [e for e in table if e.function == 0xB]
        if topo:
            assert [e.index for e in topo] == [0, 1, 2]
            assert all(e.edx == apic_id for e in topo)
            assert topo[1].ebx == 4
    hv = [e for e in supported if e.function >= 0x4000_0000]
    assert all(e in cpuid_for(supported, 1, 2) for e in hv)


def test_port_output_reaches_the_pio_bus(code_vm) -> None:  # type: ignore[no-untyped-def]
    vm = code_vm("mov $0x3f8, %dx\n mov $0x41, %al\n out %al, %dx\n mov $0x42, %al\n out %al, %dx")
    rec = Recorder()
    vm.vm.pio_bus.register(0x3F8, 8, rec)
    assert vm.run().kind == "stopped"
    assert rec.writes == [(0, b"A"), (0, b"B")]


def test_port_input_and_rep_outsb_use_device_values(code_vm) -> None:  # type: ignore[no-untyped-def]
    vm = code_vm(
        "mov $0x3f8, %dx\n in %dx, %al\n mov $0x2000, %edi\n mov %al, (%edi)\n movb $0x43, 1(%edi)\n"
        "mov %edi, %esi\n mov $2, %ecx\n mov $0x3f9, %dx\n rep outsb"
    )
    rec = Recorder(b"\x7a")
    vm.vm.pio_bus.register(0x3F8, 8, rec)
    vm.run()
    assert rec.reads == [(0, 1)]
    assert rec.writes == [(1, b"\x7a"), (1, b"C")]


def test_mmio_read_and_write_reach_the_mmio_bus(code_vm) -> None:  # type: ignore[no-untyped-def]
    vm = code_vm("mov $0xd0000000, %edi\n mov (%edi), %eax\n mov %eax, 8(%edi)")
    rec = Recorder(b"\x11\x22\x33\x44")
    vm.vm.mmio_bus.register(0xD000_0000, 0x1000, rec)
    vm.run()
    assert rec.reads == [(0, 4)]
    assert rec.writes == [(8, b"\x11\x22\x33\x44")]


def test_ioeventfd_takes_matching_writes_without_an_exit(code_vm) -> None:  # type: ignore[no-untyped-def]
    vm = code_vm(
        "mov $0xd0000000, %edi\n mov $5, %ecx\n1: movw $7, (%edi)\n loop 1b\n movw $9, (%edi)"
    )
    rec = Recorder()
    vm.vm.mmio_bus.register(0xD000_0000, 0x1000, rec)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.vm.add_ioeventfd(0xD000_0000, 2, efd, datamatch=7)
        vm.run()
        assert os.eventfd_read(efd) == 5
        assert rec.writes == [(0, b"\x09\x00")]   # the non-matching value still exits
        vm.vm.remove_ioeventfd(0xD000_0000, 2, efd, datamatch=7)
    finally:
        os.close(efd)


def test_pio_ioeventfd(code_vm) -> None:  # type: ignore[no-untyped-def]
    vm = code_vm("mov $0x510, %dx\n mov $1, %al\n out %al, %dx\n out %al, %dx")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.vm.add_ioeventfd(0x510, 1, efd, pio=True)
        vm.run()
        assert os.eventfd_read(efd) == 2
    finally:
        os.close(efd)


def test_guest_sees_the_hypervisor_signature_leaf(code_vm) -> None:  # type: ignore[no-untyped-def]
    vm = code_vm(
        "mov $0x40000000, %eax\n cpuid\n mov %ebx, %eax\n mov $0x3f8, %dx\n out %eax, %dx"
    )
    rec = Recorder()
    vm.vm.pio_bus.register(0x3F8, 8, rec)
    vm.run()
    with Kvm() as kvm:
        sig = next(e for e in kvm.supported_cpuid if e.function == 0x4000_0000)
    assert rec.writes == [(0, sig.ebx.to_bytes(4, "little"))]


def test_msi_routes_irqfds_and_irq_lines_are_accepted() -> None:
    with Vm() as vm:
        gsi = vm.allocate_gsi()
        assert gsi >= layout.FIRST_MSI_GSI
        vm.set_msi_route(gsi, 0xFEE0_0000, 0x30)
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            vm.add_irqfd(gsi, efd)
            os.eventfd_write(efd, 1)
            vm.remove_irqfd(gsi, efd)
        finally:
            os.close(efd)
        vm.remove_route(gsi)
        vm.set_irq_line(layout.UART_COM1_IRQ, True)
        vm.set_irq_line(layout.UART_COM1_IRQ, False)
        with pytest.raises(KvmError):
            vm.add_ioeventfd(0xD000_0000, 3, 0)


def test_kick_stops_an_ap_waiting_for_sipi(tmp_path: Path) -> None:
    vm = CodeVm(assemble(tmp_path, "jmp ."), num_cpus=2)
    try:
        ap = vm.vcpus[1]
        done = threading.Event()
        t = threading.Thread(target=lambda: (ap.run(vm.vm.pio_bus, vm.vm.mmio_bus), done.set()))
        t.start()
        time.sleep(0.1)
        assert not done.is_set()
        ap.kick()
        t.join(5)
        assert done.is_set()
    finally:
        vm.close()


def test_ap_starts_on_init_sipi_from_the_bsp_lapic(tmp_path: Path) -> None:
    """The BSP sends INIT and SIPI (vector 8) through its in-kernel LAPIC; the AP wakes
    in real mode at 0x8000 and writes to a port."""
    bsp = assemble(tmp_path, """
        mov $0xfee00000, %edi
        mov 0xf0(%edi), %eax
        or $0x100, %eax
        mov %eax, 0xf0(%edi)
        movl $0x01000000, 0x310(%edi)
        movl $0x00004500, 0x300(%edi)
        movl $0x01000000, 0x310(%edi)
        movl $0x00004608, 0x300(%edi)
        jmp .
    """)
    ap = assemble(tmp_path, ".code16\n mov $0x3f8, %dx\n mov $0x41, %al\n out %al, %dx\n jmp .")
    vm = CodeVm(bsp, num_cpus=2)
    vm.mem.write(0x8000, ap)
    rec = Recorder()
    vm.vm.pio_bus.register(0x3F8, 8, rec)
    threads = [threading.Thread(target=v.run, args=(vm.vm.pio_bus, vm.vm.mmio_bus)) for v in vm.vcpus]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while not rec.writes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rec.writes == [(0, b"A")]
    finally:
        for v in vm.vcpus:
            v.kick()
        for t in threads:
            t.join(5)
        vm.close()


def test_a_failing_device_does_not_stop_the_vcpu(code_vm) -> None:  # type: ignore[no-untyped-def]
    class Broken:
        def read(self, offset: int, size: int) -> bytes:
            raise RuntimeError("device bug")

        def write(self, offset: int, data: bytes) -> None:
            raise RuntimeError("device bug")

    vm = code_vm("mov $0x3f8, %dx\n mov $20, %ecx\n1: out %al, %dx\n in %dx, %al\n loop 1b")
    vm.vm.pio_bus.register(0x3F8, 8, Broken())
    assert vm.run().kind == "stopped"
    assert vm.vcpus[0].device_errors == 40
