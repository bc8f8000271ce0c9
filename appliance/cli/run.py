"""`appliance run`: boot a VM from a qemu-kvm style command line.

Options are a table (:data:`OPTIONS`): each entry knows whether it takes an
argument and how to apply it to a :class:`RunArgs`. Anything not in the table
is refused by name, as is any sub-option an entry does not consume, so
nothing is ever silently ignored. Other packages add options with
:func:`option` from a module listed in :data:`OPTION_MODULES`.

Exit status: 0 after the guest powers off (or resets with ``-no-reboot``, or
the user quits), 1 when the VM fails, 2 for bad options.

Start-up order matters for boot time: the command line is read and the VM is
built and running (:meth:`Machine.boot_early`) before asyncio and the rest of
the VMM are imported, so the guest boots while they load.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable

from appliance.bootpath import NamedTuple
from appliance.cli.options import parse_option, parse_size
from appliance.errors import ApplianceError, ConfigError, HelpRequested
from appliance.kvm import layout
from appliance.log import apply as apply_logging
from appliance.log import configure as configure_logging
from appliance.log import get_logger
from appliance.machine.config import MIN_MEM, ChardevConfig, MachineConfig

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    from appliance.kvm.vm import PendingVm
    from appliance.machine.machine import Machine

log = get_logger(__name__)

PROG = "appliance run"
# Everything is closed when main() returns (see appliance.cli.main._exit_now).
EXIT_WITHOUT_TEARDOWN = True


class RunArgs:
    """Options gathered from the command line, before they become a :class:`MachineConfig`.

    Options registered by other packages keep their raw values in ``extra``,
    and put the devices they make (DeviceSpec objects) in ``devices``.
    """

    def __init__(self) -> None:
        self.kernel: str | None = None
        self.initrd: str | None = None
        self.append = ""
        self.mem_size = 128 * layout.MiB
        self.num_cpus = 1
        self.topology: tuple[int, int, int, int] | None = None
        self.name = ""
        self.uuid = "00000000-0000-0000-0000-000000000000"
        self.serials: list[str] = []
        self.chardevs: dict[str, ChardevConfig] = {}
        self.nographic = False
        self.monitor_given = False  # -monitor, -qmp or -mon: -nographic then muxes no monitor in
        self.no_reboot = False
        self.nodefaults = False
        self.start_paused = False
        self.rtc_localtime = False
        self.pidfile: str | None = None
        self.machine_type = "q35"
        self.verbose = 0
        self.extra: dict[str, list[str]] = {}
        self.devices: list[object] = []

    def __repr__(self) -> str:
        return f"RunArgs({vars(self)!r})"


class RunOption(NamedTuple):
    name: str
    metavar: str | None       # None: a flag without argument
    help: str
    apply: Callable[[RunArgs, str], None]


OPTIONS: dict[str, RunOption] = {}
OPTION_MODULES: tuple[str, ...] = ("appliance.cli.run_devices", "appliance.cli.run_qmp")
# Called by to_config() once the whole line is read: options whose values
# refer to each other (-device drive=, netdev=) are resolved there.
FINALIZERS: list[Callable[[RunArgs], None]] = []


Applier = Callable[[RunArgs, str], None]


def option(name: str, metavar: str | None, help: str) -> Callable[[Applier], Applier]:
    """Register ``-name`` for `appliance run`."""

    def deco(fn: Applier) -> Applier:
        OPTIONS[name] = RunOption(name, metavar, help, fn)
        return fn

    return deco


# --- the options -------------------------------------------------------------------


@option("-kernel", "bzImage|vmlinux|pvh.elf", "kernel to boot (Linux bzImage, ELF vmlinux or PVH ELF)")
def _kernel(a: RunArgs, v: str) -> None:
    a.kernel = v


@option("-initrd", "file", "initial ram disk")
def _initrd(a: RunArgs, v: str) -> None:
    a.initrd = v


@option("-append", "cmdline", "kernel command line")
def _append(a: RunArgs, v: str) -> None:
    a.append = v


@option("-m", "[size=]megs[M|G]", "guest RAM (default 128M; a bare number is MiB)")
def _mem(a: RunArgs, v: str) -> None:
    opts = parse_option("-m", v, implied="size")
    size = opts.require("size")
    opts.finish()
    a.mem_size = parse_size(size, "-m", default_suffix="M")
    if a.mem_size < MIN_MEM:
        raise ConfigError(f"-m {size}: guest memory must be at least {MIN_MEM >> 20} MiB")


@option("-smp", "[cpus=]n[,cores=,threads=,sockets=,maxcpus=]", "number of vCPUs and their topology")
def _smp(a: RunArgs, v: str) -> None:
    opts = parse_option("-smp", v, implied="cpus")
    for key in opts:
        if key not in ("cpus", "maxcpus", "sockets", "dies", "clusters", "cores", "threads"):
            # SMPConfiguration's members (qapi/machine.json): QEMU's visitor words.
            raise ConfigError(f"-smp: Parameter 'smp.{key}' is unexpected")
    cpus = opts.take_int("cpus", minimum=1)
    maxcpus = opts.take_int("maxcpus", minimum=1)
    sockets, dies, clusters, cores, threads = (
        opts.take_int(k, minimum=1) for k in ("sockets", "dies", "clusters", "cores", "threads"))
    opts.finish()
    if clusters not in (None, 1):
        raise ConfigError(f"-smp {v}: clusters not supported by this machine's CPU topology")
    dies = dies or 1
    # The values left out follow from the others as in QEMU 7.2 (hw/core/machine-smp.c, machine
    # types from 6.2 on: cores before sockets, threads last).
    if cpus is None and maxcpus is None:
        sockets, cores, threads = sockets or 1, cores or 1, threads or 1
    else:
        maxcpus = maxcpus or cpus or 1
        if cores is None:
            sockets, threads = sockets or 1, threads or 1
            cores = maxcpus // (sockets * dies * threads)
        elif sockets is None:
            threads = threads or 1
            sockets = maxcpus // (dies * cores * threads)
        if threads is None:
            threads = maxcpus // (sockets * dies * cores)
    product = sockets * dies * cores * threads
    maxcpus = maxcpus or product
    cpus = cpus or maxcpus
    topology = f"sockets ({sockets}) * dies ({dies}) * cores ({cores}) * threads ({threads})"
    if product != maxcpus:
        raise ConfigError(f"-smp {v}: Invalid CPU topology: product of the hierarchy must match maxcpus: "
                          f"{topology} != maxcpus ({maxcpus})")
    if maxcpus < cpus:
        raise ConfigError(f"-smp {v}: Invalid CPU topology: maxcpus must be equal to or greater than smp: "
                          f"{topology} == maxcpus ({maxcpus}) < smp_cpus ({cpus})")
    if maxcpus != cpus:
        raise ConfigError(f"-smp {v}: maxcpus other than cpus (CPU hotplug) is not supported")
    a.num_cpus = cpus
    a.topology = (sockets, dies, cores, threads)


@option("-name", "[guest=]name[,debug-threads=on|off]", "VM name (vCPU threads are always named)")
def _name(a: RunArgs, v: str) -> None:
    opts = parse_option("-name", v, implied="guest")
    a.name = opts.take("guest", "") or ""
    opts.take_bool("debug-threads")
    opts.finish()


@option(
    "-serial",
    "stdio|mon:stdio|file:path|unix:path[,server=on,wait=off]|tcp:host:port[,...]|telnet:host:port[,...]"
    "|chardev:id|null|none",
    "COM1's host side (mon:stdio: the terminal, shared with the human monitor as with -nographic)",
)
def _serial(a: RunArgs, v: str) -> None:
    a.serials.append(v)


@option("-chardev", "socket|stdio|file|null|pty,id=id[,...]", "a character device for -serial chardev:id")
def _chardev(a: RunArgs, v: str) -> None:
    opts = parse_option("-chardev", v, implied="backend",
                        flags=("server", "wait", "signal", "mux", "append", "telnet", "nodelay"))
    backend = opts.require("backend")
    cid = opts.take("id")
    if cid is None:
        raise ConfigError("-chardev: chardev: no id specified")
    if cid in a.chardevs:
        raise ConfigError(f"-chardev: Duplicate ID '{cid}' for chardev")
    if backend == "socket":
        opts.take_bool("nodelay")
        cfg = _socket_chardev(opts, cid, path=opts.take("path"), host=opts.take("host"), port=opts.take("port"))
    elif backend == "stdio":
        cfg = ChardevConfig(
            "stdio", id=cid, signal=opts.take_bool("signal", True), mux=opts.take_bool("mux", False)
        )
    elif backend == "file":
        path = opts.take("path")
        if path is None:
            raise ConfigError("-chardev: chardev: file: no filename given")
        cfg = ChardevConfig("file", id=cid, path=path, append=opts.take_bool("append"))
    elif backend == "null":
        cfg = ChardevConfig("null", id=cid)
    elif backend == "pty":
        cfg = ChardevConfig("pty", id=cid)
    else:
        raise ConfigError(f"-chardev: backend '{backend}' is not supported")
    opts.finish()
    cfg.validate()
    a.chardevs[cid] = cfg


@option("-nographic", None, "no display; the serial console goes to stdio (Ctrl-A x quits), and with no "
        "other monitor the human monitor too (Ctrl-A c switches to it and back; Ctrl-A h lists the keys)")
def _nographic(a: RunArgs, v: str) -> None:
    a.nographic = True


@option("-display", "none", "display back end (only 'none')")
def _display(a: RunArgs, v: str) -> None:
    opts = parse_option("-display", v, implied="type")
    kind = opts.require("type")
    opts.finish()
    if kind != "none":
        raise ConfigError(f"-display: '{kind}' is not supported (only 'none')")


@option("-vnc", "none", "VNC server (only 'none': there is no display to serve)")
def _vnc(a: RunArgs, v: str) -> None:
    if v.split(",", 1)[0] != "none":
        raise ConfigError(f"-vnc: '{v}' is not supported (only 'none': there is no display)")


@option("-no-reboot", None, "exit instead of rebooting when the guest resets")
def _no_reboot(a: RunArgs, v: str) -> None:
    a.no_reboot = True


@option("-nodefaults", None, "no default devices: without -serial, no serial port either")
def _nodefaults(a: RunArgs, v: str) -> None:
    a.nodefaults = True


@option("-no-user-config", None, "(accepted) no configuration files are ever read")
def _no_user_config(a: RunArgs, v: str) -> None:
    pass


@option("-vga", "none", "VGA card (only 'none': there is no display)")
def _vga(a: RunArgs, v: str) -> None:
    if v != "none":
        raise ConfigError(f"-vga: '{v}' is not supported (only 'none')")


@option("-S", None, "do not start the vCPUs until QMP 'cont' (status 'prelaunch')")
def _start_paused(a: RunArgs, v: str) -> None:
    a.start_paused = True


@option("-rtc", "[base=utc|localtime][,clock=host][,driftfix=none|slew]",
        "the CMOS clock: UTC (the default) or the host's local time; it follows the host's clock")
def _rtc(a: RunArgs, v: str) -> None:
    opts = parse_option("-rtc", v)
    base = opts.take("base", "utc")
    if base not in ("utc", "localtime"):
        raise ConfigError(f"-rtc: base '{base}' is not supported (utc or localtime)")
    clock = opts.take("clock", "host")
    if clock != "host":
        raise ConfigError(f"-rtc: clock '{clock}' is not supported (the clock always follows the host)")
    # No periodic RTC interrupts are made, so there are no lost ticks to make up.
    if opts.take("driftfix", "none") not in ("none", "slew"):
        raise ConfigError("-rtc: driftfix must be none or slew")
    opts.finish()
    a.rtc_localtime = base == "localtime"


def _is_uuid(v: str) -> bool:
    # Checked by hand: `re` stays out of the boot path's imports.
    parts = v.split("-")
    return [len(p) for p in parts] == [8, 4, 4, 4, 12] and all(
        c in "0123456789abcdefABCDEF" for c in "".join(parts))


@option("-uuid", "%08x-%04x-%04x-%04x-%012x", "the machine's UUID (what QMP query-uuid and HMP info uuid answer)")
def _uuid(a: RunArgs, v: str) -> None:
    if not _is_uuid(v):
        raise ConfigError(f"-uuid: '{v}' is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    a.uuid = v.lower()


@option("-boot", "[order=drives][,once=drives][,menu=on|off][,strict=on|off][,splash-time=ms]",
        "(accepted) firmware boot order; a -kernel boot ignores it, as QEMU's does")
def _boot(a: RunArgs, v: str) -> None:
    opts = parse_option("-boot", v, implied="order")
    for key in ("order", "once"):
        drives = opts.take(key)
        if drives is not None and not all("a" <= c <= "p" for c in drives):
            raise ConfigError(f"-boot: invalid {key} '{drives}' (drive letters a-p)")
    opts.take_bool("menu")
    opts.take_bool("strict")
    opts.take_int("splash-time", minimum=0)
    opts.take_int("reboot-timeout", minimum=-1)
    opts.take("splash")
    opts.finish()


@option("-no-hpet", None, "(accepted) no HPET: this platform has none")
def _no_hpet(a: RunArgs, v: str) -> None:
    pass


@option("-pidfile", "file", "write the process ID to FILE (removed at exit)")
def _pidfile(a: RunArgs, v: str) -> None:
    if not v:
        raise ConfigError("-pidfile: empty file name")
    a.pidfile = v


@option("-version", None, "print the version and exit")
def _version(a: RunArgs, v: str) -> None:
    from appliance import __version__

    raise HelpRequested(f"appliance run version {__version__} (qemu-system-x86_64 7.2 style command line)\n")


@option("-enable-kvm", None, "use KVM (always on)")
def _enable_kvm(a: RunArgs, v: str) -> None:
    pass


@option("-accel", "kvm", "accelerator (only 'kvm')")
def _accel(a: RunArgs, v: str) -> None:
    if v in ("help", "?"):
        raise HelpRequested("Accelerators supported in appliance:\nkvm\n")
    opts = parse_option("-accel", v, implied="accel")
    accel = opts.require("accel")
    opts.finish()
    if accel != "kvm":
        raise ConfigError(f"-accel: '{accel}' is not supported (only 'kvm')")


_MACHINES = {"q35": "q35", "pc": "pc", "microvm": "microvm"}

_MACHINE_HELP = (
    "Supported machines are:\n"
    "microvm              microvm: the same ACPI PC platform here\n"
    "pc                   pc: the same ACPI PC platform here (pc-i440fx-* names are taken too)\n"
    "q35                  Standard PC with PCIe and ACPI (default; pc-q35-* names are taken too)\n"
)


# -machine properties for what this platform does not have or do (no USB,
# vmport, SMM, HPET or option ROMs; guest RAM is never offered to KSM):
# "off" is what it is.
_ABSENT_MACHINE_PARTS = ("usb", "vmport", "smm", "hpet", "mem-merge", "x-option-roms")


@option(
    "-machine",
    "q35|pc|microvm[,accel=kvm][,usb=off][,vmport=off][,smm=off][,hpet=off][,mem-merge=off]"
    "[,kernel-irqchip=on][,dump-guest-core=on|off]",
    "machine type (all give the same ACPI PC platform, with no USB, vmport, SMM or HPET; "
    "dump-guest-core is accepted, guest RAM always appears in core dumps)",
)
def _machine(a: RunArgs, v: str) -> None:
    if v in ("help", "?") or v.split(",", 1)[0] in ("help", "?"):
        raise HelpRequested(_MACHINE_HELP)
    opts = parse_option("-machine", v, implied="type")
    kind = opts.take("type")
    accel = opts.take("accel")
    for part in _ABSENT_MACHINE_PARTS:
        if opts.take_bool(part, False):
            raise ConfigError(f"-machine: {part}=on is not supported here")
    if not opts.take_bool("kernel-irqchip", True):
        raise ConfigError("-machine: kernel-irqchip=off is not supported (KVM's in-kernel irqchip is always used)")
    opts.take_bool("dump-guest-core", True)
    opts.finish()
    if accel is not None and accel != "kvm":
        raise ConfigError(f"-machine: accel '{accel}' is not supported (only 'kvm')")
    if kind is not None:
        base = "q35" if kind.startswith("pc-q35") else "pc" if kind.startswith("pc-i440fx") else kind
        if base not in _MACHINES:
            raise ConfigError(f"-machine: type '{kind}' is not supported (q35, pc or microvm)")
        a.machine_type = base


OPTIONS["-M"] = RunOption("-M", OPTIONS["-machine"].metavar, "same as -machine", _machine)


@option("-cpu", "host[,migratable=on|off]", "CPU model (only 'host': what KVM supports)")
def _cpu(a: RunArgs, v: str) -> None:
    if v in ("help", "?"):
        raise HelpRequested("Available CPUs:\n"
                            "x86 host                  KVM's own CPUID, what this host offers (max: the same)\n")
    opts = parse_option("-cpu", v, implied="model")
    model = opts.require("model")
    # libvirt's default for host-passthrough; there is no migration to keep it for.
    opts.take_bool("migratable", True)
    opts.finish()
    if model not in ("host", "max"):
        raise ConfigError(f"-cpu: model '{model}' is not supported (only 'host')")


@option("-d", "guest_errors|...", "(accepted) log more: any value turns on debug logging")
def _debug(a: RunArgs, v: str) -> None:
    a.verbose += 1


# --- -serial / -chardev -> ChardevConfig ---------------------------------------------------


def _socket_chardev(opts: object, cid: str, *, path: str | None, host: str | None, port: str | None,
                    telnet: bool = False) -> ChardevConfig:
    from appliance.cli.options import OptionDict

    assert isinstance(opts, OptionDict)
    server = opts.take_bool("server", False)
    wait = opts.take_bool("wait", True)
    telnet = opts.take_bool("telnet", telnet)
    if path is not None:
        return ChardevConfig("socket", id=cid, path=path, server=server, wait=wait, telnet=telnet)
    if port is None:
        # QEMU's words for -chardev (a host without a port, or neither); ours name both.
        raise ConfigError(f"{opts.option}: chardev: socket: no port given (needs 'path' or 'port')")
    try:
        port_n = int(port, 10)
    except ValueError:
        raise ConfigError(f"{opts.option}: port '{port}' is not a number") from None
    return ChardevConfig("socket", id=cid, host=host or "", port=port_n, server=server, wait=wait,
                         telnet=telnet)


def parse_serial(spec: str, chardevs: dict[str, ChardevConfig], *, nographic: bool) -> ChardevConfig | None:
    """QEMU's ``-serial`` forms; ``None`` for ``none``."""
    if spec == "none":
        return None
    if spec == "null":
        return ChardevConfig("null")
    if spec == "pty":
        return ChardevConfig("pty", id="serial0")
    if spec in ("stdio", "mon:stdio"):
        mux = nographic or spec == "mon:stdio"
        return ChardevConfig("stdio", mux=mux, signal=not mux)
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ConfigError(f"-serial: '{spec}' is not supported")
    if kind == "chardev":
        cfg = chardevs.get(rest)
        if cfg is None:
            raise ConfigError(f"-serial: chardev '{rest}' not found")
        return cfg
    if kind == "file":
        return ChardevConfig("file", path=rest)
    if kind == "unix":
        opts = parse_option("-serial", rest, implied="path", flags=("server", "wait"))
        cfg = _socket_chardev(opts, "", path=opts.require("path"), host=None, port=None)
        opts.finish()
        return cfg
    if kind in ("tcp", "telnet"):
        opts = parse_option("-serial", rest, implied="addr", flags=("server", "wait", "nodelay"))
        addr = opts.require("addr")
        host, colon, port = addr.rpartition(":")
        if not colon:
            raise ConfigError(f"-serial: '{addr}' is not host:port")
        opts.take_bool("nodelay")
        cfg = _socket_chardev(opts, "", path=None, host=host, port=port, telnet=kind == "telnet")
        opts.finish()
        return cfg
    raise ConfigError(f"-serial: '{kind}' is not supported")


