"""`make demo` (python -m appliance.demo): the test guest with a qcow2 disk and a user-mode NIC,
driven over its console; the disk checks clean and the capture holds the exchange."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from appliance.kit import paths
from tests.conftest import needs_kvm


@needs_kvm
@pytest.mark.skipif(not paths().guest_elf.exists(), reason="test guest not built (appliance kit build)")
def test_demo_uses_disk_and_user_network_and_powers_off() -> None:
    proc = subprocess.run([sys.executable, "-m", "appliance.demo"], capture_output=True, timeout=120)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out + proc.stderr.decode(errors="replace")
    assert "TESTGUEST-READY cpus=2 mem=256" in out
    assert "INFO cpus=2" in out
    written = re.search(r"BLK write sector=0 count=8 crc32=(0x[0-9a-f]+)", out)
    assert written and f"BLK read sector=0 count=8 crc32={written.group(1)}" in out
    assert "NET dhcp ip=10.0.2.15" in out
    assert "NET ping done sent=2 received=2" in out
    assert "exited with status 0" in out
    assert "No errors were found on the image." in out
    assert "DHCP ACK" in out and "Echo (ping) reply" in out
