"""Typed errors of the kit builder."""

from __future__ import annotations

from appliance.errors import ApplianceError


class KitError(ApplianceError):
    """A kit part could not be built (missing tool, download failed, bad input file)."""


class BzImageError(KitError):
    """A file is not a bzImage whose payload we can unpack."""


class ModuleError(KitError):
    """A kernel module is missing or its .modinfo cannot be read."""


class TcgError(KitError):
    """A QEMU TCG guest did not do what the harness expected."""


class TcgTimeout(TcgError):
    """The console did not show the expected text in time."""


class TcgCommandError(TcgError):
    """A shell command in the guest exited with a non-zero status."""

    def __init__(self, message: str, *, status: int, output: str) -> None:
        super().__init__(message)
        self.status = status
        self.output = output
