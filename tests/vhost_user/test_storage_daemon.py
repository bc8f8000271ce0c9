"""`appliance storage-daemon`: qemu-storage-daemon's command line and lifecycle."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
        (["--blockdev", "driver=file,node-name=f,filename=x,colour=blue"], "invalid parameter 'colour'"),
        (["--blockdev", "driver=nbd,node-name=f"], "driver 'nbd'"),
        (["--blockdev", "driver=file,filename=x"], "'node-name' is missing"),
        (["--blockdev", "driver=file,node-name=f,filename=x,aio=native"], "aio=native"),
        (["--blockdev", "driver=file,node-name=f,filename=x,read-only=maybe"], "'maybe' is not on or off"),
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


def test_equals_form_and_cache_options_parse(img: Path) -> None:
    cfg = parse_args(
        [f"--blockdev=driver=file,node-name=f,filename={img},cache.direct=on,aio=threads,discard=unmap",
         "--export=type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/x,writable=on,"
         "num-queues=4,logical-block-size=4096"]
    )
    b, e = cfg.blockdevs[0], cfg.exports[0]
    assert (b.cache_direct, b.discard) == (True, "unmap")
    assert (e.writable, e.num_queues, e.logical_block_size) == (True, 4, 4096)


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
            fe = await FrontEnd.connect(str(sock), mem_size=1 << 20)
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
    with pytest.raises(ConfigError, match="invalid parameter 'colour'"):
        parse_args(["--blockdev", '{"driver": "file", "node-name": "f", "filename": "x", "colour": "red"}'])
