"""`appliance kit` command line."""

from __future__ import annotations

import pytest

from appliance.cli.main import main
from appliance.kit import paths


def test_path_prints_the_kit_dir_and_parts(capsys) -> None:
    assert main(["kit", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(paths().kitdir)
    assert main(["kit", "path", "guest_elf"]) == 0
    assert capsys.readouterr().out.strip() == str(paths().guest_elf)


@pytest.mark.parametrize("argv", [["kit"], ["kit", "frob"], ["kit", "path", "nothing"],
                                  ["kit", "build", "--guest-only", "--linux-only"]])
def test_bad_arguments_exit_2_with_one_line(argv, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
