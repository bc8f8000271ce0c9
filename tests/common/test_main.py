"""The `appliance` dispatcher: help, unknown commands, exit codes."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_every_subcommand() -> None:
    from appliance.cli.main import SUBCOMMANDS

    r = run("--help")
    assert r.returncode == 0
    for name in SUBCOMMANDS:
        assert name in r.stdout


def test_unknown_command_is_one_line_and_exit_2() -> None:
    r = run("frobnicate")
    assert r.returncode == 2
    assert r.stderr.strip() == "appliance: unknown command 'frobnicate'"
    assert "Traceback" not in r.stderr
