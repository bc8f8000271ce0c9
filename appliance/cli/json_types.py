"""The JSON types QEMU's QAPI visitor wants in the JSON form of an option, and its words when a
member has another (qapi/qobject-input-visitor.c, QEMU 7.2).

libvirt writes ``-blockdev``, ``-netdev``, ``-object`` and ``-device`` as JSON. The rest of the
parsing reads key=value text made from that JSON (cli.options.json_pairs), which would take
``"read-only": "on"`` or ``"cache": {"direct": "yes"}``; QEMU refuses both. So before that, the
object is walked against a small table per option, in the table's (QAPI's) member order, and the
first wrong member is refused as QEMU refuses it. A member that is not in a table is left alone:
it is refused, or taken, as the key=value form does.

A table is data: a member's type is one of the names in :data:`SCALARS`, a ``dict`` (a struct
whose members are checked in order), :class:`Union` (a struct with a discriminator choosing more
members), :class:`Alternate` (QAPI's alternate: one of several JSON types) or :class:`List`;
:class:`Required` marks a member QAPI does not make optional.

On the boot path of `appliance run` (options parsing): standard library ``json`` only.
"""

from __future__ import annotations

from appliance.errors import ConfigError

# QAPI scalar → the JSON word of its type error. Unsigned and size members go through the
# uint64 reader, whose refusal is worded apart ("Parameter 'x' expects uint64"); a narrower one
# then range-checks ("expects uint32_t", naming the member without its path).
SCALARS = {"string": "string", "boolean": "boolean", "integer": "integer", "int32": "integer",
           "uint64": "uint64", "size": "uint64", "uint32": "uint64", "uint16": "uint64"}
_RANGES = {"int32": (-(2**31), 2**31 - 1, "int32_t"), "uint32": (0, 2**32 - 1, "uint32_t"),
           "uint16": (0, 2**16 - 1, "uint16_t")}


class Union:
    """A QAPI flat union: ``base`` members (the discriminator among them) then the branch's.

    A discriminator naming no branch here stops the walk (the option's parser refuses it).
    """

    __slots__ = ("base", "branches", "tag")

    def __init__(self, tag: str, base: dict[str, object], branches: dict[str, dict[str, object]]) -> None:
        self.tag, self.base, self.branches = tag, base, branches


class Alternate:
    """A QAPI alternate, ``name`` in its errors: a string, an object (``struct``, a :class:`Union`
    or a ``dict``) and, when ``null`` is set, JSON null."""

    __slots__ = ("name", "null", "struct")

    def __init__(self, name: str, struct: object, *, null: bool = False) -> None:
        self.name, self.struct, self.null = name, struct, null


class List:
    """A QAPI list; ``item`` is each element's type."""

    __slots__ = ("item",)

    def __init__(self, item: object) -> None:
        self.item = item


class Required:
    """A mandatory member: QAPI's visitor finds it missing at its place in the member order, so
    a wrong type further on is not reported before it."""

    __slots__ = ("kind",)

    def __init__(self, kind: object) -> None:
        self.kind = kind


class _Refusal(Exception):
    pass


def check(option: str, obj: object, spec: object, *, closed: bool = False) -> None:
    """Refuse ``obj`` (parsed JSON) as QEMU refuses it when a member in ``spec`` has the wrong JSON
    type, or a discriminator is missing (or, with ``closed``, when a top-level member is not in
    ``spec``, at every level: for a table that holds every member QEMU has).

    :raises ConfigError: ``"{option}: "`` and QEMU's words.
    """
    try:
        _struct(obj, spec, "", closed=closed)
    except _Refusal as err:
        raise ConfigError(f"{option}: {err}") from None


def check_text(option: str, text: str, spec: object, *, closed: bool = False) -> None:
    """:func:`check` for the JSON form ``text``; anything else (key=value text, JSON that is not
    an object, bad JSON) is left to the option's parser."""
    if not text.lstrip().startswith("{"):
        return
    import json

    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return
    if isinstance(obj, dict):
        check(option, obj, spec, closed=closed)


def _bad_type(name: str, want: str) -> _Refusal:
    return _Refusal(f"Invalid parameter type for '{name}', expected: {want}")


