"""Errors of the user-mode network stack.

::

    ApplianceError
     └── NatError          a host-side failure the stack reports (socket set-up, hostfwd bind)

Guest mistakes (bad frames) are never errors: they are dropped and counted in
:mod:`appliance.nat.stats`. Bad ``-netdev user`` options raise
:class:`appliance.errors.ConfigError`.
"""

from __future__ import annotations

from appliance.errors import ApplianceError


class NatError(ApplianceError):
    """The user-mode stack could not do something on the host side."""
