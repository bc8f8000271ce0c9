"""What QMP does to NICs at run time: carrier up/down and packet captures.

The one module of the monitor that knows the machine's NIC specs
(:class:`appliance.machine.devices.NicSpec`): a NIC is found by its
``-device … id=`` or its ``-netdev id=`` (QEMU's ``set_link`` takes either),
and a capture (``filter-dump``) is a pcap writer shared by the CapturingBackend
of every queue pair of one NIC. Captures from ``-object`` and from
``object-add`` live in the same place (the spec's ``captures``/``writers``,
kept in step), so either kind can be deleted and the spec's ``close()``
closes whatever is left.

The functions take any object with a ``nics`` list of NicSpec-shaped NICs
(``netdev``, ``name``, ``owner``, ``backends``, ``device``, ``captures``,
``writers``) in place of a machine: that is how ``appliance net-daemon``'s
monitor (:mod:`appliance.qmp.net_daemon_commands`) shares them. Such a NIC
may have its own ``set_link(up)``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, ConfigError
from appliance.qmp.errors import DeviceNotFound, GenericError


def nic_specs(machine: Any) -> list[Any]:
    from appliance.machine.devices import NicSpec

    nics = getattr(machine, "nics", None)
    if isinstance(nics, list):
        # A net-daemon: its exports, then the back ends behind its hub ports.
        return list(nics) + list(getattr(machine, "hub_netdevs", []))

    return [s for s in machine.config.devices if isinstance(s, NicSpec)]


def hubs(machine: Any) -> list[Any]:
    """The machine's hubs (appliance.net.hub.Hub) in the order they were made."""
    from appliance.machine.devices import HubSpec

    if isinstance(getattr(machine, "hubs", None), list):
        return list(machine.hubs)  # a net-daemon's
    config = getattr(machine, "config", None)
    return [s.hub for s in getattr(config, "devices", ()) if isinstance(s, HubSpec)]


def _pair_ports(spec: Any) -> tuple[str, str] | None:
    """A -net pair's hub port names (the NIC's, the back end's); None for any other NIC."""
    if getattr(spec, "hub", -1) != 0 or getattr(spec, "port", None) is not None or not hasattr(spec, "hub_port"):
        return None
    return f"hub0port{spec.hub_port}", f"hub0port{1 - spec.hub_port}"


def nic_names(spec: Any) -> set[str]:
    names = {spec.netdev.id} - {""}
    names.update(_pair_ports(spec) or ())
    prefix = "virtio-net "
    if spec.name.startswith(prefix):
        names.add(spec.name[len(prefix):])
    return names


def find_nic(machine: Any, name: str) -> Any:
    """The NicSpec whose device or netdev is called ``name``.

    :raises DeviceNotFound: When there is none.
    """
    for spec in nic_specs(machine):
        if name in nic_names(spec):
            return spec
    raise DeviceNotFound(f"Device '{name}' not found")


def user_net_specs(machine: Any) -> list[Any]:
    """The NICs (and NIC-less netdevs) in their netdevs' command-line order, which is QEMU's
    order of user networks (a net-daemon's exports keep theirs)."""
    return sorted(nic_specs(machine), key=lambda s: getattr(s, "netdev_order", 0))


def usernet_info(machine: Any) -> str:
    """HMP ``info usernet``: every user-mode netdev's flow table, as QEMU prints it."""
    from appliance.nat.stack import UserNetwork
    from appliance.nat.stats import format_flows

    out = []
    for spec in user_net_specs(machine):
        if isinstance(spec.owner, UserNetwork):
            # QEMU names the netdev with the hub it hangs off (-1: no hub; 0 for -net).
            hub = getattr(spec, "hub", -1)
            out.append(f"Hub {hub} ({spec.netdev.id}):\r\n" + format_flows(spec.owner.flows(), "\r\n"))
    return "".join(out)


def usernet_stats(machine: Any) -> list[dict[str, Any]]:
    """Each user-mode netdev's counters (drops, errors, ...) and flow table, as JSON."""
    from dataclasses import asdict

    from appliance.nat.stack import UserNetwork

    return [
        {"netdev": spec.netdev.id, "counters": spec.owner.counters(),
         "flows": [asdict(f) for f in spec.owner.flows()]}
        for spec in user_net_specs(machine) if isinstance(spec.owner, UserNetwork)
    ]


def set_link(machine: Any, name: str, up: bool) -> None:
    from appliance.machine.devices import PeerlessNetdevSpec

    try:
        spec = find_nic(machine, name)
    except DeviceNotFound:
        # A hub port no NIC or back end names: QEMU takes it (a port with nothing on it, or
        # a -netdev hubport whose netdev= is the back end).
        port = next((p for hub in hubs(machine) for p in hub.ports if p.name == name), None)
        if port is None:
            raise
        port.link_up = up
        return
    if isinstance(spec, PeerlessNetdevSpec):
        spec.set_link(up)
        return
    if spec.device is None:
        raise GenericError(f"Device '{name}' is not running")
    pair = _pair_ports(spec)
    if pair is not None and name in (spec.netdev.id, pair[1]):
        # The back end of a -net pair, or its hub port: QEMU changes a NIC's link only when the
        # named client's peer is that NIC; here it is a hub port, so only the frames stop.
        spec.device.set_peer_link(up)
        return
    own = getattr(spec, "set_link", None)
    if own is not None:
        own(up)
    else:
        spec.device.set_link(up)


