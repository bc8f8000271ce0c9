"""Numbers as QEMU 7.2 reads them from its command lines (QEMU util/cutils.c).

Two syntaxes:

- sizes (``qemu_strtosz``): a decimal number, a fraction only before a
  suffix (``1.5k``), or hexadecimal (``0x100000``, no fraction); then at
  most one suffix ``B K M G T P E`` in either case, binary multiples; nothing
  after it. Leading white space and a ``+`` pass, as C's ``strtoull`` lets
  them; a ``-`` anywhere in the number does not.
- plain numbers (``qemu_strtou64`` / ``qemu_strtoul`` with base 0): C's
  ``strtoull``, so ``0x`` hexadecimal, a leading ``0`` octal, and a ``-``
  that wraps modulo 2**64.

Errors are :class:`NumberError`; ``out_of_range`` is QEMU's ERANGE, which
qemu-img words differently from text that is no number at all.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: -m reads sizes on the boot path
if TYPE_CHECKING:
    from collections.abc import Callable

U64 = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1

_SUFFIX_SHIFT = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
# C's isspace() in the "C" locale: what strtoull skips before a number.
_C_SPACE = " \t\n\v\f\r"
_DECIMAL = "0123456789"


class NumberError(ValueError):
    """Text qemu-img would not take as a number.

    :param text: the text as given
    :param out_of_range: it is a number, but past 64 bits (QEMU's ERANGE)
    """

    def __init__(self, text: str, *, out_of_range: bool = False) -> None:
        super().__init__(f"'{text}' is {'out of range' if out_of_range else 'not a number'}")
        self.text = text
        self.out_of_range = out_of_range


def _strtoull(text: str, pos: int, base: int) -> tuple[int, int, bool]:
    """C's strtoull from ``pos``: (value, end, overflowed). end == pos when
    nothing was converted; an overflow gives U64 (errno ERANGE)."""
    i = pos
    while i < len(text) and text[i] in _C_SPACE:
        i += 1
    negative = i < len(text) and text[i] == "-"
    if i < len(text) and text[i] in "+-":
        i += 1
    if base in (0, 16) and text[i:i + 2].lower() == "0x" and _digits(text, i + 2, 16) > i + 2:
        base, i = 16, i + 2
    elif base == 0:
        base = 8 if text[i:i + 1] == "0" else 10
    end = _digits(text, i, base)
    if end == i:
        return 0, pos, False
    value = int(text[i:end], base)
    if value > U64:
        return U64, end, True
    return (-value & U64) if negative else value, end, False


def _run(text: str, pos: int, chars: str) -> int:
    """Where the run of ``chars`` starting at ``pos`` ends."""
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _digits(text: str, pos: int, base: int) -> int:
    """Where the run of ``base`` digits starting at ``pos`` ends."""
    valid = "0123456789abcdefghijklmnopqrstuvwxyz"[:base]
    while pos < len(text) and text[pos].lower() in valid:
        pos += 1
    return pos


def strtou64(text: str) -> int:
    """``qemu_strtou64(text, NULL, 0)``: all of ``text`` a C integer (base 0).

    :raises NumberError: when something is left over or nothing converts
        (``out_of_range`` past 64 bits with nothing left over).
    """
    value, end, overflowed = _strtoull(text, 0, 0)
    if end == 0 or end < len(text):
        raise NumberError(text)
    if overflowed:
        raise NumberError(text, out_of_range=True)
    return value


def strtoi64(text: str) -> int:
    """``qemu_strtoi64(text, NULL, 0)``: all of ``text`` a C ``long long`` (base 0), what
    QEMU's keyval visitor reads an integer property with (``-device …,speed=N``).

    :raises NumberError: when something is left over or nothing converts
        (``out_of_range`` outside int64 with nothing left over).
    """
    value, end, overflowed = _strtoull(text, 0, 0)
    if end == 0 or end < len(text):
        raise NumberError(text)
    negative = text.lstrip(_C_SPACE).startswith("-")
    # _strtoull wraps a "-" modulo 2**64; strtoll wants the magnitude within int64.
    magnitude = -value & U64 if negative else value
    if overflowed or magnitude > INT64_MAX + negative:
        raise NumberError(text, out_of_range=True)
    return -magnitude if negative else magnitude


def _img_warning(message: str) -> None:
    print(f"appliance img: warning: {message}", file=sys.stderr)


def strtosz(text: str, *, warn: Callable[[str], None] | None = _img_warning) -> int:
    """``qemu_strtosz(text, NULL)``: a size in bytes (see the module's docstring).

    A hexadecimal number with a suffix is taken, with QEMU's deprecation
    warning passed to ``warn`` (qemu-img's form on stderr by default).

    :raises NumberError: for anything else (``out_of_range`` past 2**64 - 1).
    """
    val, end = _sz_integer(text, 10)
    if "-" in text[:end]:
        raise NumberError(text)
    hexa = False
    valf = 0  # the fraction, as a 64-bit fixed-point number (0.64)
    if val == 0 and text[end:end + 1] in ("x", "X"):
        val, end = _sz_integer(text, 16)
        if text[end:end + 1] == ".":
            raise NumberError(text)
        hexa = True
    elif text[end:end + 1] == ".":
        # What strtod takes after the integer part: the point, digits, an exponent.
        digits_end = _run(text, end + 1, _DECIMAL)
        exp = digits_end + 1 + (text[digits_end + 1:digits_end + 2] in ("+", "-"))
        if text[digits_end:digits_end + 1] in ("e", "E") and _run(text, exp, _DECIMAL) > exp:
            raise NumberError(text)  # an exponent: the whole input is refused
        if digits_end > end + 1:
            fraction = text[end:digits_end]
            end = digits_end
            # C converts with (uint64_t)(fraction * 0x1p64); one that rounds up
            # to 1.0 is out of range there and comes out 0 on x86-64.
            valf = int(float("0" + fraction) * 2.0**64)
            if valf > U64:
                valf = 0
        else:
            end += 1  # "1." and "1.k": strtod converts nothing, the point is skipped
    shift = _SUFFIX_SHIFT.get(text[end:end + 1].upper(), -1)
    if shift >= 0:
        if hexa and warn is not None:
            warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
        end += 1
    if end < len(text):
        raise NumberError(text)
    if shift <= 0:
        if valf:
            raise NumberError(text)  # a fraction needs a suffix
        return val
    # The exact product, the fraction's half rounded up, as QEMU computes it in 128 bits.
    part = valf << shift
    total = (val << shift) + (part >> 64) + ((part & U64) >> 63)
    if total > U64:
        raise NumberError(text, out_of_range=True)
    return total


def _sz_integer(text: str, base: int) -> tuple[int, int]:
    """The integer part of a size: (value, end). Past 64 bits it is QEMU's
    ERANGE if nothing follows, else text that is no size."""
    val, end, overflowed = _strtoull(text, 0, base)
    if end == 0:
        raise NumberError(text)
    if overflowed:
        raise NumberError(text, out_of_range=end == len(text))
    return val, end
