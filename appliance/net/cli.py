"""`appliance net`: bridges, taps and the libvirt-style default network."""

from __future__ import annotations

import argparse
import asyncio
import sys

from appliance.errors import ConfigError
from appliance.net.errors import NetError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance net", description="Manage host-side networking.")
    sub = p.add_subparsers(dest="what", required=True)

    br = sub.add_parser("bridge", help="create, delete and list bridges")
    brs = br.add_subparsers(dest="op", required=True)
    a = brs.add_parser("add", help="create a bridge and bring it up")
    a.add_argument("name")
    a.add_argument("--addr", help="address to give the bridge, e.g. 10.1.0.1/24")
    d = brs.add_parser("del", help="delete a bridge")
    d.add_argument("name")
    brs.add_parser("ls", help="list bridges with their ports and addresses")

    tap = sub.add_parser("tap", help="inspect taps")
    taps = tap.add_subparsers(dest="op", required=True)
    taps.add_parser("ls", help="list taps with the processes and queue fds that hold them")
    return p


def main(argv: list[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return asyncio.run(_run(args))
    except NetError as err:
        print(f"appliance net: {err}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace) -> int:
    if args.what == "bridge":
        from appliance.net import bridge

        if args.op == "add":
            if len(args.name) > 15:
                raise ConfigError(f"bridge name '{args.name}' is longer than 15 characters")
            await bridge.add_bridge(args.name, address=args.addr)
        elif args.op == "del":
            if not await bridge.del_bridge(args.name):
                print(f"appliance net: no bridge '{args.name}'", file=sys.stderr)
                return 1
        else:
            rows = await bridge.list_bridges()
            print(f"{'BRIDGE':<16}{'STATE':<7}{'ADDRESSES':<24}PORTS")
            for b in rows:
                v4 = ",".join(a for a in b.addresses if ":" not in a) or "-"
                print(f"{b.name:<16}{'up' if b.up else 'down':<7}{v4:<24}{','.join(b.ports) or '-'}")
        return 0
    if args.what == "tap":
        from appliance.net.taps import tap_owners

        print(f"{'TAP':<16}{'PID':<9}{'COMMAND':<18}QUEUE FDS")
        for o in tap_owners():
            print(f"{o.tap:<16}{o.pid:<9}{o.command:<18}{','.join(map(str, o.fds))}")
        return 0
    return 2
