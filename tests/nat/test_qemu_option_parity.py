"""``-netdev user`` options and the user-net HMP commands, side by side with QEMU 7.2 itself.

Each option string goes to ``qemu-system-x86_64 -M none -S -netdev user,id=n0,…``
(told to quit over QMP on stdin as soon as it is up) and to ours
(:func:`parse_netdev` and a started :class:`UserNetwork`, what `appliance run`
and `net-daemon` do with it). Both must accept or both refuse; a refusal of
ours is one line that carries QEMU's reason (or the fact named in the table);
an accepted string must mean the same: the network ``info network`` shows and
the hostfwd rows of ``info usernet`` (listen address and port, guest address
and port; the guest address of a forward without one is the first DHCP lease,
so it shows where a bare ``net=`` puts the addresses). Host ports are free
ones picked at run time. Only loopback is ever contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import ApplianceError
from appliance.nat.stack import UserNetwork
from appliance.nat.stats import format_flows
from appliance.net.netdev import UserNetdev, parse_netdev
from tests.conftest import needs_kvm, needs_qemu
from tests.ports import free_port

pytestmark = needs_qemu

ROOT = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
APPLIANCE = [sys.executable, "-c", "import sys; from appliance.cli.main import main; sys.exit(main(sys.argv[1:]))"]

# (options after "user,id=n0,", the fact both refusals must name or None for QEMU's own reason).
# {p0}, {p1}: free host ports.
CASES: list[tuple[str, str | None]] = [
    ("hostfwd=tcp::{p0}-:22", None),
    ("hostfwd=udp:127.0.0.1:{p0}-:53", None),
    ("hostfwd=::{p0}-:22", None),
    ("hostfwd=tcp:127.1:{p0}-10.0.2.20:22", None),
    ("hostfwd=tcp:0x7f000001:{p0}-10.1:0x16", None),
    ("hostfwd=tcp:0.0.0.0:{p0}-0.0.0.0:+22", None),
    ("hostfwd=tcp::{p0}-10.0.3.5:22", None),
    ("hostfwd=tcp::0-:22", None),
    ("hostfwd=tcp::-:22", None),
    ("hostfwd=tcp::{p0}-:22,hostfwd=udp::{p0}-:53", None),
    ("hostfwd=tcp::{p0}-:22,", None),
    ("hostfwd=tcp::99999-:22", None),
    ("hostfwd=tcp::65536-:22", None),
    ("hostfwd=tcp::{p0}-:70000", None),
    ("hostfwd=tcp::{p0}-:0", None),
    ("hostfwd=tcp::{p0}-:", None),
    ("hostfwd=sctp::1-:2", None),
    ("hostfwd=TCP::{p0}-:22", None),
    ("hostfwd={p0}-:22", None),
    ("hostfwd=tcp:localhost:{p0}-:22", None),
    ("hostfwd=tcp:[::1]:{p0}-:22", None),
    ("hostfwd=tcp::2222a-:22", None),
    ("hostfwd=tcp::08-:22", None),
    ("hostfwd=tcp::{p0}", None),
    ("hostfwd=tcp:", None),
    ("hostfwd=tcp::{p0}-", None),
    ("hostfwd=tcp::{p0}-10.0.2.300:22", None),
    ("hostfwd=tcp:127.0.0.1:{p0}:1-:22", None),
    ("hostfwd=", None),
    ("hostfwd=tcp::{p0}-:22,hostfwd=tcp::{p0}-:23", None),
    ("hostfwd=udp::{p0}-:53,hostfwd=udp::{p0}-:54", None),
    ("net=10.0.3.0/24,hostfwd=tcp::{p0}-:22", None),
    ("net=10.0.3.0/255.255.255.0,hostfwd=tcp::{p0}-:22", None),
    ("net=10.0.3.0,hostfwd=tcp::{p0}-:22", None),
    ("net=192.168.76.0,hostfwd=tcp::{p0}-:22", None),
    ("net=172.16.0.0,hostfwd=tcp::{p0}-:22", None),
    ("net=10.0.3.5/24", None),
    ("net=10.0.3.0/ 24", None),
    ("net=10.0.3.0/30", None),
    ("net=10.0.3.0/33", None),
    ("net=10.0.3.0/3", None),
    ("net=10.0.3.0/24x", None),
    ("net=bogus", None),
    ("net=", None),
    ("net=10.0.3.0/24,net=10.0.4.0/24", None),
    ("host=10.0.3.2", None),
    ("host=10.0.2.0", None),
    ("host=10.0.2.3", None),
    ("host=10.0.2.2x", None),
    ("host=", None),
    ("dhcpstart=10.0.3.15", None),
    ("dhcpstart=10.0.2.2", None),
    ("dhcpstart=10.0.2.255,hostfwd=tcp::{p0}-:22", None),
    ("dns=10.0.3.3", None),
    ("dns=10.0.3.3,restrict=on", None),
    ("dns=10.0.2.2", None),
    ("dns=", None),
    ("restrict=yes", None),
    ("restrict=n", None),
    ("restrict=true", None),
    ("restrict=bogus", None),
    ("restrict=ON", None),
    ("restrict=1", None),
    ("restrict", None),
    ("noipv6", None),
    ("ipv6=off", None),
    ("ipv4=off", None),
    ("ipv4=off,ipv6=off", None),
    ("ipv4=off,net=10.0.3.0/24", None),
    ("ipv6=off,ipv6-net=fd00::/64", None),
    # One family named on and the other not named: that family only (net_init_slirp).
    ("ipv4=on,ipv6-net=fd00::/64", None),
    ("ipv6=on,net=10.0.3.0/24", None),
    ("ipv6=on,dns=10.0.2.4", None),
    ("ipv4=on,ipv6=on,net=10.0.3.0/24,ipv6-net=fd00::/64", None),
    ("ipv6=on,ipv4=off", None),
    # The legacy ip= is net=ADDR/24; net= wins over it.
    ("ip=10.0.3.0,hostfwd=tcp::{p0}-:22", None),
    ("ip=10.0.3.7,hostfwd=tcp::{p0}-:22", None),
    ("ip=10.0.3.0,net=10.0.4.0/24,hostfwd=tcp::{p0}-:22", None),
    ("ip=bogus", None),
    ("ipv4=off,ip=10.0.3.0", None),
    ("ipv6-net=fd00::/64", None),
    ("ipv6-net=fd00::", None),
    ("ipv6-net=fd00::/129", None),
    ("ipv6-net=fd00::/127", None),
    ("ipv6-net=fd00::/x", None),
    ("ipv6-net=bogus", None),
    ("ipv6-net=", None),
    ("ipv6-net=fd00::/64,ipv6-prefix=fd00::", None),
    ("ipv6-prefix=fd00::,ipv6-prefixlen=48", None),
    ("ipv6-prefixlen=x", None),
    ("ipv6-host=fd00::5", None),
    ("ipv6-dns=fec0::2", None),
    ("ipv6-dns=fd00::3,restrict=on", None),
    ("ipv6-net=fd00::/0,ipv6-host=fd00:0:0:1::5", None),
    ("dnssearch=a.com,dnssearch=b.org", None),
    ("dnssearch=a..b", None),
    ("domainname=", None),
    ("domainname=bad_name", None),
    ("hostname=", None),
    ("hostname=bad_host", None),
    ("hostname=" + "h" * 256, "hostname"),
    ("bootfile=" + "b" * 200, "bootfile"),
    ("guestfwd=tcp:10.0.2.100:1234-cmd:cat", None),
    ("guestfwd=tcp::1234-cmd:cat", None),
    ("guestfwd=tcp:10.0.3.100:1234-cmd:cat", None),
    ("guestfwd=tcp:10.0.2.2:1234-cmd:cat", None),
    ("guestfwd=tcp:10.0.2.100:0-cmd:cat", None),
    ("guestfwd=udp:10.0.2.100:1234-cmd:cat", None),
    ("guestfwd=10.0.2.100:1234-cmd:cat", None),
    ("guestfwd=tcp:10.0.2.100:1234", None),
    ("foo=bar", None),
    ("vlan=1", None),
    ("smb=/tmp", "smb"),
    ("smbserver=10.0.2.4", None),
    ("smbserver=bogus", None),
    ("tftp=/nonexistent", None),
    ("tftp=/nonexistent,bootfile=pxelinux.0", None),
    ("tftp-server-name=" + "t" * 256, None),
]

# Where we differ on purpose: (options, QEMU accepts, we accept, what our refusal names).
KNOWN_DIFFERENCES: list[tuple[str, bool, bool, str]] = [
    # The stack needs a contiguous mask to be a network; QEMU takes any.
    ("net=10.0.3.0/255.0.255.0", True, False, "non-contiguous"),
    # QEMU's target is a chardev connected once at start-up; ours connects per guest connection.
    ("guestfwd=tcp:10.0.2.100:1234-tcp:127.0.0.1:9", False, True, ""),
    # Only tcp: and cmd: targets here; QEMU takes any chardev.
    ("guestfwd=tcp:10.0.2.100:1234-udp:127.0.0.1:9", True, False, "udp:127.0.0.1:9"),
]

_QMP_SCRIPT = b"".join(json.dumps(c).encode() + b"\n" for c in (
    {"execute": "qmp_capabilities"},
    {"execute": "human-monitor-command", "arguments": {"command-line": "info network"}},
    {"execute": "human-monitor-command", "arguments": {"command-line": "info usernet"}},
    {"execute": "quit"},
))


def _fill(opts: str, ports: dict[str, int]) -> str:
    return opts.format(**ports) if "{" in opts else opts


class Outcome:
    def __init__(self, accepted: bool, message: str = "", network: str = "", rows: list[tuple[str, ...]] | None = None):
        self.accepted = accepted
        self.message = message
        self.network = network
        self.rows = sorted(rows or [])

    def __repr__(self) -> str:
        return f"Outcome({self.accepted}, {self.message!r}, {self.network!r}, {self.rows!r})"


def _rows(table: str, ports: set[int]) -> list[tuple[str, ...]]:
    """The HOST_FORWARD rows of ``info usernet``: (kind, listen addr, port, guest addr, port);
    a port the rule left to the kernel (0) reads as ``eph``."""
    out: list[tuple[str, ...]] = []
    for line in table.splitlines():
        f = line.split()
        if len(f) >= 6 and "HOST_FORWARD" in f[0]:
            port = f[3] if int(f[3]) in ports else "eph"
            out.append((f[0], f[2], port, f[4], f[5]))
    return out


def _no_core() -> None:
    # A too-long bootfile= makes QEMU 7.2 crash; its core must not land in the work tree.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


async def run_qemu(opts: str, ports: set[int]) -> Outcome:
    proc = await asyncio.create_subprocess_exec(
        QEMU, "-nodefaults", "-display", "none", "-S", "-M", "none", "-netdev", f"user,id=n0,{opts}",
        "-qmp", "stdio", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=_no_core)
    try:
        out, err = await asyncio.wait_for(proc.communicate(_QMP_SCRIPT), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    errors = [ln for ln in err.decode(errors="replace").splitlines() if "warning:" not in ln]
    if proc.returncode != 0:
        return Outcome(False, "\n".join(errors) or f"exit {proc.returncode}")
    answers = [json.loads(ln)["return"] for ln in out.decode().splitlines() if '"return"' in ln]
    network = re.search(r"net=([0-9.]+)", answers[1]).group(1)  # type: ignore[union-attr]
    return Outcome(True, network=network, rows=_rows(answers[2], ports))


async def run_ours(opts: str, ports: set[int]) -> Outcome:
    try:
        cfg = parse_netdev(f"user,id=n0,{opts}")
        assert isinstance(cfg, UserNetdev)
        net = UserNetwork(cfg.config)
        await net.start()
    except ApplianceError as err:
        return Outcome(False, str(err))
    try:
        return Outcome(True, network=str(cfg.config.net.network_address),
                       rows=_rows(format_flows(net.flows()), ports))
    finally:
        await net.stop()


async def _both(opts: str, sem: asyncio.Semaphore) -> tuple[str, Outcome, Outcome]:
    async with sem:
        ports = {"p0": free_port(), "p1": free_port()}
        text = _fill(opts, ports)
        # One after the other: both bind the same host ports.
        qemu = await run_qemu(text, set(ports.values()))
        ours = await run_ours(text, set(ports.values()))
        return text, qemu, ours


@pytest.fixture(scope="module")
def outcomes() -> dict[str, tuple[str, Outcome, Outcome]]:
    async def main() -> list[tuple[str, Outcome, Outcome]]:
        sem = asyncio.Semaphore(4)
        table = [o for o, _ in CASES] + [o for o, *_ in KNOWN_DIFFERENCES]
        return await asyncio.gather(*(_both(o, sem) for o in table))

    results = asyncio.run(main())
    table = [o for o, _ in CASES] + [o for o, *_ in KNOWN_DIFFERENCES]
    return dict(zip(table, results, strict=True))


def _reason(qemu_message: str) -> str:
    """QEMU's complaint without its ``qemu-system-x86_64: -netdev …:`` prefix."""
    first = qemu_message.splitlines()[0]
    return first.split(": ", 2)[-1] if first.startswith("qemu-system") else first


