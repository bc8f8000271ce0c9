"""`appliance kit build` rebuilds the test guest when anything it is built
from changes (a C file, a header, a new source file, the Makefile) and only
then, on a copy of guest/ in a scratch kit directory."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest

# The module (the package re-exports its build() function under the same name).
kit_build = importlib.import_module("appliance.kit.build")

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="gcc/make are not installed")


def stamp(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_ino, st.st_mtime_ns


def test_guest_sources_trigger_a_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "guest"
    shutil.copytree(ROOT / "guest", src, ignore=shutil.ignore_patterns("build"))
    monkeypatch.setattr(kit_build, "GUEST_SRC", src)
    kitdir = tmp_path / "kit"

    elf = kit_build.build(linux=False, kitdir=kitdir).guest_elf
    first = stamp(elf)
    kit_build.build(linux=False, kitdir=kitdir)
    assert stamp(elf) == first, "rebuilt with nothing changed"

    (src / "README.md").write_text("docs only\n")
    kit_build.build(linux=False, kitdir=kitdir)
    assert stamp(elf) == first, "a README is not an input"

    changes = [
        lambda: (src / "src" / "stats.c").write_text((src / "src" / "stats.c").read_text() + "\n/* c */\n"),
        lambda: (src / "include" / "testguest.h").write_text(
            (src / "include" / "testguest.h").read_text() + "\n/* h */\n"),
        lambda: (src / "src" / "extra.c").write_text("int guest_extra_symbol = 1;\n"),
        lambda: (src / "Makefile").write_text((src / "Makefile").read_text() + "\n# m\n"),
    ]
    before = first
    for change in changes:
        change()
        kit_build.build(linux=False, kitdir=kitdir)
        now = stamp(elf)
        assert now != before
        before = now
    assert b"guest_extra_symbol" in elf.read_bytes()
