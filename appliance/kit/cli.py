"""``appliance kit``: build the kit, or say where its parts are.

    appliance kit build [--force] [--guest-only | --linux-only]
    appliance kit path [guest_elf|bzimage|vmlinux|initramfs|kitio|kitnet|kitdir]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from appliance.errors import ConfigError
from appliance.kit.build import build, paths
from appliance.kit.errors import KitError

PARTS = [f.name for f in dataclasses.fields(paths())]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def main(argv: list[str]) -> int:
    parser = _Parser(prog="appliance kit", description="Build the test guest and the Linux kit.")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    b = sub.add_parser("build", help="build the parts whose inputs changed")
    b.add_argument("--force", action="store_true", help="rebuild everything")
    only = b.add_mutually_exclusive_group()
    only.add_argument("--guest-only", action="store_true", help="build only the test guest")
    only.add_argument("--linux-only", action="store_true", help="build only the Linux kit")
    p = sub.add_parser("path", help="print the kit directory or one part's path")
    p.add_argument("part", nargs="?", default="kitdir", choices=PARTS)
    args = parser.parse_args(argv)

    if args.cmd == "path":
        print(getattr(paths(), args.part))
        return 0
    try:
        result = build(force=args.force, linux=not args.guest_only, guest=not args.linux_only)
    except KitError as err:
        print(f"appliance kit: {err}", file=sys.stderr)
        return 1
    print(result.kitdir)
    return 0
