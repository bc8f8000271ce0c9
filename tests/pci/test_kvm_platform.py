"""The transport against a real KVM ``Vm``: ioeventfds, GSI routes and irqfds are accepted."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from appliance.kvm.memory import GuestMemory
from appliance.pci.bus import PciBus
from appliance.virtio.device import VIRTIO_F_VERSION_1
from appliance.virtio.pci import VirtioPciTransport
from appliance.virtio.rng import VirtioRng
from appliance.virtio.testing import WRITE
from tests.conftest import needs_kvm
from tests.pci.fakes import GuestPci
from tests.pci.virtio_driver import ModernDriver, lay_out_queue


@needs_kvm
async def test_rng_over_virtio_pci_on_a_kvm_vm_routes_msix_and_takes_doorbells() -> None:
    from appliance.kvm.vm import Vm

    vm = Vm()
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    try:
        vm.set_memory(mem)
        pci = PciBus(vm.mmio_bus)
        rng = VirtioRng()
        t = VirtioPciTransport(rng, mem=mem, platform=vm, loop=asyncio.get_running_loop())
        slot = pci.add(t).slot
        drv = ModernDriver(GuestPci(pci, vm), slot)  # type: ignore[arg-type]
        q = lay_out_queue(mem, 0x10000, 16)
        assert drv.negotiate(1 << VIRTIO_F_VERSION_1)
        drv.enable_msix([0, 1])
        drv.setup_queue(0, q, vector=1)
        drv.driver_ok()
        for _ in range(100):
            if t.active:
                break
            await asyncio.sleep(0.002)
        # The doorbell KVM would signal is registered at the notify address.
        assert any(addr == drv.notify_addr(0) for addr, *_ in vm._ioeventfds)
        assert t.msix is not None
        gsi = t.msix.gsi(1)
        assert gsi is not None and (gsi, t.msix.irqfd(1)) in vm._irqfds
        head = q.add_chain([(0x80000, 64, WRITE)])
        os.eventfd_write(t.doorbell_fd(0), 1)
        for _ in range(500):
            if q.pending():
                break
            await asyncio.sleep(0.002)
        assert q.used() == [(head, 64)]
        assert t.msix.delivered == 1
        t.close()
        assert not vm._ioeventfds and not vm._irqfds
        rng.close()
    finally:
        vm.close()
        mem.close()


@needs_kvm
async def test_guest_code_finds_the_device_over_cf8_and_rings_its_doorbell_without_an_exit(
    tmp_path: Path,
) -> None:
    """Real vCPU: config mechanism #1 from guest code, then a doorbell KVM turns into an eventfd."""
    from tests.kvm.guestcode import DONE_PORT, CodeVm, assemble

    slot = 1
    # Lay the device out before the code is assembled: the doorbell address is in it.
    probe = PciBus()
    probe_t = VirtioPciTransport(VirtioRng(), mem=GuestMemory(), platform=None,
                                 loop=asyncio.get_running_loop())
    probe.add(probe_t)
    notify = probe_t.config.bar_address(4) + 0x3000
    code = assemble(tmp_path, f"""
        mov ${1 << 31 | slot << 11:#x}, %eax
        mov $0xcf8, %dx
        out %eax, %dx
        mov $0xcfc, %dx
        in %dx, %eax
        mov %eax, 0x2000
        mov ${notify:#x}, %edi
        movw $0, (%edi)
        movw $0, (%edi)
        mov ${DONE_PORT}, %dx
        out %al, %dx
        jmp .
    """)
    cvm = CodeVm(code)
    try:
        pci = PciBus(cvm.vm.mmio_bus)
        cvm.vm.pio_bus.register(0xCF8, 8, pci)
        rng = VirtioRng()
        t = VirtioPciTransport(rng, mem=cvm.mem, platform=cvm.vm, loop=asyncio.get_running_loop())
        assert pci.add(t).slot == slot
        assert t.config.bar_address(4) + 0x3000 == notify
        drv = ModernDriver(GuestPci(pci, cvm.vm), slot)  # type: ignore[arg-type]
        q = lay_out_queue(cvm.mem, 0x20_0000, 16)
        assert drv.negotiate(1 << VIRTIO_F_VERSION_1)
        drv.enable_msix([0, 1])
        drv.setup_queue(0, q, vector=1)
        drv.driver_ok()
        head = q.add_chain([(0x30_0000, 32, WRITE)])

        await asyncio.to_thread(cvm.run)
        assert cvm.mem.read_u32(0x2000) == 0x1044 << 16 | 0x1AF4
        for _ in range(500):
            if q.pending():
                break
            await asyncio.sleep(0.002)
        assert q.used() == [(head, 32)]
        assert t.mmio_doorbells == 0  # both writes went through the ioeventfd
        assert t.msix is not None and t.msix.delivered >= 1
        t.close()
        rng.close()
    finally:
        cvm.close()
