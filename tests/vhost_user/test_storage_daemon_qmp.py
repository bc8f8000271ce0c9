"""`appliance storage-daemon --chardev … --monitor …`: exports managed at run time over QMP.

The real qemu.qmp client drives a real daemon process; the same requests go
to qemu-storage-daemon (when installed) and the replies are compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu.qmp import ConnectError, ExecuteError, QMPClient

from appliance.cli.main import main as appliance_main
from appliance.cli.storage_daemon import StorageDaemon, parse_args
from appliance.errors import ConfigError
from appliance.qcow2.create import CreateOptions, build_image
from appliance.qmp.daemon_commands import COMMANDS as DAEMON_COMMANDS
from appliance.qmp.server import QmpServer, Session
from appliance.virtio.vhost_user import protocol as p
from tests.vhost_user.frontend import FrontEnd

QSD = shutil.which("qemu-storage-daemon")
needs_qsd = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
OURS = [sys.executable, "-m", "appliance.cli.main", "storage-daemon"]

VERSION_1 = 1 << 32
PROTOCOL_FEATURES = 1 << 30


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for name in ("a.img", "b.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(8 << 20)
    # Lazy refcounts and 8-bit refcounts, so the header's feature members are not all defaults.
    opts = CreateOptions(16 << 20, lazy_refcounts=True, refcount_bits=8)
    (tmp_path / "c.qcow2").write_bytes(build_image(opts))
    return tmp_path


class Daemon:
    def __init__(self, proc: subprocess.Popen[str], qmp: QMPClient, sock: Path) -> None:
        self.proc = proc
        self.qmp = qmp
        self.sock = sock

    async def ex(self, name: str, args: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(name, args)

    async def outcome(self, name: str, args: dict[str, Any] | None = None) -> tuple[str, Any]:
        """("ok", return value) or (error class, description)."""
        try:
            return "ok", await self.qmp.execute(name, args)
        except ExecuteError as err:
            return err.error_class, err.error.error.desc

    async def quit(self) -> int:
        with contextlib.suppress(EOFError, ConnectionError):
            await self.qmp.execute("quit")
        with contextlib.suppress(EOFError, ConnectionError):
            await self.qmp.disconnect()
        return await asyncio.to_thread(self.proc.wait, 10)


@asynccontextmanager
async def daemon(cmd: list[str], tmp: Path, *extra: str,
                 chardev: str = "server=on,wait=off", monitor: str = "chardev=mon") -> AsyncIterator[Daemon]:
    sock = tmp / f"qmp-{os.path.basename(cmd[0])}.sock"
    proc = subprocess.Popen(
        [*cmd, "--chardev", f"socket,id=mon,path={sock},{chardev}", "--monitor", monitor,
         "--blockdev", f"driver=file,node-name=f0,filename={tmp / 'a.img'}", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        client = QMPClient("test")
        deadline = time.monotonic() + 15
        while True:
            # The socket file appears at bind(), a moment before listen().
            try:
                await client.connect(str(sock))
                break
            except ConnectError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "no QMP socket"
                await asyncio.sleep(0.02)
        yield Daemon(proc, client, sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _vu(ident: str, node: str, path: Path, **more: Any) -> dict[str, Any]:
    return {"type": "vhost-user-blk", "id": ident, "node-name": node,
            "addr": {"type": "unix", "path": str(path)}, **more}


async def _features(path: Path) -> int:
    fe = await FrontEnd.connect(str(path))
    try:
        return int.from_bytes(await fe.call(p.Request.GET_FEATURES), "little")
    finally:
        fe.close()


async def test_exports_are_added_served_and_removed_over_qmp(images: Path) -> None:
    vu = images / "vu1.sock"
    async with daemon(OURS, images) as d:
        # The nested JSON form of the file node, as scripts for qsd write it.
        await d.ex("blockdev-add", {"driver": "raw", "node-name": "disk1",
                                    "file": {"driver": "file", "filename": str(images / "b.img")}})
        await d.ex("block-export-add", _vu("exp1", "disk1", vu, writable=True, **{"num-queues": 2}))
        assert await d.ex("query-block-exports") == [
            {"type": "vhost-user-blk", "id": "exp1", "node-name": "disk1", "shutting-down": False}]
        nodes = {n["node-name"]: n for n in await d.ex("query-named-block-nodes")}
        assert nodes["disk1"]["drv"] == "raw" and nodes["disk1"]["ro"] is False
        assert nodes["disk1"]["image"]["virtual-size"] == 8 << 20
        assert nodes["f0"]["file"] == str(images / "a.img")

        # The socket speaks vhost-user: a virtio 1.x device with protocol features.
        feats = await _features(vu)
        assert feats & VERSION_1 and feats & PROTOCOL_FEATURES

        # A qcow2 node over a named file node, exported read-only beside it.
        await d.ex("blockdev-add", {"driver": "file", "node-name": "qf", "filename": str(images / "c.qcow2")})
        await d.ex("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "qf"})
        await d.ex("block-export-add", _vu("expq", "q", images / "vuq.sock"))
        assert [e["id"] for e in await d.ex("query-block-exports")] == ["expq", "exp1"]
        assert await _features(images / "vuq.sock") & VERSION_1
        assert await d.outcome("blockdev-del", {"node-name": "qf"}) == ("GenericError", "Block device qf is in use")
        await d.ex("block-export-del", {"id": "expq"})
        await d.ex("blockdev-del", {"node-name": "q"})
        await d.ex("blockdev-del", {"node-name": "qf"})

        assert await d.outcome("blockdev-del", {"node-name": "disk1"}) == ("GenericError", "Node disk1 is in use")
        assert (await d.outcome("no-such-command"))[0] == "CommandNotFound"
        # A front end still attached is dropped with its export.
        fe = await FrontEnd.connect(str(vu))
        try:
            await fe.negotiate()
            with d.qmp.listener("BLOCK_EXPORT_DELETED") as events:
                await d.ex("block-export-del", {"id": "exp1", "mode": "hard"})
                event = await asyncio.wait_for(events.get(), 5)
            assert event["data"] == {"id": "exp1"}
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.sock_recv(fe.sock, 1), 5) == b""
        finally:
            fe.close()
        assert not vu.exists()
        assert await d.ex("query-block-exports") == []
        await d.ex("blockdev-del", {"node-name": "disk1"})
        assert "disk1" not in {n["node-name"] for n in await d.ex("query-named-block-nodes")}

        # A last export, left for quit to take down.
        await d.ex("block-export-add", _vu("exp0", "f0", vu))
        assert await d.quit() == 0
        assert not vu.exists() and not d.sock.exists()


async def test_old_chardev_spelling_and_pretty_monitor(images: Path) -> None:
    sock = images / "qmp.sock"
    proc = subprocess.Popen(
        [*OURS, "--chardev", f"socket,id=mon,path={sock},server,nowait", "--monitor", "mon,mode=control,pretty=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:  # nowait: it listens without waiting for us
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock))
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                await asyncio.sleep(0.02)
        # qemu.qmp cannot read indented replies (nor QEMU's), so plain JSON here.
        dec = json.JSONDecoder()

        async def message() -> dict[str, Any]:
            buf = ""
            while True:
                buf += (await asyncio.wait_for(reader.read(4096), 5)).decode()
                with contextlib.suppress(ValueError):
                    obj, _ = dec.raw_decode(buf.strip())
                    assert "\n    " in buf  # indented
                    return dict(obj)

        assert "QMP" in await message()
        for name in ("qmp_capabilities", "query-version", "quit"):
            writer.write(json.dumps({"execute": name}).encode())
            reply = await message()
            assert "return" in reply, reply
        assert reply == {"return": {}}
        assert await asyncio.to_thread(proc.wait, 10) == 0
        writer.close()
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_monitor_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = parse_args(["--chardev", "socket,id=m,path=/tmp/x.sock,server,nowait", "--monitor", "m"])
    cd = cfg.chardevs["m"]
    assert cd.server and not cd.wait and cfg.monitors == [("m", False)]
    for argv, needle in [
        (["--chardev", "socket,id=m,path=/s,server=on", "--monitor", "chardev=m,mode=readline"], "Only QMP"),
        (["--monitor", "chardev=nope"], 'chardev "nope" not found'),
        (["--chardev", "socket,id=m,path=/s", "--monitor", "m", "--monitor", "m"], "in use"),
        (["--chardev", "stdio,id=m"], "backend 'stdio'"),
        (["--chardev", "socket,id=m"], "needs 'path' or 'port'"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            parse_args(argv)
    assert appliance_main(["storage-daemon", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--chardev" in out and "--monitor" in out and "block-export-add" in out


# The same requests to both daemons: each step's outcome must agree (the
# error class and message, or the return value's shape).
def _script(tmp: Path) -> list[tuple[str, dict[str, Any] | None]]:
    return [
        ("query-block-exports", None),
        ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": str(tmp / "b.img")}),
        ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": "f1"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "backing": None,  # as libvirt writes it
                          "file": {"driver": "file", "filename": str(tmp / "c.qcow2")}}),
        ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": str(tmp / "b.img")}),
        ("blockdev-add", {"driver": "file", "node-name": "fx", "filename": str(tmp / "missing.img")}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "qx", "file": "f0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "rx", "file": "nonode"}),
        ("blockdev-add", {"driver": "file", "node-name": "fy"}),
        ("blockdev-add", {"driver": "file", "node-name": "fz", "filename": "x", "bogus": 1}),
        ("blockdev-add", {"driver": "raw", "node-name": "9bad", "file": "f1"}),
        ("blockdev-add", {"driver": "raw", "node-name": "rz", "file": {"driver": "file", "filename": "x", "bogus": 1}}),
        ("blockdev-add", {"driver": "raw", "node-name": "rz", "file": {"driver": "file", "aio": 5}}),
        ("blockdev-add", {"driver": "raw", "node-name": "rz", "file": {"driver": "file"}}),
        ("blockdev-add", {"driver": "raw", "node-name": "ry", "file": "f1", "read-only": "on"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "qy", "file": "f1", "backing": 5}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "qy", "file": {"driver": "file", "filename": 5},
                          "backing": None}),
        ("block-export-add", _vu("e1", "r1", tmp / "vu-{}.sock", writable=True,
                                 **{"num-queues": 2, "logical-block-size": 4096})),
        ("block-export-add", _vu("e1", "r1", tmp / "vu-{}-2.sock")),
        ("block-export-add", _vu("e2", "nonode", tmp / "vu-{}-2.sock")),
        ("block-export-add", _vu("e3", "f0", tmp / "vu-{}-3.sock", **{"num-queues": 0})),
        ("block-export-add", _vu("e3", "f0", tmp / "vu-{}-3.sock", **{"logical-block-size": 1000})),
        ("block-export-add", _vu("e3", "f0", tmp / "vu-{}-3.sock", **{"logical-block-size": 256})),
        ("block-export-add", _vu("e3", "f0", tmp / "nodir" / "vu.sock")),
        ("block-export-add", {"type": "vhost-user-blk", "id": "e3", "node-name": "f0"}),
        ("block-export-add", _vu("9x", "f0", tmp / "vu-{}-3.sock")),
        ("block-export-add", _vu("e3", "f0", tmp / "vu-{}-3.sock", writable="yes")),
        ("query-block-exports", None),
        ("query-named-block-nodes", None),
        ("blockdev-del", {"node-name": "r1"}),
        ("blockdev-del", {"node-name": "f1"}),
        ("blockdev-del", {"node-name": "nonode"}),
        ("block-export-del", {"id": "e1", "mode": "soft"}),
        ("block-export-del", {"id": "nope"}),
        ("block-export-del", {"id": "e1"}),
        ("query-block-exports", None),
        ("blockdev-del", {"node-name": "r1"}),
        ("blockdev-del", {"node-name": "f1"}),
        ("qmp_capabilities", None),
        ("no-such-command", None),
        # qemu-storage-daemon has no human monitor at all.
        ("human-monitor-command", {"command-line": "foo bar"}),
    ]


def _shape(value: Any) -> Any:
    """The JSON value with leaves replaced by their types (lists keep their length)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


