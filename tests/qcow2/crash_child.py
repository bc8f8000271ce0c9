"""Child process for test_crash: writes rounds, flushes, reports; gets SIGKILLed."""

from __future__ import annotations

import asyncio
import mmap
import random
import sys

from appliance.qcow2 import open_image


def round_writes(seed: int, r: int, size: int, align: int = 1) -> list[tuple[int, int, int]]:
    """Four writes of up to 256 KiB and one of 4 KiB (a single cluster, mostly)."""
    rnd = random.Random(seed * 100_003 + r)
    out = []
    for _ in range(4):
        n = rnd.randrange(1, 256 * 1024)
        off = rnd.randrange(0, size - n)
        out.append((off, n, r % 250 + 1))
    out.append((rnd.randrange(0, size // 4096) * 4096, 4096, r % 250 + 1))
    if align > 1:
        out = [(o // align * align, max(align, n // align * align), p) for o, n, p in out]
    return out


def _buffer(n: int, pat: int, aligned: bool) -> memoryview:
    if not aligned:
        return memoryview(bytes([pat]) * n)
    m = mmap.mmap(-1, n)  # page-aligned, writable: what kernel AIO under O_DIRECT takes
    m.write(bytes([pat]) * n)
    return memoryview(m)


async def main(path: str, seed: int, size: int, cache: str, align: int) -> None:
    img = await open_image(path, read_only=False, fmt="qcow2", cache=cache)  # type: ignore[arg-type]
    from appliance.qcow2.snapops import create_snapshot, delete_snapshot

    direct = cache == "none"
    r = 0
    while True:
        await asyncio.gather(*(img.writev(off, [_buffer(n, pat, direct)])
                               for off, n, pat in round_writes(seed, r, size, align)))
        if r % 6 == 3:
            await create_snapshot(img, f"s{r}")
        if r % 6 == 5 and r > 6:
            await delete_snapshot(img, f"s{r - 8}")
        await img.flush()
        print(f"F {r}", flush=True)
        r += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                     sys.argv[4] if len(sys.argv) > 4 else "writeback",
                     int(sys.argv[5]) if len(sys.argv) > 5 else 1))
