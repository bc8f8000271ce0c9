"""Typed errors of the host-side network package."""

from __future__ import annotations

from appliance.errors import ApplianceError, ConfigError


class NetError(ApplianceError):
    """A host network object (tap, bridge, socket) could not be set up or used."""


class TapError(NetError):
    """Opening or configuring a tap device failed."""


class NetConfigError(ConfigError):
    """A bad -netdev / -nic / filter-dump value (exit code 2)."""