@pytest.mark.parametrize(("opts", "fact"), CASES, ids=[o[:50] for o, _ in CASES])
def test_user_netdev_options_as_qemu_takes_them(
    opts: str, fact: str | None, outcomes: dict[str, tuple[str, Outcome, Outcome]]
) -> None:
    if opts.startswith("smb=") and Path("/usr/sbin/smbd").exists():
        pytest.skip("with Samba installed QEMU takes smb=; there is no Samba share here")
    text, qemu, ours = outcomes[opts]
    assert ours.accepted == qemu.accepted, f"{text}: QEMU {qemu!r}, ours {ours!r}"
    if qemu.accepted:
        assert (ours.network, ours.rows) == (qemu.network, qemu.rows), text
        return
    assert "\n" not in ours.message and "Traceback" not in ours.message
    needle = fact or _reason(qemu.message)
    if fact is not None:
        assert fact.lower() in qemu.message.lower(), qemu.message
    assert needle.lower() in ours.message.lower(), f"{text}: QEMU says {qemu.message!r}, ours {ours.message!r}"


@pytest.mark.parametrize(("opts", "qemu_accepts", "we_accept", "named"), KNOWN_DIFFERENCES,
                         ids=[o[:50] for o, *_ in KNOWN_DIFFERENCES])
