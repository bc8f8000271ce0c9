"""machine: config dataclasses, the builder that wires them, and the :class:`Machine` lifecycle.

Public API::

    MachineConfig, ChardevConfig          (appliance.machine.config)
    Machine                                (appliance.machine.machine)
    Console, ConsoleTimeout                (appliance.machine.console)
"""

from __future__ import annotations

from appliance.machine.config import ChardevConfig, MachineConfig

__all__ = ["ChardevConfig", "MachineConfig", "Machine", "Console", "ConsoleTimeout"]


def __getattr__(name: str) -> object:
    # Machine pulls in the KVM layer; config users should not pay for it.
    if name == "Machine":
        from appliance.machine.machine import Machine

        return Machine
    if name in ("Console", "ConsoleTimeout"):
        from appliance.machine import console

        return getattr(console, name)
    raise AttributeError(name)
