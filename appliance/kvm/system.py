"""/dev/kvm itself: opening it, its capabilities, and what kind of KVM this host has.

Two kinds of host run us. With hardware virtualization (``vmx``/``svm`` in
/proc/cpuinfo) any guest runs natively. On a PVM host (the ``kvm_pvm`` module,
software nested virtualization on cloud VMs) only 64-bit code at CPL 3 runs
natively; everything else goes through KVM's instruction emulator, so an
unmodified Linux kernel crawls. :func:`host_kind` tells them apart for
``appliance info`` and for the warning ``appliance run`` prints.
"""

from __future__ import annotations

import errno
import fcntl
import os
from functools import cached_property

from appliance.kvm import KvmError, KvmUnavailable
from appliance.kvm import ffi as k
from appliance.kvm.ffi import ffi

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    from typing import Literal

    from appliance.machine.config import StrPath

    HostKind = Literal["hardware", "pvm", "unknown"]

KVM_DEVICE = "/dev/kvm"



def host_kind(sys_module: StrPath = "/sys/module", cpuinfo: StrPath = "/proc/cpuinfo") -> HostKind:
    """Whether this host's KVM is hardware (VMX/SVM) or PVM.

    PVM is recognised by the ``kvm_pvm`` module being loaded while the CPU
    flags show neither ``vmx`` nor ``svm``.
    """
    try:
        flags: set[str] = set()
        with open(cpuinfo) as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        flags = set()
    hw = bool(flags & {"vmx", "svm"})
    pvm = os.path.exists(os.path.join(sys_module, "kvm_pvm"))
    if pvm and not hw:
        return "pvm"
    if hw:
        return "hardware"
    return "pvm" if pvm else "unknown"


def kvm_device() -> str:
    """The KVM device to open: ``$APPLIANCE_KVM_DEVICE`` or /dev/kvm."""
    return os.environ.get("APPLIANCE_KVM_DEVICE") or KVM_DEVICE


def open_kvm(path: str | None = None) -> int:
    """Open /dev/kvm read-write, turning the usual failures into one clear sentence.

    :raises KvmUnavailable: When the device is absent or not permitted.
    """
    path = path or kvm_device()
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmUnavailable(
            f"{path} does not exist: load the kvm module (kvm_intel, kvm_amd or kvm_pvm)"
        ) from None
    except PermissionError:
        raise KvmUnavailable(
            f"{path}: permission denied (run as root or join the 'kvm' group)"
        ) from None
    except OSError as err:
        raise KvmUnavailable(f"{path} cannot be opened: {os.strerror(err.errno or 0)}") from err


def ioctl(fd: int, request: int, arg: object = 0, what: str = "") -> int:
    """``fcntl.ioctl`` with a KvmError naming the request on failure.

    ``arg`` is an int or a cffi struct pointer; structs are passed as mutable
    buffers so the kernel's answer lands in them.
    """
    try:
        if isinstance(arg, int):
            # fcntl takes a C int; KVM reads the argument as unsigned.
            return fcntl.ioctl(fd, request, arg - (1 << 32) if arg > 0x7FFF_FFFF else arg)
        return fcntl.ioctl(fd, request, ffi.buffer(arg), True)  # type: ignore[call-overload]
    except OSError as err:
        name = what or hex(request)
        raise KvmError(f"{name} failed: {os.strerror(err.errno or 0)}") from err


class CpuidEntry:
    """One ``struct kvm_cpuid_entry2``, as an immutable value.

    A plain class (not a dataclass or NamedTuple: ``index`` would shadow
    ``tuple.index``) so that `appliance run` does not import dataclasses
    before its vCPUs run.
    """

    __slots__ = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
    _FIELDS = __slots__

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    def __init__(self, function: int, index: int, flags: int, eax: int, ebx: int, ecx: int, edx: int) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "function", function)
        setattr_(self, "index", index)
        setattr_(self, "flags", flags)
        setattr_(self, "eax", eax)
        setattr_(self, "ebx", ebx)
        setattr_(self, "ecx", ecx)
        setattr_(self, "edx", edx)

    def _values(self) -> tuple[int, ...]:
        return (self.function, self.index, self.flags, self.eax, self.ebx, self.ecx, self.edx)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"CpuidEntry is immutable (cannot set {name})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CpuidEntry):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return "CpuidEntry(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self._FIELDS) + ")"


class Kvm:
    """An open /dev/kvm: the system-wide ioctls."""

    def __init__(self, path: str | None = None) -> None:
        path = path or kvm_device()
        self.path = path
        self.fd = open_kvm(path)
        try:
            version = ioctl(self.fd, k.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if version != k.KVM_API_VERSION:
                raise KvmError(f"{path} speaks KVM API {version}, expected {k.KVM_API_VERSION}")
            for cap, name in (
                (k.KVM_CAP_USER_MEMORY, "user memory"),
                (k.KVM_CAP_IRQCHIP, "in-kernel irqchip"),
                (k.KVM_CAP_IRQ_ROUTING, "IRQ routing"),
                (k.KVM_CAP_IRQFD, "irqfd"),
                (k.KVM_CAP_IOEVENTFD, "ioeventfd"),
                (k.KVM_CAP_EXT_CPUID, "KVM_GET_SUPPORTED_CPUID"),
            ):
                if not self.check_extension(cap):
                    raise KvmError(f"{path} lacks {name}, which the appliance needs")
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        try:
            return fcntl.ioctl(self.fd, k.KVM_CHECK_EXTENSION, cap)
        except OSError:
            return 0

    @cached_property
    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, k.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    @cached_property
    def max_vcpus(self) -> int:
        """The most vCPUs one VM may have (KVM_CAP_MAX_VCPUS, else NR_VCPUS, else 4)."""
        return self.check_extension(k.KVM_CAP_MAX_VCPUS) or self.check_extension(k.KVM_CAP_NR_VCPUS) or 4

    @cached_property
    def recommended_vcpus(self) -> int:
        return self.check_extension(k.KVM_CAP_NR_VCPUS) or 4

    @cached_property
    def supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        """KVM_GET_SUPPORTED_CPUID, grown until the kernel stops saying E2BIG."""
        nent = 128
        while True:
            raw = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + nent * ffi.sizeof("struct kvm_cpuid_entry2"))
            cp = ffi.cast("struct kvm_cpuid2 *", raw)
            cp.nent = nent
            try:
                fcntl.ioctl(self.fd, k.KVM_GET_SUPPORTED_CPUID, ffi.buffer(raw), True)
            except OSError as err:
                if err.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {os.strerror(err.errno or 0)}") from err
            return tuple(
                CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (cp.entries[i] for i in range(cp.nent))
            )

    @cached_property
    def msr_index_list(self) -> frozenset[int]:
        """MSRs KVM can save and restore (KVM_GET_MSR_INDEX_LIST)."""
        n = 512
        while True:
            raw = ffi.new("char[]", 4 + 4 * n)
            lst = ffi.cast("struct kvm_msr_list *", raw)
            lst.nmsrs = n
            try:
                fcntl.ioctl(self.fd, k.KVM_GET_MSR_INDEX_LIST, ffi.buffer(raw), True)
            except OSError as err:
                if err.errno == errno.E2BIG and n < 16384:
                    n *= 4
                    continue
                return frozenset()
            return frozenset(lst.indices[i] for i in range(lst.nmsrs))

    def create_vm_fd(self) -> int:
        return ioctl(self.fd, k.KVM_CREATE_VM, 0, "KVM_CREATE_VM")

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
