"""QEMU's option grammar: ``value,key=val,key=val`` with ``,,`` escaping a comma.

Used by `appliance run`, `storage-daemon` and `net-daemon` so that every
command takes QEMU's syntax exactly. Unknown keys are refused by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from appliance.errors import ConfigError
from appliance.log import get_logger

log = get_logger(__name__)


class OptionDict(dict[str, str]):
    """Parsed ``key=val`` pairs that remember which keys were consumed."""

    def __init__(self, option: str, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        self.option = option
        self.repeated: dict[str, list[str]] = {}
        for k, v in pairs:
            self.repeated.setdefault(k, []).append(v)
            self[k] = v

    def take(self, key: str, default: str | None = None) -> str | None:
        return self.pop(key, default)

    def take_all(self, key: str) -> list[str]:
        self.pop(key, None)
        return self.repeated.get(key, [])

    def take_bool(self, key: str, default: bool = False) -> bool:
        v = self.pop(key, None)
        if v is None:
            return default
        return parse_bool(v, f"{self.option} {key}")

    def take_int(self, key: str, default: int | None = None, *, minimum: int | None = None) -> int | None:
        v = self.pop(key, None)
        if v is None:
            return default
        try:
            if "_" in v:  # Python's digit separator; QEMU's strtoull stops there
                raise ValueError(v)
            n = int(v, 0)
        except ValueError:
            raise ConfigError(f"{self.option}: '{key}' expects a number, got '{v}'") from None
        if minimum is not None and n < minimum:
            raise ConfigError(f"{self.option}: '{key}' must be at least {minimum}, got '{v}'")
        return n

    def require(self, key: str) -> str:
        v = self.pop(key, None)
        if v is None:
            raise ConfigError(f"{self.option}: Parameter '{key}' is missing")
        return v

    def finish(self) -> None:
        """Refuse any key nobody consumed, naming it."""
        if self:
            key = next(iter(self))
            raise ConfigError(f"{self.option}: Invalid parameter '{key}'")


def split_option(text: str) -> list[str]:
    """Split on single commas; ``,,`` stands for a literal comma."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_option(
    option: str, text: str, *, implied: str | None = None, flags: Iterable[str] = (),
    warn_flags: bool = False,
) -> OptionDict:
    """Parse ``text`` of ``option`` (e.g. ``-drive``).

    :param implied: key for a leading bare value (``-netdev tap,id=n0`` → ``type=tap``).
    :param flags: keys allowed bare (``server`` → ``server=on``; ``nowait`` → ``wait=off``).
    :param warn_flags: warn of each bare flag, as QEMU does for options it parses as
        QemuOpts since 6.0 (``-netdev``, ``-nic``); its legacy chardev strings
        (``-serial tcp::4444,server,nowait``) it takes silently.
    :raises ConfigError: on a malformed pair.
    """
    if text.lstrip().startswith("{"):
        return OptionDict(option, json_pairs(option, text))
    flagset = set(flags)
    pairs: list[tuple[str, str]] = []
    for idx, part in enumerate(split_option(text)):
        if "=" in part:
            k, v = part.split("=", 1)
            if not k:
                raise ConfigError(f"{option}: Invalid parameter '{part}'")
            pairs.append((k, v))
        elif idx == 0 and implied is not None:
            pairs.append((implied, part))
        elif part == "" and idx > 0:
            continue
        elif part in flagset or (part.startswith("no") and part[2:] in flagset):
            key, value = (part, "on") if part in flagset else (part[2:], "off")
            pairs.append((key, value))
            if warn_flags:
                log.warning("%s %s: warning: short-form boolean option '%s' deprecated; use %s=%s",
                            option, text, part, key, value)
        else:
            raise ConfigError(f"{option}: Invalid parameter '{part}'")
    return OptionDict(option, pairs)


def json_pairs(option: str, text: str) -> list[tuple[str, str]]:
    """QEMU's JSON form of an option (``-device '{"driver": …}'``, as libvirt
    writes -device, -netdev, -object and -blockdev) as ``key=value`` pairs.

    Nested objects become dotted keys (``{"cache": {"direct": true}}`` is
    ``cache.direct=on``) and a list repeats its key, one pair per element
    (``{"hostfwd": [{"str": "tcp::22-:22"}]}``, QAPI's list of strings, too),
    the shapes QEMU's keyval grammar gives them.

    :raises ConfigError: On invalid JSON or a value that is not a string,
        number, boolean, list or object.
    """
    import json

    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise ConfigError(f"{option}: invalid JSON") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{option}: JSON value must be an object")
    pairs: list[tuple[str, str]] = []

    def flatten(key: str, value: object) -> None:
        if value is None:
            return  # libvirt's "backing": null: the key left unset
        if key.count(".") > 16:
            raise ConfigError(f"{option}: JSON nested too deeply at '{key}'")
        if isinstance(value, dict):
            if key and set(value) == {"str"}:
                flatten(key, value["str"])  # QAPI's String wrapper
                return
            for k, v in value.items():
                flatten(f"{key}.{k}" if key else str(k), v)
        elif isinstance(value, list):
            for v in value:
                flatten(key, v)
        elif isinstance(value, bool):
            pairs.append((key, "on" if value else "off"))
        elif isinstance(value, int | str):
            pairs.append((key, str(value)))
        else:
            raise ConfigError(f"{option}: unsupported JSON value for '{key}'")

    flatten("", obj)
    return pairs


def keyval_text(pairs: list[tuple[str, str]]) -> str:
    """``pairs`` back as QEMU's ``key=value,…`` text (a comma in a value doubled)."""
    return ",".join(f"{k}={v.replace(',', ',,')}" for k, v in pairs)


_TRUE = {"on", "yes", "true", "y"}
_FALSE = {"off", "no", "false", "n"}


def parse_bool(value: str, what: str) -> bool:
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{what}: '{value}' is not on or off")


_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(value: str, what: str, *, default_suffix: str = "") -> int:
    """Parse ``512M``, ``1G``, ``4096`` (QEMU size syntax; decimals allowed with a suffix)."""
    v = value.strip()
    if not v:
        raise ConfigError(f"{what}: size is empty")
    suffix = v[-1].lower() if v[-1].isalpha() else default_suffix.lower()
    num = v[:-1] if v[-1].isalpha() else v
    if suffix not in _SUFFIX:
        raise ConfigError(f"{what}: invalid size '{value}'")
    # QEMU's qemu_strtosz: decimal digits with an optional fraction, or 0x hex without a
    # fraction or suffix; no sign, no digit separators (which Python's int/float take).
    hex_form = num[:2].lower() == "0x"
    if not num[:1].isdigit() or not all(c.isdigit() or c == "." for c in num) and not hex_form:
        raise ConfigError(f"{what}: invalid size '{value}'")
    if hex_form and (num is not v or "." in num):
        raise ConfigError(f"{what}: invalid size '{value}'")
    try:
        n = int(num, 16) if hex_form else float(num) if "." in num else int(num, 10)
    except ValueError:
        raise ConfigError(f"{what}: invalid size '{value}'") from None
    if n < 0:
        raise ConfigError(f"{what}: invalid size '{value}'")
    return int(n * _SUFFIX[suffix])
