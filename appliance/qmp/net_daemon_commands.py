"""The QMP commands of `appliance net-daemon --monitor`: the VM's NIC commands on the daemon's exports.

A third command table for :class:`~appliance.qmp.server.QmpServer`;
``ctx.machine`` is the :class:`~appliance.cli.net_daemon.NetDaemon`, whose
``nics`` list :mod:`appliance.qmp.netops` takes in place of a machine's NIC
specs. So ``set_link``, ``object-add``/``object-del`` of ``filter-dump``,
``x-query-usernet`` and ``x-appliance-query-usernet`` are the very handlers
of `appliance run`'s monitor (:mod:`appliance.qmp.commands`), and answer the
same way. A NIC is named by its ``--export id=`` (the device) or its
``--netdev id=``, as QEMU's ``set_link`` takes a device or a netdev.

Where we answer differently from QEMU, and why:

- QEMU has no network daemon; the closest is qemu-storage-daemon, whose
  monitor this one copies (greeting, ``qmp_capabilities``, ``query-version``,
  ``quit``). There are no run states, so no ``stop``/``cont``/``query-status``.
- ``set_link … off`` clears the device's status bit (seen by a front end that
  reads the config space over VHOST_USER_GET_CONFIG) and drops frames in both
  directions until ``on``, as QEMU's net layer does for a link-down netdev:
  QEMU's own vhost-user-net front end keeps its config space to itself, so
  dropping is what its guest notices.
- ``x-appliance-query-nics`` is ours: each export's socket, MAC, link and
  per-queue frame/byte/drop counters.
- ``human-monitor-command`` knows ``info usernet``, ``info network``, ``info version``,
  ``set_link NAME on|off``, ``hostfwd_add``, ``hostfwd_remove``, ``help`` and ``quit``;
  anything else is answered as QEMU's HMP answers an unknown command.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from appliance.qmp import commands
from appliance.qmp.commands import Command, Context

# The NIC commands are the machine monitor's own handlers: netops reads the daemon's NICs.
_SHARED = ("qmp_capabilities", "query-version", "set_link", "object-add", "object-del",
           "x-query-usernet", "x-appliance-query-usernet")
COMMANDS: dict[str, Command] = {name: commands.COMMANDS[name] for name in _SHARED}


_command = commands.registry(COMMANDS)


@_command("query-commands")
async def _query_commands(ctx: Context, args: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": name} for name in sorted(COMMANDS)]


@_command("quit")
async def _quit(ctx: Context, args: dict[str, Any]) -> None:
    ctx.machine.quit()


def nic_info(nic: Any) -> dict[str, Any]:
    """One export as ``x-appliance-query-nics`` lists it."""
    device = nic.device
    stats = [asdict(s) for s in device.stats] if device is not None else []
    server = nic.server
    # While the link is down the device's backends are stand-ins counting what they drop.
    backends = device.backends if device is not None else []
    return {
        "id": nic.export.id,
        "netdev": nic.netdev.id,
        "path": nic.export.path,
        "mac": ":".join(f"{b:02x}" for b in nic.mac),
        "link-up": nic.link_up,
        "connections": getattr(server, "connections", 0),
        "queues": stats,
        "link-down-rx-dropped": sum(getattr(b, "rx_dropped", 0) for b in backends),
        "link-down-tx-dropped": sum(getattr(b, "tx_dropped", 0) for b in backends),
    }


@_command("x-appliance-query-nics")
async def _query_nics(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [nic_info(nic) for nic in ctx.machine.nics]


# What the daemon's human-monitor-command runs (and its help lists).
_HMP_HAS = frozenset({"help", "hostfwd_add", "hostfwd_remove", "info", "quit", "set_link",
                      "info network", "info usernet", "info version"})


@_command("human-monitor-command", {"command-line": ("string", True), "cpu-index": ("integer", False)})
async def _hmp(ctx: Context, args: dict[str, Any]) -> str:
    from appliance.qmp import hmp

    if "cpu-index" in args:
        commands.check_cpu_index(args["cpu-index"], 0)  # no vCPUs here, as QEMU's -machine none
    line = args["command-line"]
    name, end = hmp.command_name(line)
    if name in ("quit", "q") and hmp.hmp_words(line[end:]) == []:
        ctx.machine.quit()
        return ""
    # The VM monitor's parsing and answers (quoted words, usage errors, unknown commands as
    # QEMU's HMP words them, in its output rather than as a QMP error), for the commands the
    # daemon has; its NICs stand in for the VM's.
    return await hmp.execute(ctx, line, only=_HMP_HAS)
