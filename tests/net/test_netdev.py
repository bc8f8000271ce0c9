"""-netdev parsing in QEMU's syntax, and opening links from it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import ConfigError
from appliance.net.netdev import (
    BridgeNetdev,
    DgramNetdev,
    StreamNetdev,
    TapNetdev,
    UserNetdev,
    open_netdev,
    parse_netdev,
)


def test_tap_with_qemu_options() -> None:
    cfg = parse_netdev("tap,id=n0,ifname=tap7,script=no,downscript=no,queues=4,vnet_hdr=off,br=lab0")
    assert cfg == TapNetdev("n0", ifname="tap7", bridge="lab0", vnet_hdr=False, queues=4)


def test_bridge_defaults_to_br0() -> None:
    assert parse_netdev("bridge,id=b") == BridgeNetdev("b", "br0")
    assert parse_netdev("bridge,id=b,br=virbr0") == BridgeNetdev("b", "virbr0")


def test_dgram_inet_pair() -> None:
    cfg = parse_netdev(
        "dgram,id=d,local.type=inet,local.host=127.0.0.1,local.port=4000,"
        "remote.type=inet,remote.host=127.0.0.1,remote.port=4001"
    )
    assert cfg == DgramNetdev("d", ("127.0.0.1", 4000), ("127.0.0.1", 4001))


def test_old_socket_udp_form_is_a_dgram_link() -> None:
    cfg = parse_netdev("socket,id=s,udp=127.0.0.1:5001,localaddr=127.0.0.1:5000")
    assert cfg == DgramNetdev("s", ("127.0.0.1", 5000), ("127.0.0.1", 5001))


def test_dgram_unix_pair_and_multicast_groups_parse_as_qemu_spells_them() -> None:
    cfg = parse_netdev("dgram,id=u,local.type=unix,local.path=/run/a.sock,remote.type=unix,remote.path=/run/b.sock")
    assert cfg == DgramNetdev("u", "/run/a.sock", "/run/b.sock") and not cfg.multicast
    cfg = parse_netdev("dgram,id=m,remote.type=inet,remote.host=230.0.0.1,remote.port=1234")
    assert cfg == DgramNetdev("m", None, ("230.0.0.1", 1234)) and cfg.multicast
    cfg = parse_netdev("dgram,id=m,remote.type=inet,remote.host=230.0.0.1,remote.port=1234,"
                       "local.type=inet,local.host=127.0.0.1,local.port=0")
    assert cfg == DgramNetdev("m", ("127.0.0.1", 0), ("230.0.0.1", 1234)) and cfg.multicast
    cfg = parse_netdev("socket,id=s,mcast=230.0.0.1:1234,localaddr=127.0.0.1")
    assert cfg == DgramNetdev("s", ("127.0.0.1", 0), ("230.0.0.1", 1234)) and cfg.multicast


def test_socket_listen_and_connect_are_streams() -> None:
    assert parse_netdev("socket,id=s,listen=:7000") == StreamNetdev("s", ("0.0.0.0", 7000), listen=True)
    assert parse_netdev("socket,id=s,connect=127.0.0.1:7000") == StreamNetdev(
        "s", ("127.0.0.1", 7000), listen=False
    )


def test_stream_unix_and_inet() -> None:
    assert parse_netdev("stream,id=x,server=on,addr.type=unix,addr.path=/tmp/s") == StreamNetdev(
        "x", "/tmp/s", listen=True
    )
    cfg = parse_netdev("stream,id=x,server=off,addr.type=inet,addr.host=127.0.0.1,addr.port=9000,reconnect=2")
    assert cfg == StreamNetdev("x", ("127.0.0.1", 9000), listen=False, reconnect=2.0)


def test_first_id_wins_as_in_qemuopts() -> None:
    """QEMU takes the first ``id=`` of an option (``info network`` lists n0 for
    ``-netdev user,id=n0,id=n1``), and the last value of any other repeated key."""
    cfg = parse_netdev("user,id=n0,id=n1,hostname=a,hostname=b")
    assert cfg.id == "n0"
    assert cfg.config.hostname == "b"  # type: ignore[attr-defined]


def test_user_netdev_takes_slirp_options() -> None:
    cfg = parse_netdev("user,id=u,hostfwd=tcp::2222-:22,net=10.1.0.0/24")
    assert isinstance(cfg, UserNetdev) and cfg.id == "u"
    assert str(cfg.config.net) == "10.1.0.0/24"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tap", "Parameter 'id' is missing"),
        ("vde,id=x", "netdev type 'vde' is not supported"),
        ("tap,id=n,bogus=1", "Invalid parameter 'bogus'"),
        ("tap,id=n,queues=0", "'queues' must be at least 1"),
        ("tap,id=n,queues=x", "'queues' expects a number, got 'x'"),
        ("tap,id=n,fd=3,script=no", "script= is invalid with fd="),
        ("tap,id=n,fds=3:4,downscript=/x", "downscript= is invalid with fds="),
        ("tap,id=n,vhost=on", "'vhost=on' is not supported"),
        ("tap,id=n,ifname=much-too-long-name0", "invalid ifname 'much-too-long-name0'"),
        ("tap,id=1bad", "id=1bad: Parameter 'id' expects an identifier"),
        ("dgram,id=d,local.type=unix,local.port=1", "Parameter 'local.path' is missing"),
        ("dgram,id=d,local.type=vsock,local.port=1", "local.type 'vsock' is not supported"),
        ("dgram,id=d,local.type=unix,local.path=/a,remote.type=inet,remote.host=h,remote.port=1",
         "remote and local types must be the same"),
        ("dgram,id=d,remote.type=inet,remote.host=10.0.0.1,remote.port=1", "dgram requires local= parameter"),
        ("dgram,id=d,remote.type=inet,remote.host=230.0.0.1,remote.port=1,local.type=unix,local.path=/a",
         "multicast only takes local.type=inet"),
        ("socket,id=s,mcast=10.0.0.1:5", "mcast '10.0.0.1:5' is not a multicast address"),
        ("dgram,id=d,local.type=inet,local.host=127.0.0.1,local.port=99999", "invalid local.port '99999'"),
        ("socket,id=s", "exactly one of listen=, connect=, mcast= or udp= is required"),
        ("socket,id=s,udp=1.2.3.4:5", "udp= needs localaddr="),
        ("socket,id=s,connect=nohostport", "connect 'nohostport' is not HOST:PORT"),
        ("stream,id=x,addr.type=vsock", "addr.type 'vsock' is not supported"),
        ("bridge,id=b,helper=/usr/lib/qemu/qemu-bridge-helper", "'helper' is not supported"),
    ],
)
def test_bad_netdevs_are_refused_by_name(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_netdev(text)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["tap", "bridge", "dgram", "socket", "stream", "user", "x"]), st.text(max_size=60))
def test_any_netdev_text_parses_or_is_a_config_error(kind: str, rest: str) -> None:
    try:
        parse_netdev(f"{kind},{rest}")
    except ConfigError:
        pass


async def test_open_dgram_netdev_gives_one_backend() -> None:
    cfg = parse_netdev("dgram,id=d,local.type=inet,local.host=127.0.0.1,local.port=0,"
                       "remote.type=inet,remote.host=127.0.0.1,remote.port=9")
    backends, owner = await open_netdev(cfg)
    try:
        assert len(backends) == 1 and backends[0].vnet_hdr_len == 0
        with pytest.raises(ConfigError, match="mq needs a tap"):
            await open_netdev(cfg, queues=2)
    finally:
        owner.close()


def test_nic_feature_properties_follow_qemu_and_the_spec_dependencies() -> None:
    from appliance.nic import constants as C
    from appliance.nic.config import NicConfig

    nic = NicConfig.parse_device("virtio-net-pci,netdev=n0,guest_csum=off,ctrl_vq=off,gso=off")
    off = nic.features_off
    for bit in (C.F_GUEST_CSUM, C.F_GUEST_TSO4, C.F_GUEST_TSO6, C.F_GUEST_ECN, C.F_GUEST_UFO,
                C.F_CTRL_VQ, C.F_CTRL_RX, C.F_CTRL_MAC_ADDR, C.F_MQ, C.F_CTRL_GUEST_OFFLOADS):
        assert off >> bit & 1, bit
    assert not off >> C.F_CSUM & 1 and not off >> C.F_HOST_TSO4 & 1
    # ECN stays while either TSO it rides on stays.
    assert not NicConfig.parse_device("virtio-net-pci,netdev=n0,host_tso4=off").features_off >> C.F_HOST_ECN & 1
    both = NicConfig.parse_device("virtio-net-pci,netdev=n0,host_tso4=off,host_tso6=off").features_off
    assert both >> C.F_HOST_ECN & 1
    for text, message in (
        ("virtio-net-pci,netdev=n0,mq=on,ctrl_vq=off", "mq=on needs ctrl_vq"),
        ("virtio-net-pci,netdev=n0,rx_queue_size=300", "rx_queue_size=300 must be a power of two"),
        ("virtio-net-pci,netdev=n0,tx_queue_size=2048", "tx_queue_size=2048"),
        ("virtio-net-pci,netdev=n0,disable-modern=on", "only the modern"),
        ("virtio-net-pci,netdev=n0,csum=maybe", "csum"),
    ):
        with pytest.raises(ConfigError, match=message):
            NicConfig.parse_device(text)


def test_tap_scripts_default_to_qemus_unless_br_names_the_bridge(monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU runs /etc/qemu-ifup and /etc/qemu-ifdown when no script= is given (here: when they
    are installed); ours put the tap on br= itself, which the default up script would undo."""
    from appliance.net import netdev

    monkeypatch.setattr(netdev.os.path, "isfile", lambda p: p in (netdev.DEFAULT_SCRIPT, netdev.DEFAULT_DOWNSCRIPT))
    cfg = parse_netdev("tap,id=t,ifname=t0")
    assert (cfg.script, cfg.downscript) == ("/etc/qemu-ifup", "/etc/qemu-ifdown")  # type: ignore[union-attr]
    cfg = parse_netdev("tap,id=t,ifname=t0,br=lab0")
    assert (cfg.script, cfg.downscript) == (None, None)  # type: ignore[union-attr]
    cfg = parse_netdev("tap,id=t,ifname=t0,br=lab0,script=/x/up")
    assert (cfg.script, cfg.downscript) == ("/x/up", None)  # type: ignore[union-attr]
    cfg = parse_netdev("tap,id=t,ifname=t0,script=no,downscript=")
    assert (cfg.script, cfg.downscript) == (None, None)  # type: ignore[union-attr]
    monkeypatch.setattr(netdev.os.path, "isfile", lambda p: False)
    cfg = parse_netdev("tap,id=t,ifname=t0")
    assert (cfg.script, cfg.downscript) == (None, None)  # type: ignore[union-attr]