# --- command line -----------------------------------------------------------------


def usage() -> str:
    _load_option_modules()
    lines = [
        f"usage: {PROG} -kernel FILE [options]",
        "",
        "Boots a VM under KVM. Options follow qemu-system-x86_64; any other option is refused.",
        "",
    ]
    for name in sorted(OPTIONS, key=str.lower):
        o = OPTIONS[name]
        head = f"  {o.name}" + (f" {o.metavar}" if o.metavar else "")
        lines.append(head if len(head) < 30 else head)
        lines.append(f"        {o.help}")
    lines.append("")
    lines.append("Exit status: 0 after power-off, 1 if the VM fails, 2 for bad options.")
    return "\n".join(lines) + "\n"


_loaded_option_modules = False


def _load_option_modules() -> None:
    # Loaded on the first option the core table lacks: a plain
    # `run -kernel …` does not pay for importing every device package.
    global _loaded_option_modules
    if _loaded_option_modules:
        return
    _loaded_option_modules = True
    for mod in OPTION_MODULES:
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(mod)


def parse_args(argv: list[str]) -> RunArgs:
    """Parse a qemu-style argument list.

    :raises ConfigError: On an unknown option, a missing argument or a bad value.
    """
    args = RunArgs()
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-") or word == "-":
            raise ConfigError(f"unexpected argument '{word}' (disk images need -drive)")
        name = "-" + word.lstrip("-")
        opt = OPTIONS.get(name)
        if opt is None:
            _load_option_modules()
            opt = OPTIONS.get(name)
        if opt is None:
            raise ConfigError(f"option '{word}' is not supported")
        if opt.metavar is None:
            opt.apply(args, "")
            i += 1
            continue
        if i + 1 >= len(argv):
            raise ConfigError(f"{name} requires an argument")
        opt.apply(args, argv[i + 1])
        i += 2
    return args


