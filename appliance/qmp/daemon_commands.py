"""The QMP commands of `appliance storage-daemon --monitor`, as qemu-storage-daemon 7.2 answers them.

A second command table for :class:`~appliance.qmp.server.QmpServer` (same
greeting, parser and sessions as `appliance run`'s monitor); ``ctx.machine``
is the :class:`~appliance.cli.storage_daemon.StorageDaemon`. Argument names,
reply members and error messages follow QEMU's qapi/block-core.json,
qapi/block-export.json and what qemu-storage-daemon 7.2 replies to the same
request (compared in tests/vhost_user/test_storage_daemon_qmp.py).

Where we answer differently, and why:

- ``blockdev-add`` checks that the image opens (and is qcow2 when it says so)
  but holds it open only while an export uses it, as the command-line daemon
  does; locks are taken then.
- ``query-named-block-nodes`` gives each node's members with qemu-storage-daemon's
  names and types (I/O limits all zero, no backing files, no encryption); a
  file node written inline (``"file": {"driver": "file", …}``) is listed after
  its format node as ``#blockNNN``, numbered by position rather than by QEMU's
  counter; qcow2's ``format-specific`` has the header's members only (no
  ``bitmaps``, ``data-file``).
- ``block-export-add`` takes the vhost-user-blk export only, on a unix socket
  (``addr.type=fd`` is refused by name; ``iothread`` must name an ``--object
  iothread``); one socket per export.
- ``block-export-del`` ends the export at once in both modes: a vhost-user
  front end is dropped, as qemu-storage-daemon 7.2 also does with ``safe``.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, ConfigError
from appliance.qmp import commands
from appliance.qmp.block_info import image_info
from appliance.qmp.commands import Command, Context
from appliance.qmp.errors import GenericError

COMMANDS: dict[str, Command] = {
    "qmp_capabilities": commands.COMMANDS["qmp_capabilities"],
    "query-version": commands.COMMANDS["query-version"],
}


command = commands.registry(COMMANDS)


def _wellformed(ident: str) -> bool:
    # QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
    return bool(ident) and ident[0].isascii() and ident[0].isalpha() and all(
        c.isascii() and (c.isalnum() or c in "-._") for c in ident)


async def _call(fn: Any, *args: Any) -> Any:
    """Run a daemon operation, its refusals becoming GenericError replies."""
    from appliance.cli.storage_daemon import DaemonError

    try:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            result = await result
        return result
    except DaemonError as err:
        raise GenericError(str(err)) from None
    except ApplianceError as err:
        raise GenericError(str(err)) from None


@command("query-commands")
async def _query_commands(ctx: Context, args: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": name} for name in sorted(COMMANDS)]


@command("quit")
async def _quit(ctx: Context, args: dict[str, Any]) -> None:
    ctx.machine.quit()


# --- block nodes ----------------------------------------------------------------------

_DRIVERS = ("file", "raw", "qcow2")


def _check_node(obj: dict[str, Any]) -> None:
    """QEMU's input-visitor refusals (wrong JSON types, missing or unknown members at any level),
    then ours for a driver we do not have, inline nodes included."""
    from appliance.cli.json_types import check
    from appliance.storage.blockdev import BLOCKDEV

    try:
        check("blockdev-add", obj, BLOCKDEV, closed=True)
    except ConfigError as err:
        raise GenericError(str(err).split(": ", 1)[1]) from None
    node: Any = obj
    while isinstance(node, dict):
        if node["driver"] not in _DRIVERS:
            raise GenericError(f"Driver '{node['driver']}' is not supported here ({', '.join(_DRIVERS)})")
        node = node.get("file")


def _probe(path: Path, *, write: bool, qcow2: bool) -> None:
    """Open the image as blockdev-add does, to refuse what qemu-storage-daemon refuses then."""
    try:
        fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    except OSError as err:
        raise GenericError(f"Could not open '{path}': {err.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) and not stat.S_ISBLK(os.fstat(fd).st_mode):
            # A directory opens read-only, and only reading it fails.
            raise GenericError(f"'file' driver requires '{path}' to be a regular file")
        if qcow2 and os.pread(fd, 4, 0) != b"QFI\xfb":
            raise GenericError("Image is not in qcow2 format")
    except OSError as err:
        raise GenericError(f"Could not read '{path}': {err.strerror}") from None
    finally:
        os.close(fd)


@command("blockdev-add", {"driver": ("string", True)}, extra_args=True)
async def _blockdev_add(ctx: Context, args: dict[str, Any]) -> None:
    from appliance.storage.blockdev import BlockdevConfig, resolve_blockdev

    _check_node(args)
    driver = args["driver"]
    node_name = args.get("node-name")
    if node_name is None:
        raise GenericError("'node-name' must be specified for the root node")
    if not _wellformed(node_name):
        raise GenericError(f"Invalid node-name: '{node_name}'")
    daemon = ctx.machine
    try:
        node = BlockdevConfig.parse(json.dumps(args), option="blockdev-add")
    except ConfigError as err:
        # Without our "blockdev-add node-name=N: " prefix, as QEMU words it.
        raise GenericError(str(err).split(": ", 1)[-1]) from None
    await _call(daemon.add_blockdev, node)
    try:
        src = resolve_blockdev(daemon.nodes, node_name, what="blockdev-add", check_path=False)
        await asyncio.to_thread(_probe, src.path, write=not src.read_only, qcow2=driver == "qcow2")
    except BaseException:
        await daemon.del_blockdev(node_name)
        raise


@command("blockdev-del", {"node-name": ("string", True)})
async def _blockdev_del(ctx: Context, args: dict[str, Any]) -> None:
    await _call(ctx.machine.del_blockdev, args["node-name"])


def _node_info(daemon: Any, name: str, index: int) -> list[dict[str, Any]]:
    """BlockDeviceInfo of a node, and of the file node written inside it if it has one."""
    from appliance.storage.blockdev import resolve_blockdev

    node = daemon.nodes[name]
    src = resolve_blockdev(daemon.nodes, name, what="query-named-block-nodes", check_path=False)
    zero = {k: 0 for k in ("iops_rd", "iops_wr", "iops", "bps_wr", "bps", "bps_rd", "write_threshold")}

    def info(node_name: str, drv: str) -> dict[str, Any]:
        return {
            "node-name": node_name, "drv": drv, "file": str(src.path), "ro": src.read_only,
            "image": image_info(src.path, drv), "backing_file_depth": 0, "encrypted": False,
            "detect_zeroes": "off",
            "cache": {"writeback": True, "direct": src.cache == "none", "no-flush": src.cache == "unsafe"},
            **zero,
        }

    out = [info(name, node.driver)]
    if node.driver != "file" and node.filename is not None:
        # QEMU names such a node itself; scripts see it but cannot name it in blockdev-del.
        out.append(info(f"#block{index:03d}", "file"))
    return out


@command("query-named-block-nodes", {"flat": ("boolean", False)})
async def _query_named_block_nodes(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
    # Newest first, as QEMU lists its node list.
    names = list(ctx.machine.nodes)
    out: list[dict[str, Any]] = []
    for i in reversed(range(len(names))):
        out += await asyncio.to_thread(_node_info, ctx.machine, names[i], i)
    return out


# --- exports --------------------------------------------------------------------------

_MAX_LBS = 2 * 1024 * 1024  # QEMU's largest logical-block-size property value


@command("block-export-add", {
    "type": ("string", True), "id": ("string", True), "node-name": ("string", True),
    "addr": ("object", False), "writable": ("boolean", False), "writethrough": ("boolean", False),
    "iothread": ("string", False), "fixed-iothread": ("boolean", False),
    "num-queues": ("integer", False), "logical-block-size": ("integer", False),
})
async def _block_export_add(ctx: Context, args: dict[str, Any]) -> None:
    from appliance.cli.storage_daemon import ExportConfig

    kind = args["type"]
    if kind != "vhost-user-blk":
        raise GenericError(f"Export type '{kind}' is not supported here (vhost-user-blk)")
    addr = args.get("addr")
    if addr is None:
        raise GenericError("Parameter 'addr' is missing")
    addr_type = addr.get("type")
    if addr_type is None:
        raise GenericError("Parameter 'addr.type' is missing")
    if addr_type not in ("unix", "inet", "vsock", "fd"):
        raise GenericError(f"Parameter 'addr.type' does not accept value '{addr_type}'")
    allowed = {"unix": ("type", "path", "abstract", "tight"), "fd": ("type", "str")}.get(addr_type)
    if allowed is None:
        raise GenericError("Only socket address types 'unix' and 'fd' are supported")
    for key in addr:
        if key not in allowed:
            raise GenericError(f"Parameter 'addr.{key}' is unexpected")
    if addr_type == "fd":
        raise GenericError("addr.type=fd is not supported here (unix)")
    path = addr.get("path")
    if path is None:
        raise GenericError("Parameter 'addr.path' is missing")
    if not isinstance(path, str):
        raise GenericError("Invalid parameter type for 'addr.path', expected: string")
    ident = args["id"]
    if not _wellformed(ident):
        raise GenericError("Invalid block export id")
    daemon = ctx.machine
    if "iothread" in args and args["iothread"] not in daemon.config.iothreads:
        raise GenericError(f'iothread "{args["iothread"]}" not found')
    num_queues = args.get("num-queues", 1)
    lbs = args.get("logical-block-size", 512)
    # The order of QEMU's checks: the id, the node, its mode, then the device's own options.
    if ident in daemon.exports:
        raise GenericError(f"Block export id '{ident}' is already in use")
    if args["node-name"] not in daemon.nodes:
        raise GenericError(f"Cannot find device='' nor node-name='{args['node-name']}'")
    if lbs & (lbs - 1) or lbs <= 0:
        raise GenericError(f"Property {ident}.logical-block-size doesn't take value '{lbs}', "
                           "it's not a power of 2")
    if not 512 <= lbs <= _MAX_LBS:
        raise GenericError(f"Property {ident}.logical-block-size doesn't take value {lbs} "
                           f"(minimum: 512, maximum: {_MAX_LBS})")
    if lbs > 2 << 20:
        raise GenericError(f"logical-block-size {lbs} is more than 2097152 (QEMU's limit)")
    if num_queues < 1:
        raise GenericError("num-queues must be greater than 0")
    if num_queues > 64:
        raise GenericError(f"num-queues {num_queues} is more than this daemon's 64")
    e = ExportConfig(ident, args["node-name"], path, bool(args.get("writable", False)), num_queues, lbs)
    await _call(daemon.add_export, e)


@command("block-export-del", {"id": ("string", True), "mode": ("string", False)})
async def _block_export_del(ctx: Context, args: dict[str, Any]) -> None:
    mode = args.get("mode", "safe")
    if mode not in ("safe", "hard"):
        raise GenericError(f"Parameter 'mode' does not accept value '{mode}'")
    ident = args["id"]
    await _call(ctx.machine.del_export, ident)
    # Before the reply, as qemu-storage-daemon 7.2 sends it: the export is gone
    # by the time the command returns.
    ctx.emit("BLOCK_EXPORT_DELETED", {"id": ident})


@command("query-block-exports")
async def _query_block_exports(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "vhost-user-blk", "id": e.config.id, "node-name": e.config.node_name,
             "shutting-down": False} for e in reversed(ctx.machine.exports.values())]
