"""QEMU's number syntax for qemu-img arguments (appliance.qemu_numbers).

Every value below is what qemu-img 7.2 made of the text (measure --size and
bench -o print the number it read; create -o refcount_bits= the option's).
"""

from __future__ import annotations

import pytest

from appliance.qemu_numbers import NumberError, strtosz, strtou64

K, M = 1 << 10, 1 << 20


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("512", 512), ("00010", 10), ("1k", K), ("1K", K), ("1b", 1), ("1B", 1), ("1t", 1 << 40),
    ("0010k", 10 * K), ("0x100000", M), ("0X100000", M), ("0x1b", 0x1B), ("0x1k", K), ("0x1K", K),
    ("0x1g", 1 << 30), (" 1M", M), ("\t1k", K), ("\n1k", K), ("+1M", M), ("1.", 1), ("1.0", 1),
    ("0.00", 0), ("1.B", 1), ("1.0B", 1), ("1.k", K), ("1.t", 1 << 40), ("1.5k", 1536),
    ("01.5k", 1536), ("0.5k", 512), ("1.3333333k", 1365), ("2.7182818M", 2850325),
    ("0.001k", 1), ("0.0000000001k", 0), ("1.000000000000000000001k", K),
    ("1.9999999999999999999999k", K),  # the fraction rounds to 1.0: C's conversion gives 0
    ("12345.6789G", 13256071780604), ("7.5E", 8646911284551352320),
    ("18446744073709551615", (1 << 64) - 1),
])
def test_sizes_qemu_img_takes(text: str, value: int) -> None:
    assert strtosz(text, warn=None) == value


@pytest.mark.parametrize("text", [
    "", "abc", "10KB", "1kb", "1_000", "1.5", "0.5", "0.1", ".5k", ".k", "1M ", "1k ", "1e3", "1.e5",
    "1.5e3k", "0x1.5", "0x1.k", "0x", "0x-1", "0x 1", "-0", " -1", "-1k", "1..k", "1.5.k", "1.5kB",
    "1.5B", "1.k5", "99999999999999999999k", "99999999999999999999.5k", "1\u0665k", "1.\u0665k",
])
def test_text_qemu_img_refuses_as_a_size(text: str) -> None:
    with pytest.raises(NumberError) as err:
        strtosz(text, warn=None)
    assert not err.value.out_of_range


@pytest.mark.parametrize("text", [
    "18446744073709551616", "99999999999999999999", "-99999999999999999999", "16E", "17179869183.99999999e",
    "0x10000000000000000",
])
def test_sizes_past_64_bits_are_out_of_range(text: str) -> None:
    # qemu-img words these "Must be between …" rather than "You may use k, M, …".
    with pytest.raises(NumberError) as err:
        strtosz(text, warn=None)
    assert err.value.out_of_range


def test_a_suffix_on_hex_is_taken_with_qemus_deprecation_warning(capsys: pytest.CaptureFixture[str]) -> None:
    assert strtosz("0x2k") == 2048
    assert capsys.readouterr().err == ("appliance img: warning: Using a multiplier suffix on hex "
                                       "numbers is deprecated: 0x2k\n")
    assert strtosz("0x20") == 32
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("text", "value"), [
    ("16", 16), ("0x10", 16), ("020", 16), (" 16", 16), ("+16", 16), ("-0", 0), ("-1", (1 << 64) - 1),
])
def test_plain_numbers_read_as_cs_strtoull(text: str, value: int) -> None:
    assert strtou64(text) == value


@pytest.mark.parametrize(("text", "out_of_range"), [
    ("", False), ("abc", False), ("16k", False), ("0x", False), ("0x10x", False), ("08", False),
    ("0b1", False), ("1_6", False), ("1e3", False), ("99999999999999999999", True),
])
def test_plain_numbers_qemu_img_refuses(text: str, out_of_range: bool) -> None:
    with pytest.raises(NumberError) as err:
        strtou64(text)
    assert err.value.out_of_range == out_of_range
