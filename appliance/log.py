"""Loggers that import :mod:`logging` only when something is logged.

`appliance run` boots the guest before most of the VMM is imported (see
:meth:`appliance.machine.machine.Machine.boot_early`). The modules on that
path log only on rare paths, so they take their logger from here and do not
make every start pay for importing logging (and traceback, string, weakref…)
before the vCPUs run.

    from appliance.log import get_logger
    log = get_logger(__name__)        # used like logging.getLogger(__name__)

:func:`configure` is ``logging.basicConfig`` deferred the same way.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see appliance.bootpath)
if TYPE_CHECKING:
    import logging
    from typing import Any

_pending: dict[str, Any] | None = None


def configure(**kwargs: Any) -> None:
    """``logging.basicConfig(**kwargs)``: now if logging is loaded, else when it first is used here."""
    global _pending
    _pending = kwargs
    if "logging" in sys.modules:
        apply()


def apply() -> None:
    """Import logging and apply a pending :func:`configure` (idempotent)."""
    global _pending
    import logging

    if _pending is not None:
        kwargs, _pending = _pending, None
        logging.basicConfig(**kwargs)


class _LazyLogger:
    __slots__ = ("_name", "_logger")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: logging.Logger | None = None

    def __getattr__(self, attr: str) -> Any:
        logger = self._logger
        if logger is None:
            apply()
            import logging

            logger = self._logger = logging.getLogger(self._name)
        return getattr(logger, attr)


def get_logger(name: str) -> logging.Logger:
    """A logger named ``name`` that loads :mod:`logging` on its first use."""
    return _LazyLogger(name)  # type: ignore[return-value]  # a stand-in with its interface
