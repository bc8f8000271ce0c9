"""NIC command-line options as QEMU spells them."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.net.netdev import TapNetdev, UserNetdev, parse_netdev
from appliance.nic.config import FilterDumpConfig, NicConfig, default_mac, parse_nic


def test_device_options() -> None:
    cfg = NicConfig.parse_device(
        "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc,mq=on,vectors=10,host_mtu=9000,addr=0x5"
    )
    assert cfg == NicConfig("n0", mac=bytes.fromhex("525400aabbcc"), mq=True, vectors=10, host_mtu=9000, addr="0x5")


def test_macs_are_refused_in_each_options_words_as_qemu_refuses_them() -> None:
    """qdev's MAC property takes a multicast address (the guest's driver makes up one); -nic and
    -net nic refuse it, each in its own words, and name no value, so the option as typed does."""
    from appliance.nic.config import parse_legacy_nic

    assert NicConfig.parse_device("virtio-net-pci,mac=01:00:5e:00:00:01").mac == bytes.fromhex("01005e000001")
    with pytest.raises(ConfigError, match=r"^-nic user,mac=01:00:5e:00:00:01: NIC cannot have multicast MAC address$"):
        parse_nic("user,mac=01:00:5e:00:00:01", 0)
    with pytest.raises(ConfigError, match=r"^-net nic,macaddr=03:00:00:00:00:01: NIC cannot have multicast MAC "
                                          r"address \(odd 1st byte\)$"):
        parse_legacy_nic("nic,macaddr=03:00:00:00:00:01")
    for bad in ("zz:00:00:00:00:00", "52:54:00:12:34"):
        with pytest.raises(ConfigError, match=f"^-nic user,mac={bad}: invalid syntax for ethernet address$"):
            parse_nic(f"user,mac={bad}", 0)
        with pytest.raises(ConfigError, match=f"^-net nic,macaddr={bad}: invalid syntax for ethernet address$"):
            parse_legacy_nic(f"nic,macaddr={bad}")


def test_a_nic_may_have_no_netdev() -> None:
    """QEMU makes it and warns that it "has no peer" (the machine's resolve says so)."""
    assert NicConfig.parse_device("virtio-net-pci,id=n1").netdev == ""


def test_mac_bytes_may_be_split_by_dashes() -> None:
    """As QEMU's qdev MAC property."""
    assert NicConfig.parse_device("virtio-net-pci,netdev=n,mac=52-54-00-aa-bb-cc").mac == bytes.fromhex("525400aabbcc")


def test_default_macs_follow_qemu() -> None:
    assert default_mac(0).hex(":") == "52:54:00:12:34:56"
    assert default_mac(1).hex(":") == "52:54:00:12:34:57"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("virtio-net-pci,netdev=n,mac=zz:54:00:aa:bb:cc",
         "Property 'virtio-net-device.mac' doesn't take value 'zz:54:00:aa:bb:cc'"),
        ("virtio-net-pci,netdev=n,mac=", "doesn't take value ''"),
        ("virtio-net-pci,netdev=n,mac=52:54:0:12:34:56", "doesn't take value '52:54:0:12:34:56'"),
        ("virtio-net-pci,netdev=n,host_mtu=20", "'host_mtu' must be at least 68"),
        ("virtio-net-pci,netdev=n,frob=1", "Invalid parameter 'frob'"),
        ("e1000,netdev=n", "'e1000' is not a NIC"),
    ],
)
def test_bad_device_options(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NicConfig.parse_device(text)


def test_nic_shorthand_makes_netdev_and_device() -> None:
    nd, nic = parse_nic("tap,ifname=tap3,script=no,downscript=no,model=virtio-net-pci,mac=52:54:00:00:00:09", 0)
    assert nd == TapNetdev("#net0", ifname="tap3")
    assert nic == NicConfig("#net0", mac=bytes.fromhex("525400000009"))


def test_nic_user_with_hostfwd() -> None:
    nd, nic = parse_nic("user,hostfwd=tcp::2222-:22", 1)
    assert isinstance(nd, UserNetdev) and nd.id == "#net1" and nic is not None and nic.netdev == "#net1"


def test_nic_id_names_its_netdev_as_in_qemu() -> None:
    # QEMU's -nic id= is the netdev's id: hostfwd_add ID … and info network name it.
    nd, nic = parse_nic("user,id=wan,hostfwd=tcp::2222-:22", 2)
    assert isinstance(nd, UserNetdev) and nd.id == "wan" and nic is not None and nic.netdev == "wan"
    nd, nic = parse_nic("tap,id=t0,ifname=tap3,script=no,downscript=no", 0)
    assert nd == TapNetdev("t0", ifname="tap3") and nic is not None and nic.netdev == "t0"
    with pytest.raises(ConfigError, match="id"):
        parse_nic("user,id=1bad", 0)


def test_nic_user_takes_bare_keys_as_netdev_user_does() -> None:
    nd, _ = parse_nic("user,restrict", 0)
    assert isinstance(nd, UserNetdev) and nd.config.restrict
    nd, _ = parse_nic("user,norestrict", 0)
    assert isinstance(nd, UserNetdev) and not nd.config.restrict


def test_nic_none_and_bad_model() -> None:
    assert parse_nic("none", 0) == (None, None)
    with pytest.raises(ConfigError, match="model 'e1000' is not supported"):
        parse_nic("user,model=e1000", 0)


def test_filter_dump() -> None:
    cfg = FilterDumpConfig.parse("filter-dump,id=f0,netdev=n0,file=/tmp/x.pcap,maxlen=128")
    assert cfg == FilterDumpConfig("f0", "n0", Path("/tmp/x.pcap"), 128)
    with pytest.raises(ConfigError, match="Parameter 'file' is missing"):
        FilterDumpConfig.parse("filter-dump,id=f0,netdev=n0")
    with pytest.raises(ConfigError, match="Parameter 'queue' does not accept value 'bogus'"):
        FilterDumpConfig.parse("filter-dump,id=f0,netdev=n0,file=x,queue=bogus")


@pytest.mark.parametrize("option", ["-nic", "-netdev"])
def test_an_id_a_user_gives_must_be_a_qemu_identifier_even_if_it_looks_implicit(option: str) -> None:
    """QEMU refuses ``id=#net1`` (Parameter 'id' expects an identifier); only the id ``-nic``
    makes for itself may take that form, else ``-nic user,id=#net1 -nic user`` clashed."""
    with pytest.raises(ConfigError, match="id=#net1: Parameter 'id' expects an identifier"):
        if option == "-nic":
            parse_nic("user,id=#net1", 0)
        else:
            parse_netdev("user,id=#net1")


@pytest.mark.parametrize("text", ["id=n0,type=user,restrict", "id=n0,type=user,norestrict,restrict"])
def test_bare_user_keys_are_taken_wherever_type_user_stands(text: str) -> None:
    """QEMU 7.2 takes ``-netdev id=n0,type=user,restrict`` (and ``-nic model=…,type=user,restrict``)
    as restrict=on, with its short-form warning; the type need not come first."""
    nd = parse_netdev(text)
    assert isinstance(nd, UserNetdev) and nd.config.restrict
    nd2, _nic = parse_nic("model=virtio-net-pci," + text.removeprefix("id=n0,"), 0)
    assert isinstance(nd2, UserNetdev) and nd2.config.restrict


def test_bare_boolean_properties_as_qemu_takes_them() -> None:
    """``-device virtio-net-pci,netdev=n,mq``: QEMU 7.2 reads a bare property as on (with a warning)."""
    cfg = NicConfig.parse_device("virtio-net-pci,netdev=n,mq,nocsum")
    assert cfg.mq and cfg == NicConfig.parse_device("virtio-net-pci,netdev=n,mq=on,csum=off")
