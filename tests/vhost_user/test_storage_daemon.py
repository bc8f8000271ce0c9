"""`appliance storage-daemon`: qemu-storage-daemon's command line and lifecycle."""

from __future__ import annotations

import asyncio
import mmap
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.cli.main import main as appliance_main
from appliance.cli.storage_daemon import StorageDaemon, parse_args
from appliance.errors import ConfigError
from appliance.virtio.vhost_user import protocol as p
from tests.vhost_user.frontend import FrontEnd


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "a.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = appliance_main(["storage-daemon", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_blockdev_and_export(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(["--help"], capsys)
    assert rc == 0
    assert "--blockdev" in out and "--export" in out and "vhost-user-blk" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--nbd-server", "addr.type=unix"], "unrecognized option '--nbd-server"),
        (["--blockdev", "driver=file,node-name=f,filename=x,colour=blue"], "Invalid parameter 'colour'"),
        (["--blockdev", "driver=nbd,node-name=f"], "driver 'nbd'"),
        (["--blockdev", "driver=file,filename=x"], "'node-name' must be specified for the root node"),
        (["--blockdev", "driver=file,node-name=f,filename=x,aio=native"], "aio=native"),
        (["--blockdev", "driver=file,node-name=f,filename=x,read-only=maybe"], "'on' or 'off', not 'maybe'"),
        (["--blockdev", "driver=raw,node-name=r,file=nothere"], "'nothere'"),
        (
            ["--blockdev", "driver=file,node-name=f,filename=x", "--blockdev", "driver=file,node-name=f,filename=y"],
            "duplicate node name 'f'",
        ),
        (
            ["--blockdev", "driver=file,node-name=f,filename=x",
             "--export", "type=nbd,id=e,node-name=f"],
            "type 'nbd'",
        ),
        (
            ["--blockdev", "driver=file,node-name=f,filename=x",
             "--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=inet,addr.path=/s"],
            "addr.type=inet",
        ),
        (
            ["--blockdev", "driver=file,node-name=f,filename=x",
             "--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/s,num-queues=0"],
            "num-queues",
        ),
        (
            ["--blockdev", "driver=file,node-name=f,filename=x,read-only=on",
             "--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/s,writable=on"],
            "read-only",
        ),
        (
            ["--blockdev", "driver=file,node-name=f,filename=x",
             "--export", "type=vhost-user-blk,id=e,node-name=g,addr.type=unix,addr.path=/s"],
            "node 'g' does not exist",
        ),
        (["--export"], "requires an argument"),
        (
            ["--blockdev", "driver=file,node-name=f,filename=x",
             "--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/s,iothread=io9"],
            'iothread "io9" not found',
        ),
        (["--object", "secret,id=s0,data=x"], "type 'secret'"),
        (["--object", "iothread,id=io0,poll-max-ns=x"], "'x'"),
        (["--object", "iothread,id=io0", "--object", "iothread,id=io0"], "duplicate id 'io0'"),
        (["--blockdev", "file,node-name=f,filename=x,detect-zeroes=unmap"], "detect-zeroes=unmap"),
        ([], "no --export"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = _run(argv, capsys)
    assert rc == 2
    assert needle in err
    assert err.count("\n") == 1


def test_missing_image_exits_1_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(
        ["--blockdev", f"driver=file,node-name=f,filename={tmp_path / 'none.img'}",
         "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={tmp_path / 's'}"],
        capsys,
    )
    assert rc == 1
    assert "none.img" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_unwritable_pidfile_exits_1_with_one_line(
    tmp_path: Path, img: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As qemu-storage-daemon: a runtime failure (exit 1), its socket removed again, and a
    file that is in the way is not ours to delete."""
    blocker = tmp_path / "d"
    blocker.write_text("not ours\n")
    rc, _, err = _run(
        ["--pidfile", str(blocker / "x.pid"), "--blockdev", f"driver=file,node-name=f,filename={img}",
         "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={tmp_path / 's'}"],
        capsys,
    )
    assert rc == 1
    assert "cannot create PID file" in err and str(blocker / "x.pid") in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()
    assert blocker.read_text() == "not ours\n"


def test_equals_form_and_cache_options_parse(img: Path) -> None:
    cfg = parse_args(
        [f"--blockdev=driver=file,node-name=f,filename={img},cache.direct=on,aio=threads,discard=unmap",
         "--export=type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/x,writable=on,"
         "num-queues=4,logical-block-size=4096"]
    )
    b, e = cfg.blockdevs[0], cfg.exports[0]
    assert (b.cache_direct, b.discard) == (True, "unmap")
    assert (e.writable, e.num_queues, e.logical_block_size) == (True, 4, 4096)


def test_iothread_object_and_export_iothread_set_the_polling_bound(img: Path) -> None:
    from appliance.cli.storage_daemon import StorageDaemon
    from appliance.storage import poll

    before = poll.max_ns()
    cfg = parse_args(
        ["--object", "iothread,id=io0,poll-max-ns=20000,poll-grow=2", "--object", "iothread,id=io1",
         f"--blockdev=driver=file,node-name=f,filename={img}",
         "--export=type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/x,iothread=io0"]
    )
    assert cfg.iothreads == {"io0": 20000, "io1": None}
    assert cfg.exports[0].iothread == "io0"
    try:
        StorageDaemon(cfg)
        assert poll.max_ns() == 20000
    finally:
        poll.set_max_ns(before)


def _capacity(cfg: bytes) -> int:
    return int(struct.unpack_from("<Q", cfg, 12)[0])


async def test_two_exports_in_one_daemon(tmp_path: Path, img: Path) -> None:
    other = tmp_path / "b.img"
    with open(other, "wb") as f:
        f.truncate(2 << 20)
    s1, s2 = tmp_path / "one.sock", tmp_path / "two.sock"
    cfg = parse_args(
        ["--blockdev", f"driver=file,node-name=f1,filename={img}",
         "--blockdev", f"driver=file,node-name=f2,filename={other}",
         "--blockdev", "driver=raw,node-name=r2,file=f2",
         "--export", f"type=vhost-user-blk,id=e1,node-name=f1,addr.type=unix,addr.path={s1},writable=on,num-queues=2",
         "--export", f"type=vhost-user-blk,id=e2,node-name=r2,addr.type=unix,addr.path={s2}"]
    )
    async with StorageDaemon(cfg) as d:
        a = await FrontEnd.connect(str(s1), mem_size=1 << 20)
        b = await FrontEnd.connect(str(s2), mem_size=1 << 20)
        assert _capacity(await a.call(p.Request.GET_CONFIG, p.config(0, 60))) == (8 << 20) // 512
        assert _capacity(await b.call(p.Request.GET_CONFIG, p.config(0, 60))) == (2 << 20) // 512
        assert int.from_bytes(await a.call(p.Request.GET_QUEUE_NUM), "little") == 2
        feats = int.from_bytes(await b.call(p.Request.GET_FEATURES), "little")
        assert feats >> 5 & 1  # VIRTIO_BLK_F_RO: writable=off is the default
        a.close()
        b.close()
        assert d.exports["e2"].device.read_only
    assert not s1.exists() and not s2.exists()


def test_daemon_process_serves_until_sigterm_and_removes_its_socket(tmp_path: Path, img: Path) -> None:
    sock = tmp_path / "vu.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "storage-daemon",
         "--blockdev", f"driver=file,node-name=f,filename={img}",
         "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "socket never appeared"
            time.sleep(0.05)

        async def probe() -> int:
            # The file appears at bind(), a moment before listen(): try until it takes us.
            while True:
                try:
                    fe = await FrontEnd.connect(str(sock), mem_size=1 << 20)
                    break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline, "the socket never listened"
                    await asyncio.sleep(0.05)
            n = int.from_bytes(await fe.call(p.Request.GET_QUEUE_NUM), "little")
            fe.close()
            return n

        assert asyncio.run(probe()) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_storage_daemon_config_validates_on_construction(img: Path) -> None:
    cfg = parse_args(["--help"])
    cfg.exports.append(
        parse_args(
            ["--blockdev", f"driver=file,node-name=f,filename={img}",
             "--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/x"]
        ).exports[0]
    )
    with pytest.raises(ConfigError, match="does not exist"):
        StorageDaemon(cfg)


async def test_implied_keys_and_logical_block_size_reach_the_guest(tmp_path: Path, img: Path) -> None:
    """``--blockdev file,…`` and ``--export vhost-user-blk,…`` as qemu-storage-daemon's help shows them."""
    sock = tmp_path / "lbs.sock"
    cfg = parse_args(
        ["--blockdev", f"file,node-name=f,filename={img}",
         "--export", f"vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},logical-block-size=4096"]
    )
    async with StorageDaemon(cfg):
        fe = await FrontEnd.connect(str(sock), mem_size=1 << 20)
        config = await fe.call(p.Request.GET_CONFIG, p.config(0, 60))
        blk_size = int(struct.unpack_from("<I", config, 12 + 20)[0])  # virtio 1.2 §5.2.4 blk_size
        assert blk_size == 4096
        fe.close()


def test_json_forms_parse_like_key_value(img: Path) -> None:
    cfg = parse_args(
        ["--blockdev", f'{{"driver": "file", "node-name": "f", "filename": "{img}", "cache": {{"direct": true}}}}',
         "--blockdev", '{"driver": "qcow2", "node-name": "q", "file": "f"}',
         "--export", '{"type": "vhost-user-blk", "id": "e", "node-name": "q", '
                     '"addr": {"type": "unix", "path": "/tmp/j.sock"}, "writable": true, "num-queues": 2}']
    )
    assert cfg.blockdevs[0].cache_direct and cfg.blockdevs[1].driver == "qcow2"
    e = cfg.exports[0]
    assert (e.path, e.writable, e.num_queues) == ("/tmp/j.sock", True, 2)
    with pytest.raises(ConfigError, match="invalid JSON"):
        parse_args(["--blockdev", "{nope"])
    with pytest.raises(ConfigError, match="Invalid parameter 'colour'"):
        parse_args(["--blockdev", '{"driver": "file", "node-name": "f", "filename": "x", "colour": "red"}'])


# --- one --blockdev parser for the daemon and `appliance run` ---------------------------

_KEYS = ["driver", "node-name", "filename", "file", "read-only", "cache.direct", "cache.no-flush", "aio",
         "discard", "locking", "detect-zeroes", "file.driver", "file.filename", "file.aio", "colour"]
_VALUES = ["file", "raw", "qcow2", "nbd", "f", "g", "0bad", "x.img", "on", "off", "maybe", "auto",
           "native", "threads", "unmap", "ignore", ""]


def _outcome(option: str, text: str) -> str:
    """What `appliance run` (``-blockdev``) or the daemon (``--blockdev``) makes of ``text``."""
    from dataclasses import replace

    from appliance.storage.blockdev import BlockdevConfig

    try:
        if option == "-blockdev":
            cfg = BlockdevConfig.parse(text)  # as appliance.cli.run_devices calls it
        else:
            # --help skips the cross-node checks, leaving the parse alone.
            cfg = parse_args(["--help", "--blockdev", text]).blockdevs[0]
    except ConfigError as err:
        return "error: " + str(err).replace(option, "OPT")
    return repr(replace(cfg, option="OPT"))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_KEYS), st.sampled_from(_VALUES)), max_size=6),
       st.sampled_from(["", "file,", "qcow2,"]))
