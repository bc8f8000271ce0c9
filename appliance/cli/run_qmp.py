"""`appliance run` options for the monitors, in QEMU's syntax.

QMP: ``-qmp unix:PATH[,server=on|off][,wait=on|off]``, ``-qmp tcp:[HOST]:PORT[,…]``,
``-qmp-pretty`` (the same, with indented JSON), and ``-mon
[chardev=]ID,mode=control[,pretty=on|off]`` for a ``-chardev socket,id=ID,…``;
each becomes a :class:`~appliance.qmp.server.QmpSpec`. The human monitor:
``-monitor tcp:…|telnet:…|unix:…|chardev:ID|none`` and ``-mon
[chardev=]ID[,mode=readline]``, each a :class:`~appliance.qmp.hmp.HmpSpec`.
"""

from __future__ import annotations

from pathlib import Path

from appliance.cli.options import parse_option
from appliance.cli.run import FINALIZERS, RunArgs, option
from appliance.errors import ConfigError
from appliance.machine.config import ChardevConfig

_SOCKET_FORMS = "unix:PATH[,server=on|off][,wait=on|off] | tcp:[HOST]:PORT[,server=on|off][,wait=on|off] | stdio"


def parse_qmp(spec: str, what: str = "-qmp") -> ChardevConfig:
    """A ``-qmp`` socket as a ChardevConfig (server defaults to off and wait to on, as in QEMU).

    :raises ConfigError: On anything but a unix or tcp socket, or a bad address.
    """
    if spec == "stdio":
        # The process's own stdin/stdout, as QEMU scripts drive it (-display none -qmp stdio).
        return ChardevConfig("stdio", id=what, signal=False)
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
        cfg = ChardevConfig("socket", id=what, host=host.strip("[]"), port=port_n, server=server, wait=wait)
    cfg.validate()
    return cfg


def _add_hmp(a: RunArgs, chardev: ChardevConfig, what: str) -> None:
    from appliance.qmp.hmp import HmpSpec

    a.devices.append(HmpSpec(chardev, name=what, telnet=chardev.telnet))


@option("-monitor", "stdio | tcp:[HOST]:PORT[,server=on,wait=off] | telnet:… | unix:PATH[,…] | chardev:ID | none",
        "the human monitor (HMP: a '(qemu)' prompt for stop, cont, set_link, info status, …)")
def _monitor(a: RunArgs, v: str) -> None:
    a.monitor_given = True
    if v == "none":
        return
    kind, _, rest = v.partition(":")
    if kind == "chardev":
        a.extra.setdefault("-monitor chardev", []).append(rest)
    elif kind == "telnet":
        cfg = parse_qmp(f"tcp:{rest}", "-monitor")
        _add_hmp(a, ChardevConfig("socket", id="-monitor", host=cfg.host, port=cfg.port,
                                  server=cfg.server, wait=cfg.wait, telnet=True), "-monitor")
    elif kind in ("tcp", "unix", "stdio"):
        _add_hmp(a, parse_qmp(v, "-monitor"), "-monitor")
    else:
        raise ConfigError(f"-monitor: '{v}' is not supported (stdio, tcp:, telnet:, unix:, chardev: or none)")


def _add(a: RunArgs, chardev: ChardevConfig, pretty: bool, what: str) -> None:
    from appliance.qmp.server import QmpSpec

    a.devices.append(QmpSpec(chardev, pretty=pretty, name=what))


@option("-qmp", _SOCKET_FORMS, "a QMP monitor (JSON) on a socket; server=on,wait=off to listen without waiting")
def _qmp(a: RunArgs, v: str) -> None:
    a.monitor_given = True
    _add(a, parse_qmp(v), False, "-qmp")


@option("-qmp-pretty", _SOCKET_FORMS, "same as -qmp, with indented JSON")
def _qmp_pretty(a: RunArgs, v: str) -> None:
    a.monitor_given = True
    _add(a, parse_qmp(v, "-qmp-pretty"), True, "-qmp-pretty")


@option("-mon", "[chardev=]ID[,mode=readline|control][,pretty=on|off]",
        "a monitor on -chardev socket,id=ID: the human one (mode=readline, QEMU's default) or QMP "
        "(mode=control, also on -chardev stdio)")
def _mon(a: RunArgs, v: str) -> None:
    a.monitor_given = True
    opts = parse_option("-mon", v, implied="chardev", flags=("pretty",))
    chardev = opts.take("chardev")
    mode = opts.take("mode", "readline")
    opts.take_bool("pretty")
    opts.finish()
    if mode not in ("control", "readline"):
        raise ConfigError(f"-mon: Parameter 'mode' does not accept value '{mode}'")
    if chardev is None:
        raise ConfigError("-mon: Parameter 'chardev' is missing")
    a.extra.setdefault("-mon", []).append(v)


def finalize(a: RunArgs) -> None:
    """Resolve each ``-mon chardev=ID`` against the ``-chardev`` s (which may come later on the line)."""
    for v in a.extra.pop("-mon", []):
        opts = parse_option("-mon", v, implied="chardev", flags=("pretty",))
        cid = opts.require("chardev")
        pretty = opts.take_bool("pretty")
        mode = opts.take("mode", "readline")
        if mode == "control":
            _add(a, _monitor_chardev(a, cid, "-mon", control=True), pretty, f"-mon chardev={cid}")
        else:
            _readline_monitor(a, cid, "-mon", f"-mon chardev={cid}")
    for cid in a.extra.pop("-monitor chardev", []):
        _readline_monitor(a, cid, "-monitor", f"-monitor chardev:{cid}")


def _readline_monitor(a: RunArgs, cid: str, what: str, name: str) -> None:
    shared = a.chardevs.get(cid)
    if shared is not None and shared.backend == "stdio" and shared.mux and f"chardev:{cid}" in a.serials:
        # QEMU's documented mux (-chardev stdio,mux=on,id=C -serial chardev:C -mon chardev=C):
        # the console and the monitor share the terminal, Ctrl-A c between them.
        from appliance.qmp.hmp import MuxMonitorSpec

        a.devices.append(MuxMonitorSpec())
        return
    _add_hmp(a, _monitor_chardev(a, cid, what), name)


def _monitor_chardev(a: RunArgs, cid: str, what: str, *, control: bool = False) -> ChardevConfig:
    cfg = a.chardevs.get(cid)
    if cfg is None:
        raise ConfigError(f"{what}: chardev '{cid}' not found")
    if cfg.backend == "stdio":
        return cfg  # a monitor on the process's stdin/stdout
    if cfg.backend != "socket":
        raise ConfigError(f"{what}: chardev '{cid}' is '{cfg.backend}'; a monitor needs a socket or stdio")
    if f"chardev:{cid}" in a.serials:
        raise ConfigError(f"{what}: chardev '{cid}' is already used by -serial")
    return cfg


if finalize not in FINALIZERS:
    FINALIZERS.append(finalize)
