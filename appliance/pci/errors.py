"""Typed errors of the PCI package.

::

    ApplianceError
     └── PciError
          ├── SlotError (also ConfigError: a bad or taken ``addr=``, a full bus)
          └── BarSpaceError (also ConfigError: the MMIO window is exhausted)
"""

from __future__ import annotations

from appliance.errors import ApplianceError, ConfigError


class PciError(ApplianceError):
    """Something the PCI layer cannot do."""


class SlotError(PciError, ConfigError):
    """A PCI address that is malformed, already used, or a bus with no free slot."""


class BarSpaceError(PciError, ConfigError):
    """A BAR that does not fit into the PCI memory window."""
