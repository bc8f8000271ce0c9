"""Errors of the kernel loaders.

A kernel, initrd or command line the loaders cannot use is bad user input, so
:class:`BootError` is a :class:`~appliance.errors.ConfigError`: the CLI prints
its one-line message and exits with status 2.
"""

from __future__ import annotations

from appliance.errors import ConfigError


class BootError(ConfigError):
    """The kernel, initrd or command line cannot be loaded into this VM."""
