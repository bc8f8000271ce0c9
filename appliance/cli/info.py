"""`appliance info`: what kind of KVM this host has, and what it allows.

Prints ``key: value`` lines (or JSON with ``--json``). The first line says
whether KVM is hardware (VMX/SVM: any guest runs natively) or PVM (only
64-bit CPL-3 code runs natively; an unmodified Linux kernel runs emulated).
"""

from __future__ import annotations

import json
import os
import sys

from appliance.errors import ConfigError

EXPLAIN = {
    "hardware": "hardware virtualization (VMX/SVM): guests run natively",
    "pvm": "PVM (kvm_pvm): 64-bit CPL-3 code runs natively, other guest code is emulated; "
    "Linux guests need a PVM-enabled kernel",
    "unknown": "unknown (neither VMX/SVM nor kvm_pvm found)",
}


def gather() -> dict[str, object]:
    from appliance.kvm import KvmError
    from appliance.kvm.system import Kvm, host_kind

    kind = host_kind()
    info: dict[str, object] = {"kvm": kind, "description": EXPLAIN[kind]}
    sysmod = "/sys/module"
    info["modules"] = sorted(m for m in os.listdir(sysmod) if m.startswith("kvm")) if os.path.isdir(sysmod) else []
    try:
        kvm = Kvm()
    except KvmError as err:
        info["device"] = f"unavailable: {err}"
        return info
    with kvm:
        info["device"] = kvm.path
        info["api_version"] = 12
        info["recommended_vcpus"] = kvm.recommended_vcpus
        info["max_vcpus"] = kvm.max_vcpus
        sig = next((e for e in kvm.supported_cpuid if e.function == 0x40000000), None)
        if sig is not None:
            raw = b"".join(v.to_bytes(4, "little") for v in (sig.ebx, sig.ecx, sig.edx))
            info["hypervisor_signature"] = raw.rstrip(b"\0").decode(errors="replace")
    return info


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print("usage: appliance info [--json]\n\nDescribe this host's KVM (hardware or PVM).")
        return 0
    for a in argv:
        if a != "--json":
            raise ConfigError(f"option '{a}' is not supported")
    info = gather()
    if "--json" in argv:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        for key, value in info.items():
            if isinstance(value, list):
                value = " ".join(value) or "-"
            print(f"{key}: {value}")
    return 0 if not str(info.get("device", "")).startswith("unavailable") else 1