def test_known_differences_stay_as_documented(
    opts: str, qemu_accepts: bool, we_accept: bool, named: str,
    outcomes: dict[str, tuple[str, Outcome, Outcome]],
) -> None:
    _, qemu, ours = outcomes[opts]
    assert (qemu.accepted, ours.accepted) == (qemu_accepts, we_accept), (qemu, ours)
    assert named in ours.message


def test_a_refusal_through_the_cli_exits_2_with_one_line() -> None:
    """What `appliance net-daemon` and `appliance run -nic` print for a bad hostfwd: QEMU's reason, exit 2."""
    for argv in (
        ["net-daemon", "--netdev", "user,id=n0,hostfwd=tcp::99999-:22",
         "--export", "type=vhost-user-net,id=e0,netdev=n0,addr.type=unix,addr.path=/nonexistent/s"],
        ["run", "-M", "q35", "-m", "64", "-display", "none", "-nic", "user,hostfwd=tcp::99999-:22"],
    ):
        r = subprocess.run([*APPLIANCE, *argv], capture_output=True, text=True,
                           timeout=30, cwd=ROOT)
        assert r.returncode == 2, r
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert "Invalid host forwarding rule 'tcp::99999-:22' (Bad host port)" in r.stderr


# --- HMP hostfwd_add / hostfwd_remove through QMP human-monitor-command ------------------------

