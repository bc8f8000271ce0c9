"""Turns a :class:`MachineConfig` into a running VM: the one place that knows everything.

One :class:`Instance` is one boot: a fresh KVM VM, fresh guest RAM with the
ACPI tables and the kernel loaded, the platform devices on their ports, and
one :class:`~appliance.kvm.vcpu.Vcpu` per CPU. A reset throws the instance
away and builds a new one from the same config, which is exactly what a cold
boot sees. Adding a device is an ``attach_x()`` method here (STYLE.md, "Config
is data").

Machine-level events (power off, reset) come from device callbacks and vCPU
exits on vCPU threads; the builder hands them to ``post_event``, which the
machine makes thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from appliance.devices.acpi_pm import AcpiPm, ResetRegister
from appliance.devices.i8042 import I8042
from appliance.devices.rtc import Rtc
from appliance.devices.uart16550 import Uart16550
from appliance.kvm import layout
from appliance.kvm.boot import BootPlan, load_kernel
from appliance.kvm.memory import GuestMemory
from appliance.kvm.system import Kvm
from appliance.kvm.vcpu import Vcpu
from appliance.kvm.vm import PendingVm, Vm
from appliance.log import get_logger
from appliance.machine.config import MachineConfig

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    from typing import Any

    from appliance.kvm.bus import BusDevice
    from appliance.machine.console import Console

log = get_logger(__name__)

# (kind, detail): kind is "poweroff", "reset" or "error".
EventSink = Callable[[str, str], None]


class Instance:
    """Everything that lives for one boot of the machine."""

    def __init__(
        self, vm: Vm, memory: GuestMemory, vcpus: list[Vcpu], plan: BootPlan, uart: Uart16550, pm: AcpiPm,
        pci: Any = None,
    ) -> None:
        self.vm = vm
        self.memory = memory
        self.vcpus = vcpus
        self.plan = plan
        self.uart = uart
        self.pm = pm
        self.pci = pci
        self.closers: list[Callable[[], None]] = []

    def close(self) -> None:
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception:
                log.exception("closing a device failed")
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        try:
            self.memory.close()
        except BufferError:
            # A device still holds a view of guest RAM; the mapping goes with the
            # last reference instead.
            log.debug("guest memory still referenced at close")


class MachineBuilder:
    """Builds :class:`Instance` s for one config.

    :param post_event: thread-safe sink for power events.
    :param console: receives UART output and feeds UART input.
    """

    def __init__(self, config: MachineConfig, kvm: Kvm, console: Console, post_event: EventSink) -> None:
        self.config = config
        self.kvm = kvm
        self.console = console
        self.post_event = post_event

    def start_vm(self) -> PendingVm:
        """Allocate guest RAM and start making the KVM VM for it on a helper thread.

        :raises KvmError: When the memory cannot be allocated.
        """
        return PendingVm.allocate(self.kvm, self.config.mem_size)

    def build(self, pending: PendingVm | None = None, *, defer: bool = False) -> Instance:
        """A complete, not yet running VM with the kernel loaded into vCPU 0.

        :param pending: from :meth:`start_vm`, when the caller started it
            earlier; this method owns it from here, also on failure.
        :param defer: leave loading the PCI bus model (an empty bus: the host
            bridge) to the guest's first config-port access, so the vCPUs
            start sooner and a guest that never probes PCI never pays for it.
            Only for configs without devices (``inst.pci`` stays ``None``
            until then).
        :raises BootError: When the kernel or initrd cannot be loaded.
        :raises KvmError: When KVM refuses part of the set-up.
        """
        cfg = self.config
        if pending is None:
            pending = self.start_vm()
        elif pending.memory is None:
            try:
                pending.allocate_memory(cfg.mem_size)
            except BaseException:
                pending.cancel()
                raise
        memory = pending.memory
        assert memory is not None
        vm: Vm | None = None
        try:
            # Loading runs while KVM makes the VM.
            rsdp = self._build_acpi(memory)
            plan = load_kernel(
                memory,
                cfg.kernel,
                initrd=cfg.initrd,
                cmdline=cfg.cmdline,
                num_cpus=cfg.num_cpus,
                rsdp_addr=rsdp,
            )
            vm = pending.result()
            inst = self._attach_platform(vm, memory, plan)
            if defer and not cfg.devices:
                self.register_config_ports(inst, _DeferredPci(self, inst))
            else:
                self.attach_pci(inst)
            self.attach_devices(inst)
            for index in range(cfg.num_cpus):
                vcpu = Vcpu(vm, index)
                inst.vcpus.append(vcpu)
                vcpu.configure(cfg.num_cpus)
            inst.vcpus[0].apply_boot_plan(plan)
            return inst
        except BaseException:
            if vm is not None:
                vm.close()
            else:
                pending.cancel()
            memory.close()
            raise

    def _build_acpi(self, memory: GuestMemory) -> int:
        try:
            from appliance.kvm.acpi import build_acpi
        except ImportError:
            log.warning("ACPI tables are not available in this build; booting without them")
            return 0
        return build_acpi(memory, num_cpus=self.config.num_cpus, mem_size=self.config.mem_size)

    def _attach_platform(self, vm: Vm, memory: GuestMemory, plan: BootPlan) -> Instance:
        def irq_line(irq: int) -> Callable[[bool], None]:
            return lambda level: vm.set_irq_line(irq, level)

        uart = Uart16550(
            irq_line(layout.UART_COM1_IRQ),
            self.console.guest_output,
            self.console.rx_drained,
            self.console.input_polled,
        )
        vm.pio_bus.register(layout.UART_COM1, 8, uart)
        pm = AcpiPm(lambda: self.post_event("poweroff", "ACPI S5"), irq_line(layout.SCI_IRQ))
        vm.pio_bus.register(layout.PM_BASE, 12, pm)
        i8042 = I8042(lambda: self.post_event("reset", "i8042 reset line"))
        vm.pio_bus.register(layout.I8042_DATA, 1, i8042.data_port)
        vm.pio_bus.register(layout.I8042_CMD, 1, i8042.command_port)
        vm.pio_bus.register(layout.RTC_PORT, 2, Rtc(self.config.mem_size, localtime=self.config.rtc_localtime))
        inst = Instance(vm=vm, memory=memory, vcpus=[], plan=plan, uart=uart, pm=pm)
        self.console.attach_uart(uart)
        inst.closers.append(lambda: self.console.attach_uart(None))
        return inst

    def attach_pci(self, inst: Instance) -> None:
        """PCI bus 0 behind config mechanism #1 on 0xCF8-0xCFF (0xCF9 is the reset register).

        Devices are plugged into ``inst.pci`` (an :class:`appliance.pci.bus.PciBus`);
        their BARs register on ``inst.vm.mmio_bus`` themselves.
        """
        pci = self._make_pci(inst)
        if isinstance(pci, ResetRegister):
            inst.vm.pio_bus.register(layout.RESET_PORT, 1, pci)
        else:
            self.register_config_ports(inst, pci)

    def _make_pci(self, inst: Instance) -> Any:
        # The PciBus (set as inst.pci), or only the reset register in a build without PCI.
        reset = ResetRegister(lambda: self.post_event("reset", "reset register"))
        try:
            from appliance.pci.bus import PciBus
        except ImportError:
            return reset
        pci = PciBus(inst.vm.mmio_bus)
        pci.on_reset_port = lambda value: reset.write(0, bytes([value]))
        inst.pci = pci
        inst.closers.append(pci.close)
        return pci


    def attach_devices(self, inst: Instance) -> None:
        """Plug in every :class:`~appliance.machine.config.DeviceSpec` of the config."""
        for spec in self.config.devices:
            spec.attach(self, inst)

    @staticmethod
    def register_config_ports(inst: Instance, device: BusDevice) -> None:
        inst.vm.pio_bus.register(layout.PCI_CONFIG_ADDRESS, 8, device)


class _DeferredPci:
    """Ports 0xCF8-0xCFF of a bus whose model is loaded on the guest's first access.

    :meth:`load` runs on the vCPU thread that makes that access, under a lock
    (another vCPU waits for it), so every access sees the same bus; the first
    one costs its importing.
    """

    def __init__(self, builder: MachineBuilder, inst: Instance) -> None:
        self._builder = builder
        self._inst = inst
        self._lock = threading.Lock()
        self._target: Any = None

    def load(self) -> Any:
        with self._lock:
            if self._target is None:
                self._target = self._builder._make_pci(self._inst)
            return self._target

    def read(self, offset: int, size: int) -> bytes:
        target = self._target or self.load()
        if isinstance(target, ResetRegister):
            return b"\xff" * size
        return bytes(target.read(offset, size))

    def write(self, offset: int, data: bytes) -> None:
        target = self._target or self.load()
        if isinstance(target, ResetRegister):
            if offset == layout.RESET_PORT - layout.PCI_CONFIG_ADDRESS and len(data) == 1:
                target.write(0, data)
            return
        target.write(offset, data)
