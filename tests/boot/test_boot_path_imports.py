"""The modules `appliance run` loads before its vCPUs start stay off the heavy stdlib.

Each of these costs milliseconds of boot time on the benchmark host (see
appliance.bootpath); a new import of one of them on the boot path would
silently slow every `appliance run`.
"""

from __future__ import annotations

import subprocess
import sys

from appliance.bootpath import BOOT_PATH

HEAVY = ("typing", "pathlib", "re", "asyncio", "logging", "dataclasses", "inspect", "socket", "selectors")


def test_boot_path_modules_do_not_import_the_heavy_stdlib() -> None:
    code = (
        "import sys\n"
        f"for m in {BOOT_PATH!r}: __import__(m)\n"
        f"print(' '.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [], f"imported before the vCPUs start: {out.stdout.strip()}"


def test_the_boot_path_namedtuple_behaves_like_typings() -> None:
    from appliance.bootpath import NamedTuple

    class Point(NamedTuple):
        """A point."""

        x: int
        y: int = 2

        @property
        def norm1(self) -> int:
            return abs(self.x) + abs(self.y)

    p = Point(1)
    assert (p, p.norm1, tuple(p), p._replace(y=5)) == (Point(1, 2), 3, (1, 2), Point(1, 5))
    assert Point._fields == ("x", "y") and Point.__doc__ == "A point." and "Point" in Point.__qualname__
    assert repr(p) == "Point(x=1, y=2)"
