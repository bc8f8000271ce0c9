"""``appliance img``: the qemu-img work-alike.

Subcommands, options, human output and JSON field names follow qemu-img so
scripts written against it keep working. Exit codes: 0 success, 1 failure;
``check`` returns 2 for corruptions and 3 for leaks only; ``compare`` returns
1 for a mismatch, 2 when an image will not open, 3 when a block status and 4
when a read fails. Bad option values raise ConfigError (2).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.cli import qemu_json
from appliance.errors import ConfigError
from appliance.qcow2 import header as H
from appliance.qcow2.backing import json_target, open_any, resolve_backing
from appliance.qcow2.errors import CorruptImage, ErrorKind, Qcow2Error
from appliance.qcow2.image import K_COMPRESSED, K_DATA, K_UNALLOC, K_ZERO, Qcow2Image, probe_format
from appliance.qemu_numbers import INT64_MAX, NumberError, strtosz, strtou64
from appliance.storage.formats import foreign_format_of, unsupported_message

USAGE = """usage: appliance img <command> [options]

commands: create, info, check, map, measure, convert, dd, snapshot, resize, commit,
          rebase, compare, amend, bitmap, bench   (same options as qemu-img)
"""


CACHE_MODES = ("none", "off", "writeback", "writethrough", "directsync", "unsafe")


class _Parser(argparse.ArgumentParser):
    """argparse as GNU getopt_long reads qemu-img's command lines: options may
    come between and after the file names (getopt permutes), and a long
    option may be cut to any prefix that names only one."""

    _extra: tuple[str, ...] = ()  # the arguments nothing took, for error()

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise ConfigError(self._qemu_words(message))

    def _qemu_words(self, message: str) -> str:
        """argparse's complaint in qemu-img's words where qemu-img has its own."""
        cmd = self.prog.rsplit(" ", 1)[-1]
        if message.startswith("unrecognized arguments: "):
            extra = self._extra or ("",)
            if extra[0].startswith("-"):
                return f"unrecognized option '{extra[0]}'"
            return f"Unexpected argument: {extra[0]}" if cmd == "create" else "Expecting one image file name"
        if message.startswith("ambiguous option: "):
            # getopt_long's answer to a prefix of several long options.
            return f"unrecognized option '{message.removeprefix('ambiguous option: ').split(' could match ')[0]}'"
        if message.startswith("the following arguments are required: "):
            missing = message.removeprefix("the following arguments are required: ")
            if cmd == "compare":
                return "Expecting two image file names"
            if missing == "size" and cmd == "resize":
                return "Not enough arguments"
            if missing.startswith("filename"):
                return "Expecting one image file name"
        if message.startswith("argument --output: invalid choice"):
            return "--output must be used with human or json as argument."
        if message.startswith("argument -r/--repair: invalid choice: ") and cmd == "check":
            value = message.removeprefix("argument -r/--repair: invalid choice: ").split(" (")[0].strip("'")
            return f"Unknown option value for -r (expecting 'leaks' or 'all'): {value}"
        return message

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """Parse with options anywhere among the file names (getopt's
        permutation), then refuse unknown cache modes (-t the target's or the
        image's, -T the source's) in qemu-img's words."""
        a, extra = super().parse_known_intermixed_args(args, namespace)
        if extra:
            self._extra = tuple(extra)  # an empty one would not survive the message's split
            self.error("unrecognized arguments: " + " ".join(extra))
        return self._checked(a)

    def parse_intermixed_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        return self.parse_args(args, namespace)

    def _checked(self, a: Any) -> Any:
        for flag, what in (("-t", "cache option"), ("-T", "source cache option")):
            action = self._option_string_actions.get(flag)
            value = getattr(a, action.dest, None) if action else None
            if value is not None and value not in CACHE_MODES:
                if self.prog.endswith(" bench"):
                    raise ConfigError("Invalid cache mode")
                raise ConfigError(f"Invalid {what}: {value}")
            if value == "off" and action is not None:
                setattr(a, action.dest, "none")  # QEMU's other name for it
        return a


