"""A KVM virtual machine: memory slots, in-kernel irqchip and PIT, eventfds, buses.

:class:`Vm` owns the VM file descriptor and everything registered on it. The
in-kernel irqchip (PIC + IOAPIC + per-vCPU local APICs) and PIT are always
created: interrupts then never need a vCPU exit, and application processors
wait for INIT/SIPI inside KVM. Device notifications are ioeventfds, device
interrupts irqfds behind GSI routes; both are plain fds the asyncio loop owns.
The only Python on a vCPU thread is the :class:`~appliance.kvm.bus.Bus`
dispatch of PIO/MMIO exits.
"""

from __future__ import annotations

import os
import threading

from appliance.kvm import KvmError, layout
from appliance.kvm import ffi as k
from appliance.kvm.bus import Bus
from appliance.kvm.ffi import ffi
from appliance.kvm.irq import GsiRouting
from appliance.kvm.memory import GuestMemory
from appliance.kvm.system import Kvm, ioctl
from appliance.log import get_logger

log = get_logger(__name__)

# Three pages just below the BIOS area at the top of 4 GiB, where no RAM or
# MMIO of ours lives: KVM needs them for real-mode emulation on Intel hosts.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000


class Vm:
    """One KVM VM.

    :param kvm: an open /dev/kvm (a new one is opened when omitted, and closed
        with the VM).
    :raises KvmUnavailable: When /dev/kvm cannot be opened.
    :raises KvmError: When KVM refuses to create the VM or its irqchip.
    """

    def __init__(self, kvm: Kvm | None = None) -> None:
        self._own_kvm = kvm is None
        self.kvm = kvm if kvm is not None else Kvm()
        self.fd = -1
        self.mmio_bus = Bus("mmio")
        self.pio_bus = Bus("pio")
        self.memory: GuestMemory | None = None
        self._slots = 0
        self._routing = GsiRouting()
        self._routing_lock = threading.Lock()
        self._ioeventfds: set[tuple[int, int, int, int | None, bool]] = set()
        self._irqfds: set[tuple[int, int]] = set()
        try:
            self.fd = self.kvm.create_vm_fd()
            self._setup_platform()
        except BaseException:
            self.close()
            raise

    def _setup_platform(self) -> None:
        # Both calls fail harmlessly where the vendor module has no use for them
        # (AMD, PVM); Intel hosts need them before the first vCPU runs.
        for req, arg, name in (
            (k.KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR"),
            (k.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", IDENTITY_MAP_ADDR), "KVM_SET_IDENTITY_MAP_ADDR"),
        ):
            try:
                ioctl(self.fd, req, arg, name)
            except KvmError as err:
                log.debug("%s", err)
        ioctl(self.fd, k.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
        pit = ffi.new("struct kvm_pit_config *", {"flags": k.KVM_PIT_SPEAKER_DUMMY})
        ioctl(self.fd, k.KVM_CREATE_PIT2, pit, "KVM_CREATE_PIT2")
        self._submit_routing()

    # --- memory ---------------------------------------------------------------

    def set_memory(self, memory: GuestMemory) -> None:
        """Register every region of ``memory`` as a KVM memory slot."""
        for region in memory.regions:
            slot = ffi.new(
                "struct kvm_userspace_memory_region *",
                {
                    "slot": self._slots,
                    "flags": 0,
                    "guest_phys_addr": region.start,
                    "memory_size": region.size,
                    "userspace_addr": _host_address(region.buf),
                },
            )
            ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, slot, "KVM_SET_USER_MEMORY_REGION")
            self._slots += 1
        self.memory = memory

    # --- interrupts -----------------------------------------------------------

    def set_irq_line(self, irq: int, level: bool) -> None:
        """Drive GSI ``irq`` (0-23) high or low (KVM_IRQ_LINE); safe from any thread."""
        arg = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": 1 if level else 0})
        ioctl(self.fd, k.KVM_IRQ_LINE, arg, "KVM_IRQ_LINE")

    def allocate_gsi(self) -> int:
        """A free GSI for an MSI route, from ``layout.FIRST_MSI_GSI`` up."""
        return self._routing.allocate()

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        """Route ``gsi`` to the MSI message ``(address, data)`` and resubmit the table."""
        if self._routing.set_msi(gsi, address, data):
            self._submit_routing()

    def remove_route(self, gsi: int) -> None:
        """Drop the MSI route of ``gsi`` (the GSI stays allocated until released)."""
        if self._routing.remove(gsi):
            self._submit_routing()

    def release_gsi(self, gsi: int) -> None:
        self._routing.release(gsi)
        self._submit_routing()

    def _submit_routing(self) -> None:
        # The lock orders submissions: two threads changing routes must not
        # let an older table overwrite a newer one.
        with self._routing_lock:
            ioctl(self.fd, k.KVM_SET_GSI_ROUTING, self._routing.build(), "KVM_SET_GSI_ROUTING")

    def add_irqfd(self, gsi: int, fd: int) -> None:
        """Writing to eventfd ``fd`` injects ``gsi`` (KVM_IRQFD)."""
        arg = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi})
        ioctl(self.fd, k.KVM_IRQFD, arg, "KVM_IRQFD")
        self._irqfds.add((gsi, fd))

    def remove_irqfd(self, gsi: int, fd: int) -> None:
        arg = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": k.KVM_IRQFD_FLAG_DEASSIGN})
        ioctl(self.fd, k.KVM_IRQFD, arg, "KVM_IRQFD deassign")
        self._irqfds.discard((gsi, fd))

    def signal_msi(self, address: int, data: int) -> None:
        """Inject one MSI directly (KVM_SIGNAL_MSI), without a route."""
        arg = ffi.new(
            "struct kvm_msi *",
            {"address_lo": address & 0xFFFF_FFFF, "address_hi": address >> 32, "data": data},
        )
        ioctl(self.fd, k.KVM_SIGNAL_MSI, arg, "KVM_SIGNAL_MSI")

    # --- ioeventfds -----------------------------------------------------------

    def _ioeventfd(self, addr: int, length: int, fd: int, datamatch: int | None, pio: bool, flags: int) -> None:
        if length not in (0, 1, 2, 4, 8):
            raise KvmError(f"ioeventfd length {length} is not 0, 1, 2, 4 or 8")
        if datamatch is not None:
            flags |= k.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= k.KVM_IOEVENTFD_FLAG_PIO
        arg = ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags},
        )
        ioctl(self.fd, k.KVM_IOEVENTFD, arg, "KVM_IOEVENTFD")

    def add_ioeventfd(
        self, addr: int, length: int, fd: int, *, datamatch: int | None = None, pio: bool = False
    ) -> None:
        """Guest writes of ``length`` bytes at ``addr`` signal eventfd ``fd`` in-kernel.

        :param datamatch: only writes of this value signal (others exit as usual).
        :param pio: ``addr`` is an I/O port rather than an MMIO address.
        """
        self._ioeventfd(addr, length, fd, datamatch, pio, 0)
        self._ioeventfds.add((addr, length, fd, datamatch, pio))

    def remove_ioeventfd(
        self, addr: int, length: int, fd: int, *, datamatch: int | None = None, pio: bool = False
    ) -> None:
        self._ioeventfd(addr, length, fd, datamatch, pio, k.KVM_IOEVENTFD_FLAG_DEASSIGN)
        self._ioeventfds.discard((addr, length, fd, datamatch, pio))

    # --- vCPUs ----------------------------------------------------------------

    def create_vcpu_fd(self, index: int) -> int:
        return ioctl(self.fd, k.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")

    # --- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Close the VM fd (KVM drops slots, eventfd bindings and irqchip with it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._ioeventfds.clear()
        self._irqfds.clear()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PendingVm:
    """A :class:`Vm` being made on a helper thread, then given its guest RAM.

    KVM takes milliseconds to create the in-kernel irqchip and PIT and to add
    a memory slot (measured on PVM: ~4 ms each, waiting in the kernel with
    the GIL released), so a machine starts its VM as early as it can, and
    parses options, loads the kernel, builds ACPI tables or imports the rest
    of itself meanwhile. The irqchip and PIT need no RAM: they start at once;
    the slot is added when :meth:`give_memory` (or :meth:`allocate`) supplies
    the RAM. Guest RAM can be written while the slot is being added.

    :param kvm: an open /dev/kvm (not closed with the VM).
    :param memory: guest RAM to register, or ``None`` to give it later.
    """

    def __init__(self, kvm: Kvm, memory: GuestMemory | None = None) -> None:
        self.memory = memory
        self._given = threading.Event()
        if memory is not None:
            self._given.set()
        self._cancelled = False
        self._vm: Vm | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._make, args=(kvm,), name="vm setup", daemon=True)
        self._thread.start()

    @classmethod
    def allocate(cls, kvm: Kvm, mem_size: int) -> PendingVm:
        """Start a VM with ``mem_size`` bytes of guest RAM (see :meth:`allocate_memory`)."""
        pending = cls(kvm)
        try:
            pending.allocate_memory(mem_size)
        except BaseException:
            pending.cancel()
            raise
        return pending

    def allocate_memory(self, mem_size: int) -> GuestMemory:
        """Allocate ``mem_size`` bytes of guest RAM (laid out by :func:`layout.ram_ranges`) and give it.

        :raises KvmError: When the memory cannot be allocated.
        """
        try:
            memory = GuestMemory.anonymous(layout.ram_ranges(mem_size))
        except OSError as err:
            raise KvmError(f"cannot allocate {mem_size >> 20} MiB of guest memory") from err
        self.give_memory(memory)
        return memory

    def give_memory(self, memory: GuestMemory) -> None:
        """The guest RAM to register (once)."""
        if self._given.is_set():
            raise KvmError("the VM already has its memory")
        self.memory = memory
        self._given.set()

    def _make(self, kvm: Kvm) -> None:
        try:
            vm = Vm(kvm)
            try:
                self._given.wait()
                if not self._cancelled:
                    assert self.memory is not None
                    vm.set_memory(self.memory)
            except BaseException:
                vm.close()
                raise
            if self._cancelled:
                vm.close()
            else:
                self._vm = vm
        except BaseException as err:
            self._error = err

    def result(self) -> Vm:
        """The VM with its memory, once made (the caller owns it from here).

        :raises KvmError: What :class:`Vm` or :meth:`Vm.set_memory` raised.
        """
        if not self._given.is_set():
            raise KvmError("the VM was given no memory")
        self._thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        vm, self._vm = self._vm, None
        if vm is None:
            raise KvmError("the VM was already taken")
        return vm

    def cancel(self) -> None:
        """Stop waiting for memory, wait for the helper and close the VM if nobody took it."""
        self._cancelled = not self._given.is_set() or self._cancelled
        self._given.set()
        self._thread.join()
        self._error = None
        if self._vm is not None:
            self._vm.close()
            self._vm = None


def _host_address(buf: object) -> int:
    # The address KVM maps guest RAM from (cffi, so no ctypes import at start-up).
    ptr = ffi.from_buffer(buf)
    try:
        return int(ffi.cast("uintptr_t", ptr))
    finally:
        ffi.release(ptr)
