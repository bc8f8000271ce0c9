"""Stamps decide which kit parts to rebuild."""

from __future__ import annotations

from pathlib import Path

from appliance.kit.build import paths
from appliance.kit.cache import Stamps, digest, write_atomic


def test_part_is_fresh_only_with_the_same_key_and_its_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    write_atomic(out, b"x")
    stamps = Stamps(tmp_path)
    assert not stamps.fresh("p", "k1", [out])
    stamps.record("p", "k1", note="n")
    assert stamps.fresh("p", "k1", [out])
    assert not stamps.fresh("p", "k2", [out])
    out.unlink()
    assert not stamps.fresh("p", "k1", [out])
    assert stamps.info("p")["note"] == "n"


def test_digest_changes_with_file_contents(tmp_path: Path) -> None:
    f = tmp_path / "src.c"
    f.write_text("int x;")
    before = digest("v1", f)
    f.write_text("int y;")
    assert digest("v1", f) != before
    assert digest("v1", f) == digest("v1", f)


def test_kit_dir_follows_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("APPLIANCE_KIT_DIR", str(tmp_path))
    p = paths()
    assert p.kitdir == tmp_path
    assert p.guest_elf.parent == p.bzimage.parent == p.initramfs.parent == tmp_path