def test_run_and_daemon_blockdev_accept_and_refuse_the_same_text(pairs: list[tuple[str, str]], lead: str) -> None:
    """Any key=value text means the same to ``appliance run -blockdev`` and the daemon's ``--blockdev``."""
    text = lead + ",".join(f"{k}={v}" for k, v in pairs)
    assert _outcome("-blockdev", text) == _outcome("--blockdev", text)


def test_daemon_parse_errors_are_the_run_parsers(img: Path) -> None:
    """The daemon's --blockdev errors come from the same parser as `appliance run -blockdev`."""
    for text, needle in [
        ("driver=file,node-name=f,filename=x,aio=native", "--blockdev node-name=f: aio=native was specified, "
                                                          "but it requires cache.direct=on"),
        ("driver=nbd,node-name=f", "--blockdev: driver 'nbd' is not supported (file, raw or qcow2)"),
        ("driver=qcow2,node-name=q,file.driver=nbd", "--blockdev node-name=q: file.driver=nbd is not supported"),
        ("driver=file,node-name=1f,filename=x", "--blockdev: invalid id '1f'"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_args(["--blockdev", text])
        assert needle in str(info.value)
    with pytest.raises(ConfigError, match="--blockdev node-name=r: 'q' is not a driver=file node"):
        parse_args(["--blockdev", f"driver=file,node-name=f,filename={img}",
                    "--blockdev", "driver=raw,node-name=q,file=f", "--blockdev", "driver=raw,node-name=r,file=q"])


async def test_inline_file_node_and_native_aio_are_served(tmp_path: Path, img: Path) -> None:
    """``file.driver=file,file.filename=`` and ``aio=native,cache.direct=on`` work in the daemon as in run."""
    with open(img, "r+b") as f:
        f.write(b"inline!!")
    s1, s2 = tmp_path / "in.sock", tmp_path / "aio.sock"
    other = tmp_path / "b.img"
    with open(other, "wb") as f:
        f.truncate(4 << 20)
    cfg = parse_args(
        ["--blockdev", f"driver=raw,node-name=r,file.driver=file,file.filename={img}",
         "--blockdev", f"driver=file,node-name=n,filename={other},cache.direct=on,aio=native",
         "--export", f"type=vhost-user-blk,id=e1,node-name=r,addr.type=unix,addr.path={s1}",
         "--export", f"type=vhost-user-blk,id=e2,node-name=n,addr.type=unix,addr.path={s2},writable=on"]
    )
    async with StorageDaemon(cfg) as d:
        r, n = d.exports["e1"].backend, d.exports["e2"].backend
        buf = bytearray(512)
        assert await r.readv(0, [memoryview(buf)]) == 512 and buf[:8] == b"inline!!"
        assert r.read_only
        assert struct.unpack_from("<Q", d.exports["e2"].device.config_bytes())[0] == (4 << 20) // 512
        assert getattr(n, "cache", None) == "none"
        page = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
        page[:] = b"\xa5" * 4096
        assert await n.writev(8192, [memoryview(page)]) == 4096
        await n.flush()
        page.close()
    with open(other, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"\xa5" * 4096


def test_version_prints_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """qemu-storage-daemon's -V/--version."""
    for flag in ("-V", "--version"):
        rc, out, err = _run([flag], capsys)
        assert (rc, err) == (0, "") and out.startswith("appliance storage-daemon version ")
