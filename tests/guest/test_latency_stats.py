"""The test guest's latency statistics (guest/src/stats.c), compiled on the
host with a small driver: percentiles come from a uniform sample of the whole
run once there are more samples than the guest keeps, they are nearest-rank
values of the sorted samples, and mean and max count every sample."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
GUEST = ROOT / "guest"
GUEST_CAP = 256 * 1024  # MAX_SAMPLES in guest/virtio/blk.c

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("stats") / "latency_driver"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{GUEST / 'include'}",
         str(GUEST / "src" / "stats.c"), str(Path(__file__).with_name("latency_driver.c")), "-o", str(exe)],
        check=True,
    )
    return exe


def run(driver: Path, cap: int, per_mille: list[int], values: list[int] | None = None,
        steps: list[tuple[int, int]] | None = None) -> tuple[dict[str, int], list[int]]:
    argv = [str(driver), str(cap), *map(str, per_mille)]
    if steps is not None:
        argv += ["--", *(str(x) for step in steps for x in step)]
    stdin = "" if values is None else "\n".join(map(str, values)) + "\n"
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"driver exit {p.returncode} (3: samples not sorted)"
    words = [int(w) for w in p.stdout.split()]
    facts = dict(zip(["n", "kept", "sum", "max", "mean"], words[:5], strict=True))
    return facts, words[5:]


def test_percentiles_cover_the_whole_run_past_the_sample_cap(driver: Path) -> None:
    # 300k fast completions, then 700k slow ones: the guest keeps 256k samples.
    # Keeping only the first 256k (as the guest once did) reports p50 = 100.
    facts, (p30, p50, p99) = run(driver, GUEST_CAP, [300, 500, 990],
                                 steps=[(300_000, 100), (700_000, 1000)])
    assert facts["n"] == 1_000_000 and facts["kept"] == GUEST_CAP
    assert facts["mean"] == 730 and facts["max"] == 1000
    assert (p30, p50, p99) == (100, 1000, 1000)


def test_reservoir_is_a_uniform_sample(driver: Path) -> None:
    # 40% of a million samples are 1: about 40% of the kept ones must be (a
    # uniform sample of 256k has a standard deviation of 0.1 percentage points).
    _, (p390, p410) = run(driver, GUEST_CAP, [390, 410], steps=[(400_000, 1), (600_000, 2)])
    assert (p390, p410) == (1, 2)
    _, (p390, p410) = run(driver, GUEST_CAP, [390, 410], steps=[(600_000, 2), (400_000, 1)])
    assert (p390, p410) == (1, 2)


def test_nearest_rank_on_small_runs(driver: Path) -> None:
    assert run(driver, 16, [0, 500, 990, 1000], values=[7])[1] == [7, 7, 7, 7]
    assert run(driver, 200, [500, 990, 1000], values=list(range(100, 0, -1)))[1] == [50, 99, 100]
    assert run(driver, 200, [500, 990], values=list(range(1, 11)))[1] == [5, 10]
    facts, pct = run(driver, 16, [500, 990], values=[])
    assert pct == [0, 0] and facts["n"] == facts["mean"] == facts["max"] == 0


def test_cycles_past_32_bits_are_clamped_in_samples_not_in_max_and_mean(driver: Path) -> None:
    facts, (p99,) = run(driver, 16, [990], values=[1 << 40, 1 << 40])
    assert p99 == 0xFFFFFFFF and facts["max"] == facts["mean"] == 1 << 40


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=300), st.integers(1, 400))
def test_percentiles_are_ordered_and_match_a_sorted_copy(driver: Path, values: list[int], cap: int) -> None:
    marks = [0, 1, 250, 500, 900, 990, 999, 1000]
    facts, pct = run(driver, cap, marks, values=values)
    assert pct == sorted(pct)
    assert facts["n"] == len(values) and facts["kept"] == min(cap, len(values))
    if values and cap >= len(values):
        s = sorted(values)
        assert pct == [s[max(0, -(-len(s) * m // 1000) - 1)] for m in marks]
        assert pct[-1] == facts["max"] == max(values)
