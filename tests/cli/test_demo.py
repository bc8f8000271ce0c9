"""`make demo` (python -m appliance.demo) boots the test guest, types info and poweroff, exits 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.kit import paths
from tests.conftest import needs_kvm


@needs_kvm
@pytest.mark.skipif(not paths().guest_elf.exists(), reason="test guest not built (appliance kit build)")
def test_demo_shows_the_console_and_powers_off() -> None:
    proc = subprocess.run([sys.executable, "-m", "appliance.demo"], capture_output=True, timeout=120)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out + proc.stderr.decode(errors="replace")
    assert "TESTGUEST-READY cpus=2 mem=256" in out
    assert "INFO cpus=2" in out
    assert "exited with status 0" in out
