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

    dn = sub.add_parser("default", help="the libvirt-style default network virbr0 (192.168.122.0/24)")
    dns = dn.add_subparsers(dest="op", required=True)
    dns.add_parser("start", help="create virbr0 with DHCP, DNS and NAT")
    dns.add_parser("stop", help="remove virbr0, its daemon and its nftables rules")
    st = dns.add_parser("status", help="show the bridge, the daemon and the leases")
    st.add_argument("--output", choices=("human", "json"), default="human")
    rs = dns.add_parser("reserve", help="always give MAC the address IP")
    rs.add_argument("mac")
    rs.add_argument("ip")
    rs.add_argument("--name", default="", help="DNS name answered for this host")
    dns.add_parser("serve", help=argparse.SUPPRESS)

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
    if args.what == "default":
        return await _default(args)
    if args.what == "tap":
        from appliance.net.taps import tap_owners

        print(f"{'TAP':<16}{'PID':<9}{'COMMAND':<18}QUEUE FDS")
        for o in tap_owners():
            print(f"{o.tap:<16}{o.pid:<9}{o.command:<18}{','.join(map(str, o.fds))}")
        return 0
    return 2


async def _default(args: argparse.Namespace) -> int:
    from appliance.net import default_net as dn

    if args.op == "start":
        await dn.start()
        print(f"default network started: {dn.BRIDGE} {dn.GATEWAY}/{dn.NETWORK.prefixlen}, "
              f"DHCP {dn.FIRST}-{dn.LAST}, NAT on")
    elif args.op == "stop":
        await dn.stop()
        print("default network stopped")
    elif args.op == "reserve":
        dn.add_reservation(args.mac, args.ip, args.name)
    elif args.op == "serve":
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await dn.serve(dn.state_dir(), stop)
    else:
        st = await dn.status()
        if args.output == "json":
            import json

            print(json.dumps(st, indent=2))
            return 0
        print(f"bridge:  {dn.BRIDGE} {'up' if st['bridge'] else 'absent'}")
        print(f"daemon:  {'running, pid ' + str(st['daemon']) if st['daemon'] else 'not running'}")
        print(f"nat:     {'on' if st['nat'] else 'off'}")
        leases = st["leases"]
        assert isinstance(leases, list)
        print(f"{'MAC':<19}{'IP':<17}{'HOSTNAME':<20}EXPIRES")
        import time as _t

        for le in leases:
            left = int(le["expires"] - _t.time())
            print(f"{le['mac']:<19}{le['ip']:<17}{le['hostname'] or '-':<20}{left}s")
    return 0
