"""The QMP commands the appliance answers, as a table.

Each entry names its arguments with their JSON types, so argument errors are
found before a handler runs and read like QEMU's (``Parameter 'up' is
missing``, ``Invalid parameter type for 'up', expected: boolean``). Handlers
get the :class:`Context` (the machine and what the session knows) and the
checked arguments, and return the ``"return"`` value (``None`` becomes ``{}``,
as QEMU answers commands without a result).

Semantics follow QEMU's QAPI schema (qapi/run-state.json, qapi/net.json,
qapi/qom.json, qapi/machine.json) for the subset listed in :data:`COMMANDS`.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.qmp import netops
from appliance.qmp.errors import CommandNotFound, GenericError

# The QEMU release whose QMP behaviour we follow (Debian 12's qemu-system-x86).
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}


class Context(Protocol):
    """What a command may touch: the machine, and the session that sent it."""

    machine: Any
    negotiated: bool

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None: ...


Handler = Callable[[Context, dict[str, Any]], Awaitable[Any]]

# JSON type names as QEMU's input visitor spells them in errors.
_TYPES: dict[str, tuple[type, ...]] = {
    "boolean": (bool,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "array": (list,),
    "object": (dict,),
    "any": (object,),
}


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    handler: Handler
    # argument name -> (JSON type name, required)
    args: dict[str, tuple[str, bool]] = field(default_factory=dict)
    # object-add takes the object's own properties beside its fixed arguments.
    extra_args: bool = False


COMMANDS: dict[str, Command] = {}

Register = Callable[..., Callable[[Handler], Handler]]


def registry(table: dict[str, Command]) -> Register:
    """A ``@command(name, args, extra_args=)`` decorator that fills ``table``."""

    def command(
        name: str, args: dict[str, tuple[str, bool]] | None = None, *, extra_args: bool = False
    ) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            table[name] = Command(name, fn, dict(args or {}), extra_args)
            return fn

        return deco

    return command


command = registry(COMMANDS)


def check_args(cmd: Command, args: dict[str, Any]) -> dict[str, Any]:
    """Check ``args`` against ``cmd``'s table.

    :raises GenericError: On a missing, unexpected or mistyped argument.
    """
    for key, value in args.items():
        spec = cmd.args.get(key)
        if spec is None:
            if cmd.extra_args:
                continue
            raise GenericError(f"Parameter '{key}' is unexpected")
        kind, _ = spec
        ok = isinstance(value, _TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))
        if not ok:
            raise GenericError(f"Invalid parameter type for '{key}', expected: {kind}")
    for key, (_, required) in cmd.args.items():
        if required and key not in args:
            raise GenericError(f"Parameter '{key}' is missing")
    return args


def lookup(name: str) -> Command:
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise CommandNotFound(f"The command {name} has not been found")
    return cmd


# --- session ------------------------------------------------------------------------


@command("qmp_capabilities", {"enable": ("array", False)})
async def _qmp_capabilities(ctx: Context, args: dict[str, Any]) -> None:
    if ctx.negotiated:
        raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
    for cap in args.get("enable", []):
        if cap == "oob":
            # qmp-spec.rst §2.2.1: only capabilities from the greeting may be enabled.
            raise GenericError("Capability 'oob' not available")
        raise GenericError(f"Parameter 'enable' does not accept value '{cap}'")
    ctx.negotiated = True


@command("query-commands")
async def _query_commands(ctx: Context, args: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": name} for name in sorted(COMMANDS)]


@command("query-version")
async def _query_version(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    from appliance import __version__ as ours

    return {"qemu": dict(QEMU_VERSION), "package": f"appliance {ours}".strip()}


# --- the machine --------------------------------------------------------------------

# Machine runstates -> QEMU RunState names (qapi/run-state.json).
_STATUS = {
    "created": "prelaunch",
    "running": "running",
    "paused": "paused",
    "rebooting": "running",
    "stopping": "shutdown",
    "stopped": "shutdown",
}


@command("query-status")
async def _query_status(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    status = "prelaunch" if ctx.machine.prelaunch else _STATUS.get(ctx.machine.runstate.value, "running")
    # QEMU 7.2 still reports the deprecated 'singlestep' member.
    return {"status": status, "running": status == "running", "singlestep": False}


@command("query-name")
async def _query_name(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    name = ctx.machine.config.name
    return {"name": name} if name else {}


@command("query-uuid")
async def _query_uuid(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    uuid = getattr(ctx.machine.config, "uuid", None) or "00000000-0000-0000-0000-000000000000"
    return {"UUID": uuid}


@command("x-query-usernet")
async def _x_query_usernet(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    # Ours (QEMU 7.2 has none): info usernet's text in the HumanReadableText
    # object QEMU's other x-query-* commands answer with.
    return {"human-readable-text": netops.usernet_info(ctx.machine)}


@command("x-appliance-query-usernet")
async def _x_appliance_query_usernet(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
    # Ours: the counters (drops, errors) and the flows of every -netdev user, for scripts.
    return netops.usernet_stats(ctx.machine)


@command("query-kvm")
async def _query_kvm(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return {"enabled": True, "present": True}


@command("query-cpus-fast")
async def _query_cpus_fast(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
    # vCPU threads are named "CPU n/KVM" (as QEMU names them); a paused
    # machine has none running, and reports its main thread like QEMU's TCG.
    threads = {t.name: t.native_id for t in threading.enumerate() if t.name.endswith("/KVM")}
    main_tid = threading.main_thread().native_id or 0
    config = ctx.machine.config
    _sockets, dies, cores, threads_per_core = config.topology or (1, 1, config.num_cpus, 1)
    out = []
    for i in range(config.num_cpus):
        # QEMU numbers vCPUs thread-fastest (x86 topology: socket > die > core > thread); its
        # board makes one other device between the first vCPU and the rest.
        props = {"core-id": i // threads_per_core % cores, "thread-id": i % threads_per_core,
                 "socket-id": i // (threads_per_core * cores * dies)}
        if dies > 1:  # in QEMU's order of the keys
            socket_id = props.pop("socket-id")
            props["die-id"] = i // (threads_per_core * cores) % dies
            props["socket-id"] = socket_id
        out.append({
            "cpu-index": i,
            "qom-path": f"/machine/unattached/device[{i if i == 0 else i + 1}]",
            "thread-id": threads.get(f"CPU {i}/KVM") or main_tid,
            "props": props,
            "target": "x86_64",
        })
    return out


@command("stop")
async def _stop(ctx: Context, args: dict[str, Any]) -> None:
    await ctx.machine.pause()


@command("cont")
async def _cont(ctx: Context, args: dict[str, Any]) -> None:
    await ctx.machine.resume()


@command("system_reset")
async def _system_reset(ctx: Context, args: dict[str, Any]) -> None:
    # Done before the reply, as in QEMU 7.2: the RESET event comes first, and a
    # VM that was paused is in prelaunch when the next command asks.
    await ctx.machine.request("reset", HOST_RESET)


@command("system_powerdown")
async def _system_powerdown(ctx: Context, args: dict[str, Any]) -> None:
    ctx.machine.powerdown()
    ctx.emit("POWERDOWN")


@command("quit")
async def _quit(ctx: Context, args: dict[str, Any]) -> None:
    # QEMU 7.2 sends the SHUTDOWN event, then this reply, then hangs up: the
    # machine tells the monitor before it closes it, and the monitor lets
    # this command answer before it hangs up (QmpServer.close).
    await ctx.machine.request("quit", HOST_QUIT)


# Details the monitor posts, so machine events it caused are told apart from the guest's.
HOST_RESET = "host-qmp-system-reset"
HOST_QUIT = "host-qmp-quit"


@command("query-block")
async def _query_block(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
    import asyncio

    from appliance.machine.devices import BlkSpec
    from appliance.qmp.block_info import block_info

    disks = [spec for spec in ctx.machine.config.devices if isinstance(spec, BlkSpec)]
    # In QEMU's order: its block backends' (the -drive ones first), not the PCI slots'.
    disks.sort(key=lambda spec: spec.names.order)
    # Each entry reads its image's file (size, qcow2 header): off the loop.
    return [await asyncio.to_thread(block_info, spec, i) for i, spec in enumerate(disks)]


# --- network ------------------------------------------------------------------------


@command("set_link", {"name": ("string", True), "up": ("boolean", True)})
async def _set_link(ctx: Context, args: dict[str, Any]) -> None:
    netops.set_link(ctx.machine, args["name"], args["up"])


@command("object-add", {"qom-type": ("string", True), "id": ("string", True), "props": ("object", False)},
         extra_args=True)
async def _object_add(ctx: Context, args: dict[str, Any]) -> None:
    props = dict(args)
    kind = props.pop("qom-type")
    ident = props.pop("id")
    # Before QEMU 6.0 the properties came in a nested 'props' object.
    props.update(props.pop("props", None) or {})
    if kind != "filter-dump":
        raise GenericError(f"Invalid parameter value for 'qom-type': object type '{kind}' is not supported "
                           "(only filter-dump)")
    await netops.add_capture(ctx.machine, ident, props)


@command("object-del", {"id": ("string", True)})
async def _object_del(ctx: Context, args: dict[str, Any]) -> None:
    netops.del_capture(ctx.machine, args["id"])


# --- the human monitor, through QMP -----------------------------------------------------


@command("human-monitor-command", {"command-line": ("string", True), "cpu-index": ("integer", False)})
async def _hmp(ctx: Context, args: dict[str, Any]) -> str:
    # qmp-shell -H and `virsh qemu-monitor-command --hmp` send these; the
    # socket monitor (-monitor) runs the same words.
    from appliance.qmp import hmp

    if "cpu-index" in args:
        check_cpu_index(args["cpu-index"], ctx.machine.config.num_cpus)
    return await hmp.execute(ctx, args["command-line"])


def check_cpu_index(index: int, cpus: int) -> None:
    """human-monitor-command's ``cpu-index`` checked as QEMU 7.2 checks it (qmp_human_monitor_command).

    :raises GenericError: When it names none of the ``cpus`` vCPUs.
    """
    # QEMU hands the 64-bit argument to monitor_set_cpu()'s int: only the low 32 bits count.
    index = (index + (1 << 31)) % (1 << 32) - (1 << 31)
    if not 0 <= index < cpus:
        raise GenericError("Parameter 'cpu-index' expects a CPU number")
