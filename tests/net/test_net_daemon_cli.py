"""`appliance net-daemon` command line: QEMU-storage-daemon-style options, refused by name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.cli.net_daemon import NetExport, parse_args, parse_export, wants_help
from appliance.errors import ConfigError


def test_export_and_netdev_parse() -> None:
    netdevs, exports = parse_args(
        [
            "--netdev", "tap,id=t0,ifname=tap9,queues=2",
            "--export=type=vhost-user-net,id=e0,netdev=t0,addr.type=unix,addr.path=/tmp/n.sock,queues=2",
        ]
    )
    assert set(netdevs) == {"t0"}
    assert exports == [NetExport("e0", "t0", "/tmp/n.sock", 2)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "nothing to do"),
        (["--bogus"], "unknown option '--bogus'"),
        (["--export", "type=vhost-user-blk,id=e,netdev=n,addr.type=unix,addr.path=p"], "type 'vhost-user-blk'"),
        (["--export", "type=vhost-user-net,id=e,netdev=n,addr.type=unix,addr.path=p"], "no netdev 'n'"),
        (
            [
                "--netdev", "user,id=n",
                "--export", "type=vhost-user-net,id=e,netdev=n,addr.type=unix,addr.path=p,queues=2",
            ],
            "needs a tap netdev",
        ),
        (["--export", "type=vhost-user-net,id=e,netdev=n,addr.type=inet,addr.path=p"], "addr.type 'inet'"),
        (["--netdev"], "needs a value"),
        # Hubs: a port has one peer, which must come before it and be a back end.
        (["--netdev", "hubport,id=p,hubid=0,netdev=u", "--netdev", "user,id=u",
          "--export", "type=vhost-user-net,id=e,netdev=p,addr.type=unix,addr.path=s"], "netdev 'u' not found"),
        (["--netdev", "user,id=u", "--netdev", "hubport,id=p,hubid=0,netdev=u",
          "--export", "type=vhost-user-net,id=e,netdev=u,addr.type=unix,addr.path=s"], "can't take value 'u'"),
        (["--netdev", "user,id=u", "--netdev", "hubport,id=p,hubid=0,netdev=u",
          "--export", "type=vhost-user-net,id=e,netdev=p,addr.type=unix,addr.path=s"], "can't take value 'p'"),
        (["--netdev", "user,id=u", "--netdev", "hubport,id=p,hubid=0,netdev=u",
          "--netdev", "hubport,id=q,hubid=1,netdev=u",
          "--export", "type=vhost-user-net,id=e,netdev=q,addr.type=unix,addr.path=s"], "peer of hub port p"),
        (["--netdev", "hubport,id=p,hubid=0", "--netdev", "hubport,id=q,hubid=1,netdev=p",
          "--export", "type=vhost-user-net,id=e,netdev=p,addr.type=unix,addr.path=s"], "is a hub port"),
        (["--netdev", "hubport,id=p,hubid=0",
          "--export", "type=vhost-user-net,id=e,netdev=p,addr.type=unix,addr.path=s,queues=2"], "needs a tap"),
        (["--netdev", "user,id=u", "--netdev", "hubport,id=p,hubid=0,netdev=u", "--netdev", "hubport,id=q,hubid=0",
          "--export", "type=vhost-user-net,id=e,netdev=q,addr.type=unix,addr.path=s",
          "--object", "filter-dump,id=f,netdev=p,file=/tmp/x.pcap"], "capture on 'u'"),
    ],
)
def test_bad_command_lines_are_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_bad_command_line_exits_2_with_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "net-daemon", "--netdev", "tap,id=x,queues=abc"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "'queues' expects a number, got 'abc'" in r.stderr


def test_help_names_the_options() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "net-daemon", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "--netdev" in r.stdout and "vhost-user-net" in r.stdout


def test_export_type_may_be_implied() -> None:
    """``--export vhost-user-net,id=...`` as qemu-storage-daemon takes its exports."""
    assert parse_export("vhost-user-net,id=e0,netdev=u0,addr.type=unix,addr.path=/tmp/s") == NetExport(
        "e0", "u0", "/tmp/s", 1)


def test_help_is_not_taken_from_an_option_value() -> None:
    assert wants_help(["--netdev", "user,id=u0", "--help"])
    assert not wants_help(["--netdev", "--help"])
