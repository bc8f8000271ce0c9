"""``python -m appliance`` is the ``appliance`` command: same dispatch, same exit codes."""

from __future__ import annotations

import subprocess
import sys

from appliance import __version__


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=60)


def test_module_runs_the_command() -> None:
    r = _run("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"appliance {__version__}"


def test_module_keeps_exit_code_2_for_a_bad_command_line() -> None:
    r = _run("run", "-nic", "bogus")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "'bogus'" in r.stderr and "Traceback" not in r.stderr
