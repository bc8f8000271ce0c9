"""``appliance img bench``: qemu-img bench's workload on our engine.

Same options and output as qemu-img bench: ``-c`` requests of ``-s`` bytes,
``-d`` in flight, starting at ``-o`` and advancing by ``-S`` (wrapping at the
image's end; a request that runs past it fails the run, as in qemu-img 7.2),
reads unless ``-w``, ``-t none`` for O_DIRECT. Like qemu-img 7.2 every
request uses one buffer of ``-s`` bytes (``--buffer-per-request``, ours only,
gives each of the ``-d`` slots its own). The clock runs from the first
request to the last completion, after the image is open and the buffer filled.
"""

from __future__ import annotations

import asyncio
import mmap
import time
from typing import Any

from appliance.errors import ConfigError
from appliance.qcow2.cli import _open, _parser, count_arg, cvtnum
from appliance.qcow2.errors import ErrorKind, Qcow2Error
from appliance.qemu_numbers import INT_MAX
from appliance.storage import poll


async def cmd_bench(argv: list[str]) -> int:
    p = _parser("bench")
    p.add_argument("-c", dest="count", default="75000")
    p.add_argument("-d", dest="depth", default="64")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-n", dest="native", action="store_true")
    # Our default under -t none is kernel AIO (-i native); -i threads uses the pool.
    p.add_argument("-i", dest="aio", default="native")
    p.add_argument("-o", dest="offset", default="0")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-s", dest="bufsize", default="4096")
    p.add_argument("-S", dest="step")
    p.add_argument("-t", dest="cache", default="writeback")
    p.add_argument("-w", dest="write", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("--pattern", default=None)
    p.add_argument("--flush-interval", default="0")
    p.add_argument("--no-drain", action="store_true")
    p.add_argument("--buffer-per-request", dest="per_request", action="store_true")
    # Ours: the ceiling of the AIO completion polling window (appliance.storage.poll).
    p.add_argument("--poll-max-ns", dest="poll_max_ns")
    p.add_argument("--poll-stats", action="store_true")
    p.add_argument("filename")
    a = p.parse_args(argv)
    # As qemu-img reads them: C numbers (0x…, 0…) for counts, QEMU sizes for bytes.
    a.count = count_arg(a.count, INT_MAX, "Invalid request count specified")
    a.depth = count_arg(a.depth, INT_MAX, "Invalid queue depth specified")
    offset = cvtnum("offset", a.offset)
    bufsize = cvtnum("buffer size", a.bufsize, 0, INT_MAX)
    step = cvtnum("step_size", a.step, 0, INT_MAX) if a.step is not None else bufsize
    if a.pattern is not None:
        a.pattern = count_arg(a.pattern, 0xFF, "Invalid pattern byte specified")
    a.flush_interval = count_arg(a.flush_interval, INT_MAX, "Invalid flush interval specified")
    if a.depth < 1:
        # qemu-img waits for ever on no requests in flight; refused here.
        raise ConfigError("Invalid request count or queue depth")
    if a.pattern is not None and not a.write:
        raise ConfigError("--pattern is only for write tests")
    if a.flush_interval and not a.write:
        raise ConfigError("--flush-interval is only available in write tests")
    if a.flush_interval and a.flush_interval < a.depth:
        raise ConfigError("Flush interval can't be smaller than depth")
    if a.aio not in ("threads", "native"):
        raise ConfigError(f"Invalid aio option: {a.aio}")
    if a.poll_max_ns is not None:
        poll.set_max_ns(poll.parse_max_ns(a.poll_max_ns, "--poll-max-ns"))
    else:
        poll.max_ns()  # a bad $APPLIANCE_POLL_MAX_NS is refused before the image opens
    kw = {"aio": a.aio} if a.aio == "threads" and (a.fmt or "qcow2") == "qcow2" else {}
    img = await _open(a.filename, a.fmt, read_only=not a.write, cache=a.cache,
                      share=a.force_share, **kw)
    try:
        size = img.size
        # qemu-img bench prints these under -q too (its -q quiets nothing here).
        print(f"Sending {a.count} {'write' if a.write else 'read'} requests, {bufsize} bytes "
              f"each, {a.depth} in parallel (starting at offset {offset}, step size {step})")
        if a.flush_interval:
            print(f"Sending flush every {a.flush_interval} requests")
        # qemu-img 7.2 (the baseline bench/qcow2.py runs) sends every request
        # from one buffer of -s bytes, filled before the clock starts (strace:
        # one iov_base for all requests in flight); 32 requests reading into
        # 32 buffers move 32 times the memory per round through the host's
        # caches, a different workload. --buffer-per-request gives each
        # request slot its own buffer.
        slots = min(a.depth, a.count)
        stride = (bufsize + 4095) & ~4095
        arena = mmap.mmap(-1, max(4096, stride * (slots if a.per_request else 1)),
                          flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena.write(bytes([a.pattern or 0]) * len(arena))
        whole = memoryview(arena)
        bufs = [whole[(i * stride if a.per_request else 0):][:bufsize] for i in range(slots)]
        last = size - bufsize  # the last offset a whole request fits at
        count = a.count
        nxt = offset  # offset of the next request
        issued = done = depth = 0
        pending = 0  # requests and flushes not yet answered: waited for when the run fails

        op = img.writev if a.write else img.readv
        write = a.write
        flush_every = a.flush_interval
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        quiet: asyncio.Future[None] = loop.create_future()  # nothing pending after a failure
        # Like qemu-img's bench_cb, a completion starts the next request: through
        # the image's callback form (start_rw) where it takes the request,
        # else as a coroutine.
        start_rw = getattr(img, "start_rw", None)

        def spawn(coro: Any) -> None:
            """Run ``coro`` at once, up to its first wait, then from its futures' callbacks.

            A task would start a loop turn later, one more turn per request
            than qemu-img's bench_cb takes (virtio-blk steps its coroutines
            the same way, storage.blk ``_step``). A request that never waits
            (zeroes read from a hole) starts the next one from inside this
            call: past a few levels of that the next goes round the loop.
            """
            nonlocal depth
            if depth >= 32:
                loop.call_soon(spawn, coro)
                return
            depth += 1
            try:
                waited = coro.send(None)
            except StopIteration:
                return
            except BaseException as err:  # noqa: BLE001 - ends the run
                if not finished.done():
                    finished.set_exception(err)
                return
            finally:
                depth -= 1
            if getattr(waited, "_asyncio_future_blocking", False):
                # ``await future`` yields the future; the coroutine reads its result.
                waited._asyncio_future_blocking = False
                waited.add_done_callback(lambda _f: spawn(coro))
            elif waited is None:  # a bare yield: once round the loop
                loop.call_soon(spawn, coro)
            else:
                coro.close()
                if not finished.done():
                    finished.set_exception(RuntimeError(f"bench awaited {waited!r}"))

        def issue(buf: memoryview) -> None:
            # Called from the previous request's completion: the time from
            # there to the next submission is on every request's path, so
            # this stays one flat function.
            nonlocal issued, nxt, pending
            issued += 1
            pending += 1
            off = nxt
            # qemu-img 7.2 wraps at the image end (later versions inside the
            # range a whole request fits in), and QEMU's block layer fails a
            # request that runs past the end with EIO.
            nxt = (off + step) % size if size else 0
            if off > last:
                completed(buf, 0, _past_end(off))
            elif start_rw is None or not start_rw(write, off, [buf], completed, buf):
                spawn(slow(off, buf))

        async def slow(off: int, buf: memoryview) -> None:
            try:
                n = await op(off, [buf])
            except Exception as err:  # noqa: BLE001 - ends the run below
                completed(buf, 0, err)
            else:
                completed(buf, n, None)

        async def flush_then_next(buf: memoryview) -> None:
            nonlocal pending
            try:
                await img.flush()
            except Exception as err:  # noqa: BLE001 - ends the run below
                pending -= 1
                failed(err)
                return
            pending -= 1
            if finished.done():
                settle()
                return
            following(buf)

        def failed(err: BaseException) -> None:
            if not finished.done():
                finished.set_exception(err)
            settle()

        def settle() -> None:
            if not pending and not quiet.done():
                quiet.set_result(None)

        def completed(buf: memoryview, n: int, err: BaseException | None) -> None:
            nonlocal done, pending
            pending -= 1
            if finished.done():
                settle()
                return
            if err is not None:
                failed(err)
                return
            done += 1
            if flush_every and done % flush_every == 0:
                pending += 1
                spawn(flush_then_next(buf))  # this slot waits for the flush
            elif issued < count:
                issue(buf)
            elif done == count:
                finished.set_result(None)

        def following(buf: memoryview) -> None:
            if issued < count:
                issue(buf)
            elif done == count and not finished.done():
                finished.set_result(None)

        t0 = time.perf_counter()
        for b in bufs:
            if finished.done():
                break  # the first request failed: start no more
            issue(b)
        if not count:
            finished.set_result(None)
        try:
            await finished
        except (Qcow2Error, OSError) as err:
            # qemu-img's bench_cb: the first request that fails ends the run.
            # Those still under way are let finish before the image closes.
            settle()
            await quiet
            why = err.strerror if isinstance(err, OSError) and err.strerror else "Input/output error"
            raise Qcow2Error(f"Failed request: {why}", kind=getattr(err, "kind", ErrorKind.IO)) from err
        elapsed = time.perf_counter() - t0
        print(f"Run completed in {elapsed:.3f} seconds.")
        if a.poll_stats:
            _print_poll_stats(loop)
    finally:
        await img.close()
    return 0


def _past_end(offset: int) -> Qcow2Error:
    return Qcow2Error(f"request at {offset} runs past the end of the image", kind=ErrorKind.RANGE)


def _print_poll_stats(loop: asyncio.AbstractEventLoop) -> None:
    p = poll.poller_of(loop)
    if p is None:
        print("Completion polling: not used")
        return
    spins = p.hits + p.misses
    print(f"Completion polling: max {p.max_ns} ns, window {p.ns} ns, {p.hits} of {spins} "
          f"spins saw a completion, {p.spun_ns / 1e6:.1f} ms spun, {p.contended} waits on a shared CPU")
