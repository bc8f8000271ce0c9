"""A virtual machine as a Python object: start it, talk to its console, wait for it to end.

::

    async with Machine(MachineConfig(kernel=Path("guest.elf"), num_cpus=4)) as vm:
        await vm.console.expect(r"TESTGUEST-READY cpus=(\\d+)")
        vm.console.send("poweroff\\n")
        assert await vm.wait() == 0

The machine's runstate is a small table (``TRANSITIONS``). vCPU threads and
device callbacks report events with :meth:`Machine.post_event` from any
thread; the machine acts on them on its loop: power off ends it with status
0, a reset rebuilds the VM from its config (or ends it, with ``no_reboot``),
an error ends it with status 1. The host's own requests (the monitor's
``system_reset`` and ``quit``) go through :meth:`Machine.request`, which
waits until the machine has acted on them.

:meth:`Machine.boot_early` is the pre-loop phase `appliance run` uses: it
builds the VM and starts the vCPUs synchronously, before asyncio is even
imported, so the guest boots while the rest of the VMM loads. Until
:meth:`Machine.start` runs the loop, console output is written directly by
the vCPU threads (:meth:`Console.start_early`) and machine events are held;
``start`` then hands both over to the loop. This module therefore imports
asyncio only inside the methods that run on the loop.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Callable

from appliance.kvm.system import Kvm
from appliance.log import get_logger
from appliance.machine.config import MachineConfig
from appliance.machine.console import Console, make_backend

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    import asyncio
    from typing import Any

    from appliance.kvm.vm import PendingVm
    from appliance.machine.builder import Instance, MachineBuilder

    # (boot generation or None for "the current one", kind, detail, the host's
    # request waiting for it to be acted on)
    _Event = tuple[int | None, str, str, asyncio.Future[None] | None]

log = get_logger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1


async def _maybe_await(fn: Any) -> None:
    if fn is None:
        return
    result = fn()
    if hasattr(result, "__await__"):  # inspect.isawaitable, without importing inspect at start-up
        await result


class Runstate(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    REBOOTING = "rebooting"
    STOPPING = "stopping"
    STOPPED = "stopped"


TRANSITIONS: dict[Runstate, frozenset[Runstate]] = {
    # PAUSED straight from CREATED: -S, the vCPUs wait for the first "cont".
    Runstate.CREATED: frozenset({Runstate.RUNNING, Runstate.PAUSED, Runstate.STOPPED}),
    Runstate.RUNNING: frozenset({Runstate.PAUSED, Runstate.REBOOTING, Runstate.STOPPING}),
    Runstate.PAUSED: frozenset({Runstate.RUNNING, Runstate.REBOOTING, Runstate.STOPPING}),
    Runstate.REBOOTING: frozenset({Runstate.RUNNING, Runstate.PAUSED, Runstate.STOPPING}),
    Runstate.STOPPING: frozenset({Runstate.STOPPED}),
    Runstate.STOPPED: frozenset(),
}


_LIVE = frozenset({Runstate.RUNNING, Runstate.PAUSED, Runstate.REBOOTING})


def boots_early(config: MachineConfig) -> bool:
    """Whether a machine of ``config`` can boot before the loop: nothing in it needs the loop first.

    Device specs open on the loop and a socket console must listen or
    connect there, so those machines boot in :meth:`Machine.start`.
    """
    return (
        not config.devices
        and not config.start_paused
        and (config.serial is None or config.serial.backend != "socket")
    )


class Machine:
    """One VM built from ``config``.

    :param kvm: an open /dev/kvm to share (one is opened otherwise).
    """

    def __init__(self, config: MachineConfig, *, kvm: Kvm | None = None) -> None:
        self.config = config
        self._kvm = kvm
        self._own_kvm = kvm is None
        self.console = Console(make_backend(config.serial))
        self.console.on_quit = lambda: self.post_event("quit", "console escape")
        self.runstate = Runstate.CREATED
        # Paused since start (-S) and never resumed: QMP's "prelaunch".
        self.prelaunch = False
        self.boots = 0
        self.exit_code: int | None = None
        self.exit_reason = ""
        self._inst: Instance | None = None
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._generation = 0
        self._builder: MachineBuilder | None = None
        self._event_task: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[_Event] | None = None
        # The host request being acted on (request()), answered once it is done.
        self._request: asyncio.Future[None] | None = None
        # Serialises runstate changes: guest events, pause/resume (made by start()).
        self._lock: asyncio.Lock | None = None
        # Events posted before the loop runs (boot_early), and the lock that
        # makes "no loop yet: hold it" and the hand-over in start() atomic.
        # Re-entrant: a signal handler on the main thread may post.
        self._held: list[_Event] = []
        self._post_lock = threading.RLock()
        self._early = False
        # Set when the guest first waits on its console or posts an event (wait_for_guest).
        self._guest_waits = threading.Event()
        self.console.on_input_poll = self._guest_waits.set
        # Told on the loop what the machine is about to act on (the QMP
        # monitor turns it into events): (kind, detail) with kind one of
        # post_event's kinds, or "stop"/"resume" from pause()/resume().
        self.observers: list[Callable[[str, str], None]] = []

    # --- public API ---------------------------------------------------------------

    @property
    def instance(self) -> Instance | None:
        """The current boot's VM, memory, vCPUs and devices (None when not running)."""
        return self._inst

    def can_boot_early(self) -> bool:
        """Whether :meth:`boot_early` can run this machine (see :func:`boots_early`)."""
        return self.runstate is Runstate.CREATED and boots_early(self.config)

    def boot_early(self, pending: PendingVm | None = None) -> None:
        """Build the VM and start its vCPUs now, before any event loop exists.

        Console output is written straight to the backend meanwhile, and
        power events wait for :meth:`start`, which must follow (on the loop
        that will run the machine). On failure everything is undone.

        :param pending: a VM already being made for this machine's KVM (with
            or without its memory); this method owns it from here.
        :raises ConfigError: When the kernel is unusable or the console cannot open.
        :raises KvmError: When KVM cannot run this VM.
        """
        if not self.can_boot_early() or not self.console.start_early():
            if pending is not None:
                pending.cancel()
            raise RuntimeError("this machine needs the loop to boot (use start())")
        try:
            if self._kvm is None:
                self._kvm = Kvm()
            from appliance.kvm.vm import PendingVm

            # KVM makes the VM while the builder and the devices load.
            if pending is None:
                pending = PendingVm(self._kvm)
            if pending.memory is None:
                pending.allocate_memory(self.config.mem_size)
            self._builder = self._make_builder()
            self._set_state(Runstate.RUNNING)
            self._early = True
            self._boot(pending)
        except BaseException:
            if pending is not None and self._inst is None:
                pending.cancel()
            self.abandon()
            raise

    def wait_for_guest(self, timeout: float) -> bool:
        """After :meth:`boot_early`: block (without the GIL) until the guest waits on its console.

        Returns True once the guest polls the UART for input or posts a
        power event, False after ``timeout`` seconds. Until then the vCPU
        threads have the interpreter to themselves: each port exit a booting
        guest makes needs the GIL, and if the main thread were importing the
        loop meanwhile (~40 ms of bytecode here), every exit would wait for a
        GIL hand-off; measured with the test guest, its readiness line came
        ~25 ms later that way.
        """
        return self._guest_waits.wait(timeout)

    def abandon(self) -> None:
        """Tear down a machine :meth:`boot_early` started when :meth:`start` will not run."""
        inst, threads = self._inst, self._threads
        self._inst, self._threads = None, []
        if inst is not None:
            for vcpu in inst.vcpus:
                vcpu.kick()
            for t in threads:
                t.join(5.0)
            if not any(t.is_alive() for t in threads):
                inst.close()
        self.console.close_early()
        if self._own_kvm and self._kvm is not None:
            self._kvm.close()
            self._kvm = None
        self.runstate = Runstate.STOPPED

    async def start(self) -> None:
        """Open KVM, start the console backend, build the VM and run its vCPUs.

        After :meth:`boot_early`, only the loop's part remains: the console
        moves to the loop and events held meanwhile are acted on.

        :raises ConfigError: When the config or the kernel is unusable.
        :raises KvmError: When KVM cannot run this VM.
        """
        import asyncio

        paused = self.config.start_paused and not self._early
        if not self._early:
            self._set_state(Runstate.PAUSED if paused else Runstate.RUNNING)
            self.prelaunch = paused
        loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._done = asyncio.Event()
        self._events = asyncio.Queue()
        try:
            if not self._early:
                if self._kvm is None:
                    self._kvm = Kvm()
                self._builder = self._make_builder()
            await self.console.start(loop)
            self._open_loop(loop)
            for spec in self.config.devices:
                # Specs that drive the machine itself (the QMP monitor) get it before open().
                bind = getattr(spec, "bind_machine", None)
                if bind is not None:
                    bind(self)
            for spec in self.config.devices:
                await _maybe_await(getattr(spec, "open", None))
            if not self._early:
                # The monitor is already up: a "stop" or "cont" may have come
                # while devices opened, and the runstate holds its answer.
                self._boot(run=self.runstate is Runstate.RUNNING)
        except BaseException:
            self.runstate = Runstate.STOPPING
            self._open_loop(loop)
            await self._finish(EXIT_ERROR, "start failed")
            raise
        self._event_task = asyncio.ensure_future(self._event_loop())

    def _open_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        # From here post_event goes to the loop; what was held goes first.
        assert self._events is not None
        with self._post_lock:
            if self._loop is not None:
                return
            self._loop = loop
            held, self._held = self._held, []
        for event in held:
            self._events.put_nowait(event)

    async def wait(self) -> int:
        """Wait until the machine ends; returns its exit status (0 after power-off)."""
        assert self._done is not None, "start() first"
        await self._done.wait()
        assert self.exit_code is not None
        return self.exit_code

    async def stop(self) -> int:
        """Stop the VM now (as if its power cord was pulled); returns the exit status."""
        if self.runstate in _LIVE:
            self.post_event("quit", "stopped by host")
        if self._done is not None:
            await self._done.wait()
        if self._event_task is not None:
            import asyncio

            await asyncio.gather(self._event_task, return_exceptions=True)
        return self.exit_code if self.exit_code is not None else EXIT_OK

    async def pause(self) -> None:
        """Stop the vCPUs where they are (QMP ``stop``); devices and console stay up.

        Before the VM is built (its devices still opening) it will start paused.
        """
        assert self._lock is not None, "start() first"
        if self.runstate not in _LIVE:
            # Ending: the lock is held until the devices (the monitor too) are
            # closed, and the monitor waits for this command's reply.
            return
        async with self._lock:
            if self.runstate is not Runstate.RUNNING:
                return
            self._set_state(Runstate.PAUSED)
            await self._stop_threads()
            self._tell("stop", "")

    async def resume(self) -> None:
        """Let paused vCPUs run again (QMP ``cont``).

        Before the VM is built (``-S``, devices still opening) the vCPUs
        will start with it instead: the answer is never lost.
        """
        assert self._lock is not None, "start() first"
        if self.runstate not in _LIVE:
            return  # ending (see pause())
        async with self._lock:
            if self.runstate is not Runstate.PAUSED:
                return
            if self._inst is not None:
                for vcpu in self._inst.vcpus:
                    vcpu.rearm()
                self._start_threads(self._inst, self._generation)
            self._set_state(Runstate.RUNNING)
            self.prelaunch = False
            self._tell("resume", "")

    def reset(self) -> None:
        """Reset the guest as its reset button would.

        A running machine reboots running; a paused one is rebuilt and left
        in prelaunch, waiting for :meth:`resume` (QMP ``cont``), as QEMU's is.
        """
        self.post_event("reset", "reset by host")

    async def request(self, kind: str, detail: str) -> None:
        """Act on ``kind`` (as :meth:`post_event` takes it) for the host, and return once done.

        For the monitor's ``system_reset`` and ``quit``: QEMU's main loop acts
        on them before the command's reply goes out, so its RESET or SHUTDOWN
        event comes first, and a reset VM's new state is what the next
        command sees. Observers are told, and a reset has rebuilt the VM,
        when this returns; a request that ends the machine returns before
        the devices (the monitor among them) close. Call it on the loop.
        """
        import asyncio

        if self._events is None or self.runstate not in _LIVE:
            return  # not started, or ending: nothing to act on
        done = asyncio.get_running_loop().create_future()
        # Not tied to a boot: a reset the guest made meanwhile does not cancel the host's.
        self._events.put_nowait((None, kind, detail, done))
        await done

    def powerdown(self) -> None:
        """Press the ACPI power button; the guest decides what to do."""
        inst = self._inst
        if inst is not None:
            inst.pm.press_power_button()

    def post_event(self, kind: str, detail: str = "", generation: int | None = None) -> None:
        """Report ``poweroff``/``reset``/``shutdown``/``error``/``quit``; callable from any thread.

        Before :meth:`start` has the loop, events are held and delivered then.
        """
        gen = self._generation if generation is None else generation
        loop, events = self._loop, self._events
        if loop is None:
            with self._post_lock:
                if self._loop is None:
                    if self.runstate is not Runstate.STOPPED:
                        self._held.append((gen, kind, detail, None))
                    self._guest_waits.set()
                    return
                loop, events = self._loop, self._events
        if events is None:
            return
        try:
            loop.call_soon_threadsafe(events.put_nowait, (gen, kind, detail, None))
        except RuntimeError:
            pass  # loop closed

    async def __aenter__(self) -> Machine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- internals ---------------------------------------------------------------

    def _tell(self, kind: str, detail: str) -> None:
        for observer in list(self.observers):
            try:
                observer(kind, detail)
            except Exception:
                log.exception("machine observer failed")

    def _set_state(self, new: Runstate) -> None:
        if new not in TRANSITIONS[self.runstate]:
            raise RuntimeError(f"machine cannot go from {self.runstate.value} to {new.value}")
        self.runstate = new

    def _make_builder(self) -> MachineBuilder:
        from appliance.machine.builder import MachineBuilder

        assert self._kvm is not None
        return MachineBuilder(self.config, self._kvm, self.console, self.post_event)

    def _boot(self, pending: PendingVm | None = None, *, run: bool = True) -> None:
        assert self._builder is not None
        self._generation += 1
        gen = self._generation
        # Before the loop, what the guest does not need at once waits for start().
        inst = self._builder.build(pending, defer=pending is not None)
        self._inst = inst
        self.boots += 1
        if run:
            self._start_threads(inst, gen)
        else:
            self._threads = []

    def _start_threads(self, inst: Instance, gen: int) -> None:
        self._threads = []
        for vcpu in inst.vcpus:
            t = threading.Thread(
                target=self._vcpu_main, args=(inst, vcpu.index, gen), name=f"CPU {vcpu.index}/KVM", daemon=True
            )
            self._threads.append(t)
        for t in self._threads:
            t.start()

    def _vcpu_main(self, inst: Instance, index: int, gen: int) -> None:
        from appliance.kvm.vcpu import VcpuExit

        vcpu = inst.vcpus[index]
        try:
            result = vcpu.run(inst.vm.pio_bus, inst.vm.mmio_bus)
        except Exception as err:  # a bug of ours: end the machine, say why
            log.exception("vCPU %d crashed", index)
            result = VcpuExit("error", f"vCPU {index}: {err!r}")
        if result.kind != "stopped":
            self.post_event(result.kind, f"vCPU {index}: {result.detail}", gen)

    async def _event_loop(self) -> None:
        assert self._events is not None and self._lock is not None
        while self.runstate in _LIVE:
            gen, kind, detail, self._request = await self._events.get()
            try:
                async with self._lock:
                    await self._handle(gen, kind, detail)
            finally:
                self._answer_request()

    def _answer_request(self) -> None:
        """Let the host request being acted on (:meth:`request`) return."""
        done, self._request = self._request, None
        if done is not None and not done.done():
            done.set_result(None)

    async def _handle(self, gen: int | None, kind: str, detail: str) -> None:
        if self.runstate not in _LIVE:
            return
        if gen is not None and gen != self._generation and kind != "quit":
            return  # from a boot already torn down
        log.debug("machine event %s: %s", kind, detail)
        self._tell(kind, detail)
        if kind == "poweroff":
            await self._end(EXIT_OK, f"guest powered off ({detail})")
        elif kind in ("reset", "shutdown"):
            if self.config.no_reboot:
                await self._end(EXIT_OK, f"guest reset with -no-reboot ({detail})")
            else:
                await self._reboot(detail)
        elif kind == "quit":
            await self._end(EXIT_OK, detail)
        else:
            log.info("guest stopped: %s", detail)
            await self._end(EXIT_ERROR, detail)

    async def _reboot(self, detail: str) -> None:
        log.info("rebooting: %s", detail)
        # QEMU's main loop (main_loop_should_exit) leaves a VM that was not
        # running in prelaunch after a reset: paused or -S, it waits for "cont".
        paused = self.runstate is Runstate.PAUSED
        self._set_state(Runstate.REBOOTING)
        await self._teardown()
        try:
            self._boot(run=not paused)
        except Exception as err:
            log.error("reboot failed: %s", err)
            await self._end(EXIT_ERROR, f"reboot failed: {err}")
            return
        self.prelaunch = paused
        self._set_state(Runstate.PAUSED if paused else Runstate.RUNNING)

    async def _end(self, code: int, reason: str) -> None:
        self._set_state(Runstate.STOPPING)
        # A host request that ends the machine has been acted on: its monitor
        # command answers while the monitor closes.
        self._answer_request()
        await self._finish(code, reason)

    async def _finish(self, code: int, reason: str) -> None:
        # Before the monitor closes, so the commands waiting on them can answer.
        self._answer_queued_requests()
        await self._teardown()
        for spec in self.config.devices:
            try:
                await _maybe_await(getattr(spec, "close", None))
            except Exception:
                log.exception("closing device %r failed", spec)
        await self.console.close()
        if self._own_kvm and self._kvm is not None:
            self._kvm.close()
            self._kvm = None
        self.exit_code = code
        self.exit_reason = reason
        self.runstate = Runstate.STOPPED
        if self._done is not None:
            self._done.set()

    def _answer_queued_requests(self) -> None:
        """Host requests still queued when the machine ends have nothing left to act on."""
        events = self._events
        while events is not None and not events.empty():
            done = events.get_nowait()[3]
            if done is not None and not done.done():
                done.set_result(None)

    async def _stop_threads(self) -> bool:
        """Kick every vCPU out of KVM_RUN and wait for its thread; False if one hangs."""
        inst, threads = self._inst, self._threads
        self._threads = []
        if inst is None:
            return True
        for vcpu in inst.vcpus:
            vcpu.kick()
        import asyncio

        deadline = time.monotonic() + 5.0
        # Kicked threads leave within microseconds; polling spares a helper thread.
        while any(t.is_alive() for t in threads):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.0005)
        return True

    async def _teardown(self) -> None:
        stopped = await self._stop_threads()
        inst = self._inst
        self._inst = None
        self._generation += 1
        if inst is None:
            return
        if not stopped:
            log.error("a vCPU thread did not stop; leaking its VM")
            return
        # Output the guest wrote just before stopping is still pending.
        self.console.output  # noqa: B018  (flushes)
        inst.close()

    def __repr__(self) -> str:
        return f"<Machine {self.config.name or os.path.basename(self.config.kernel)} {self.runstate.value}>"

    def stats(self) -> dict[str, Any]:
        inst = self._inst
        return {
            "runstate": self.runstate.value,
            "boots": self.boots,
            "vcpu_exits": [v.exits for v in inst.vcpus] if inst else [],
        }