# {a}…{g}: free ports (each side its own, mapped back before comparing).
HMP_LINES = [
    "hostfwd_add tcp::{a}-:22",
    "hostfwd_add tcp::{a}-:22",
    "hostfwd_add n0 tcp::{b}-:22",
    "hostfwd_add n1 udp:127.0.0.1:{c}-:53",
    "hostfwd_add nx tcp::{c}-:22",
    "hostfwd_add hub0 tcp::{c}-:22",
    "hostfwd_add tcp::99999-:22",
    "hostfwd_add sctp::1-:2",
    "hostfwd_add tcp::{c}",
    "hostfwd_add tcp:localhost:{c}-:22",
    "hostfwd_add tcp::{c}-:0",
    "hostfwd_add",
    "hostfwd_add n0 tcp::{c}-:22 extra",
    "hostfwd_add n1 tcp:127.0.0.1:{d}-10.0.2.20:80",
    "hostfwd_add n1 udp::{e}-:53",
    "info usernet",
    "hostfwd_remove n1 tcp:127.0.0.1:{d}",
    "hostfwd_remove n1 udp::{e}",
    "hostfwd_remove tcp::{a}",
    "hostfwd_remove tcp::{a}",
    "hostfwd_remove n0 tcp::{b}",
    "hostfwd_remove n1 udp::{c}",
    "hostfwd_remove n1 udp:127.0.0.1:{c}",
    "hostfwd_remove nx tcp::1",
    "hostfwd_remove tcp::abc",
    "hostfwd_remove tcp:{a}",
    "hostfwd_remove sctp::1",
    "hostfwd_remove tcp:bogus:1",
    "hostfwd_remove tcp::0x10",
    "hostfwd_remove tcp::99999",
    "hostfwd_remove",
    "hostfwd_add tcp::0-:22",
    "hostfwd_remove tcp::0",
    "hostfwd_remove udp::-1",
    "hostfwd_add tcp::{f}-:22",
    "hostfwd_remove tcp:0.0.0.0:{f}",
    "hostfwd_add tcp:127.0.0.1:{g}-:22",
    "hostfwd_remove tcp::{g}",
    "hostfwd_remove tcp:127.1:{g}",
    # Arguments as QEMU's monitor reads them: a quoted word, its escapes, and too many words.
    'hostfwd_add n0 "tcp:127.0.0.1:{h}-:22"',
    'hostfwd_remove "n0" "tcp:127.0.0.1:{h}"',
    'hostfwd_add "tcp::{h}-:22',
    'hostfwd_add "tcp::{h}\\q-:22"',
    'hostfwd_add n0 "tcp::{h}-:2\\"2"',
    "info usernet extra",
    "info version 1",
    "set_link x on extra",
    "set_link x",
]