def to_config(args: RunArgs) -> MachineConfig:
    for finish in FINALIZERS:
        finish(args)
    if args.kernel is None:
        for given, name in ((args.append, "-append"), (args.initrd, "-initrd")):
            if given:
                raise ConfigError(f"{name} only allowed with -kernel option")
        raise ConfigError("-kernel is required (the appliance has no firmware to boot disks)")
    if len(args.serials) > 1:
        raise ConfigError("-serial: only one serial port (COM1) is supported")
    stdio_monitor = any(getattr(getattr(d, "chardev", None), "backend", None) == "stdio" for d in args.devices)
    if args.serials:
        serial = parse_serial(args.serials[0], args.chardevs, nographic=args.nographic)
    elif args.nodefaults or (stdio_monitor and not args.nographic):
        # With QMP on stdio the console has nowhere to go, as QEMU's default vc with no display.
        serial = None
    else:
        # No display exists: the console goes to the terminal unless told otherwise.
        serial = ChardevConfig("stdio", mux=args.nographic, signal=not args.nographic)
    if stdio_monitor and serial is not None and serial.backend == "stdio":
        raise ConfigError("cannot use stdio by multiple character devices")
    mon_stdio = args.serials == ["mon:stdio"] or (
        args.nographic and not args.monitor_given and args.serials in ([], ["stdio"]))
    if mon_stdio and serial is not None and serial.backend == "stdio" and serial.mux:
        # QEMU's mon:stdio, which -nographic means when no monitor is given: the human monitor
        # shares the terminal with the console, Ctrl-A c switching between them.
        from appliance.qmp.hmp import MuxMonitorSpec

        args.devices.append(MuxMonitorSpec())
    return MachineConfig(
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.append,
        mem_size=args.mem_size,
        num_cpus=args.num_cpus,
        topology=args.topology,
        name=args.name,
        serial=serial,
        no_reboot=args.no_reboot,
        machine_type=args.machine_type,  # type: ignore[arg-type]
        devices=list(args.devices),
        start_paused=args.start_paused,
        rtc_localtime=args.rtc_localtime,
        uuid=args.uuid,
    )


def pvm_warning(config: MachineConfig) -> str | None:
    """A warning when a Linux kernel without PVM support is booted on a PVM host."""
    from appliance.kvm.system import host_kind

    if host_kind() != "pvm":
        return None
    try:
        with open(config.kernel, "rb") as f:
            head = f.read(0x210)
            f.seek(0)
            data = f.read(64 << 20)
    except OSError:
        return None
    is_bzimage = head[0x202:0x206] == b"HdrS"
    is_linux = is_bzimage or (data[:4] == b"\x7fELF" and b"Linux version " in data)
    if not is_linux:
        return None
    try:
        from appliance.kvm.boot import kernel_is_pvm_capable
    except ImportError:
        return None
    if kernel_is_pvm_capable(config.kernel):
        return None
    return (
        f"warning: {config.kernel} is a Linux kernel without PVM support and this host's KVM is PVM: "
        "it will run under KVM's instruction emulator (very slowly)"
    )


# Seconds the loop waits for an early-booted guest to settle (see _boot_early).
GUEST_HEAD_START = 0.1

QUIT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def run_machine(machine: Machine) -> int:
    """Run ``machine`` until the guest ends; SIGINT/SIGTERM/SIGHUP stop it with status 0."""
    import asyncio

    loop = asyncio.get_running_loop()
    for sig in QUIT_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, machine.post_event, "quit", f"terminating on signal {sig}")
    await machine.start()
    code = await machine.wait()
    if code != 0:
        print(f"{PROG}: {machine.exit_reason}", file=sys.stderr)
    return code


