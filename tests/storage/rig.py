"""A virtio-blk device on a fake driver, with helpers that speak the request format."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from appliance.kvm.memory import GuestMemory
from appliance.storage.backend import BlockBackend
from appliance.storage.blk import VirtioBlk
from appliance.storage.blk_request import HEADER, SEGMENT
from appliance.virtio.testing import WRITE, FakeDriver

STATUS_UNSET = 0xEE


def blk_header(rtype: int, sector: int = 0) -> bytes:
    return HEADER.pack(rtype, 0, sector)


def segments(*segs: tuple[int, int, int]) -> bytes:
    return b"".join(SEGMENT.pack(*s) for s in segs)


@dataclass
class Result:
    head: int
    used_len: int
    status: int
    data: bytes


class BlkRig:
    """``VirtioBlk`` + ``FakeDriver`` with a request helper."""

    def __init__(
        self,
        backend: BlockBackend,
        *,
        num_queues: int = 1,
        serial: str = "",
        event_idx: bool = False,
        mem_size: int = 8 << 20,
        queue_size: int = 64,
        mem: GuestMemory | None = None,
    ) -> None:
        self.dev = VirtioBlk(backend, num_queues=num_queues, serial=serial)
        self.drv = FakeDriver(
            self.dev, mem_size=mem_size, event_idx=event_idx, queue_size=queue_size, mem=mem
        )
        self.vqs = self.drv.activate()
        self.mem = self.drv.mem

    async def close(self) -> None:
        """Finish requests, let go of the rings and unmap guest RAM."""
        await self.dev.quiesce()
        for q in self.vqs:
            q.close()
        self.mem.close()

    def submit(
        self,
        rtype: int,
        sector: int = 0,
        *,
        payload: bytes = b"",
        read_len: int = 0,
        qi: int = 0,
        kick: bool = True,
    ) -> tuple[int, int, int]:
        """Offer one well-formed request; returns ``(head, data_addr, status_addr)``."""
        hdr = self.drv.alloc(16)
        self.mem.write(hdr, blk_header(rtype, sector))
        bufs = [(hdr, 16, 0)]
        data = 0
        if payload:
            data = self.drv.alloc(len(payload), 512)
            self.mem.write(data, payload)
            bufs.append((data, len(payload), 0))
        if read_len:
            data = self.drv.alloc(read_len, 512)
            bufs.append((data, read_len, WRITE))
        status = self.drv.alloc(1, 1)
        self.mem.write(status, bytes([STATUS_UNSET]))
        bufs.append((status, 1, WRITE))
        head = self.drv.queues[qi].add_chain(bufs)
        if kick:
            self.drv.kick(qi)
        return head, data, status

    async def request(
        self,
        rtype: int,
        sector: int = 0,
        *,
        payload: bytes = b"",
        read_len: int = 0,
        qi: int = 0,
    ) -> Result:
        head, data, status = self.submit(rtype, sector, payload=payload, read_len=read_len, qi=qi)
        await self.drv.wait_used(qi)
        # The interrupt for a batch is raised from a callback one loop turn later.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        used = self.drv.queues[qi].used()
        assert len(used) == 1 and used[0][0] == head, used
        return Result(
            head,
            used[0][1],
            self.mem.read(status, 1)[0],
            self.mem.read(data, read_len) if read_len else b"",
        )

    def config(self) -> dict[str, int]:
        raw = self.dev.read_config(0, 60)
        capacity, = struct.unpack_from("<Q", raw, 0)
        seg_max, = struct.unpack_from("<I", raw, 12)
        blk_size, = struct.unpack_from("<I", raw, 20)
        num_queues, = struct.unpack_from("<H", raw, 34)
        return {"capacity": capacity, "seg_max": seg_max, "blk_size": blk_size, "num_queues": num_queues}
