"""`appliance run` options for the QMP monitor, in QEMU's syntax.

``-qmp unix:PATH[,server=on|off][,wait=on|off]``, ``-qmp tcp:[HOST]:PORT[,…]``,
``-qmp-pretty`` (the same, with indented JSON), and ``-mon
[chardev=]ID,mode=control[,pretty=on|off]`` for a ``-chardev socket,id=ID,…``.
Each becomes a :class:`~appliance.qmp.server.QmpSpec` in the machine's device
list. The human monitor (HMP, ``mode=readline``, ``-monitor``) is refused by name.
"""

from __future__ import annotations

from pathlib import Path

from appliance.cli.options import parse_option
from appliance.cli.run import FINALIZERS, RunArgs, option
from appliance.errors import ConfigError
from appliance.machine.config import ChardevConfig

_SOCKET_FORMS = "unix:PATH[,server=on|off][,wait=on|off] | tcp:[HOST]:PORT[,server=on|off][,wait=on|off]"


def parse_qmp(spec: str, what: str = "-qmp") -> ChardevConfig:
    """A ``-qmp`` socket as a ChardevConfig (server defaults to off and wait to on, as in QEMU).

    :raises ConfigError: On anything but a unix or tcp socket, or a bad address.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("unix", "tcp"):
        raise ConfigError(f"{what}: '{spec}' is not supported (unix:PATH or tcp:HOST:PORT)")
    opts = parse_option(what, rest, implied="addr", flags=("server", "wait", "nowait", "nodelay"))
    addr = opts.require("addr")
    server = opts.take_bool("server", False)
    wait = opts.take_bool("wait", True) and not opts.take_bool("nowait", False)
    opts.take_bool("nodelay")
    opts.finish()
    if kind == "unix":
        cfg = ChardevConfig("socket", id=what, path=Path(addr), server=server, wait=wait)
    else:
        host, colon, port = addr.rpartition(":")
        if not colon:
            raise ConfigError(f"{what}: '{addr}' is not HOST:PORT")
        try:
            port_n = int(port, 10)
        except ValueError:
            raise ConfigError(f"{what}: port '{port}' is not a number") from None
        cfg = ChardevConfig("socket", id=what, host=host.strip("[]") or None, port=port_n, server=server, wait=wait)
    cfg.validate()
    return cfg


def _add(a: RunArgs, chardev: ChardevConfig, pretty: bool, what: str) -> None:
    from appliance.qmp.server import QmpSpec

    a.devices.append(QmpSpec(chardev, pretty=pretty, name=what))


@option("-qmp", _SOCKET_FORMS, "a QMP monitor (JSON) on a socket; server=on,wait=off to listen without waiting")
def _qmp(a: RunArgs, v: str) -> None:
    _add(a, parse_qmp(v), False, "-qmp")


@option("-qmp-pretty", _SOCKET_FORMS, "same as -qmp, with indented JSON")
def _qmp_pretty(a: RunArgs, v: str) -> None:
    _add(a, parse_qmp(v, "-qmp-pretty"), True, "-qmp-pretty")


@option("-mon", "[chardev=]ID,mode=control[,pretty=on|off]",
        "a QMP monitor on -chardev socket,id=ID (mode=readline, the human monitor, is not supported)")
def _mon(a: RunArgs, v: str) -> None:
    opts = parse_option("-mon", v, implied="chardev", flags=("pretty",))
    opts.require("chardev")
    mode = opts.take("mode", "readline")
    opts.take_bool("pretty")
    opts.finish()
    if mode != "control":
        raise ConfigError(f"-mon: mode '{mode}' (the human monitor) is not supported; use mode=control")
    a.extra.setdefault("-mon", []).append(v)


def finalize(a: RunArgs) -> None:
    """Resolve each ``-mon chardev=ID`` against the ``-chardev`` s (which may come later on the line)."""
    for v in a.extra.pop("-mon", []):
        opts = parse_option("-mon", v, implied="chardev", flags=("pretty",))
        cid = opts.require("chardev")
        pretty = opts.take_bool("pretty")
        cfg = a.chardevs.get(cid)
        if cfg is None:
            raise ConfigError(f"-mon: chardev '{cid}' not found")
        if cfg.backend != "socket":
            raise ConfigError(f"-mon: chardev '{cid}' is '{cfg.backend}'; a QMP monitor needs a socket")
        if f"chardev:{cid}" in a.serials:
            raise ConfigError(f"-mon: chardev '{cid}' is already used by -serial")
        _add(a, cfg, pretty, f"-mon chardev={cid}")


if finalize not in FINALIZERS:
    FINALIZERS.append(finalize)