def _fill(args: dict[str, Any] | None, tag: str) -> dict[str, Any] | None:
    if args is None:
        return None
    addr = args.get("addr")
    if isinstance(addr, dict) and "path" in addr:
        return {**args, "addr": {**addr, "path": addr["path"].replace("{}", tag)}}
    return args


async def _run_script(cmd: list[str], tmp: Path, tag: str) -> list[tuple[str, Any]]:
    async with daemon(cmd, tmp) as d:
        out = [await d.outcome(name, _fill(args, tag)) for name, args in _script(tmp)]
        assert await d.quit() == 0
    return out


@needs_qsd
async def test_replies_match_qemu_storage_daemon(images: Path) -> None:
    assert QSD is not None
    ours = await _run_script(OURS, images, "ours")
    theirs = await _run_script([QSD], images, "qsd")
    for (name, _), mine, real in zip(_script(images), ours, theirs, strict=True):
        assert mine[0] == real[0], (name, mine, real)
        if mine[0] != "ok":
            assert mine[1] == real[1], (name, mine, real)
        elif name == "query-named-block-nodes":
            assert [_shape(n) for n in mine[1]] == [_shape(n) for n in real[1]]
            # The same nodes, but for the name QEMU gives an inline file node.
            def key(n: dict[str, Any]) -> tuple[Any, ...]:
                name = "#auto" if n["node-name"].startswith("#block") else n["node-name"]
                return name, n["drv"], n["file"], n["ro"], n["cache"], n["image"]["virtual-size"]
            assert [key(n) for n in mine[1]] == [key(n) for n in real[1]]
            assert mine[1][0]["image"]["format-specific"] == real[1][0]["image"]["format-specific"]
        else:
            assert mine[1] == real[1], (name, mine, real)


