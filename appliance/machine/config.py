"""What a machine is made of, as plain data: the CLI and the Python API both build these.

Each config carries its grammar (``SYNTAX``) and checks itself in
``validate()``, raising :class:`~appliance.errors.ConfigError` with one line
naming the bad value. Only the builder turns config into devices.
"""

from __future__ import annotations

import os

from appliance.errors import ConfigError
from appliance.kvm import layout

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    from typing import Any, ClassVar, Literal, Protocol

    # A path as open() takes it: the CLI passes str, Python callers often pathlib.Path.
    StrPath = str | os.PathLike[str]

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


class Record:
    """Equality and repr from ``__slots__``, as ``@dataclass`` would generate them.

    The config classes are written out by hand: importing dataclasses (and
    inspect with it) and generating each class cost `appliance run` ~10 ms
    before its vCPUs can start.
    """

    __slots__ = ()

    def _names(self) -> tuple[str, ...]:
        return self.__slots__

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, k) for k in self._names())

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    # Defining __eq__ leaves __hash__ None: unhashable unless a subclass is immutable.

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._names())
        return f"{type(self).__qualname__}({fields})"


class ChardevConfig(Record):
    """Host side of a character device (the serial console). Immutable.

    ``stdio``: this process's terminal (``mux``: Ctrl-A x quits, as with
    ``-nographic``; ``signal``: Ctrl-C stops the VMM). ``file``: output only.
    ``socket``: a unix (``path``) or TCP (``host``/``port``) socket, as a server
    (one client at a time; output is dropped while none is connected) or a client.
    ``null``: nothing. ``pty``: a new pseudo-terminal, its name printed at start
    (``screen /dev/pts/N``), as QEMU's ``-serial pty``.
    """

    SYNTAX: ClassVar[str] = (
        "stdio|null|pty|file,path=<path>|socket,path=<path>|socket,host=<host>,port=<port>"
        "[,server=on|off][,wait=on|off]"
    )
    __slots__ = ("backend", "id", "path", "host", "port", "server", "wait", "mux", "signal", "append",
                 "telnet")
    backend: Literal["stdio", "file", "socket", "null", "pty"]
    id: str
    path: StrPath | None
    host: str | None
    port: int | None
    server: bool
    wait: bool
    mux: bool
    signal: bool
    append: bool
    telnet: bool  # socket: speak telnet (RFC 854) to the client, as QEMU's telnet: chardevs

    def __init__(
        self,
        backend: Literal["stdio", "file", "socket", "null", "pty"],
        id: str = "",
        path: StrPath | None = None,
        host: str | None = None,
        port: int | None = None,
        server: bool = False,
        wait: bool = True,
        mux: bool = False,
        signal: bool = True,
        append: bool = False,
        telnet: bool = False,
    ) -> None:
        values = (backend, id, path, host, port, server, wait, mux, signal, append, telnet)
        for k, v in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field '{name}' (ChardevConfig is immutable)")

    def __hash__(self) -> int:
        return hash(self._values())

    def validate(self) -> None:
        # A socket's host may be empty, as in QEMU's tcp::PORT: a server listens on every
        # address, a client connects to localhost.
        if self.backend == "file" and self.path is None:
            raise ConfigError(f"chardev '{self.id or 'file'}': 'path' is missing")
        if self.backend == "socket":
            if self.path is None and (self.host is None or self.port is None):
                raise ConfigError(f"chardev '{self.id or 'socket'}': needs 'path' or 'host' and 'port'")
            if self.port is not None and not 0 <= self.port <= 65535:
                raise ConfigError(f"chardev '{self.id or 'socket'}': port {self.port} is out of range")


if TYPE_CHECKING:

    class DeviceSpec(Protocol):
        """A device to plug into the machine, contributed by another package (disk, NIC…).

        ``open()`` runs once when the machine starts (open backends, taps, files),
        ``attach()`` on every boot (a reset rebuilds the VM), ``close()`` once at
        the end. ``open``/``close`` may be coroutines or plain functions; any of
        the three may be omitted except ``attach``.
        """

        def attach(self, builder: MachineBuilder, inst: Instance) -> None: ...


class MachineConfig(Record):
    """A whole machine.

    :param kernel: PVH ELF, Linux bzImage or uncompressed vmlinux.
    :param serial: host side of COM1; ``None`` keeps the console to the
        Python API (:class:`~appliance.machine.console.Console`) only.
    :param devices: DeviceSpec objects.
    :param warnings: where to tell the user about things that are not errors (PVM warning).
    :param start_paused: build the machine but leave its vCPUs stopped until
        QMP ``cont`` (QEMU's ``-S``; the machine is in "prelaunch").
    :param rtc_localtime: the CMOS clock keeps the host's local time, not UTC.
    """

    __slots__ = (
        "kernel", "initrd", "cmdline", "mem_size", "num_cpus", "name", "serial", "no_reboot", "machine_type",
        "devices", "warnings", "start_paused", "rtc_localtime", "uuid", "topology",
    )
    kernel: StrPath
    initrd: StrPath | None
    cmdline: str
    mem_size: int
    num_cpus: int
    name: str
    serial: ChardevConfig | None
    no_reboot: bool
    machine_type: Literal["q35", "pc", "microvm"]
    devices: list[Any]
    warnings: list[str]
    start_paused: bool
    rtc_localtime: bool
    uuid: str  # -uuid, what query-uuid answers; QEMU's all-zero one when not given
    # -smp's (sockets, dies, cores, threads), as QEMU reports it (query-cpus-fast); None: one
    # socket of num_cpus cores, QEMU 7.2's default for a plain -smp N.
    topology: tuple[int, int, int, int] | None

    def __init__(
        self,
        kernel: StrPath,
        initrd: StrPath | None = None,
        cmdline: str = "",
        mem_size: int = DEFAULT_MEM,
        num_cpus: int = 1,
        name: str = "",
        serial: ChardevConfig | None = None,
        no_reboot: bool = False,
        machine_type: Literal["q35", "pc", "microvm"] = "q35",
        devices: list[Any] | None = None,
        warnings: list[str] | None = None,
        start_paused: bool = False,
        rtc_localtime: bool = False,
        uuid: str = "00000000-0000-0000-0000-000000000000",
        topology: tuple[int, int, int, int] | None = None,
    ) -> None:
        self.kernel = kernel
        self.initrd = initrd
        self.cmdline = cmdline
        self.mem_size = mem_size
        self.num_cpus = num_cpus
        self.name = name
        self.serial = serial
        self.no_reboot = no_reboot
        self.machine_type = machine_type
        self.devices = [] if devices is None else devices
        self.warnings = [] if warnings is None else warnings
        self.start_paused = start_paused
        self.rtc_localtime = rtc_localtime
        self.uuid = uuid
        self.topology = topology

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
            size = os.stat(self.initrd).st_size
            if size >= self.mem_size:
                raise ConfigError(
                    f"-initrd {self.initrd}: {size // layout.MiB} MiB does not fit in "
                    f"{self.mem_size // layout.MiB} MiB of guest memory"
                )
        if len(self.cmdline.encode()) >= layout.CMDLINE_MAX:
            raise ConfigError(f"-append: command line longer than {layout.CMDLINE_MAX - 1} bytes")
        if self.serial is not None:
            self.serial.validate()


def _check_file(path: StrPath, option: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{option} {path}: no such file")
    if not os.path.isfile(path):
        raise ConfigError(f"{option} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{option} {path}: permission denied")


def _size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
