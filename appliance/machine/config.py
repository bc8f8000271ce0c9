"""What a machine is made of, as plain data: the CLI and the Python API both build these.

Each config carries its grammar (``SYNTAX``) and checks itself in
``validate()``, raising :class:`~appliance.errors.ConfigError` with one line
naming the bad value. Only the builder turns config into devices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from appliance.errors import ConfigError
from appliance.kvm import layout

if TYPE_CHECKING:
    from appliance.machine.builder import Instance, MachineBuilder

MIN_MEM = 2 * layout.MiB
DEFAULT_MEM = 128 * layout.MiB
MAX_CPUS = 254  # xAPIC ids are 8 bits, 0xFF is broadcast; the MADT lists one local APIC per vCPU


def host_memory() -> int:
    """MemTotal of this host, in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True, slots=True)
class ChardevConfig:
    """Host side of a character device (the serial console).

    ``stdio``: this process's terminal (``mux``: Ctrl-A x quits, as with
    ``-nographic``; ``signal``: Ctrl-C stops the VMM). ``file``: output only.
    ``socket``: a unix (``path``) or TCP (``host``/``port``) socket, as a server
    (one client at a time; output is dropped while none is connected) or a client.
    ``null``: nothing.
    """

    SYNTAX: ClassVar[str] = (
        "stdio|null|file,path=<path>|socket,path=<path>|socket,host=<host>,port=<port>"
        "[,server=on|off][,wait=on|off]"
    )
    backend: Literal["stdio", "file", "socket", "null"]
    id: str = ""
    path: Path | None = None
    host: str | None = None
    port: int | None = None
    server: bool = False
    wait: bool = True
    mux: bool = False
    signal: bool = True
    append: bool = False

    def validate(self) -> None:
        if self.backend == "file" and self.path is None:
            raise ConfigError(f"chardev '{self.id or 'file'}': 'path' is missing")
        if self.backend == "socket":
            if self.path is None and (self.host is None or self.port is None):
                raise ConfigError(f"chardev '{self.id or 'socket'}': needs 'path' or 'host' and 'port'")
            if self.port is not None and not 0 <= self.port <= 65535:
                raise ConfigError(f"chardev '{self.id or 'socket'}': port {self.port} is out of range")


@runtime_checkable
class DeviceSpec(Protocol):
    """A device to plug into the machine, contributed by another package (disk, NIC…).

    ``open()`` runs once when the machine starts (open backends, taps, files),
    ``attach()`` on every boot (a reset rebuilds the VM), ``close()`` once at
    the end. ``open``/``close`` may be coroutines or plain functions; any of
    the three may be omitted except ``attach``.
    """

    def attach(self, builder: MachineBuilder, inst: Instance) -> None: ...


@dataclass(slots=True)
class MachineConfig:
    """A whole machine.

    :param kernel: PVH ELF, Linux bzImage or uncompressed vmlinux.
    :param serial: host side of COM1; ``None`` keeps the console to the
        Python API (:class:`~appliance.machine.console.Console`) only.
    """

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    mem_size: int = DEFAULT_MEM
    num_cpus: int = 1
    name: str = ""
    serial: ChardevConfig | None = None
    no_reboot: bool = False
    machine_type: Literal["q35", "pc", "microvm"] = "q35"
    devices: list[Any] = field(default_factory=list)   # DeviceSpec objects
    # Where to tell the user about things that are not errors (PVM warning).
    warnings: list[str] = field(default_factory=list)

    def validate(self, *, max_cpus: int = MAX_CPUS, host_mem: int | None = None) -> None:
        """Check everything that can be checked before touching /dev/kvm.

        :raises ConfigError: When a value is out of range or a file is missing.
        """
        if self.mem_size < MIN_MEM:
            raise ConfigError(
                f"-m {self.mem_size // layout.MiB}M: guest memory must be at least {MIN_MEM // layout.MiB} MiB"
            )
        limit = host_memory() if host_mem is None else host_mem
        if limit and self.mem_size > limit:
            raise ConfigError(
                f"-m {_size(self.mem_size)}: more than this host's {limit // layout.MiB} MiB of memory"
            )
        if not 1 <= self.num_cpus <= min(max_cpus, MAX_CPUS):
            raise ConfigError(f"-smp {self.num_cpus}: must be between 1 and {min(max_cpus, MAX_CPUS)}")
        _check_file(self.kernel, "-kernel")
        if self.initrd is not None:
            _check_file(self.initrd, "-initrd")
            size = self.initrd.stat().st_size
            if size >= self.mem_size:
                raise ConfigError(
                    f"-initrd {self.initrd}: {size // layout.MiB} MiB does not fit in "
                    f"{self.mem_size // layout.MiB} MiB of guest memory"
                )
        if len(self.cmdline.encode()) >= layout.CMDLINE_MAX:
            raise ConfigError(f"-append: command line longer than {layout.CMDLINE_MAX - 1} bytes")
        if self.serial is not None:
            self.serial.validate()


def _check_file(path: Path, option: str) -> None:
    if not path.exists():
        raise ConfigError(f"{option} {path}: no such file")
    if not path.is_file():
        raise ConfigError(f"{option} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{option} {path}: permission denied")


def _size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
