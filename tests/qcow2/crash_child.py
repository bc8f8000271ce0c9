"""Child process for test_crash: writes rounds, flushes, reports; gets SIGKILLed."""

from __future__ import annotations

import asyncio
import random
import sys

from appliance.qcow2 import open_image


def round_writes(seed: int, r: int, size: int) -> list[tuple[int, int, int]]:
    rnd = random.Random(seed * 100_003 + r)
    out = []
    for _ in range(4):
        n = rnd.randrange(1, 256 * 1024)
        off = rnd.randrange(0, size - n)
        out.append((off, n, r % 250 + 1))
    return out


async def main(path: str, seed: int, size: int) -> None:
    img = await open_image(path, read_only=False, fmt="qcow2")  # type: ignore[arg-type]
    from appliance.qcow2.snapops import create_snapshot, delete_snapshot

    r = 0
    while True:
        await asyncio.gather(*(img.writev(off, [memoryview(bytes([pat]) * n)])
                               for off, n, pat in round_writes(seed, r, size)))
        if r % 6 == 3:
            await create_snapshot(img, f"s{r}")
        if r % 6 == 5 and r > 6:
            await delete_snapshot(img, f"s{r - 8}")
        await img.flush()
        print(f"F {r}", flush=True)
        r += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
