"""The QMP package's errors.

::

    ApplianceError
     └─ QmpError                  anything the monitor raises
         └─ CommandError          becomes an ``{"error": …}`` reply; never ends the session
             ├─ GenericError
             ├─ CommandNotFound
             └─ DeviceNotFound

The ``error_class`` values are the ones QEMU puts in ``"class"``
(qmp-spec.rst §2.4.2, qapi/error.json); clients branch on them, so they are
part of the wire format.
"""

from __future__ import annotations

from typing import Any, ClassVar

from appliance.errors import ApplianceError


class QmpError(ApplianceError):
    """Root of the monitor's errors."""


class CommandError(QmpError):
    """A command failed; the client gets ``{"error": {"class": …, "desc": …}}``."""

    error_class: ClassVar[str] = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc

    def to_json(self) -> dict[str, Any]:
        return {"class": self.error_class, "desc": self.desc}


class GenericError(CommandError):
    error_class = "GenericError"


class CommandNotFound(CommandError):
    error_class = "CommandNotFound"


class DeviceNotFound(CommandError):
    error_class = "DeviceNotFound"
