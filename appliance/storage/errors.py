"""Typed errors of the storage package."""

from __future__ import annotations

from appliance.errors import ApplianceError


class StorageError(ApplianceError):
    """A block backend could not do what was asked."""


class BackendOpenError(StorageError):
    """An image could not be opened (missing, locked, wrong format)."""


class ReadOnlyError(StorageError):
    """A write reached a read-only backend."""
