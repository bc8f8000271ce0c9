"""kvm: /dev/kvm through cffi — the VM, its vCPUs, memory, interrupts and boot.

The error tree of this package::

    ApplianceError
     └── KvmError               an ioctl failed or KVM lacks something we need
          ├── KvmUnavailable    /dev/kvm is missing or not permitted
          └── VcpuError         a vCPU stopped on something it cannot go on from

Importing this package is cheap; the cffi declarations load with
:mod:`appliance.kvm.ffi` on first use of :mod:`~appliance.kvm.system`.
"""

from __future__ import annotations

from appliance.errors import ApplianceError


class KvmError(ApplianceError):
    """A KVM ioctl failed, or this host's KVM lacks a capability we need."""


class KvmUnavailable(KvmError):
    """/dev/kvm cannot be opened (absent, or not permitted for this user)."""


class VcpuError(KvmError):
    """A vCPU stopped on an exit it cannot continue from (internal error, failed entry)."""
