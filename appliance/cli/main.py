"""`appliance` command: dispatches to one module per subcommand.

Each subcommand module exposes ``main(argv: list[str]) -> int``. Modules are
imported lazily so `appliance img` does not pay for KVM's cffi build and so on.
Any :class:`~appliance.errors.ConfigError` that escapes becomes one line on
stderr and exit status 2, like QEMU's option errors.
"""

from __future__ import annotations

import importlib
import os
import sys

from appliance.errors import ConfigError, HelpRequested

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("appliance.cli.run", "boot a VM (qemu-kvm style options)"),
    "info": ("appliance.cli.info", "describe this host's KVM (hardware or PVM)"),
    "kit": ("appliance.kit.cli", "build the test guest and the Linux kit"),
    "img": ("appliance.qcow2.cli", "disk image tool (qemu-img style)"),
    "storage-daemon": ("appliance.cli.storage_daemon", "serve block devices over vhost-user"),
    "net-daemon": ("appliance.cli.net_daemon", "serve NICs over vhost-user"),
    "net": ("appliance.net.cli", "manage bridges, taps and the virbr0 default network"),
}

USAGE = "usage: appliance <command> [options]\n\ncommands:\n" + "".join(
    f"  {name:<16}{desc}\n" for name, (_, desc) in SUBCOMMANDS.items()
) + "\nRun 'appliance <command> --help' for a command's options.\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        from appliance import __version__

        print(f"appliance {__version__}")
        return 0
    name, rest = args[0], args[1:]
    entry = SUBCOMMANDS.get(name)
    if entry is None:
        print(f"appliance: unknown command '{name}'", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(entry[0])
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith(entry[0]):
            print(f"appliance: command '{name}' is not available in this build", file=sys.stderr)
            return 2
        raise
    try:
        code = int(module.main(rest) or 0)
    except ConfigError as err:
        print(f"appliance {name}: {err}", file=sys.stderr)
        return 2
    except HelpRequested as shown:
        sys.stdout.write(shown.text)
        return 0
    except KeyboardInterrupt:
        return 130
    if argv is None and getattr(module, "EXIT_WITHOUT_TEARDOWN", False):
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown.

    For commands that have closed everything they own by the time they
    return (`appliance run`: the VM, its files, sockets and threads): what
    is left, clearing every module and collecting the heap, took ~12 ms of
    the time from the guest's power-off to the exit status here. Only for
    the process's own command (``argv is None``), never for callers in
    the same interpreter.
    """
    if "logging" in sys.modules:
        import logging

        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
