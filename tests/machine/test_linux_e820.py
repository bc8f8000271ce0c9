"""Real Linux under our vCPUs, as far as PVM lets it run: its BIOS-e820 lines match our map.

Debian's uncompressed vmlinux is entered at its 64-bit entry with our
boot_params. Under PVM its CPL-0 code runs in KVM's instruction emulator; it
prints the e820 map (earlyprintk replays it) some seconds in, and later stops
on an instruction the emulator lacks, so the test stops the VM once the lines
are checked. On a hardware-virtualization host the same test passes quickly.
The lines take 12-20 s here; the timeouts leave room for a loaded machine.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from appliance.kit import paths
from appliance.kvm import layout
from appliance.kvm.boot.e820 import linux_e820_lines
from appliance.machine import MachineConfig
from appliance.machine.machine import Machine
from tests.conftest import needs_kvm

VMLINUX = paths().vmlinux
CMDLINE = "console=ttyS0 earlyprintk=serial noxsave clearcpuid=cx16"
MEM = 256 * layout.MiB

pytestmark = [
    needs_kvm,
    pytest.mark.slow,
    pytest.mark.skipif(not VMLINUX.exists(), reason="kit vmlinux not built (appliance kit build)"),
]


async def test_linux_prints_the_e820_map_we_built() -> None:
    async with Machine(MachineConfig(kernel=VMLINUX, mem_size=MEM, cmdline=CMDLINE)) as vm:
        await vm.console.expect("Linux version", timeout=150)
        await vm.console.expect("BIOS-provided physical RAM map", timeout=60)
        expected = linux_e820_lines(MEM)
        seen: list[str] = []
        for _ in expected:
            # Whole lines only: output arrives in pieces.
            m = await vm.console.expect(r"(BIOS-e820: [^\r\n]*)\r?\n", timeout=60)
            seen.append(m.group(1).strip())
        assert seen == expected
        # Nothing more than our map: the next line is not another e820 entry.
        nxt = await vm.console.expect(r"\[[^\]]*\] ([^\r\n]*)\r?\n", timeout=60)
        assert not re.match("BIOS-e820", nxt.group(1))
        assert await asyncio.wait_for(vm.stop(), 10) == 0
