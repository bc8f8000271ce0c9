"""A console process that does not answer in time: the error says where its threads are."""

from __future__ import annotations

import asyncio

import pytest

from appliance.kit.console import ConsoleProcess
from appliance.kit.errors import TcgTimeout


async def test_wait_timeout_names_each_thread_and_its_state() -> None:
    async with ConsoleProcess(["sleep", "30"]) as p:
        assert p.proc is not None
        # On a loaded machine the child may still be starting: wait until it sleeps.
        for _ in range(500):
            with open(f"/proc/{p.proc.pid}/syscall", encoding="ascii") as f:
                if f.read().startswith("230 "):
                    break
            await asyncio.sleep(0.02)
        with pytest.raises(TcgTimeout) as err:
            await p.wait(0.2)
    text = str(err.value)
    assert "--- threads (name state wchan syscall) ---" in text
    # One thread, sleeping (S) in clock_nanosleep (x86-64 syscall 230).
    [line] = text.split("--- threads (name state wchan syscall) ---\n")[1].splitlines()
    tid, name, state, _wchan, syscall = line.split(" ", 4)
    assert int(tid) == p.proc.pid and name == "sleep" and state == "S", line  # type: ignore[union-attr]
    assert syscall.startswith("[230 "), line


async def test_tail_of_an_exited_process_lists_no_threads() -> None:
    async with ConsoleProcess(["sh", "-c", "echo hello"]) as p:
        assert await p.wait(10) == 0
    assert "threads" not in p.tail()
