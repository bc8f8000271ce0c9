"""QEMU option grammar shared by every subcommand."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.cli.options import parse_option, parse_size, split_option
from appliance.errors import ConfigError


def test_double_comma_is_a_literal_comma() -> None:
    assert split_option("file=a,,b.img,if=virtio") == ["file=a,b.img", "if=virtio"]


def test_leading_value_takes_the_implied_key() -> None:
    opts = parse_option("-netdev", "tap,id=n0,ifname=tap0", implied="type")
    assert opts.take("type") == "tap"
    assert opts.require("id") == "n0"
    assert opts.take("ifname") == "tap0"
    opts.finish()


def test_unconsumed_key_is_refused_by_name() -> None:
    opts = parse_option("-drive", "file=x.img,bogus=1")
    opts.take("file")
    with pytest.raises(ConfigError, match="Invalid parameter 'bogus'"):
        opts.finish()


def test_bare_flags_and_their_no_forms() -> None:
    opts = parse_option("-chardev", "socket,id=c,server,nowait", implied="backend", flags=["server", "wait"])
    assert opts.take_bool("server") is True
    assert opts.take_bool("wait", True) is False


def test_repeated_keys_are_all_kept() -> None:
    opts = parse_option("-netdev", "user,id=u,hostfwd=tcp::1-:2,hostfwd=udp::3-:4", implied="type")
    assert opts.take_all("hostfwd") == ["tcp::1-:2", "udp::3-:4"]


def test_bad_boolean_names_the_value() -> None:
    opts = parse_option("-drive", "readonly=maybe")
    with pytest.raises(ConfigError, match="'maybe'"):
        opts.take_bool("readonly")


def test_number_parameter_rejects_text() -> None:
    opts = parse_option("-device", "virtio-blk-pci,num-queues=abc", implied="driver")
    with pytest.raises(ConfigError, match="'abc'"):
        opts.take_int("num-queues")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512M", 512 << 20), ("1G", 1 << 30), ("2g", 2 << 30), ("4096", 4096), ("1.5G", 3 << 29), ("64k", 65536)],
)
def test_sizes_take_qemu_suffixes(text: str, expected: int) -> None:
    assert parse_size(text, "-m") == expected


def test_default_suffix_applies_to_plain_numbers() -> None:
    assert parse_size("256", "-m", default_suffix="M") == 256 << 20


@pytest.mark.parametrize("text", ["", "abc", "12Q", "-5M", "1..2G"])
def test_bad_sizes_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text, "-m")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_option_text_parses_or_raises_config_error(text: str) -> None:
    try:
        opts = parse_option("-x", text, implied="type", flags=["server"])
        opts.finish()
    except ConfigError:
        pass
