"""GuestConsole (the host side of the test guest's line protocol) matches only
whole lines, so a reply pattern that ends in a number never returns the
number's first digits while the rest is still on the way; ConsoleProcess
(used for shells with prompts that end in no newline) still matches at once."""

from __future__ import annotations

from appliance.kit.console import ConsoleProcess, GuestConsole

# A line that arrives in two pieces, the cut inside a number.
SPLIT = ["sh", "-c",
         "printf 'BLK bench p50_us=1723 p99_us=1'; sleep 0.3; printf '2345 max_us=99999\\r\\n'; exec sleep 5"]


async def test_guest_console_waits_for_the_whole_line() -> None:
    async with GuestConsole(SPLIT) as g:
        m = await g.expect(r"p50_us=(\d+) p99_us=(\d+)", timeout=10)
        assert m.groups() == ("1723", "12345")
        assert g.output.endswith("max_us=99999\n")


async def test_guest_console_fields_parse_the_whole_line() -> None:
    async with GuestConsole(SPLIT) as g:
        f = await g.fields("", "BLK bench", timeout=10)
        assert (f["p50_us"], f["p99_us"], f["max_us"]) == ("1723", "12345", "99999")


async def test_console_process_still_matches_a_prompt_without_newline() -> None:
    async with ConsoleProcess(["sh", "-c", "printf '# '; exec sleep 5"]) as p:
        await p.expect(r"# ", timeout=10)