def _boot_early(machine: Machine, pending: PendingVm) -> None:
    # A quit signal before the loop has its handlers becomes the same quit
    # event, held until the loop runs (so a terminal in raw mode is restored).
    for sig in QUIT_SIGNALS:
        signal.signal(sig, lambda signum, _frame: machine.post_event("quit", f"terminating on signal {signum}"))
    machine.boot_early(pending)
    # The guest boots alone before the main thread loads the loop (see
    # Machine.wait_for_guest); a guest that never polls the console (Linux
    # uses the UART's interrupts) only delays the loop by this much.
    machine.wait_for_guest(GUEST_HEAD_START)


def wants_help(argv: list[str]) -> bool:
    """-h, -help or --help where an option may stand; ``-append --help`` is a kernel command line."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-") or word == "-":
            return False  # parse_args refuses the line here
        name = "-" + word.lstrip("-")
        if name in ("-h", "-help"):
            return True
        opt = OPTIONS.get(name)
        if opt is None:
            _load_option_modules()
            opt = OPTIONS.get(name)
        i += 2 if opt is not None and opt.metavar is not None else 1
    return False


def main(argv: list[str]) -> int:
    if wants_help(argv):
        sys.stdout.write(usage())
        return 0
    # Applied when logging is first used (see appliance.log): a plain boot
    # does not import it before the vCPUs run. Set before the options are read, so that
    # their warnings (a short-form boolean) carry the program's name, as QEMU's do.
    configure_logging(level="WARNING", format=f"{PROG}: %(message)s")
    args = parse_args(argv)
    if args.verbose:
        configure_logging(level="DEBUG", format=f"{PROG}: %(message)s", force=True)
    config = to_config(args)
    if args.pidfile is not None:
        write_pidfile(args.pidfile)
    try:
        return _run(config)
    finally:
        if args.pidfile is not None:
            with contextlib.suppress(OSError):
                os.unlink(args.pidfile)


def write_pidfile(path: str) -> None:
    """Write our PID to ``path`` (QEMU's -pidfile).

    :raises ConfigError: When the file cannot be written.
    """
    try:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as err:
        raise ConfigError(f"-pidfile {path}: {err.strerror or err}") from err


def _run(config: MachineConfig) -> int:
    from appliance.kvm import KvmError
    from appliance.kvm.system import Kvm
    from appliance.machine.machine import Machine, boots_early

    try:
        kvm = Kvm()
    except KvmError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    pending: PendingVm | None = None
    try:
        if boots_early(config):
            from appliance.kvm.vm import PendingVm

            # KVM takes milliseconds for the in-kernel irqchip and PIT: start now.
            pending = PendingVm(kvm)
        config.validate(max_cpus=kvm.max_vcpus)
        warning = pvm_warning(config)
        if warning:
            print(f"{PROG}: {warning}", file=sys.stderr)
        machine = Machine(config, kvm=kvm)
        try:
            if pending is not None:
                early = pending
                pending = None  # boot_early owns it now
                _boot_early(machine, early)
            apply_logging()
            # Only now the loop and everything that comes with it.
            import asyncio

            return asyncio.run(run_machine(machine))
        except ConfigError:
            raise
        except ApplianceError as err:
            print(f"{PROG}: {err}", file=sys.stderr)
            return 1
        finally:
            if machine.exit_code is None:
                machine.abandon()  # boot_early ran but the loop never finished the machine
    finally:
        if pending is not None:
            pending.cancel()
        kvm.close()

