"""The kit's kitnet (bench/net.py's bulk sender and sink) moves exactly the bytes asked
for and reports them; run on the host over loopback, built as the kit builds it."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("gcc") is None,
                                reason="needs make and gcc")


@pytest.fixture(scope="module")
def kitnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kitnet")
    subprocess.run(["make", "-s", "-C", str(ROOT / "guest"), f"O={out}", f"{out}/kitnet"], check=True)
    return out / "kitnet"


def fields(line: str) -> dict[str, str]:
    words = line.split()
    assert words[0] == "KITNET", line
    return dict(w.split("=", 1) for w in words[1:])


def connect_retrying(kitnet: Path, port: int, size: str, bs: str) -> subprocess.CompletedProcess[str]:
    for _ in range(50):
        sent = subprocess.run([str(kitnet), "send", "127.0.0.1", str(port), size, "--bs", bs],
                              capture_output=True, text=True, timeout=30)
        if "Connection refused" not in sent.stdout:
            return sent
        subprocess.run(["sleep", "0.05"], check=True)
    return sent


@pytest.mark.parametrize(("size", "nbytes", "bs"), [("3M", 3 << 20, "256K"), ("100001", 100001, "4096")])
def test_send_and_recv_count_every_byte(kitnet: Path, size: str, nbytes: int, bs: str) -> None:
    port = free_port()
    sink = subprocess.Popen([str(kitnet), "recv", str(port), "--bs", bs], stdout=subprocess.PIPE, text=True)
    try:
        sent = connect_retrying(kitnet, port, size, bs)
        out, _ = sink.communicate(timeout=30)
    finally:
        sink.kill()
    assert sent.returncode == 0 and sink.returncode == 0, (sent.stdout, out)
    s, r = fields(sent.stdout), fields(out)
    assert s["dir"] == "send" and r["dir"] == "recv"
    assert int(s["bytes"]) == int(r["bytes"]) == nbytes
    assert float(s["gbps"]) > 0


def test_send_reaches_the_peer_eof_before_reporting(kitnet: Path) -> None:
    # The sender's time covers delivery: it reports only after the peer closes.
    port = free_port()
    with socket.create_server(("127.0.0.1", port)) as srv:
        proc = subprocess.Popen([str(kitnet), "send", "127.0.0.1", str(port), "64K"], stdout=subprocess.PIPE, text=True)
        conn, _ = srv.accept()
        got = 0
        while chunk := conn.recv(1 << 16):
            got += len(chunk)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.3)
        conn.close()
        out, _ = proc.communicate(timeout=10)
    assert got == 64 << 10
    assert fields(out)["bytes"] == str(64 << 10)


@pytest.mark.parametrize("argv", [[], ["send"], ["send", "127.0.0.1", "0", "1"], ["recv", "x"],
                                  ["send", "not-an-ip", "1", "1"], ["recv", "1", "--bs", "0"], ["bogus", "1"]])
def test_bad_arguments_exit_2(kitnet: Path, argv: list[str]) -> None:
    assert subprocess.run([str(kitnet), *argv], capture_output=True).returncode == 2


def test_refused_connection_is_a_reported_error(kitnet: Path) -> None:
    proc = subprocess.run([str(kitnet), "send", "127.0.0.1", str(free_port()), "1"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stdout.startswith("KITNET error=connect:")
