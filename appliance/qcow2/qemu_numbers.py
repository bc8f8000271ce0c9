"""Moved to :mod:`appliance.qemu_numbers` (the command lines read QEMU's numbers too)."""

from appliance.qemu_numbers import INT64_MAX, INT_MAX, U64, NumberError, strtosz, strtou64

__all__ = ["INT64_MAX", "INT_MAX", "U64", "NumberError", "strtosz", "strtou64"]