def _without_objects(argv: list[str]) -> list[str]:
    """qemu-img's --object (secrets, throttle groups…): nothing here uses one, so
    each is taken and left aside."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--object":
            next(it, None)
        elif not arg.startswith("--object="):
            out.append(arg)
    return out


# Keys of an --image-opts string that change nothing here (caching, AIO mode,
# locking, cache sizes: the engine decides those) besides the file and driver.
_IMAGE_OPTS_TAKEN = frozenset({
    "driver", "file.driver", "file.filename", "filename", "read-only", "auto-read-only",
    "cache.direct", "cache.no-flush", "file.aio", "file.locking", "file.cache.direct",
    "l2-cache-size", "refcount-cache-size", "cache-size", "discard", "detect-zeroes",
    "force-share", "node-name", "file.node-name", "lazy-refcounts", "overlap-check",
})


def _image_opts(cmd: str, argv: list[str]) -> list[str]:
    """--image-opts: image arguments given as option strings (``driver=qcow2,
    file.filename=x.qcow2``; ``,,`` is a literal comma) become the file name,
    and the driver -f. Keys that tune what has nothing to tune here are
    taken; any other is refused, as QEMU refuses an option its driver lacks.
    """
    from appliance.cli.options import split_option

    argv = [a for a in argv if a != "--image-opts"]
    if "-f" in argv:
        raise ConfigError("--image-opts and --format are mutually exclusive")
    out: list[str] = []
    driver: str | None = None
    for arg in argv:
        prefix = ""
        body = arg
        if cmd == "dd" and arg[:3] in ("if=", "of="):
            prefix, body = arg[:3], arg[3:]  # dd's operand holds the option string
        if arg.startswith("-") or "=" not in body or (cmd == "dd" and not prefix):
            out.append(arg)
            continue
        keys: dict[str, str] = {}
        for kv in split_option(body):
            k, eq, v = kv.partition("=")
            if not eq:
                raise ConfigError(f"--image-opts: invalid parameter '{kv}'")
            keys[k] = v
        path = keys.get("file.filename", keys.get("filename"))
        if path is None:
            out.append(arg)
            continue
        d = keys.get("driver")
        extra = sorted(set(keys) - _IMAGE_OPTS_TAKEN)
        if extra:
            raise Qcow2Error(f"Could not open '{body}': Block format '{d or 'raw'}' does not support "
                             f"the option '{extra[0]}'")
        if d is not None and driver is None and prefix != "of=":
            driver = "raw" if d == "file" else d
        out.append(prefix + path)
    if driver is not None and cmd != "compare":
        out = ["-f", driver, *out]
    return out


def _json_filenames(argv: list[str]) -> list[str]:
    """Image arguments given as ``json:{...}`` (QEMU's options as JSON) become the
    file they name, and their driver -f unless one is given: what qemu-img
    shows and does for the common form."""
    from appliance.qcow2.backing import json_target

    out: list[str] = []
    driver: str | None = None
    for i, arg in enumerate(argv):
        # A backing file name (-b, -B) stays JSON: the image records it as given.
        target = json_target(arg) if arg.startswith("json:") and (i == 0 or argv[i - 1] not in (
            "-b", "-B")) else None
        if target is None:
            out.append(arg)
            continue
        path, d = target
        if not os.path.exists(path):
            raise Qcow2Error(f"Could not open '{arg}': Could not open '{path}': No such file or directory")
        if d is not None and driver is None:
            driver = "raw" if d == "file" else d
        out.append(path)
    if driver is not None and "-f" not in out:
        out = ["-f", driver, *out]
    return out


def _parser(prog: str) -> _Parser:
    p = _Parser(prog=f"appliance img {prog}", add_help=True, allow_abbrev=True)
    # main() takes these two out before a command parses its line; known here
    # too, a prefix of several long options is as ambiguous as in qemu-img
    # (info --o: --object or --output).
    p.add_argument("--object", help=argparse.SUPPRESS)
    if prog != "create":
        p.add_argument("--image-opts", action=_Unabbreviated, nargs=0, help=argparse.SUPPRESS)
    return p


class _Unabbreviated(argparse.Action):
    """--image-opts changes how the other arguments read, before they are
    parsed (main): cut short, it arrives too late for that."""

    def __call__(self, parser: Any, ns: Any, value: Any, option: Any = None) -> None:
        raise ConfigError("--image-opts must be spelled out in full")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from appliance import __version__

        # qemu-img's first line shape, for scripts that read the version.
        print(f"appliance img version {__version__} (qemu-img 7.2 compatible)")
        return 0
    cmd, rest = argv[0], argv[1:]
    handler = COMMANDS.get(cmd)
    if handler is None:
        raise ConfigError(f"Command not found: {cmd}")
    rest = _without_objects(rest)
    try:
        if any(x.startswith("json:") for x in rest):
            rest = _json_filenames(rest)
        if "--image-opts" in rest:
            rest = _image_opts(cmd, rest)
        return int(asyncio.run(handler(rest)))
    except Qcow2Error as err:
        # qemu-img's hint naming a detected format ends without a newline.
        hint = "\nDetected format of " in str(err)
        print(f"appliance img: {err}", file=sys.stderr, end="" if hint else "\n")
        return 1
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as qemu-img does,
        # and keep the interpreter's final flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:
        where = f"Could not open '{err.filename}': " if err.filename else ""
        print(f"appliance img: {where}{err.strerror or err}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------- helpers


def size_to_str(val: int) -> str:
    """QEMU's size_to_str: three significant digits, binary suffixes."""
    if val == 0:
        return "0 B"
    _, e = math.frexp(val / (1000.0 / 1024.0))
    i = (e - 1) // 10
    suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    return f"{val / (1 << (i * 10)):0.3g} {suffixes[i]}B"


_SUFFIX_HINT = ("You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, "
                "terabytes, petabytes and exabytes.")


def cvtnum(what: str, text: str, low: int = 0, high: int = INT64_MAX) -> int:
    """A size argument, as qemu-img's cvtnum_full takes it (QEMU's size syntax,
    qemu_numbers.strtosz), refused in its words for ``what``."""
    try:
        n = strtosz(text)
    except NumberError as err:
        if not err.out_of_range:
            raise ConfigError(f"Invalid {what} specified. {_SUFFIX_HINT}") from None
        n = -1
    if not low <= n <= high:
        raise ConfigError(f"Invalid {what} specified. Must be between {low} and {high}.")
    return n


def option_size(key: str, text: str) -> int:
    """A size given in ``-o`` (QemuOpts' parse_option_size), refused in its words."""
    try:
        return strtosz(text)
    except NumberError as err:
        if err.out_of_range:
            raise ConfigError(f"Value '{text}' is out of range for parameter '{key}'") from None
        raise ConfigError(f"Parameter '{key}' expects a non-negative number below 2^64 Optional "
                          "suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and "
                          "exabytes, respectively.") from None


def option_number(key: str, text: str) -> int:
    """A number given in ``-o`` (QemuOpts' parse_option_number: C's strtoull,
    base 0), refused in its words."""
    try:
        return strtou64(text)
    except NumberError as err:
        if err.out_of_range:
            raise ConfigError(f"Value '{text}' is too large for parameter '{key}'") from None
        raise ConfigError(f"Parameter '{key}' expects a number") from None


def count_arg(text: str, high: int, message: str, *, low: int = 0) -> int:
    """A count on the command line (qemu_strtoul or qemu_strtoi, base 0) from
    ``low`` to ``high``; ``message`` (qemu-img's words) for anything else. A
    negative one wraps past ``high``, as C's strtoul makes it."""
    try:
        n = strtou64(text)
    except NumberError:
        n = -1
    if not low <= n <= high:
        raise ConfigError(message)
    return n


def parse_o_all(texts: list[str]) -> dict[str, str]:
    """Every ``-o`` given, later ones overriding earlier keys, as qemu-img merges them."""
    out: dict[str, str] = {}
    for text in texts:
        out.update(parse_o(text))
    return out


def parse_o(text: str | None) -> dict[str, str]:
    from appliance.cli.options import split_option

    out: dict[str, str] = {}
    if not text:
        return out
    for part in split_option(text):  # ",," is a literal comma (a file name may hold one)
        if not part:
            raise ConfigError(f"Invalid option list: {text}")
        if "=" in part:
            k, v = part.split("=", 1)
        else:
            k, v = part, "on"
        out[k.strip()] = v.strip()
    return out


# What `-o help` lists per format: the creation options this engine takes.
CREATE_OPTIONS: dict[str, list[tuple[str, str, str]]] = {
    "qcow2": [
        ("backing_file", "str", "File name of the backing image"),
        ("backing_fmt", "str", "Format of the backing image (raw or qcow2)"),
        ("cluster_size", "size", "Cluster size, a power of two from 512 bytes to 2 MiB"),
        ("compat", "str", "Version: 0.10 (v2) or 1.1 (v3)"),
        ("compression_type", "str", "Compression of compressed clusters: zlib or zstd"),
        ("extended_l2", "bool (on/off)", "Extended L2 entries: 32 subclusters per cluster"),
        ("lazy_refcounts", "bool (on/off)", "Defer refcount updates (repaired on open after a crash)"),
        ("preallocation", "str", "Preallocation: off, metadata, falloc or full"),
        ("refcount_bits", "num", "Bits per reference count: 1, 2, 4, 8, 16, 32 or 64"),
        ("size", "size", "Virtual disk size"),
    ],
    "raw": [
        ("preallocation", "str", "Preallocation: off, falloc or full"),
        ("size", "size", "Virtual disk size"),
    ],
}


def wants_help(o: dict[str, str]) -> bool:
    """Whether ``-o`` asked for the option list (``-o help`` or ``-o ?``)."""
    return "help" in o or "?" in o


AMEND_OPTIONS = ("backing_file", "backing_fmt", "compat", "lazy_refcounts", "refcount_bits", "size")


def print_create_options(fmt: str, *, amend: bool = False) -> int:
    """`-o help`: the options ``fmt`` takes (or, ``amend``, can change), laid out as qemu-img does."""
    opts = CREATE_OPTIONS.get(fmt)
    if opts is None or (amend and fmt != "qcow2"):
        raise ConfigError(f"Unknown file format '{fmt}'" if opts is None
                          else f"Format driver '{fmt}' does not support option amendment")
    print(f"Amend options for '{fmt}':" if amend else f"Supported {fmt} options:")
    for key, kind, text in opts:
        if not amend or key in AMEND_OPTIONS:
            print(f"  {f'{key}=<{kind}>':<22} - {text}")
    return 0


def _bool(v: str, what: str) -> bool:
    if v in ("on", "yes", "true", "y"):
        return True
    if v in ("off", "no", "false", "n"):
        return False
    raise ConfigError(f"Parameter '{what}' expects 'on' or 'off'")


async def _open(path: str, fmt: str | None, *, read_only: bool, cache: str = "writeback",
                backing: bool = True, share: bool = False, **kw: Any) -> Any:
    """Open an image for a command; locked as qemu-img locks it unless ``share`` (-U)."""
    refuse_unopenable(path)
    dirty = not read_only and fmt in (None, "qcow2") and _dirty(path)
    if dirty:
        kw["repair_dirty"] = False  # repaired below, in qemu-img's words
    try:
        img = await open_any(path, fmt, read_only=read_only, cache=cache,
                             backing_override=None if backing else False, **kw)
    except Qcow2Error as err:
        if str(err).startswith("Could not open"):
            raise
        if str(err).startswith(f"could not open '{path}'"):
            # The file layer's own words under the image's, as QEMU nests them.
            raise Qcow2Error(f"Could not open '{path}': C{str(err)[1:]}", kind=err.kind) from err
        text = str(err)
        if text.startswith("not a qcow2 image") and probe_format(path, warn=False) != "qcow2":
            text = "Image is not in qcow2 format"  # -f qcow2 on another format, in QEMU's words
        # qemu-img names the image it could not open first.
        raise Qcow2Error(f"Could not open '{path}': {text}", kind=err.kind) from err
    if not share:
        try:
            lock_for_command(img, path, write=not read_only)
        except BaseException:
            await img.close()
            raise
    if dirty and isinstance(img, Qcow2Image):
        try:
            await _repair_dirty(img)
        except BaseException:
            await img.close()
            raise
    return img


def _dirty(path: str) -> bool:
    """Whether ``path`` is a qcow2 image with its dirty bit set (lazy refcounts
    left behind by a crash)."""
    try:
        with open(path, "rb") as f:
            h = H.parse_header(f.read(2 << 20), check_mode=True)
    except (OSError, ValueError, Qcow2Error):
        return False
    return bool(h.dirty)


async def _repair_dirty(img: Qcow2Image) -> None:
    """QEMU opens a dirty image for writing only after a check that repairs
    everything (qcow2_do_open), which prints what it finds and repairs."""
    from appliance.qcow2.check_flow import FIX_MODES, check_pass

    res = await check_pass(img, FIX_MODES["all"])
    _say(res.messages)
    if res.failed or res.check_errors or res.corruptions:
        raise Qcow2Error(f"Could not open '{img.path}': Could not repair dirty image")
    img.header.incompatible_features &= ~H.INCOMPAT_DIRTY
    await img._write_header()
    await img._sync()


def refuse_unopenable(path: str) -> None:
    """A missing file or a directory, refused in qemu-img's words: its file
    driver's message inside the image's."""
    if not os.path.exists(path):
        raise Qcow2Error(f"Could not open '{path}': Could not open '{path}': No such file or directory")
    if os.path.isdir(path):
        raise Qcow2Error(f"Could not open '{path}': 'file' driver requires '{path}' to be a regular file")


def once_named(err: Exception) -> str:
    """An image's open error as QEMU words it where the image is a backing file
    rather than a command's image: the file named once, and what failed below
    it without its name."""
    text = str(err)
    head, sep, rest = text.partition(": ")
    if sep and head.startswith("Could not open '") and (
            rest.startswith(head + ": ") or rest.startswith("Could not open backing file: ")):
        return rest
    return text


def refuse_missing_backing(path: str, fmt: str | None) -> None:
    """Commands that open the whole chain (resize, snapshot, amend) stop, before
    anything is written, when a qcow2 image's backing file is missing."""
    layer, levels = Path(path), 0
    while fmt in (None, "qcow2") and levels < 64:
        try:
            with open(layer, "rb") as f:
                data = f.read(2 << 20)  # the largest first cluster
            h = H.parse_header(data, check_mode=True)
        except (OSError, ValueError, Qcow2Error):
            return  # the open that follows words whatever is wrong
        name = h.backing_file
        if not name or name.startswith("json:"):
            return
        levels += 1
        below = resolve_backing(layer, name)
        if not below.exists():
            raise Qcow2Error(f"Could not open '{path}': " + "Could not open backing file: " * levels
                             + f"Could not open '{below}': No such file or directory")
        layer, fmt = below, h.backing_format


def refuse_if_in_use(path: str) -> None:
    """Before (re)creating ``path``: refuse, as qemu-img does, if another process uses it."""
    from appliance.storage.errors import ImageLockedError
    from appliance.storage.locking import lock_image

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # nothing there (or not ours to read): nothing to protect
    try:
        lock_image(fd, path, write=True)
    except ImageLockedError as err:
        raise _lock_refused(err, path, f"{path}: ") from None
    finally:
        os.close(fd)


def _lock_refused(err: Exception, path: str, lead: str) -> Qcow2Error:
    """A lock conflict (storage.locking) in qemu-img's two lines."""
    what = str(err).split(":")[0]  # 'Failed to get [shared] "write" lock'
    return Qcow2Error(f"{lead}{what}\nIs another process using the image [{path}]?")


def lock_for_command(img: Any, path: str, *, write: bool) -> None:
    """Take QEMU's permission locks on ``img`` (storage.locking), in qemu-img's words.

    A VM (ours or QEMU's) writing the image refuses every command without
    -U; one reading it refuses writers. The locks go with the image's fd.
    """
    from appliance.storage.errors import ImageLockedError
    from appliance.storage.locking import lock_image

    fd = getattr(img, "_fd", -1)
    if fd < 0:
        return
    try:
        lock_image(fd, path, write=write)
    except ImageLockedError as err:
        raise _lock_refused(err, path, f"Could not open '{path}': ") from None


def _chain(img: Any) -> list[Any]:
    out = []
    while img is not None:
        out.append(img)
        img = getattr(img, "backing", None)
    return out


# ---------------------------------------------------------------- create


def _create_options(o: dict[str, str], size: int | None) -> Any:
    """qcow2's creation options as QEMU's option parser takes them: each name
    known, sizes, numbers and booleans well formed, in the order given. Values
    the driver checks (compat, preallocation…) are checked by create_image."""
    from appliance.qcow2.create import CreateOptions

    opts = CreateOptions(size=size or 0)
    for k, v in list(o.items()):
        if k == "cluster_size":
            opts.cluster_size = option_size(k, v)
        elif k == "compat":
            opts.compat = v
        elif k == "lazy_refcounts":
            opts.lazy_refcounts = _bool(v, k)
        elif k == "refcount_bits":
            opts.refcount_bits = option_number(k, v)
        elif k == "compression_type":
            opts.compression_type = v
        elif k == "extended_l2":
            opts.extended_l2 = _bool(v, k)
        elif k == "preallocation":
            opts.preallocation = v  # checked by create_image, after "Formatting…" as qemu-img does
        elif k == "backing_file":
            opts.backing_file = v
        elif k == "backing_fmt":
            opts.backing_fmt = v
        elif k == "size":
            opts.size = option_size(k, v)
        elif k == "nocow":
            _bool(v, k)  # the file layer's btrfs flag: taken, nothing here to set it on
        else:
            raise ConfigError(f"Invalid parameter '{k}'")
    return opts


RAW_CREATE_KEYS = ("preallocation", "size", "nocow")


def raw_create_options(o: dict[str, str]) -> int | None:
    """raw's creation options as QEMU's option parser takes them; the size
    given as ``-o size=``, if any. The preallocation mode is the file
    driver's to check (create_raw), after qemu-img's "Formatting…" line."""
    size = None
    for k, v in o.items():
        if k not in RAW_CREATE_KEYS:
            raise ConfigError(f"Invalid parameter '{k}'")
        if k == "size":
            size = option_size(k, v)
        elif k == "nocow":
            _bool(v, k)
    return size


async def cmd_create(argv: list[str]) -> int:
    p = _parser("create")
    p.add_argument("-f", dest="fmt", default="raw")
    p.add_argument("-b", dest="backing")
    p.add_argument("-F", dest="backing_fmt")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-u", dest="unsafe", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename", nargs="?")
    p.add_argument("size", nargs="?")
    a = p.parse_args(argv)
    o = parse_o_all(a.options)
    if wants_help(o):
        return print_create_options(a.fmt)
    if a.filename is None:
        raise ConfigError("Expecting image file name")
    if a.size is not None and "size" in o:
        raise Qcow2Error(f"{a.filename}: The image size must be specified only once")
    refuse_if_in_use(a.filename)
    # The size comes positionally or as -o size=, either way.
    size: int | None = None
    if a.size is not None:
        if a.size.startswith("-") and "--" not in argv:
            raise ConfigError(f"unrecognized option '{a.size}'")  # getopt's reading of it
        size = cvtnum("image size", a.size)
    if a.fmt not in ("raw", "qcow2"):
        raise ConfigError(f"{a.filename}: Unknown file format '{a.fmt}'")
    try:
        # qemu-img names the file first.
        if a.fmt == "raw":
            given = raw_create_options(o)
        else:
            opts = _create_options(o, size)
            given = opts.size if "size" in o else None
    except ConfigError as err:
        raise ConfigError(f"{a.filename}: {err}") from None
    size = size if given is None else given
    if a.fmt == "raw":
        if size is None:
            raise ConfigError(f"{a.filename}: Image creation needs a size parameter")
        if not a.quiet:
            tail = "".join(f" {k}={o[k]}" for k in ("nocow", "preallocation") if k in o)
            if "nocow" in o:
                tail = tail.replace(f"nocow={o['nocow']}", f"nocow={'on' if _bool(o['nocow'], 'nocow') else 'off'}")
            print(f"Formatting '{a.filename}', fmt=raw size={size}{tail}")
        from appliance.qcow2.create import create_raw

        try:
            create_raw(a.filename, size, o.get("preallocation", "off"))
        except Qcow2Error as err:
            raise Qcow2Error(f"{a.filename}: {err}") from err
        return 0
    if a.backing is not None:
        opts.backing_file = a.backing
    if a.backing_fmt is not None:
        opts.backing_fmt = a.backing_fmt
    if opts.backing_file:
        from appliance.qcow2.backing import resolve_backing

        bpath = resolve_backing(Path(a.filename), opts.backing_file)
        if size is None or not a.unsafe:
            # As qemu-img: a backing file that cannot be opened is the first complaint.
            try:
                b = await _open(str(bpath), opts.backing_fmt, read_only=True)
            except Qcow2Error as err:
                if size is None or not a.unsafe:
                    raise Qcow2Error(f"{a.filename}: {once_named(err)}\nCould not open backing image.") from err
            else:
                if size is None:
                    opts.size = -(-b.size // 512) * 512  # whole sectors, as qemu-img takes it
                await b.close()
        if opts.backing_fmt is None:
            # qemu-img (since 6.1) refuses to write an image whose backing
            # format would have to be probed on every open; it names the
            # format it would have guessed.
            guess = f"\nDetected format of {probe_format(bpath, warn=False)}." if bpath.exists() else ""
            raise Qcow2Error(f"{a.filename}: Backing file specified without backing format{guess}")
    elif size is None:
        raise ConfigError(f"{a.filename}: Image creation needs a size parameter")
    if opts.backing_file and opts.preallocation != "off" and not opts.extended_l2:
        raise Qcow2Error("Backing file and preallocation can only be used at the same time "
                         "if extended_l2 is on")
    if not a.quiet:
        # qemu-img's order; compat and preallocation only when given.
        parts = [f"Formatting '{a.filename}', fmt=qcow2 cluster_size={opts.cluster_size}",
                 f"extended_l2={'on' if opts.extended_l2 else 'off'}"]
        if "preallocation" in o:
            parts.append(f"preallocation={opts.preallocation}")
        parts.append(f"compression_type={opts.compression_type}")
        parts.append(f"size={opts.size}")
        if "compat" in o:
            parts.append(f"compat={opts.compat}")
        if opts.backing_file:
            parts.append(f"backing_file={opts.backing_file.replace(',', ',,')}")  # QEMU's option escaping
            if opts.backing_fmt:
                parts.append(f"backing_fmt={opts.backing_fmt}")
        parts.append(f"lazy_refcounts={'on' if opts.lazy_refcounts else 'off'}")
        rb = opts.refcount_bits  # printed as QEMU prints a number option: a signed 64-bit one
        parts.append(f"refcount_bits={rb - (1 << 64) if rb >> 63 else rb}")
        if "nocow" in o:
            parts.append(f"nocow={'on' if _bool(o['nocow'], 'nocow') else 'off'}")
        print(" ".join(parts))
    from appliance.qcow2.create import create_image

    try:
        await create_image(a.filename, opts)
    except Qcow2Error as err:
        raise Qcow2Error(f"{a.filename}: {err}") from err  # qemu-img names the file first
    return 0


# ---------------------------------------------------------------- measure


def _measure_options(o: dict[str, str]) -> tuple[int, int, int, bool, str, bool]:
    """(cluster size, refcount bits, version, extended L2, preallocation, backing file?) of
    measure's -o, checked as qemu-img measure checks them: what does not change the sizes
    (lazy_refcounts, compression_type, data_file…) is taken without a look."""
    known = {"cluster_size", "compat", "refcount_bits", "extended_l2", "preallocation",
             "backing_file", "backing_fmt", "lazy_refcounts", "compression_type", "data_file",
             "data_file_raw", "size"}
    for k in o:
        if k.startswith("encrypt"):
            raise Qcow2Error("Encrypted images are not supported here")
        if k not in known:
            raise ConfigError(f"Invalid parameter '{k}'")
    for k in ("extended_l2", "lazy_refcounts", "data_file_raw"):
        if k in o:
            _bool(o[k], k)
    ext_l2 = _bool(o["extended_l2"], "extended_l2") if "extended_l2" in o else False
    cs = option_size("cluster_size", o["cluster_size"]) if "cluster_size" in o else 65536
    if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise Qcow2Error("Cluster size must be a power of two between 512 and 2048k")
    if ext_l2 and cs < 16384:
        raise Qcow2Error("Extended L2 entries are only supported with cluster sizes of at least "
                         "16384 bytes")
    compat = o.get("compat", "1.1")
    if compat not in ("0.10", "1.1", "v2", "v3"):
        raise Qcow2Error(f"Invalid compatibility level: '{compat}'")
    version = 2 if compat in ("0.10", "v2") else 3
    rb = option_number("refcount_bits", o.get("refcount_bits", "16"))
    if rb < 1 or rb > 64 or rb & (rb - 1):
        raise Qcow2Error("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and rb != 16:
        raise Qcow2Error("Different refcount widths than 16 bits require compatibility level 1.1 "
                         "or above (use compat=1.1 or greater)")
    prealloc = o.get("preallocation", "off")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise Qcow2Error(f"invalid parameter value: {prealloc}")
    return cs, rb, version, ext_l2, prealloc, "backing_file" in o


async def cmd_measure(argv: list[str]) -> int:
    from appliance.qcow2 import measure as M

    p = _parser("measure")
    p.add_argument("--output", default="human", choices=["human", "json"])
    p.add_argument("-O", dest="out_fmt", default="raw")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("--size")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-l", dest="snapshot")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("filename", nargs="?")
    a = p.parse_args(argv)
    given = cvtnum("image size", a.size) if a.size is not None else 0
    o = parse_o_all(a.options)
    if wants_help(o):
        return print_create_options(a.out_fmt)
    if a.size is not None and a.filename:
        raise ConfigError("--size N cannot be used together with a filename.")
    if a.size is None and not a.filename:
        raise ConfigError("Either --size N or one filename must be specified.")
    if a.snapshot is not None and not a.filename:
        raise ConfigError("--snapshot is only valid with a filename.")
    if a.out_fmt not in ("raw", "qcow2"):
        raise ConfigError(f"Unknown file format '{a.out_fmt}'")
    src: Any = None
    if a.filename:
        src = await _open(a.filename, a.fmt, read_only=True, share=a.force_share)
    try:
        if src is not None and a.snapshot is not None:
            from appliance.qcow2 import snapops
            from appliance.qcow2.img_ops import _snapshot_param

            name, ident, either = _snapshot_param(a.snapshot)
            if not isinstance(src, Qcow2Image):
                raise Qcow2Error(f"Failed to load snapshot: '{a.filename}' has no internal snapshots")
            await snapops.view_snapshot(src, name=name, ident=ident, either=either)
        size = src.size if src is not None else given
        if a.out_fmt == "raw":
            for k in o:  # raw's creation options; neither changes what a raw file needs
                if k not in ("size", "preallocation"):
                    raise ConfigError(f"Invalid parameter '{k}'")
            m = M.measure_raw(size, from_image=src is not None)
        else:
            cs, rb, version, ext_l2, prealloc, backing = _measure_options(o)
            data = None
            if src is not None:
                data = [(s, s + n) for s, n, _, present, zero, kind, _ in
                        await chain_status(src, 0, size, detail=True)
                        if present and not zero and kind in (K_DATA, K_COMPRESSED)]
            bitmaps = None
            # Only a version 3 source can carry persistent bitmaps; qemu-img
            # leaves the line out for a version 2 one.
            if isinstance(src, Qcow2Image) and src.header.version >= 3:
                bitmaps = [(b.name, 1 << b.granularity_bits) for b in src.bitmaps]
            m = M.measure_qcow2(size, cluster_size=cs, refcount_bits=rb, version=version,
                                extended_l2=ext_l2, preallocation=prealloc, has_backing=backing,
                                data=data, bitmaps=bitmaps)
    finally:
        if src is not None:
            await src.close()
    if a.output == "json":
        d: dict[str, Any] = {} if m.bitmaps is None else {"bitmaps": m.bitmaps}
        d |= {"required": m.required, "fully-allocated": m.fully_allocated}
        print(qemu_json.dumps(d))
    else:
        print(f"required size: {m.required}")
        print(f"fully allocated size: {m.fully_allocated}")
        if m.bitmaps is not None:
            print(f"bitmaps size: {m.bitmaps}")
    return 0


# ---------------------------------------------------------------- info


def _info_dict(img: Any, filename: str) -> dict[str, Any]:
    st = os.stat(img.path)
    d: dict[str, Any] = {}
    if isinstance(img, Qcow2Image):
        h = img.header
        if h.backing_file and h.backing_format:
            d["backing-filename-format"] = h.backing_format
        if img.snapshots:
            d["snapshots"] = [
                ({"icount": s.icount} if s.icount is not None else {}) | {
                    "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                    "name": s.name,
                    "date-sec": s.date_sec,
                    "date-nsec": s.date_nsec,
                    "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000,
                    "id": s.id,
                    "vm-state-size": s.vm_state_size,
                }
                for s in img.snapshots
            ]
        d["virtual-size"] = img.size
        d["filename"] = filename
        d["cluster-size"] = h.cluster_size
        d["format"] = "qcow2"
        d["actual-size"] = st.st_blocks * 512
        data: dict[str, Any] = {"compat": h.compat_name(),
                                "compression-type": H.COMPRESSION_NAMES[h.compression_type]}
        if h.version >= 3:
            data["lazy-refcounts"] = h.lazy_refcounts
        if img.bitmaps:
            from appliance.qcow2.bitmaps import flag_names

            data["bitmaps"] = [{"flags": flag_names(b.flags), "name": b.name,
                                "granularity": 1 << b.granularity_bits} for b in img.bitmaps]
        data["refcount-bits"] = h.refcount_bits
        if h.encrypted:
            from appliance.qcow2.crypto_info import encrypt_info

            enc = encrypt_info(img._fd, h)
            if enc is not None:
                data["encrypt"] = enc
        if h.version >= 3:
            data["corrupt"] = h.corrupt
            data["extended-l2"] = h.extended_l2
        d["format-specific"] = {"type": "qcow2", "data": data}
        if h.backing_file:
            from appliance.qcow2.backing import resolve_backing

            d["full-backing-filename"] = (h.backing_file if h.backing_file.startswith("json:")
                                          else str(resolve_backing(Path(filename), h.backing_file)))
            d["backing-filename"] = h.backing_file
        if h.encrypted:
            d["encrypted"] = True
        d["dirty-flag"] = h.dirty
    else:
        # QEMU sizes a raw image in whole 512-byte sectors, a partial last one included.
        d["virtual-size"] = -(-img.size // 512) * 512
        d["filename"] = filename
        d["format"] = "raw"
        d["actual-size"] = st.st_blocks * 512
        d["dirty-flag"] = False
    return d


def _fmt_clock(nsec: int) -> str:
    ms = nsec // 1_000_000
    s, ms = divmod(ms, 1000)
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def snapshot_table(snaps: list[Any]) -> str:
    lines = [f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        icount = "" if s.icount is None else str(s.icount)
        lines.append(f"{_pad(s.id, 9)} {_pad(s.name, 16)} {size_to_str(s.vm_state_size):>8}{date:>20}"
                     f"{_fmt_clock(s.vm_clock_nsec):>13}{icount:>11}")
    return "\n".join(lines) + "\n"


def _pad(text: str, width: int) -> str:
    """Left-justified to ``width`` bytes of UTF-8, as qemu-img's printf pads."""
    return text + " " * max(0, width - len(text.encode()))


def _info_human(d: dict[str, Any], img: Any) -> str:
    out = [f"image: {d['filename']}", f"file format: {d['format']}",
           f"virtual size: {size_to_str(d['virtual-size'])} ({d['virtual-size']} bytes)",
           f"disk size: {size_to_str(d['actual-size'])}"]
    if d.get("encrypted"):
        out.append("encrypted: yes")
    if "cluster-size" in d:
        out.append(f"cluster_size: {d['cluster-size']}")
    if d.get("dirty-flag"):
        out.append("cleanly shut down: no")
    if "backing-filename" in d:
        bf = d["backing-filename"]
        if d["full-backing-filename"] != bf:
            bf += f" (actual path: {d['full-backing-filename']})"
        out.append(f"backing file: {bf}")
        if "backing-filename-format" in d:
            out.append(f"backing file format: {d['backing-filename-format']}")
    text = "\n".join(out) + "\n"
    if d.get("snapshots"):
        text += "Snapshot list:\n" + snapshot_table(img.snapshots)
    if "format-specific" in d:
        text += "Format specific information:\n"
        for k, v in d["format-specific"]["data"].items():
            text += _human_value(k.replace("-", " "), v, 4)
    return text


def _human_value(key: str, v: Any, indent: int) -> str:
    """qemu-img's nested 'key: value' layout for format-specific data."""
    pad = " " * indent
    if isinstance(v, bool):
        return f"{pad}{key}: {'true' if v else 'false'}\n"
    if isinstance(v, list):
        out = f"{pad}{key}:\n"
        for i, item in enumerate(v):
            out += _human_value(f"[{i}]", item, indent + 4)
        return out
    if isinstance(v, dict):
        out = f"{pad}{key}:\n"
        for k2, v2 in v.items():
            out += _human_value(k2.replace("-", " "), v2, indent + 4)
        return out
    return f"{pad}{key}: {v}\n"


async def cmd_info(argv: list[str]) -> int:
    p = _parser("info")
    p.add_argument("-f", "--format", dest="fmt")  # qemu-img info has the long name too
    p.add_argument("--output", default="human", choices=["human", "json"])
    p.add_argument("--backing-chain", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("filename")
    a = p.parse_args(argv)
    try:
        # Metadata only (QEMU's BDRV_O_NO_IO): an encrypted image opens here alone.
        img = await _open(a.filename, a.fmt, read_only=True, backing=a.backing_chain,
                          share=a.force_share, metadata_only=True)
    except Qcow2Error as err:
        # qemu-img info opens each layer of --backing-chain on its own, so a
        # missing one is named as a missing image, not as a backing file.
        lead, sep, missing = str(err).partition(": Could not open backing file: ")
        while missing.startswith("Could not open backing file: "):
            missing = missing.removeprefix("Could not open backing file: ")
        if sep and missing.endswith(": No such file or directory") and "backing file" not in missing:
            raise Qcow2Error(f"{missing.removesuffix(': No such file or directory')}: {missing}") from err
        raise
    try:
        infos = []
        names = [a.filename]
        chain = _chain(img) if a.backing_chain else [img]
        for i, layer in enumerate(chain):
            if i > 0:
                prev = chain[i - 1]
                below = _info_dict(prev, names[i - 1])["full-backing-filename"]
                target = json_target(below)
                names.append(below if target is None else target[0])
            infos.append(_info_dict(layer, names[i]))
        if a.output == "json":
            print(qemu_json.dumps(infos if a.backing_chain else infos[0]))
        else:
            print("\n".join(_info_human(d, layer) for d, layer in zip(infos, chain, strict=False)), end="")
    finally:
        await img.close()
    return 0


def _is_qcow2(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == H.MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------- check


async def cmd_check(argv: list[str]) -> int:
    from appliance.qcow2.check_flow import FIX_MODES, check_pass

    p = _parser("check")
    p.add_argument("-f", "--format", dest="fmt")  # qemu-img check has the long name too
    p.add_argument("-r", "--repair", dest="repair", choices=["leaks", "all"])
    p.add_argument("-T", dest="src_cache", default="writeback")
    p.add_argument("--output", default="human", choices=["human", "json"])
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("filename")
    a = p.parse_args(argv)
    if a.fmt not in (None, "qcow2") or not _is_qcow2(a.filename):
        refuse_unopenable(a.filename)
        if a.fmt == "qcow2" and probe_format(a.filename, warn=False) != "qcow2":
            raise Qcow2Error(f"Could not open '{a.filename}': Image is not in qcow2 format")
        foreign = foreign_format_of(a.filename) if a.fmt is None else None
        if foreign is not None:
            raise Qcow2Error(unsupported_message(a.filename, foreign))
        if a.fmt is None and a.repair:
            # -r opens the image writable, and a probed raw one warns then.
            probe_format(a.filename)
        print("appliance img: This image format does not support checks", file=sys.stderr)
        return 63
    try:
        img = await Qcow2Image.open(a.filename, read_only=a.repair is None, open_backing=False,
                                    repair_dirty=False, allow_corrupt=True, check_mode=True)
    except Qcow2Error as err:
        print(f"appliance img: Could not open '{a.filename}': {err}", file=sys.stderr)
        return 1
    if not a.force_share:
        try:
            lock_for_command(img, a.filename, write=a.repair is not None)
        except BaseException:
            await img.close()
            raise
    try:
        # qemu-img check opens the whole chain, so a missing backing file stops it.
        refuse_missing_backing(a.filename, "qcow2")
    except Qcow2Error:
        await img.close()
        raise
    fix = FIX_MODES[a.repair]
    try:
        # qemu-img's img_check: one pass (repairing what -r allows); when it
        # repaired anything, say so and check again without repairing.
        res = await check_pass(img, fix)
        _say(res.messages)
        # Like qemu-img's buffered stdout, the report comes after every stderr line.
        summary = ""
        if not res.failed and (res.corruptions_fixed or res.leaks_fixed):
            if a.output == "human" and not a.quiet:
                summary = ("The following inconsistencies were found and repaired:\n\n"
                           f"    {res.leaks_fixed} leaked clusters\n"
                           f"    {res.corruptions_fixed} corruptions\n\n"
                           "Double checking the fixed image now...\n")
            fixed = res.leaks_fixed, res.corruptions_fixed
            res = await check_pass(img, 0)
            _say(res.messages)
            res.leaks_fixed, res.corruptions_fixed = fixed
    finally:
        await img.close()
    if res.failed:
        print(f"appliance img: Check failed: {os.strerror(res.failed)}", file=sys.stderr)
        return 1
    sys.stderr.flush()
    print(summary, end="")
    if a.output == "json":
        print(qemu_json.dumps(_check_json(res, a.filename)))
    elif not a.quiet:
        _check_human(res)
    if res.check_errors:
        print("appliance img: Check failed", file=sys.stderr)
        return 1
    if res.corruptions:
        return 2
    if res.leaks:
        return 3
    return 0


def _say(lines: list[str]) -> None:
    for m in lines:
        print(m, file=sys.stderr)


def _check_json(res: Any, filename: str) -> dict[str, Any]:
    # qemu-img prints a QDict: its keys come out in the order of their hash
    # buckets, one fixed order, whichever keys are present.
    d: dict[str, Any] = {"image-end-offset": res.image_end_offset}
    if res.compressed_clusters:
        d["compressed-clusters"] = res.compressed_clusters
    d["total-clusters"] = res.total_clusters
    if res.corruptions:
        d["corruptions"] = res.corruptions
    if res.corruptions_fixed:
        d["corruptions-fixed"] = res.corruptions_fixed
    d["check-errors"] = res.check_errors
    if res.leaks:
        d["leaks"] = res.leaks
    if res.leaks_fixed:
        d["leaks-fixed"] = res.leaks_fixed
    if res.allocated_clusters:
        d["allocated-clusters"] = res.allocated_clusters
    d["filename"] = filename
    d["format"] = "qcow2"
    if res.fragmented_clusters:
        d["fragmented-clusters"] = res.fragmented_clusters
    return d


def _check_human(res: Any) -> None:
    if not res.corruptions and not res.leaks and not res.check_errors:
        print("No errors were found on the image.")
    else:
        if res.corruptions:
            print(f"\n{res.corruptions} errors were found on the image.\n"
                  "Data may be corrupted, or further writes to the image may corrupt it.")
        if res.leaks:
            print(f"\n{res.leaks} leaked clusters were found on the image.\n"
                  "This means waste of disk space, but no harm to data.")
        if res.check_errors:
            print(f"\n{res.check_errors} internal errors have occurred during the check.")
    if res.total_clusters and res.allocated_clusters:
        # As qemu-img: fragmentation and compression are shares of allocated clusters.
        t, al = res.total_clusters, res.allocated_clusters
        print(f"{al}/{t} = {al * 100 / t:0.2f}% allocated, "
              f"{res.fragmented_clusters * 100 / al:0.2f}% fragmented, "
              f"{res.compressed_clusters * 100 / al:0.2f}% compressed clusters")
    if res.image_end_offset:
        print(f"Image end offset: {res.image_end_offset}")


# ---------------------------------------------------------------- map


async def chain_status(img: Any, offset: int, length: int, depth: int = 0, *,
                       detail: bool = False) -> list[tuple[int, int, int, bool, bool, int, Any]]:
    """(start, length, depth, present, reads-as-zero, kind, (host, layer)) through the chain.

    kind: K_DATA, K_ZERO, K_COMPRESSED, or K_UNALLOC (nothing anywhere: reads
    zero). ``host`` is -1 where the layer keeps no host bytes.

    :param detail: what ``map`` shows beyond what a copy needs: the host
        offsets zero clusters keep, and data extents whose host bytes are a
        hole in a metadata-preallocated image (qemu-img reports those as
        both data and zero).
    """
    out: list[tuple[int, int, int, bool, bool, int, Any]] = []
    ext = await img.block_status(offset, length)
    holes: bool | None = None if detail else False
    for kind, start, n, host in ext:
        if kind == K_UNALLOC:
            b = getattr(img, "backing", None)
            if b is not None and start < b.size:
                m = min(n, b.size - start)
                out.extend(await chain_status(b, start, m, depth + 1, detail=detail))
                if m < n:
                    out.extend(await _unallocated(img, start + m, n - m, depth, detail))
            else:
                out.extend(await _unallocated(img, start, n, depth, detail))
        elif kind == K_ZERO and detail and isinstance(img, Qcow2Image):
            for s, m, h in await _zero_hosts(img, start, n):
                out.append((s, m, depth, True, True, kind, (h, img)))
        elif kind == K_DATA and isinstance(img, Qcow2Image):
            if holes is None:
                holes = await _metadata_preallocated(img)
            pieces = _file_holes(img._fd, host, n) if holes else [(0, n, False)]
            for rel, m, zero in pieces:
                out.append((start + rel, m, depth, True, zero, kind, (host + rel, img)))
        else:
            out.append((start, n, depth, True, kind == K_ZERO, kind, (host, img)))
    return out


async def _unallocated(img: Any, start: int, n: int, depth: int, detail: bool
                       ) -> list[tuple[int, int, int, bool, bool, int, Any]]:
    """Bytes no layer holds. With extended L2 entries an unallocated subcluster
    can sit in a host cluster kept for its neighbours, and qemu-img map shows
    that cluster's offset for it."""
    if not (detail and isinstance(img, Qcow2Image) and img._ext):
        return [(start, n, depth, False, False, K_UNALLOC, None)]
    return [(s, m, depth, False, False, K_UNALLOC, (h, img) if h >= 0 else None)
            for s, m, h in await _zero_hosts(img, start, n)]


async def _zero_hosts(img: Qcow2Image, start: int, n: int) -> list[tuple[int, int, int]]:
    """(start, length, host) pieces of an extent; host -1 where no cluster is kept.

    A zero cluster (or subcluster) may keep its host cluster (qcow2.txt:
    the zero flag with a non-zero offset), and qemu-img map shows that
    offset.
    """
    from appliance.qcow2.image import OFFSET_MASK

    out: list[tuple[int, int, int]] = []
    cb, cs = img._cb, img._cs
    pos, end = start, start + n
    while pos < end:
        gc = pos >> cb
        nxt = min(end, (gc + 1) << cb)
        e, _ = await img._entry(gc)
        host = e & OFFSET_MASK
        h = host + (pos & (cs - 1)) if host else -1
        last = out[-1] if out else None
        if last and last[0] + last[1] == pos and (
                (h == -1 and last[2] == -1) or (h != -1 and last[2] != -1 and last[2] + last[1] == h)):
            out[-1] = (last[0], last[1] + nxt - pos, last[2])
        else:
            out.append((pos, nxt - pos, h))
        pos = nxt
    return out


async def _metadata_preallocated(img: Qcow2Image) -> bool:
    """Whether many of the image's allocated clusters are holes in its file.

    That is what preallocation=metadata leaves behind, and qemu-img then
    looks through data clusters into the file to report holes as zero. The
    test: clusters with a non-zero refcount clearly outnumber the clusters
    the file system really holds (a margin of a ninth, and at least two).
    """
    cs = img._cs
    try:
        st = os.fstat(img._fd)
    except OSError:
        return False
    held = st.st_blocks * 512 // cs
    need = max(held * 10 // 9, held + 2)
    clusters = -(-st.st_size // cs)
    per_block = img._rb_entries
    counted = 0
    # A whole refcount block at a time: a large image has millions of
    # clusters but few blocks, and map must not take seconds for this.
    for ti in range(min(len(img._rt), -(-clusters // per_block))):
        blk = await img._refblock(ti)
        if blk is None:
            continue
        live = blk[: clusters - ti * per_block] if (ti + 1) * per_block > clusters else blk
        counted += len(live) - live.count(0)
        if counted >= need:
            return True
    return False


def _file_holes(fd: int, host: int, n: int) -> list[tuple[int, int, bool]]:
    """(relative start, length, is-hole) pieces of the file bytes [host, host+n)."""
    out: list[tuple[int, int, bool]] = []
    pos, end = host, host + n
    while pos < end:
        try:
            data = min(end, os.lseek(fd, pos, os.SEEK_DATA))
        except OSError:
            data = end  # ENXIO: nothing but hole up to EOF and past it
        if data > pos:
            out.append((pos - host, data - pos, True))
            pos = data
            if pos >= end:
                break
        try:
            hole = min(end, os.lseek(fd, pos, os.SEEK_HOLE))
        except OSError:
            hole = end
        out.append((pos - host, hole - pos, False))
        pos = hole
    return out


async def map_rows(img: Any, start: int, length: int) -> list[dict[str, Any]]:
    """qemu-img map's rows for [start, start+length): start, length, depth,
    present, zero, data, offset (where the bytes have one) and ``_file``
    (the layer's path). Neighbours with the same flags and following host
    offsets in the same file are one row, as qemu-img prints them;
    compressed clusters (no offset) carry ``_compressed``."""
    rows: list[dict[str, Any]] = []
    for s, n, depth, present, zero, kind, hi in await chain_status(img, start, length,
                                                                     detail=True):
        row: dict[str, Any] = {"start": s, "length": n, "depth": depth, "present": present,
                               "zero": zero or kind == K_UNALLOC,
                               "data": kind in (K_DATA, K_COMPRESSED)}
        if hi and hi[0] >= 0 and kind != K_COMPRESSED:
            row["offset"] = hi[0]
        row["_file"] = str(hi[1].path) if hi else None
        row["_compressed"] = kind == K_COMPRESSED
        if rows:
            last = rows[-1]
            same = all(last[k] == row[k] for k in ("depth", "present", "zero", "data"))
            contiguous = ("offset" in last) == ("offset" in row) and (
                "offset" not in row or last["offset"] + last["length"] == row["offset"])
            if same and contiguous and last["start"] + last["length"] == s and (
                    last["_file"] == row["_file"]):
                last["length"] += n
                last["_compressed"] = last["_compressed"] or row["_compressed"]
                continue
        rows.append(row)
    return rows


async def cmd_map(argv: list[str]) -> int:
    p = _parser("map")
    p.add_argument("-f", "--format", dest="fmt")  # qemu-img map has the long name too
    p.add_argument("--output", default="human", choices=["human", "json"])
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("--start-offset", default="0")
    p.add_argument("--max-length")
    p.add_argument("filename")
    a = p.parse_args(argv)
    start = cvtnum("start offset", a.start_offset)
    most = cvtnum("max length", a.max_length) if a.max_length is not None else None
    img = await _open(a.filename, a.fmt, read_only=True, share=a.force_share)
    try:
        length = img.size - start if most is None else min(most, img.size - start)
        rows = await map_rows(img, start, max(0, length))
        if length <= 0:
            # qemu-img's one row for a start at or past the end: nothing there, not even zeroes.
            rows = [{"start": start, "length": 0, "depth": 0, "present": False, "zero": False,
                     "data": False, "_file": None, "_compressed": False}]
        if a.output == "json":
            import json

            lines = []
            for r in rows:
                r.pop("_file")
                r.pop("_compressed")
                body = ", ".join(f'"{k}": {json.dumps(v)}' for k, v in r.items())
                lines.append("{ " + body + "}")
            print("[" + ",\n".join(lines) + "]")
        else:
            print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
            for r in rows:
                if r["data"] and "offset" not in r:
                    # The human form names a file offset for every data row.
                    sys.stdout.flush()
                    print("appliance img: File contains external, encrypted or compressed clusters.",
                          file=sys.stderr)
                    return 1
                if r["data"] and not r["zero"]:
                    print(f"{_hx(r['start']):<15} {_hx(r['length']):<15} {_hx(r['offset']):<15} "
                          f"{r['_file'] if r['_file'] else ''}")
    finally:
        await img.close()
    return 0


def _hx(v: int) -> str:
    return "0" if v == 0 else f"{v:#x}"


# ---------------------------------------------------------------- snapshot / resize / amend


async def cmd_snapshot(argv: list[str]) -> int:
    from appliance.qcow2 import snapops

    class _One(argparse.Action):
        """-l/-a/-c/-d: one action a command, as qemu-img takes them."""

        def __call__(self, parser: Any, ns: Any, value: Any, option: Any = None) -> None:
            if getattr(ns, "_acted", False):
                raise ConfigError("Cannot mix '-l', '-a', '-c', '-d'")
            ns._acted = True
            setattr(ns, self.dest, True if value == [] else value)

    p = _parser("snapshot")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-l", dest="list", action=_One, nargs=0)
    p.add_argument("-a", dest="apply", action=_One)
    p.add_argument("-c", dest="create", action=_One)
    p.add_argument("-d", dest="delete", action=_One)
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("filename")
    a = p.parse_args(argv)
    ro = a.apply is None and a.create is None and a.delete is None
    refuse_unopenable(a.filename)
    refuse_missing_backing(a.filename, a.fmt)
    img = await _open(a.filename, a.fmt, read_only=ro, backing=False, share=a.force_share and ro)
    if not isinstance(img, Qcow2Image):
        # A format without internal snapshots: an empty list, and each change
        # refused in qemu-img's words (-a opens the image a second time there,
        # so a probed raw image warns twice).
        await img.close()
        if a.create is not None:
            raise Qcow2Error(f"Could not create snapshot '{a.create}': -95 (Operation not supported)")
        if a.delete is not None:
            raise Qcow2Error(f"Could not delete snapshot '{a.delete}': snapshot not found")
        if a.apply is not None:
            if a.fmt is None:
                probe_format(a.filename)
            raise Qcow2Error(f"Could not apply snapshot '{a.apply}': Block driver does not support snapshots")
        return 0
    try:
        if a.list:  # no action at all lists nothing, as in qemu-img
            if img.snapshots:
                print("Snapshot list:")
                print(snapshot_table(img.snapshots), end="")
        elif a.create is not None:
            try:
                await snapops.create_snapshot(img, a.create)
            except Qcow2Error as err:
                # A refcount that would overflow is QEMU's EINVAL there; a write
                # its overlap check stops (a damaged snapshot entry), EIO.
                why = "-22 (Invalid argument)" if "would overflow" in str(err) else str(err)
                if isinstance(err, CorruptImage) and str(err).startswith("Preventing invalid write"):
                    print(f"qcow2: Marking image as corrupt: {err}; further corruption events "
                          "will be suppressed", file=sys.stderr)
                    why = "-5 (Input/output error)"
                raise Qcow2Error(f"Could not create snapshot '{a.create}': {why}") from err
        elif a.delete is not None:
            # qemu-img deletes by name only (an id is not looked up here).
            if not any(s.name == a.delete for s in img.snapshots):
                raise Qcow2Error(f"Could not delete snapshot '{a.delete}': snapshot not found")
            try:
                await snapops.delete_snapshot(img, a.delete)
            except snapops.SnapshotL1Invalid as err:
                raise Qcow2Error(f"Could not delete snapshot '{a.delete}': {err}") from err
        elif a.apply is not None:
            if snapops.find(img, a.apply) is None:
                raise Qcow2Error(f"Could not apply snapshot '{a.apply}': "
                                 "Failed to load snapshot: No such file or directory")
            try:
                await snapops.apply_snapshot(img, a.apply)
            except snapops.SnapshotL1Invalid as err:
                print(f"appliance img: {err}", file=sys.stderr)
                raise Qcow2Error(f"Could not apply snapshot '{a.apply}': "
                                 f"Failed to load snapshot: {os.strerror(err.errno)}") from err
            except Qcow2Error as err:
                if err.kind is not ErrorKind.RANGE:
                    raise
                # A refcount that would overflow is QEMU's EINVAL there too.
                raise Qcow2Error(f"Could not apply snapshot '{a.apply}': "
                                 "Failed to load snapshot: Invalid argument") from err
    finally:
        await img.close()
    return 0


async def cmd_resize(argv: list[str]) -> int:
    p = _parser("resize")
    p.add_argument("-f", dest="fmt")
    p.add_argument("--shrink", action="store_true")
    p.add_argument("--preallocation", default="off")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")
    p.add_argument("size")
    # The size comes last and may start with "-" (shrink by), which is not an option.
    relative = argv and argv[-1][:1] in "+-" and "--" not in argv
    a = p.parse_args(argv[:-1] + ["--", argv[-1]] if relative else argv)
    prealloc = a.preallocation
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise Qcow2Error(f"Invalid preallocation mode '{prealloc}'")
    # As qemu-img: one sign is taken off, the rest is an option's size value,
    # checked before the image is opened.
    sign = a.size[:1] if a.size[:1] in ("+", "-") else ""
    amount = option_size("size", a.size[len(sign):])
    refuse_unopenable(a.filename)
    refuse_missing_backing(a.filename, a.fmt)
    img = await _open(a.filename, a.fmt, read_only=False, backing=False)
    try:
        new = {"+": img.size + amount, "-": img.size - amount}.get(sign, amount)
        new = (new + (1 << 63)) % (1 << 64) - (1 << 63)  # qemu-img's int64_t arithmetic
        if new <= 0:
            raise ConfigError("New image size must be positive")
        if new < img.size and not a.shrink:
            print("appliance img: Use the --shrink option to perform a shrink operation.\n"
                  "appliance img: warning: Shrinking an image will delete all data beyond the "
                  "shrunken image's end. Before performing such an operation, make sure there "
                  "is no important data there.", file=sys.stderr)
            return 1
        if prealloc != "off" and new < img.size:
            raise Qcow2Error("Preallocation can only be used for growing images")
        old = img.size
        if isinstance(img, Qcow2Image):
            from appliance.qcow2.create import preallocate
            from appliance.qcow2.ops import resize

            await resize(img, new)
            if prealloc != "off" and new > old:
                await preallocate(img, prealloc, first=-(-old // img._cs))
            if new > old and img.header.backing_file:
                await _zero_over_backing(img, old, new)
        else:
            if prealloc == "metadata":
                raise Qcow2Error("Unsupported preallocation mode: metadata")
            os.ftruncate(img._fd, new)
            if new > old and prealloc == "falloc":
                os.posix_fallocate(img._fd, old, new - old)
            elif new > old and prealloc == "full":
                zero = bytes(1 << 20)
                pos = old
                while pos < new:
                    pos += os.pwrite(img._fd, zero[:min(len(zero), new - pos)], pos)
    finally:
        await img.close()
    if not a.quiet:
        print("Image resized.")
    return 0


async def _zero_over_backing(img: Qcow2Image, old: int, new: int) -> None:
    """A grown overlay reads zeroes in its new area, as QEMU makes it, even
    where its backing file is longer: that stretch gets zero clusters."""
    from appliance.qcow2.backing import open_backing_file, zero_over_backing

    backing = await open_backing_file(img.path, img.header.backing_file or "",
                                      img.header.backing_format, cache="writeback", chain=())
    try:
        end = min(new, backing.size)
        if end > old:
            await zero_over_backing(img, backing, old, end - old)
    finally:
        await backing.close()


async def cmd_amend(argv: list[str]) -> int:
    from appliance.qcow2.ops import amend

    p = _parser("amend")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-t", dest="cache", default="writeback")
    p.add_argument("--force", action="store_true")
    p.add_argument("filename", nargs="?")
    a = p.parse_args(argv)
    o = parse_o_all(a.options)
    if wants_help(o):
        return print_create_options(a.fmt or "qcow2", amend=True)
    if a.filename is None:
        raise ConfigError("Expecting one image file name")
    if not o:
        raise ConfigError("Must specify options (-o)")
    from appliance.qcow2.img_ops import _Progress

    # qemu-img starts its progress before it opens the image: from here a
    # failure still ends the line, and once the options were taken (the 0
    # printed) it shows 100 whatever became of the work.
    prog = _Progress(a.progress and not a.quiet, 1, start=False)
    try:
        refuse_unopenable(a.filename)
        refuse_missing_backing(a.filename, a.fmt)
        img = await _open(a.filename, a.fmt, read_only=False, backing=False, cache=a.cache)
        try:
            if not isinstance(img, Qcow2Image):
                raise Qcow2Error("Format driver 'raw' does not support option amendment")
            await amend(img, o, progress=prog.set)
        finally:
            if prog.touched:
                prog.set(100.0)
            await img.close()
    finally:
        prog.end()
    return 0


async def _lazy(name: str, argv: list[str]) -> int:
    from appliance.qcow2 import img_ops

    fn: Callable[[list[str]], Any] = getattr(img_ops, name)
    return int(await fn(argv))


async def cmd_convert(argv: list[str]) -> int:
    return await _lazy("cmd_convert", argv)


async def cmd_dd(argv: list[str]) -> int:
    return await _lazy("cmd_dd", argv)


async def cmd_commit(argv: list[str]) -> int:
    return await _lazy("cmd_commit", argv)


async def cmd_rebase(argv: list[str]) -> int:
    return await _lazy("cmd_rebase", argv)


async def cmd_compare(argv: list[str]) -> int:
    return await _lazy("cmd_compare", argv)


async def cmd_bitmap(argv: list[str]) -> int:
    from appliance.qcow2.bitmap_cmd import cmd_bitmap as bitmap

    return int(await bitmap(argv))


async def cmd_bench(argv: list[str]) -> int:
    from appliance.qcow2.img_bench import cmd_bench as bench

    return int(await bench(argv))


COMMANDS: dict[str, Callable[[list[str]], Any]] = {
    "create": cmd_create,
    "info": cmd_info,
    "check": cmd_check,
    "map": cmd_map,
    "convert": cmd_convert,
    "dd": cmd_dd,
    "measure": cmd_measure,
    "snapshot": cmd_snapshot,
    "resize": cmd_resize,
    "commit": cmd_commit,
    "rebase": cmd_rebase,
    "compare": cmd_compare,
    "amend": cmd_amend,
    "bitmap": cmd_bitmap,
    "bench": cmd_bench,
}
