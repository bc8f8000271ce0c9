"""Suite-wide fixtures and skip rules.

Tests that need a resource skip only when it is really absent here, and say so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent

# The property and fuzz tests draw the same examples on every run by default,
# so `make test` (and CI) passes or fails on the code, not on a lucky draw;
# HYPOTHESIS_PROFILE=explore draws fresh ones (what to run while hunting, and
# whatever it finds is kept as a named test).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def have_kvm() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


needs_kvm = pytest.mark.skipif(not have_kvm(), reason="/dev/kvm is absent or not permitted")
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
)
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT
