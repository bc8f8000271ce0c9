"""A test guest on our vCPUs takes a long rx flood from a tap without its ring breaking.

The guest polls the used ring natively on another CPU while we write it, so
this is where a torn index store shows up (it did: after ~65k frames).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from appliance.kit import paths
from appliance.kit.console import GuestConsole
from tests.conftest import needs_kvm, needs_root
from tests.net.netns import namespace

pytestmark = [needs_kvm, needs_root]
ROOT = Path(__file__).resolve().parents[2]


def blaster(tmp: Path) -> Path:
    out = tmp / "blast"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(ROOT / "bench" / "tools" / "blast.c")], check=True)
    return out


async def test_rx_flood_past_index_wrap_keeps_the_ring_whole(tmp_path: Path) -> None:
    blast = blaster(tmp_path)
    elf = paths().guest_elf
    with namespace() as ns:
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "appliance.cli.main", "run", "-m", "128",
                "-nographic", "-kernel", str(elf), "-netdev", "tap,id=n0,ifname=fl0,script=no,downscript=no",
                "-device", "virtio-net-pci,netdev=n0"]
        async with GuestConsole(argv) as g:
            await g.ready(60)
            await g.fields("net info", "NET info")
            total = 0
            for _ in range(3):
                await g.write("net bench rx 4\n")
                await asyncio.sleep(0.2)
                p = await asyncio.create_subprocess_exec(
                    "ip", "netns", "exec", ns, str(blast), "fl0", "64", "5", stdout=asyncio.subprocess.DEVNULL
                )
                m = await g.expect(r"NET bench dir=rx (.*)\n", 60)
                await p.wait()
                frames = int(dict(kv.split("=", 1) for kv in m.group(1).split())["frames"])
                assert frames > 0, "the NIC stopped delivering"
                total += frames
            info = await g.fields("net info", "NET info")
            assert int(info["rx_frames"]) >= total  # the idle responder also counts
            await g.write("poweroff\n")
            assert await g.wait(30) == 0
        assert "needs reset" not in g.output and "broken" not in g.tail()
        assert total > 70000, f"only {total} frames: the flood did not pass the 16-bit index wrap"
