"""Boot the Linux kit in QEMU TCG and talk to its shell: the harness for tests
that put a real Linux guest in front of our devices (vhost-user) or measure
them with ``kitio``.

QEMU runs with the guest's first serial port on its stdin/stdout, so the
console is two pipes. A reader task appends everything QEMU prints to one
buffer; :meth:`TcgGuest.expect` searches it from a cursor that only moves
forward. Commands go through :meth:`TcgGuest.run`, which switches tty echo and
the prompt off first (busybox's ash then reads lines without echoing them),
sends each command base64-encoded to ``eval`` so any quoting or newlines
survive, and brackets its output with markers the command text itself cannot
contain (they are assembled by ``printf``).

Guest RAM is a shared memfd by default, which vhost-user back ends need.
``microvm,pcie=on`` boots faster than ``q35`` here (no SeaBIOS; ~2.1 s against
~2.5 s to the readiness line on an idle host) and still has a PCIe root for
``-device …-pci``; pass ``machine="q35"`` for the PC chipset. microvm has
neither HPET nor ACPI PM timer, so the kernel can only calibrate its TSC
against the PIT, and under TCG on a busy host that calibration fails and boot
hangs before init. TCG's guest TSC runs at the host's TSC rate, so we hand the
kernel that rate (``tsc_early_khz=``) and skip the calibration.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import secrets
import shutil
from pathlib import Path

from appliance.kit.build import KitPaths, build, paths
from appliance.kit.console import ConsoleProcess
from appliance.kit.errors import TcgCommandError, TcgError
from appliance.kit.initramfs import READY_LINE

QEMU = "qemu-system-x86_64"
DEFAULT_MACHINE = "microvm,pcie=on"
CHUNK = 2048  # base64 characters per console line


def host_tsc_khz() -> int | None:
    """The host CPU's clock in kHz from /proc/cpuinfo (TCG's TSC ticks at this rate)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return None


# Every emulated instruction costs, so boot work no test looks at is turned off: the boot-time
# self-tests of each crypto algorithm, the patching of speculation mitigations into the kernel's
# text (each patch throws away translated code), the LSMs and audit, and the timer IRQ and TSC
# checks. Measured over 5 paired boots on q35: 5.75 -> 5.23 s to the readiness line. The kernel
# itself is the kit's uncompressed vmlinux, entered through its PVH note (QEMU loads an ELF
# -kernel that has one), which saves decompressing the bzImage in TCG: 4.79 -> 4.13 s more.
FAST_BOOT = ("mitigations=off", "cryptomgr.notests", "security=none", "audit=0", "tsc=reliable",
             "no_timer_check")