@needs_qsd
async def test_export_added_over_qmp_answers_like_qsds(images: Path) -> None:
    assert QSD is not None
    got = {}
    for tag, cmd in (("ours", OURS), ("qsd", [QSD])):
        vu = images / f"vu-{tag}.sock"
        async with daemon(cmd, images) as d:
            await d.ex("block-export-add", _vu("e", "f0", vu, writable=True))
            got[tag] = await _features(vu)
            assert await d.quit() == 0
        assert not vu.exists()
    # Both offer virtio 1.x and vhost-user protocol features.
    for feats in got.values():
        assert feats & VERSION_1 and feats & PROTOCOL_FEATURES


async def _raw_export_del(cmd: list[str], tmp: Path, tag: str) -> list[dict[str, Any]]:
    """What a client reading line by line gets for a block-export-del, event and reply, in order."""
    async with daemon(cmd, tmp) as d:
        await d.ex("block-export-add", _vu("e1", "f0", tmp / f"vu-{tag}.sock"))
        await d.qmp.disconnect()  # qsd's monitor socket takes one client at a time
        reader, writer = await asyncio.open_unix_connection(str(d.sock))
        try:
            await asyncio.wait_for(reader.readline(), 10)  # the greeting
            writer.write(b'{"execute": "qmp_capabilities"}\n')
            await asyncio.wait_for(reader.readline(), 10)
            writer.write(b'{"execute": "block-export-del", "arguments": {"id": "e1"}, "id": 1}\n')
            got = [json.loads(await asyncio.wait_for(reader.readline(), 10))]
            if "event" in got[0]:
                got.append(json.loads(await asyncio.wait_for(reader.readline(), 10)))
        finally:
            writer.close()
    for msg in got:
        msg.pop("timestamp", None)
    return got


