"""The pre-loop boot (Machine.boot_early): output before and after the loop takes over, held events.

`appliance run` builds the VM and starts its vCPUs before asyncio is imported;
the console then writes straight to its backend from the vCPU thread until
Machine.start() hands over to the loop. Nothing may be lost, repeated or
reordered across that hand-over, and power events from before it must still
be acted on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from appliance.machine.config import ChardevConfig, MachineConfig
from appliance.machine.console import Console
from appliance.machine.machine import Machine, Runstate
from tests.conftest import needs_kvm
from tests.machine import chattyguest, tinyguest


class RecordingBackend:
    """A backend that can start before the loop, recording what it is given and when."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.threads: set[str] = set()
        self.started = False
        self.closed_sync = False

    def open_sync(self) -> object:
        return self.write

    def close_sync(self) -> None:
        self.closed_sync = True

    async def start(self, console: Console) -> None:
        self.started = True

    def write(self, data: bytes) -> None:
        self.data += data
        self.threads.add(threading.current_thread().name)

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def chatty_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not tinyguest.have_toolchain():
        pytest.skip("binutils missing")
    return chattyguest.build(tmp_path_factory.mktemp("chatty"))


def test_early_output_is_written_at_once_and_kept_for_expect() -> None:
    backend = RecordingBackend()
    console = Console(backend)  # type: ignore[arg-type]
    assert console.start_early()
    t = threading.Thread(target=console.guest_output, args=(b"before ",), name="vcpu")
    t.start()
    t.join()
    # No loop exists: the vCPU thread wrote it itself.
    assert bytes(backend.data) == b"before " and backend.threads == {"vcpu"}

    async def after() -> None:
        await console.start()
        console.guest_output(b"after\n")
        assert bytes(backend.data) == b"before ", "after the hand-over, output goes through the loop"
        m = await console.expect(r"before after\n", timeout=5)
        assert m.start() == 0

    asyncio.run(after())
    assert bytes(backend.data) == b"before after\n"
    assert console.output == "before after\n"


def test_a_socket_console_cannot_start_before_the_loop(tmp_path: Path) -> None:
    cfg = MachineConfig(kernel=tmp_path / "k", serial=ChardevConfig("socket", path=tmp_path / "s", server=True))
    assert not Machine(cfg).can_boot_early()
    assert not Machine(MachineConfig(kernel=tmp_path / "k", devices=[object()])).can_boot_early()
    assert Machine(MachineConfig(kernel=tmp_path / "k", serial=ChardevConfig("null"))).can_boot_early()


@needs_kvm
def test_output_spanning_the_hand_over_is_complete_and_in_order(chatty_elf: Path) -> None:
    backend = RecordingBackend()
    machine = Machine(MachineConfig(kernel=chatty_elf))
    machine.console = Console(backend)  # type: ignore[arg-type]
    machine.boot_early()
    deadline = time.monotonic() + 30
    while not backend.data:  # some output has gone out before any loop exists
        assert time.monotonic() < deadline, "no output before the loop"
        time.sleep(0.001)
    before = len(backend.data)

    async def run() -> int:
        await machine.start()
        await machine.console.expect("DONE\n", timeout=60)
        machine.console.send("q")
        return await machine.wait()

    assert asyncio.run(run()) == 0
    expected = chattyguest.expected()
    assert bytes(backend.data) == expected
    assert machine.console.output.encode() == expected
    assert before > 0 and backend.started


@needs_kvm
def test_events_before_the_loop_are_held_until_start(chatty_elf: Path) -> None:
    machine = Machine(MachineConfig(kernel=chatty_elf, serial=ChardevConfig("null")))
    machine.boot_early()
    machine.post_event("quit", "signal before the loop")

    async def run() -> int:
        await machine.start()
        return await machine.wait()

    assert asyncio.run(run()) == 0
    assert machine.exit_reason == "signal before the loop"
    assert machine.runstate is Runstate.STOPPED


@needs_kvm
def test_abandon_undoes_boot_early(chatty_elf: Path) -> None:
    backend = RecordingBackend()
    machine = Machine(MachineConfig(kernel=chatty_elf))
    machine.console = Console(backend)  # type: ignore[arg-type]
    machine.boot_early()
    assert machine.instance is not None
    machine.abandon()
    assert machine.instance is None and backend.closed_sync
    assert machine.runstate is Runstate.STOPPED


@needs_kvm
def test_deferred_pci_bus_is_there_from_the_guests_first_access(chatty_elf: Path) -> None:
    machine = Machine(MachineConfig(kernel=chatty_elf, serial=ChardevConfig("null")))
    machine.boot_early()
    inst = machine.instance
    assert inst is not None and inst.pci is None  # not loaded yet
    got: list[bytes] = []

    def vcpu_probe() -> None:
        # What a guest does first: select 00.0 register 0 and read vendor/device.
        inst.vm.pio_bus.write(0xCF8, (1 << 31).to_bytes(4, "little"))
        got.append(inst.vm.pio_bus.read(0xCFC, 4))

    t = threading.Thread(target=vcpu_probe)
    t.start()
    t.join()
    assert int.from_bytes(got[0], "little") & 0xFFFF == 0x8086
    bus = inst.pci
    assert bus is not None

    async def run() -> int:
        await machine.start()
        assert inst.pci is bus, "start() must not make a second bus"
        machine.post_event("quit", "done")
        return await machine.wait()

    assert asyncio.run(run()) == 0


@needs_kvm
def test_the_deferred_pci_bus_waits_for_the_guest(chatty_elf: Path) -> None:
    machine = Machine(MachineConfig(kernel=chatty_elf, serial=ChardevConfig("null")))
    machine.boot_early()

    async def run() -> int:
        await machine.start()
        # The chatty guest never touches PCI: nothing was loaded for it.
        assert machine.instance is not None and machine.instance.pci is None
        machine.post_event("quit", "done")
        return await machine.wait()

    assert asyncio.run(run()) == 0
