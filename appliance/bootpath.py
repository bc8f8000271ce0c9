"""What `appliance run` may import before its vCPUs start, and a NamedTuple that fits.

`appliance run` builds the VM and starts the guest before it loads asyncio
(:meth:`~appliance.machine.machine.Machine.boot_early`), so every module on
that path costs boot time. Measured on the 2-core PVM host this project is
benchmarked on, on top of what the path needs anyway: ``typing`` (with ``re``,
which it imports) ~6 ms, ``pathlib`` ~6 ms, ``contextlib`` ~1 ms, against
~45 ms for QEMU to reach the test guest's readiness line. Modules on the path
(:data:`BOOT_PATH`, checked by ``tests/boot/test_boot_path_imports.py``)
therefore:

- import typing names only under ``if TYPE_CHECKING:``, with
  ``TYPE_CHECKING = False`` defined locally (mypy and ruff recognise the name);
- declare records with this module's :class:`NamedTuple`;
- handle paths with ``os`` and ``open()`` (any ``str`` or ``os.PathLike``).
"""

from __future__ import annotations

import collections

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
else:

    class _NamedTupleMeta(type):
        """Class syntax for collections.namedtuple, as typing.NamedTuple offers it.

        Fields are the annotated names in order; a class attribute of the same
        name is that field's default; methods, properties and the docstring
        are copied onto the generated tuple class.
        """

        def __new__(mcls, name: str, bases: tuple[type, ...], ns: dict[str, object]) -> type:
            if not bases:
                return super().__new__(mcls, name, bases, ns)
            annotations = ns.get("__annotations__", {})
            assert isinstance(annotations, dict)
            fields = list(annotations)
            defaults = [ns[f] for f in fields if f in ns]
            if any(f not in ns for f in fields[len(fields) - len(defaults):]):
                raise TypeError(f"{name}: a field without a default follows one with a default")
            cls = collections.namedtuple(name, fields, defaults=defaults, module=str(ns["__module__"]))  # type: ignore[misc]
            for key, value in ns.items():
                if key not in fields and key not in ("__module__", "__qualname__", "__dict__", "__weakref__"):
                    setattr(cls, key, value)
            cls.__qualname__ = str(ns.get("__qualname__", name))
            return cls

    class NamedTuple(metaclass=_NamedTupleMeta):
        """Base for typed records on the boot path (see the module docstring)."""


# The modules `appliance run` imports before its vCPUs start.
BOOT_PATH = (
    "appliance.cli.main",
    "appliance.cli.run",
    "appliance.kvm.system",
    "appliance.kvm.vm",
    "appliance.machine.machine",
    "appliance.machine.builder",
    "appliance.kvm.acpi",
    "appliance.kvm.vcpu",
)