@needs_qsd
async def test_block_export_deleted_comes_before_the_reply_as_from_qsd(images: Path) -> None:
    assert QSD is not None
    ours = await _raw_export_del(OURS, images, "ours")
    theirs = await _raw_export_del([QSD], images, "qsd")
    assert ours == theirs == [{"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e1"}}, {"return": {}, "id": 1}]


# --- hostile clients ----------------------------------------------------------------------

_NAMES = st.sampled_from(["f0", "n1", "n2", "e1", "9x", "", "#block000"])
_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-3, 1 << 40), _NAMES, st.text(max_size=8))


def _requests(tmp: Path) -> st.SearchStrategy[list[tuple[str, dict[str, Any]]]]:
    """Short scripts of mostly well-formed requests, each member sometimes of a wrong value or type."""

    def often(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        # One value in ten of a wrong kind, so most requests get past the argument checks.
        return st.integers(0, 9).flatmap(lambda i: _LEAF if i == 0 else good)

    files = often(st.sampled_from([str(tmp / "a.img"), str(tmp / "b.img"), str(tmp / "c.qcow2"),
                                   str(tmp / "gone"), str(tmp)]))
    inline = st.fixed_dictionaries({"driver": often(st.just("file")), "filename": files},
                                   optional={"aio": st.sampled_from(["threads", "native"]),
                                             "cache": st.fixed_dictionaries({}, optional={"direct": _LEAF})})
    names = often(st.sampled_from(["f0", "n1", "n2", "n3"]))
    file_node = st.fixed_dictionaries(
        {"driver": often(st.just("file")), "node-name": names, "filename": files},
        optional={"read-only": often(st.booleans()),
                  "cache": often(st.fixed_dictionaries({}, optional={"direct": often(st.booleans()),
                                                                     "no-flush": often(st.booleans())})),
                  "aio": st.sampled_from(["threads", "native", "x"]), "locking": st.sampled_from(["auto", "x"])},
    )
    format_node = st.fixed_dictionaries(
        {"driver": often(st.sampled_from(["raw", "qcow2"])), "node-name": names,
         "file": often(st.one_of(names, inline))},
        optional={"read-only": often(st.booleans()), "l2-cache-size": often(st.just(1 << 20)),
                  "discard": st.sampled_from(["unmap", "ignore", "x"])},
    )
    node = st.one_of(file_node, format_node, st.fixed_dictionaries({"driver": st.just("nbd"), "bogus": _LEAF}))
    addr = often(st.fixed_dictionaries(
        {"type": often(st.just("unix")),
         "path": often(st.sampled_from([str(tmp / "s1.sock"), str(tmp / "s2.sock"), str(tmp / "no" / "s.sock")]))}))
    export = st.fixed_dictionaries(
        {"type": often(st.just("vhost-user-blk")), "id": often(st.sampled_from(["e1", "e2"])),
         "node-name": often(st.sampled_from(["f0", "f0", "n1", "n2"])), "addr": addr},
        optional={"writable": often(st.booleans()), "num-queues": often(st.integers(-1, 70)),
                  "logical-block-size": often(st.sampled_from([512, 4096, 1000, 0, 1 << 16, 1 << 22]))},
    )
    export_del = st.tuples(st.just("block-export-del"), st.fixed_dictionaries(
        {"id": often(st.sampled_from(["e1", "e2"]))}, optional={"mode": often(st.sampled_from(["safe", "hard"]))}))
    request = st.one_of(
        st.tuples(st.just("blockdev-add"), node),
        st.tuples(st.just("blockdev-del"), st.fixed_dictionaries({"node-name": names})),
        # Exports come and go more often than the rest, so they meet the other commands.
        st.tuples(st.just("block-export-add"), export),
        export_del,
        st.tuples(st.just("block-export-add"), export),
        export_del,
        st.tuples(st.sampled_from(["query-block-exports", "query-named-block-nodes", "query-commands",
                                   "query-version", "qmp_capabilities", "nope"]),
                  st.fixed_dictionaries({}, optional={"flat": _LEAF})),
    )
    return st.lists(request, min_size=1, max_size=10)


def test_fuzzed_requests_get_replies_and_leave_nothing_behind(images: Path) -> None:
    """Any argument mix gets a QMP reply (never an internal error), and closing removes every socket."""

    async def run(script: list[tuple[str, dict[str, Any]]]) -> None:
        cfg = parse_args(["--blockdev", f"driver=file,node-name=f0,filename={images / 'a.img'}"])
        async with StorageDaemon(cfg) as d:
            session = Session(QmpServer(d, table=DAEMON_COMMANDS))
            session.negotiated = True
            for name, args in script:
                reply = await session.handle(json.dumps({"execute": name, "arguments": args}).encode())
                assert reply is not None
                if "error" in reply:
                    assert reply["error"]["class"] in ("GenericError", "CommandNotFound"), reply
                    assert not reply["error"]["desc"].startswith("internal error"), (name, args, reply)
                else:
                    assert set(reply) == {"return"}
        assert not list(images.glob("*.sock"))

    @given(_requests(images))
    @settings(max_examples=200, deadline=None)
    def check(script: list[tuple[str, dict[str, Any]]]) -> None:
        asyncio.run(run(script))

    check()


def test_blockdev_add_of_a_directory_is_refused_as_qsd_refuses_it(images: Path) -> None:
    """Found by the fuzzer above: a directory opened read-only, then reading it raised out."""

    async def run() -> None:
        cfg = parse_args(["--blockdev", f"driver=file,node-name=f0,filename={images / 'a.img'}"])
        async with StorageDaemon(cfg) as d:
            session = Session(QmpServer(d, table=DAEMON_COMMANDS))
            session.negotiated = True
            for args in ({"driver": "qcow2", "node-name": "n1", "read-only": True,
                          "file": {"driver": "file", "filename": str(images)}},
                         {"driver": "file", "node-name": "n2", "read-only": True, "filename": str(images)}):
                reply = await session.handle(json.dumps({"execute": "blockdev-add", "arguments": args}).encode())
                assert reply == {"error": {"class": "GenericError",
                                           "desc": f"'file' driver requires '{images}' to be a regular file"}}

    asyncio.run(run())