def _struct(obj: object, spec: object, prefix: str, *, closed: bool) -> None:
    """``obj`` is a JSON object already; check the members ``spec`` (a dict or Union) names."""
    assert isinstance(obj, dict)
    if isinstance(spec, Union):
        for key, kind in spec.base.items():
            if key in obj:
                _value(obj[key], kind, key, prefix + key, closed=closed)
            elif key == spec.tag:
                raise _Refusal(f"Parameter '{prefix}{key}' is missing")
        tag = obj[spec.tag]
        branch = spec.branches.get(tag) if isinstance(tag, str) else None
        if branch is None:
            return  # a type not here: its parser refuses it
        _members(obj, branch, prefix, closed=closed)
        known: dict[str, object] = {**spec.base, **branch}
    else:
        assert isinstance(spec, dict)
        _members(obj, spec, prefix, closed=closed)
        known = spec
    if closed:
        for key in obj:
            if key not in known:
                raise _Refusal(f"Parameter '{prefix}{key}' is unexpected")


def _members(obj: dict[str, object], spec: dict[str, object], prefix: str, *, closed: bool) -> None:
    for key, kind in spec.items():
        if key in obj:
            _value(obj[key], kind, key, prefix + key, closed=closed)
        elif isinstance(kind, Required):
            raise _Refusal(f"Parameter '{prefix}{key}' is missing")


def _value(value: object, kind: object, name: str, full: str, *, closed: bool) -> None:
    """One member: ``name`` is its own name, ``full`` its path (QEMU uses each in some errors)."""
    if isinstance(kind, Required):
        kind = kind.kind
    if isinstance(kind, str):
        _scalar(value, kind, name, full)
    elif isinstance(kind, Alternate):
        if isinstance(value, str) or (value is None and kind.null):
            return
        if not isinstance(value, dict):
            raise _bad_type(name, kind.name)
        _struct(value, kind.struct, full + ".", closed=closed)
    elif isinstance(kind, List):
        if not isinstance(value, list):
            raise _bad_type(full, "array")
        for i, item in enumerate(value):
            # An element has no name of its own: QEMU's errors that use it say 'null'.
            _value(item, kind.item, "null", f"{full}[{i}]", closed=closed)
    else:
        if not isinstance(value, dict):
            raise _bad_type(full, "object")
        _struct(value, kind, full + ".", closed=closed)


def _scalar(value: object, kind: str, name: str, full: str) -> None:
    want = SCALARS[kind]
    if want == "string":
        if not isinstance(value, str):
            raise _bad_type(full, want)
        return
    if want == "boolean":
        if not isinstance(value, bool):
            raise _bad_type(full, want)
        return
    # bool is an int to Python; QAPI keeps them apart. The integer reader takes no number above
    # int64; the uint64 reader also takes a negative one (as its two's complement).
    top = 2**63 if want == "integer" else 2**64
    if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < top:
        if want == "uint64":
            raise _Refusal(f"Parameter '{full}' expects uint64")
        raise _bad_type(full, want)
    if kind in _RANGES:
        low, high, ctype = _RANGES[kind]
        n = value % 2**64 if want == "uint64" else value
        if not low <= n <= high:
            raise _Refusal(f"Parameter '{name}' expects {ctype}")


# --- -object ------------------------------------------------------------------------------

_RNG: dict[str, object] = {"opened": "boolean"}  # RngProperties
_MEMORY_BACKEND: dict[str, object] = {  # MemoryBackendProperties
    "dump": "boolean", "host-nodes": List("uint16"), "merge": "boolean", "policy": "string",
    "prealloc": "boolean", "prealloc-threads": "uint32", "prealloc-context": "string",
    "share": "boolean", "reserve": "boolean", "size": "size",
    "x-use-canonical-path-for-ramblock-id": "boolean",
}

# ObjectOptions (qapi/qom.json, QEMU 7.2), every member of each branch (checked closed), for the
# qom-types -object and --object take or QEMU users pass
# to them most (memory backends, refused later as not supported).
OBJECT = Union("qom-type", {"qom-type": "string", "id": "string"}, {
    "iothread": {  # EventLoopBaseProperties, then IothreadProperties
        "aio-max-batch": "integer", "thread-pool-min": "integer", "thread-pool-max": "integer",
        "poll-max-ns": "integer", "poll-grow": "integer", "poll-shrink": "integer",
    },
    "rng-builtin": _RNG,
    "rng-random": {**_RNG, "filename": "string"},
    "filter-dump": {  # NetfilterProperties, then FilterDumpProperties
        "netdev": "string", "queue": "string", "status": "string", "position": "string",
        "insert": "string", "file": "string", "maxlen": "uint32",
    },
    "memory-backend-ram": _MEMORY_BACKEND,
    "memory-backend-file": {**_MEMORY_BACKEND, "align": "size", "discard-data": "boolean",
                            "mem-path": "string", "pmem": "boolean", "readonly": "boolean"},
    "memory-backend-memfd": {**_MEMORY_BACKEND, "hugetlb": "boolean", "hugetlbsize": "size",
                             "seal": "boolean"},
})