async def _hmp_session(sock: str, ports: dict[str, int]) -> list[str]:
    from qemu.qmp import ConnectError, QMPClient

    client = QMPClient("parity")
    # The socket file appears at bind(), a moment before listen(): try until it takes us.
    for _ in range(300):
        try:
            await client.connect(sock)
            break
        except ConnectError:
            await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"no monitor on {sock}")
    back = {str(v): "{" + k + "}" for k, v in ports.items()}
    out = []
    try:
        for line in HMP_LINES:
            r = await client.execute("human-monitor-command", {"command-line": line.format(**ports)})
            assert isinstance(r, str)
            r = re.sub(r"(HOST_FORWARD\]) +\d+ ", r"\1 FD ", r)  # descriptor numbers are the host's
            out.append(re.sub(r"\d+", lambda m: back.get(m.group(0), m.group(0)), r))
        await client.execute("quit")
    finally:
        with contextlib.suppress(EOFError, ConnectionError):  # the server is gone after quit
            await client.disconnect()
    return out


async def test_hmp_hostfwd_commands_answer_as_qemus(tmp_path: Path) -> None:
    qsock, osock = str(tmp_path / "qemu.qmp"), str(tmp_path / "ours.qmp")
    qports = {k: free_port() for k in "abcdefgh"}
    oports = {k: free_port() for k in "abcdefgh"}
    qemu = await asyncio.create_subprocess_exec(
        QEMU, "-nodefaults", "-display", "none", "-S", "-M", "none", "-netdev", "user,id=n0",
        "-netdev", "user,id=n1", "-netdev", "hubport,id=hub0,hubid=0",
        "-qmp", f"unix:{qsock},server=on,wait=off", stderr=asyncio.subprocess.DEVNULL)
    exports = []
    for i, nd in enumerate(("n0", "n1", "hub0")):
        exports += ["--export", f"type=vhost-user-net,id=e{i},netdev={nd},addr.type=unix,"
                                f"addr.path={tmp_path / f'v{i}'}"]
    ours = await asyncio.create_subprocess_exec(
        *APPLIANCE, "net-daemon", "--netdev", "user,id=n0", "--netdev", "user,id=n1",
        "--netdev", "dgram,id=hub0,local.type=inet,local.host=127.0.0.1,local.port=0,remote.type=inet,"
        "remote.host=127.0.0.1,remote.port=9", *exports,
        "--chardev", f"socket,id=m,path={osock},server=on,wait=off", "--monitor", "chardev=m",
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        want, got = await asyncio.wait_for(
            asyncio.gather(_hmp_session(qsock, qports), _hmp_session(osock, oports)), 25)
    finally:
        for p in (qemu, ours):
            if p.returncode is None:
                try:
                    await asyncio.wait_for(p.wait(), 5)
                except TimeoutError:
                    p.kill()
                    await p.wait()
    for line, w, g in zip(HMP_LINES, want, got, strict=True):
        assert g == w, f"{line}: QEMU {w!r}, ours {g!r}"


def _usernet_hubs(argv: list[str]) -> list[str]:
    """The ``Hub N (id):`` headings of ``info usernet``, in order, from a VM started paused with
    QMP on stdio (the commands of ``_QMP_SCRIPT``'s kind: capabilities, the HMP line, quit)."""
    script = b"".join(json.dumps(c).encode() + b"\n" for c in (
        {"execute": "qmp_capabilities"},
        {"execute": "human-monitor-command", "arguments": {"command-line": "info usernet"}},
        {"execute": "quit"},
    ))
    r = subprocess.run([*argv, "-S", "-display", "none", "-nodefaults", "-qmp", "stdio"], input=script,
                       capture_output=True, timeout=60, cwd=ROOT)
    texts = [m["return"] for m in map(json.loads, r.stdout.splitlines()) if isinstance(m.get("return"), str)]
    assert len(texts) == 1, r
    return re.findall(r"^Hub -?\d+ \(\w+\):", texts[0], flags=re.M)


@needs_kvm
def test_usernet_lists_netdev_then_nic_then_net_as_qemu_makes_them() -> None:
    """QEMU makes every -netdev, then every -nic, then every -net (net_init_clients), whatever
    their order on the line: ``info usernet`` lists the user networks so."""
    from tests.qmp.test_machine_qmp import GUEST

    if not GUEST.exists():
        pytest.skip("test guest not built (appliance kit build)")
    p = [free_port() for _ in range(3)]
    line = ["-net", "nic,model=virtio", "-net", f"user,id=a,hostfwd=tcp:127.0.0.1:{p[0]}-:22",
            "-nic", f"user,id=c,hostfwd=tcp:127.0.0.1:{p[1]}-:22",
            "-netdev", f"user,id=b,hostfwd=tcp:127.0.0.1:{p[2]}-:22", "-device", "virtio-net-pci,netdev=b"]
    theirs = _usernet_hubs([QEMU, "-M", "pc", *line])
    assert theirs == ["Hub -1 (b):", "Hub -1 (c):", "Hub 0 (a):"]
    assert _usernet_hubs([*APPLIANCE, "run", "-kernel", str(GUEST), *line]) == theirs


# --- the JSON form (libvirt writes -netdev as JSON) --------------------------------------------

JSON_CASES = [
    '{"type":"user","id":"n0","hostfwd":["tcp::1-:22"]}',
    '{"type":"user","id":"n0","hostfwd":"tcp::1-:22"}',
    '{"type":"user","id":"n0","hostfwd":[{"x":"tcp::1-:22"}]}',
    '{"type":"user","id":"n0","hostfwd":[{"str":"tcp::1-:22","x":1}]}',
    '{"type":"user","id":"n0","hostfwd":[{"str":5}]}',
    '{"type":"user","id":"n0","restrict":"on"}',
    '{"type":"user","id":"n0","restrict":1}',
    '{"type":"user","id":"n0","ipv6-prefixlen":"64"}',
    '{"type":"user","id":"n0","ipv6-prefixlen":true}',
    '{"type":"user","id":"n0","ipv6-net":"fec1::/64"}',
    '{"type":"user","id":"n0","dnssearch":["example.com"]}',
    '{"type":"user","id":"n0","hostname":7}',
    '{"type":"user","id":5}',
    '{"type":"user","id":"n0","bogus":1}',
    '{"type":"user","id":"n0","restrict":"on","bogus":1}',
]


@pytest.mark.parametrize("text", JSON_CASES)
def test_json_netdev_member_types_as_qemus(text: str) -> None:
    """QAPI's visitor takes no string for a boolean or a number and wants a list of String
    objects for hostfwd/dnssearch: both refuse each of these with the same reason."""
    qemu = subprocess.run([QEMU, "-nodefaults", "-display", "none", "-S", "-M", "none", "-netdev", text,
                           "-qmp", "stdio"], input=_QMP_SCRIPT, capture_output=True, timeout=20)
    assert qemu.returncode != 0, qemu
    reason = _reason(qemu.stderr.decode())
    with pytest.raises(ApplianceError) as err:
        parse_netdev(text)
    assert str(err.value) == f"-netdev: {reason}"


def test_json_netdev_quapi_shapes_are_taken() -> None:
    cfg = parse_netdev('{"type":"user","id":"n0","hostfwd":[{"str":"tcp:127.0.0.1:2222-:22"}],'
                       '"restrict":true,"ipv6-prefixlen":64,"dnssearch":[{"str":"example.com"}]}')
    assert isinstance(cfg, UserNetdev)
    assert cfg.config.restrict and cfg.config.dnssearch == ("example.com",)
    assert [f.host_port for f in cfg.config.hostfwd] == [2222]


def test_netdev_help_lists_qemus_names_in_its_order() -> None:
    theirs = subprocess.run([QEMU, "-netdev", "help"], capture_output=True, text=True, timeout=20)
    for option in ("help", "?"):
        r = subprocess.run([*APPLIANCE, "run", "-netdev", option], capture_output=True, text=True,
                           timeout=30, cwd=ROOT)
        assert (r.returncode, r.stderr) == (0, ""), r
        head, *ours = r.stdout.splitlines()
        assert head == theirs.stdout.splitlines()[0] == "Available netdev backend types:"
        assert "user" in ours and "tap" in ours
        assert ours == [t for t in theirs.stdout.splitlines()[1:] if t in ours]


@pytest.mark.parametrize("text", ["user,help", "bogus", "bogus,help", "type=user", "tap,foo=1", "id=n0",
                                  "bogus,id=n0", "user,id=n0,help", "user,id=1x", "user,,id=n0",
                                  "user,,x", "id=n0,user", "id=n0,tap", "id=n0,type=user,foo",
                                  "id=n0,type=user,nofoo"])
def test_whole_netdev_refusals_name_qemus_first_complaint(text: str) -> None:
    """QEMU asks for the id before it reads the type or any other key; the reason after its
    ``-netdev TEXT:`` prefix must be ours too."""
    qemu = subprocess.run([QEMU, "-nodefaults", "-display", "none", "-S", "-M", "none", "-netdev", text,
                           "-qmp", "stdio"], input=_QMP_SCRIPT, capture_output=True, timeout=20)
    assert qemu.returncode == 1, qemu
    reason = _reason([ln for ln in qemu.stderr.decode().splitlines() if ln.startswith("qemu-system")][-1])
    with pytest.raises(ApplianceError) as err:
        parse_netdev(text)
    assert str(err.value).endswith(": " + reason), (text, reason, str(err.value))


def test_short_form_booleans_warn_as_qemu_does(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        cfg = parse_netdev("user,id=n0,restrict,noipv6")
    assert isinstance(cfg, UserNetdev) and cfg.config.restrict and not cfg.config.ipv6
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2
    assert "short-form boolean option 'restrict' deprecated\nPlease use restrict=on instead" in said[0]
    assert "short-form boolean option 'noipv6' deprecated\nPlease use ipv6=off instead" in said[1]
    qemu = subprocess.run([QEMU, "-nodefaults", "-display", "none", "-S", "-M", "none", "-netdev",
                           "user,id=n0,restrict", "-qmp", "stdio"], input=_QMP_SCRIPT, capture_output=True,
                          timeout=20)
    assert b"short-form boolean option 'restrict' deprecated\nPlease use restrict=on instead" in qemu.stderr


@needs_kvm
def test_a_hostfwd_that_cannot_bind_is_named_by_the_option_as_typed() -> None:
    """QEMU names the option as typed (not an internal netdev id); 192.0.2.1 (TEST-NET-1) is no
    address of this host, so the bind fails and nothing is sent."""
    from tests.qmp.test_machine_qmp import GUEST

    if not GUEST.exists():
        pytest.skip("test guest not built (appliance kit build)")
    nic = "user,hostfwd=tcp:192.0.2.1:15555-:22"
    r = subprocess.run([*APPLIANCE, "run", "-kernel", str(GUEST), "-display", "none", "-nic", nic],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 2, r
    assert r.stderr == (f"appliance run: -nic {nic}: Could not set up host forwarding rule "
                        "'tcp:192.0.2.1:15555-:22'\n")


@pytest.mark.parametrize("text", ['{"type":"user"}', '{"type":"user","id":"x"}'])
def test_nic_has_no_json_form_as_in_qemu(text: str) -> None:
    """QEMU reads ``-nic {…}`` as key=value text: its type is the text up to the first comma."""
    from appliance.nic.config import parse_nic

    qemu = subprocess.run([QEMU, "-nodefaults", "-display", "none", "-S", "-M", "none", "-nic", text,
                           "-qmp", "stdio"], input=_QMP_SCRIPT, capture_output=True, timeout=20)
    assert qemu.returncode == 1, qemu
    with pytest.raises(ApplianceError) as err:
        parse_nic(text, 0)
    assert str(err.value).endswith(": " + _reason(qemu.stderr.decode().splitlines()[-1]))


def test_a_json_netdev_id_is_not_held_to_the_key_value_rules_as_in_qemu() -> None:
    qemu = subprocess.run([QEMU, "-nodefaults", "-display", "none", "-S", "-M", "none", "-netdev",
                           '{"type":"user","id":"0bad"}', "-qmp", "stdio"], input=_QMP_SCRIPT,
                          capture_output=True, timeout=20)
    assert qemu.returncode == 0, qemu
    assert parse_netdev('{"type":"user","id":"0bad"}').id == "0bad"
    with pytest.raises(ApplianceError, match="Parameter 'id' expects an identifier"):
        parse_netdev("user,id=0bad")
