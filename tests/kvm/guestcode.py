"""Run a few 32-bit instructions on vCPU 0 of a real VM (assembled with ``as`` at test time)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from appliance.kvm import layout
from appliance.kvm.boot.plan import BootPlan, Segment
from appliance.kvm.memory import GuestMemory
from appliance.kvm.vcpu import Vcpu, VcpuExit
from appliance.kvm.vm import Vm

CODE_ADDR = 0x100000
DONE_PORT = 0xF4


def assemble(tmp: Path, source: str) -> bytes:
    src, obj, out = tmp / "c.S", tmp / "c.o", tmp / "c.bin"
    src.write_text("    .code32\n" + source + "\n")
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out)], check=True)
    return out.read_bytes()


def flat32_plan(entry: int) -> BootPlan:
    """Flat 32-bit protected mode, paging off: what PVH entry looks like."""
    return BootPlan(
        kind="pvh", rip=entry, rsp=0x8000, rsi=0, rbx=0, rflags=0x2, cr0=0x11, cr3=0, cr4=0, efer=0,
        cs=Segment(selector=0x8, type=0xB, db=1), ds=Segment(selector=0x10, type=0x3, db=1),
        tr=Segment(selector=0x18, type=0xB, s=0, g=0, limit=0x67), gdt_base=0x500, gdt_limit=0x1F,
    )


class Done:
    """Port DONE_PORT: the guest writes here to end the run."""

    def __init__(self) -> None:
        self.vcpu: Vcpu | None = None
        self.values: list[bytes] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.values.append(bytes(data))
        assert self.vcpu is not None
        self.vcpu.kick()


class CodeVm:
    """A 16 MiB VM with one vCPU, code at 1 MiB."""

    def __init__(self, code: bytes, num_cpus: int = 1) -> None:
        self.mem = GuestMemory.anonymous(layout.ram_ranges(16 * layout.MiB))
        self.mem.write(CODE_ADDR, code)
        self.vm = Vm()
        self.vm.set_memory(self.mem)
        self.done = Done()
        self.vm.pio_bus.register(DONE_PORT, 1, self.done)
        self.vcpus = [Vcpu(self.vm, i) for i in range(num_cpus)]
        for v in self.vcpus:
            v.configure(num_cpus)
        self.vcpus[0].apply_boot_plan(flat32_plan(CODE_ADDR))
        self.done.vcpu = self.vcpus[0]

    def run(self, timeout: float = 10.0) -> VcpuExit:
        result: list[VcpuExit] = []
        t = threading.Thread(target=lambda: result.append(self.vcpus[0].run(self.vm.pio_bus, self.vm.mmio_bus)))
        t.start()
        t.join(timeout)
        if t.is_alive():
            self.vcpus[0].kick()
            t.join(5)
            raise AssertionError("guest code did not finish")
        return result[0]

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vm.close()
        self.mem.close()