class TcgGuest(ConsoleProcess):
    """A QEMU TCG VM running the Linux kit, driven through its serial console.

    ::

        async with TcgGuest(["-device", "virtio-rng-pci"]) as g:
            out = await g.run("cat /sys/class/misc/hw_random/rng_current")
            await g.poweroff()

    :param extra_args: more QEMU arguments (devices, chardevs, netdevs).
    :param memory_mb: guest RAM in MiB.
    :param smp: number of vCPUs.
    :param append: extra kernel command-line words (``appliance.action=…``,
        ``appliance.script=…`` or kernel options).
    :param shared_memory: back RAM with a shared memfd (needed by vhost-user).
    :param machine: QEMU ``-M`` value.
    :param boot_timeout: seconds to wait for ``APPLIANCE-KIT-READY``.
    :param wait_ready: wait for the readiness line on entry (turn off to watch
        the boot yourself with :meth:`expect`).
    :param console_log: also write everything the console prints to this file.
    :param kit: kit paths; the kit is built (if out of date) when omitted.
    :param qemu: the QEMU binary (default: ``qemu-system-x86_64`` on ``PATH``).
    :param firmware_dirs: directories QEMU searches for its BIOS and option
        ROMs (``-L``), for a QEMU unpacked outside ``/usr``.
    """

    def __init__(
        self,
        extra_args: list[str] | None = None,
        memory_mb: int = 512,
        smp: int = 1,
        append: str = "",
        shared_memory: bool = True,
        *,
        machine: str = DEFAULT_MACHINE,
        boot_timeout: float = 60.0,
        wait_ready: bool = True,
        console_log: Path | None = None,
        kit: KitPaths | None = None,
        qemu: str = QEMU,
        firmware_dirs: tuple[Path, ...] = (),
    ) -> None:
        super().__init__(console_log=console_log)
        self.extra_args = list(extra_args or [])
        self.memory_mb = memory_mb
        self.smp = smp
        self.append = append
        self.shared_memory = shared_memory
        self.machine = machine
        self.boot_timeout = boot_timeout
        self.wait_ready = wait_ready
        self.kit = kit
        self.qemu = qemu
        self.firmware_dirs = firmware_dirs
        self._counter = itertools.count(1)
        self._shell_ready = False

    # -- lifecycle ---------------------------------------------------------

    def qemu_argv(self, kit: KitPaths) -> list[str]:
        """The QEMU command line this guest runs."""
        words = ["console=ttyS0 quiet panic=-1", *FAST_BOOT]
        khz = host_tsc_khz() if self.machine.startswith("microvm") else None
        if khz:
            words.append(f"tsc_early_khz={khz}")
        cmdline = " ".join(w for w in (*words, self.append) if w)
        argv = [self.qemu, *(a for d in self.firmware_dirs for a in ("-L", str(d)))]
        argv += [
            "-accel", "tcg", "-M", self.machine, "-m", f"{self.memory_mb}M",
            "-smp", str(self.smp), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot",
            "-kernel", str(kit.vmlinux if kit.vmlinux.exists() else kit.bzimage),
            "-initrd", str(kit.initramfs), "-append", cmdline,
        ]
        if self.shared_memory:
            argv += [
                "-object", f"memory-backend-memfd,id=mem,size={self.memory_mb}M,share=on",
                "-machine", "memory-backend=mem",
            ]
        return argv + self.extra_args

    async def start(self) -> None:
        """Start QEMU (building the kit first if needed) and wait for readiness."""
        if shutil.which(self.qemu) is None:
            raise TcgError(f"{self.qemu} is not installed")
        kit = self.kit
        if kit is None:
            kit = paths()
            if not (kit.bzimage.exists() and kit.initramfs.exists()):
                kit = await asyncio.to_thread(build, guest=False)
        await self.spawn(self.qemu_argv(kit))
        if self.wait_ready:
            await self.expect(re.escape(READY_LINE), self.boot_timeout)

    async def poweroff(self, timeout: float = 90.0) -> int:
        """Power the guest off from its shell; returns QEMU's exit status (0 on success).

        It takes well under a second. ``kit-poweroff`` takes the network links down first
        (see :data:`appliance.kit.initramfs.KIT_POWEROFF`): a plain ``poweroff -f`` could hang
        for good in the guest's virtio_net. The long default is for a whole TCG guest stalled
        on a loaded host, which is not what a test is checking. (The CI run that raised it
        from 30 s, whose guest's RCU watchdog reported its kthread starved 21 s, may have
        been that hang: the hang's runs print the same report.)
        """
        await self.write("kit-poweroff\n")
        return await self.wait(timeout)

    # -- shell -------------------------------------------------------------

    async def _quiet_shell(self, timeout: float) -> None:
        # Without tty echo, busybox's line editor falls back to plain reads and
        # echoes nothing; with an empty prompt only command output is left.
        tag = f"Q{secrets.token_hex(4)}"
        await self.write(f"stty -echo; PS1=''; PS2=''; printf '@@%s@@\\n' {tag}\n")
        await self.expect(f"@@{tag}@@\n", timeout)
        self._shell_ready = True

    async def run(self, cmd: str, timeout: float = 30.0, check: bool = True) -> str:
        """Run a shell command in the guest and return its output.

        The command runs in the console shell itself (``cd`` and variables
        persist). Output is stdout and stderr as the console shows them, with
        one trailing newline removed.

        :raises TcgCommandError: When ``check`` and the command's status is not 0.
        :raises TcgTimeout: When it does not finish within ``timeout`` seconds.
        """
        if not self._shell_ready:
            await self._quiet_shell(timeout)
        tag = f"{next(self._counter)}x{secrets.token_hex(4)}"
        encoded = base64.b64encode(cmd.encode()).decode()
        # The tty takes at most 4095 characters per line in canonical mode, so a
        # long command travels in pieces collected in a shell variable.
        chunks = [encoded[i : i + CHUNK] for i in range(0, len(encoded), CHUNK)] or [""]
        lines = ["_kit_cmd="] + [f"_kit_cmd=\"${{_kit_cmd}}{c}\"" for c in chunks]
        await self.write("\n".join(lines) + "\n")
        await self.write(
            f"printf '@@%s@@\\n' S{tag}; eval \"$(echo \"$_kit_cmd\" | base64 -d)\" 2>&1; "
            f"printf '@@%s:%s@@\\n' E{tag} $?\n"
        )
        start = await self.expect(f"@@S{tag}@@\n", timeout)
        end = await self.expect(f"@@E{tag}:(\\d+)@@\n", timeout)
        output = self._buf[start.end() : end.start()].removesuffix("\n")
        status = int(end.group(1))
        if check and status != 0:
            raise TcgCommandError(
                f"guest command {cmd!r} exited with status {status}:\n{output[-3000:]}",
                status=status, output=output,
            )
        return output

