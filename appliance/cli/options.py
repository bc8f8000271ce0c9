"""QEMU's option grammar: ``value,key=val,key=val`` with ``,,`` escaping a comma.

Used by `appliance run`, `storage-daemon` and `net-daemon` so that every
command takes QEMU's syntax exactly. Unknown keys are refused by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from appliance.errors import ConfigError
from appliance.log import get_logger
from appliance.qemu_numbers import NumberError, strtosz

log = get_logger(__name__)


class OptionDict(dict[str, str]):
    """Parsed ``key=val`` pairs that remember which keys were consumed."""

    def __init__(self, option: str, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        self.option = option
        self.repeated: dict[str, list[str]] = {}
        for k, v in pairs:
            self.repeated.setdefault(k, []).append(v)
            if k == "id" and k in self:
                continue  # QemuOpts takes the first id= (opts_parse_id), any other key's last value
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
        return parse_bool(v, self.option, key)

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
    warn_flags: bool = False, json: bool = True,
) -> OptionDict:
    """Parse ``text`` of ``option`` (e.g. ``-drive``).

    :param implied: key for a leading bare value (``-netdev tap,id=n0`` → ``type=tap``).
    :param flags: keys allowed bare (``server`` → ``server=on``; ``nowait`` → ``wait=off``).
    :param warn_flags: warn of each bare flag, as QEMU does for options it parses as
        QemuOpts since 6.0 (``-netdev``, ``-nic``), and take any bare word as one, to be
        refused by name if no key of the option has it; its legacy chardev strings
        (``-serial tcp::4444,server,nowait``) it takes silently.
    :param json: read ``{…}`` as QEMU's JSON form (False for an option that has none, ``-nic``).
    :raises ConfigError: on a malformed pair.
    """
    if json and text.lstrip().startswith("{"):
        return OptionDict(option, json_pairs(option, text))
    flagset = set(flags)
    pairs: list[tuple[str, str]] = []
    # QEMU reads a leading word as the implied key's value when a comma comes before any '='
    # in the raw text: ``user,,id=n0`` is type 'user,id=n0', not a key 'user,id'.
    implied_first = "," in text.split("=", 1)[0] or "=" not in text
    for idx, part in enumerate(split_option(text)):
        if idx == 0 and implied is not None and implied_first:
            pairs.append((implied, part))
        elif "=" in part:
            k, v = part.split("=", 1)
            if not k:
                raise ConfigError(f"{option}: Invalid parameter '{part}'")
            pairs.append((k, v))
        elif part == "" and idx > 0:
            continue
        elif part in flagset or (part.startswith("no") and part[2:] in flagset) or warn_flags:
            # QemuOpts reads any bare word as a boolean (``nokey`` as key=off) and checks the
            # key later with the rest: ``id=n0,user`` is refused for its missing type.
            on = part in flagset or not (part.startswith("no") and len(part) > 2)
            key, value = (part, "on") if on else (part[2:], "off")
            pairs.append((key, value))
            if warn_flags:
                log.warning("%s %s: warning: short-form boolean option '%s' deprecated\nPlease use %s=%s instead",
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


def is_identifier(ident: str) -> bool:
    """QEMU's id_wellformed: an ASCII letter, then ASCII letters, digits, '-', '.' and '_'."""
    return ident[:1].isascii() and ident[:1].isalpha() and all(
        c.isascii() and (c.isalnum() or c in "-._") for c in ident)


def parse_bool(value: str, option: str, key: str) -> bool:
    """A boolean as QEMU's option parsers read it (qapi_bool_parse: these words, in lower case
    only), refused in their words with the bad value after them."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{option}: Parameter '{key}' expects 'on' or 'off', not '{value}'")


def parse_size(value: str, what: str, *, default_suffix: str = "") -> int:
    """A size in QEMU's syntax (``qemu_strtosz``): ``4096``, ``512M``, ``1.5G``, ``0x1000``.

    ``default_suffix`` is ``-m``'s legacy form: QEMU first checks the text as
    a byte size, then appends the suffix when it ends in a digit, so ``-m 64``
    is 64 MiB and ``-m 1.5`` is refused as QEMU refuses it.
    """
    def warn(message: str) -> None:
        log.warning("%s %s: warning: %s", what, value, message)

    try:
        size = strtosz(value, warn=warn)
        if default_suffix and value[-1:].isdigit():
            size = strtosz(value + default_suffix, warn=warn)
    except NumberError:
        raise ConfigError(f"{what}: invalid size '{value}' (a non-negative number below 2^64, "
                          f"with an optional suffix k, M, G, T, P or E)") from None
    return size