def _find_capture(machine: Any, ident: str) -> tuple[Any, int] | None:
    for spec in nic_specs(machine):
        for i, cfg in enumerate(spec.captures):
            if cfg.id == ident:
                return spec, i
    return None


# filter-dump's string properties (net/filter.c, net/filter-dump.c); maxlen is its one number.
_DUMP_STRINGS = ("netdev", "file", "queue", "status", "position", "insert")


def _dump_config(ident: str, props: dict[str, Any], *, hmp: bool) -> Any:
    """``object-add``'s properties checked as QEMU 7.2's QMP (typed JSON) or HMP ``object_add``
    (keyval text) checks them, in its words.

    :raises GenericError: naming the bad property.
    """
    from appliance.nic.config import MAXLEN_DEFAULT, U32_MAX, FilterDumpConfig
    from appliance.qemu_numbers import NumberError, strtou64

    for key, value in props.items():
        if key != "maxlen" and key not in _DUMP_STRINGS:
            raise GenericError(f"Parameter '{key}' is unexpected")
        if key != "maxlen" and not isinstance(value, str):
            raise GenericError(f"Invalid parameter type for '{key}', expected: string")
    maxlen = props.get("maxlen", MAXLEN_DEFAULT)
    if isinstance(maxlen, str):
        # HMP's keyval: qemu_strtou64 with base 0; QMP takes no string for a number.
        if not hmp:
            raise GenericError("Parameter 'maxlen' expects uint64")
        try:
            if "-" in maxlen or not maxlen.strip():
                raise NumberError(maxlen)
            maxlen = strtou64(maxlen)
        except NumberError:
            raise GenericError("Parameter 'maxlen' expects integer") from None
    elif isinstance(maxlen, bool) or not isinstance(maxlen, int):
        raise GenericError("Parameter 'maxlen' expects uint64")
    if not 0 <= maxlen <= U32_MAX:
        raise GenericError("Parameter 'maxlen' expects uint32_t")
    for key in ("netdev", "file"):
        if key not in props:
            raise GenericError(f"Parameter '{key}' is missing")
    try:
        return FilterDumpConfig.make("", ident, props["netdev"], props["file"], maxlen=maxlen,
                                     **{k: props[k] for k in ("queue", "status", "position", "insert")
                                        if k in props})
    except ConfigError as err:
        raise GenericError(str(err)) from None


async def add_capture(machine: Any, ident: str, props: dict[str, Any], *, hmp: bool = False) -> None:
    """Start a pcap of a NIC's netdev (``object-add`` with qom-type filter-dump).

    :param hmp: the properties are HMP ``object_add``'s text, not QMP's JSON values.
    :raises GenericError: On a duplicate id, a bad property or a file that cannot be opened.
    """
    from appliance.net.backend import LinkDownBackend
    from appliance.net.capture import CapturingBackend, open_capture

    if _find_capture(machine, ident) is not None:
        raise GenericError(f"attempt to add duplicate property '{ident}' to object (type 'container')")
    cfg = _dump_config(ident, props, hmp=hmp)
    spec = None
    for candidate in nic_specs(machine):
        if candidate.netdev.id == cfg.netdev:
            spec = candidate
    if spec is None:
        raise GenericError("Parameter 'netdev' expects a network backend id")
    try:
        index = cfg.place(spec.captures, {c.id for s in nic_specs(machine) for c in s.captures})
    except ConfigError as err:
        raise GenericError(str(err)) from None
    if not spec.backends:
        raise GenericError(f"netdev '{cfg.netdev}' is not open")
    try:
        writer = await asyncio.to_thread(open_capture, Path(cfg.file), maxlen=cfg.maxlen, queue=cfg.queue,
                                         status=cfg.status)
    except (ApplianceError, OSError) as err:
        raise GenericError(str(err)) from None
    if not spec.backends:
        # The machine ended while the file was being opened.
        writer.close()
        raise GenericError(f"netdev '{cfg.netdev}' is not open")
    # The device reads its backend list on every batch; swapping entries
    # between batches (we are on the loop) wraps the next frame already.
    if not all(isinstance(b, CapturingBackend) for b in spec.backends):
        wrapped = [b if isinstance(b, CapturingBackend) else CapturingBackend(b) for b in spec.backends]
        device = spec.device
        if device is not None:
            for i, b in enumerate(device.backends):
                for old, new in zip(spec.backends, wrapped, strict=True):
                    if b is old:
                        device.backends[i] = new
                    elif isinstance(b, LinkDownBackend) and b.inner is old:
                        b.inner = new  # the link is down: the capture starts with it back up
        spec.backends[:] = wrapped
    for b in spec.backends:
        b.writers.append(writer)
    # captures and writers stay index for index (del_capture); the list's order is QEMU's
    # filter order, which info network shows.
    spec.captures.insert(index, cfg)
    spec.writers.insert(index, writer)


def del_capture(machine: Any, ident: str) -> None:
    """Stop and close a capture (``object-del``); frames after this are not written.

    :raises GenericError: When no capture has that id.
    """
    found = _find_capture(machine, ident)
    if found is None:
        raise GenericError(f"object '{ident}' not found")
    spec, i = found
    del spec.captures[i]
    writer = spec.writers.pop(i)
    for b in spec.backends:
        writers = getattr(b, "writers", None)
        if writers is not None and writer in writers:
            writers.remove(writer)
    writer.close()
