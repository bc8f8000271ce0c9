"""The JSON forms of -blockdev, -netdev and -object check each member's JSON type as QEMU 7.2's
QAPI visitor does, in its words (cli.json_types), and still take what libvirt writes.

Each refusal here is also asked of the real qemu-system-x86_64, whose first error line (after
``qemu-system-x86_64: OPTION TEXT: ``) must be the same.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appliance.cli import run
from appliance.cli.json_types import List, Union, check
from appliance.errors import ConfigError
from appliance.storage.blockdev import BlockdevConfig, resolve_blockdev

F = "/tmp/appliance-json-types.img"  # never opened: every case is refused while parsing
_FILE = f'"driver":"file","filename":"{F}","node-name":"a"'
_QCOW2 = '"driver":"qcow2","node-name":"a","file":"f"'



def bad(name: str, want: str) -> str:
    return f"Invalid parameter type for '{name}', expected: {want}"


# (option, JSON text, QEMU 7.2's message)
CASES: list[tuple[str, str, str]] = [
    # -blockdev: the common members, file, raw, qcow2, the nested cache/file/backing objects
    ("-blockdev", f'{{{_FILE},"read-only":"on"}}', bad("read-only", "boolean")),
    ("-blockdev", f'{{{_FILE},"read-only":1}}', bad("read-only", "boolean")),
    ("-blockdev", f'{{{_FILE},"read-only":null}}', bad("read-only", "boolean")),
    ("-blockdev", f'{{{_FILE},"auto-read-only":"yes"}}',
     bad("auto-read-only", "boolean")),
    ("-blockdev", f'{{{_FILE},"force-share":"off"}}', bad("force-share", "boolean")),
    ("-blockdev", f'{{{_FILE},"discard":true}}', bad("discard", "string")),
    ("-blockdev", f'{{{_FILE},"detect-zeroes":false}}', bad("detect-zeroes", "string")),
    ("-blockdev", f'{{{_FILE},"cache":{{"direct":"yes"}}}}', bad("cache.direct", "boolean")),
    ("-blockdev", f'{{{_FILE},"cache":{{"no-flush":"on"}}}}',
     bad("cache.no-flush", "boolean")),
    ("-blockdev", f'{{{_FILE},"cache":"none"}}', bad("cache", "object")),
    ("-blockdev", f'{{{_FILE},"cache":["x"]}}', bad("cache", "object")),
    ("-blockdev", '{"driver":"file","filename":["x","y"],"node-name":"a"}',
     bad("filename", "string")),
    ("-blockdev", '{"driver":"file","filename":7,"node-name":"a"}',
     bad("filename", "string")),
    ("-blockdev", f'{{"driver":"file","filename":"{F}","node-name":5}}',
     bad("node-name", "string")),
    ("-blockdev", '{"driver":5}', bad("driver", "string")),
    ("-blockdev", f'{{{_FILE},"locking":true}}', bad("locking", "string")),
    ("-blockdev", f'{{{_FILE},"aio":1}}', bad("aio", "string")),
    ("-blockdev", f'{{{_FILE},"aio-max-batch":"8"}}', bad("aio-max-batch", "integer")),
    ("-blockdev", f'{{{_FILE},"discard":"unmap","read-only":"x"}}',
     bad("read-only", "boolean")),
    ("-blockdev", f'{{{_FILE},"read-only":"x","discard":5}}',  # discard comes first in QAPI's order
     bad("discard", "string")),
    ("-blockdev", f'{{{_FILE},"bogus":1,"read-only":"x"}}', bad("read-only", "boolean")),
    ("-blockdev", '{"driver":"raw","node-name":"a","file":5}', bad("file", "BlockdevRef")),
    ("-blockdev", '{"driver":"raw","node-name":"a","file":null}',
     bad("file", "BlockdevRef")),
    ("-blockdev", '{"driver":"raw","node-name":"a","file":"f","offset":"1"}',
     bad("offset", "integer")),
    ("-blockdev", '{"driver":"raw","node-name":"a","file":"f","size":1.5}',
     bad("size", "integer")),
    ("-blockdev", f'{{{_QCOW2},"l2-cache-size":"1M"}}', bad("l2-cache-size", "integer")),
    ("-blockdev", f'{{{_QCOW2},"l2-cache-size":true}}', bad("l2-cache-size", "integer")),
    ("-blockdev", f'{{{_QCOW2},"lazy-refcounts":"on"}}', bad("lazy-refcounts", "boolean")),
    ("-blockdev", f'{{{_QCOW2},"backing":5}}', bad("backing", "BlockdevRefOrNull")),
    ("-blockdev", f'{{{_QCOW2},"backing":[]}}', bad("backing", "BlockdevRefOrNull")),
    ("-blockdev", f'{{{_QCOW2},"backing":{{"driver":"file","filename":["a"]}}}}',
     bad("backing.filename", "string")),
    ("-blockdev", '{"driver":"qcow2","node-name":"a","file":{"driver":"file","filename":5}}',
     bad("file.filename", "string")),
    ("-blockdev", '{"driver":"qcow2","node-name":"a","file":{"driver":"file","filename":"x","cache":{"direct":1}}}',
     bad("file.cache.direct", "boolean")),
    ("-blockdev", '{"driver":"qcow2","node-name":"a","file":{"driver":"file","filename":"x","read-only":"y"}}',
     bad("file.read-only", "boolean")),
    ("-blockdev", '{"driver":"qcow2","node-name":"a","file":{"driver":"qcow2","file":5}}',
     bad("file", "BlockdevRef")),  # QEMU names it without its path
    ("-blockdev", '{"driver":"qcow2","node-name":"a","file":{"filename":"x"}}', "Parameter 'file.driver' is missing"),
    ("-blockdev", '{"driver":"qcow2","node-name":"a","file":{"driver":true}}',
     bad("file.driver", "string")),
    ("-blockdev", '{"driver":"qcow2","node-name":"a","read-only":"x","file":{"driver":"file","filename":5}}',
     bad("read-only", "boolean")),
    # -netdev
    ("-netdev", '{"type":"tap","id":"n","vhost":"on"}', bad("vhost", "boolean")),
    ("-netdev", '{"type":"tap","id":"n","vnet_hdr":"off"}', bad("vnet_hdr", "boolean")),
    ("-netdev", '{"type":"tap","id":"n","ifname":5}', bad("ifname", "string")),
    ("-netdev", '{"type":"tap","id":"n","fd":3}', bad("fd", "string")),
    ("-netdev", '{"type":"tap","id":"n","script":false}', bad("script", "string")),
    ("-netdev", '{"type":"tap","id":"n","queues":"2"}', "Parameter 'queues' expects uint64"),
    ("-netdev", '{"type":"tap","id":"n","queues":4294967296}', "Parameter 'queues' expects uint32_t"),
    ("-netdev", '{"type":"tap","id":"n","poll-us":1.5}', "Parameter 'poll-us' expects uint64"),
    ("-netdev", '{"type":"tap","id":"n","sndbuf":"1M"}', "Parameter 'sndbuf' expects uint64"),
    ("-netdev", '{"type":"tap","id":"n","vhostforce":1}', bad("vhostforce", "boolean")),
    ("-netdev", '{"type":"tap","id":5}', bad("id", "string")),
    ("-netdev", '{"type":5,"id":"n"}', bad("type", "string")),
    ("-netdev", '{"type":"tap","id":"n","vhost":"on","ifname":5}', bad("ifname", "string")),
    ("-netdev", '{"type":"bridge","id":"n","br":["br0"]}', bad("br", "string")),
    ("-netdev", '{"type":"bridge","id":"n","helper":1}', bad("helper", "string")),
    ("-netdev", '{"type":"socket","id":"n","listen":1234}', bad("listen", "string")),
    ("-netdev", '{"type":"socket","id":"n","udp":true}', bad("udp", "string")),
    ("-netdev", '{"type":"stream","id":"n","server":"on","addr":{"type":"unix","path":"/s"}}',
     bad("server", "boolean")),
    ("-netdev", '{"type":"stream","id":"n","addr":"unix:/s"}', bad("addr", "object")),
    ("-netdev", '{"type":"stream","id":"n","addr":{"path":"/s"}}', "Parameter 'addr.type' is missing"),
    ("-netdev", '{"type":"stream","id":"n","addr":{"type":"inet","host":"h","port":22}}',
     bad("addr.port", "string")),
    ("-netdev", '{"type":"stream","id":"n","addr":{"type":"inet","host":"h","port":"22","numeric":"on"}}',
     bad("addr.numeric", "boolean")),
    ("-netdev", '{"type":"stream","id":"n","addr":{"type":"inet","host":"h","port":"22","to":"30"}}',
     "Parameter 'addr.to' expects uint64"),
    ("-netdev", '{"type":"stream","id":"n","addr":{"type":"inet","host":"h","port":"22","to":70000}}',
     "Parameter 'to' expects uint16_t"),
    ("-netdev", '{"type":"stream","id":"n","addr":{"type":"unix","path":"/s","abstract":"yes"}}',
     bad("addr.abstract", "boolean")),
    ("-netdev", '{"type":"stream","id":"n","addr":{"type":"unix","path":"/s","tight":0}}',
     bad("addr.tight", "boolean")),
    ("-netdev", '{"type":"stream","id":"n","addr":{"type":"fd","str":3}}',
     bad("addr.str", "string")),
    ("-netdev", '{"type":"dgram","id":"n","local":{"type":"inet","host":"127.0.0.1","port":5000}}',
     bad("local.port", "string")),
    ("-netdev", '{"type":"dgram","id":"n","local":{"type":"unix","path":"/a"},"remote":{"type":"unix","path":7}}',
     bad("remote.path", "string")),
    ("-netdev", '{"type":"dgram","id":"n","remote":["x"]}', bad("remote", "object")),
    ("-netdev", '{"type":"vhost-user","id":"n","chardev":"c","queues":"2"}',
     bad("queues", "integer")),
    ("-netdev", '{"type":"vhost-user","id":"n","chardev":"c","vhostforce":"on"}',
     bad("vhostforce", "boolean")),
    ("-netdev", '{"type":"user","id":"n","ipv4":"on"}', bad("ipv4", "boolean")),
    # -object
    ("-object", '{"qom-type":"iothread","id":"i","poll-max-ns":"5"}',
     bad("poll-max-ns", "integer")),
    ("-object", '{"qom-type":"iothread","id":"i","poll-grow":1.5}', bad("poll-grow", "integer")),
    ("-object", '{"qom-type":"iothread","id":"i","aio-max-batch":"1","poll-grow":"1"}',
     bad("aio-max-batch", "integer")),
    ("-object", '{"qom-type":"iothread","id":"i","thread-pool-max":"1","thread-pool-min":"1"}',
     bad("thread-pool-min", "integer")),
    ("-object", '{"qom-type":"iothread","id":5}', bad("id", "string")),
    ("-object", '{"qom-type":5}', bad("qom-type", "string")),
    ("-object", '{"qom-type":"rng-random","id":"r","filename":5}', bad("filename", "string")),
    ("-object", '{"qom-type":"rng-random","id":"r","opened":"on","filename":5}',
     bad("opened", "boolean")),
    ("-object", '{"qom-type":"rng-builtin","id":"r","opened":"on"}', bad("opened", "boolean")),
    ("-object", '{"qom-type":"filter-dump","id":"f","netdev":"n","file":"x","maxlen":"5"}',
     "Parameter 'maxlen' expects uint64"),
    ("-object", '{"qom-type":"filter-dump","id":"f","netdev":"n","file":"x","maxlen":-1}',
     "Parameter 'maxlen' expects uint32_t"),
    ("-object", '{"qom-type":"filter-dump","id":"f","netdev":"n","file":"x","maxlen":5000000000}',
     "Parameter 'maxlen' expects uint32_t"),
    ("-object", '{"qom-type":"filter-dump","id":"f","netdev":"n","file":"x","status":true}',
     bad("status", "string")),
    ("-object", '{"qom-type":"filter-dump","id":"f","netdev":5,"file":"x"}',
     bad("netdev", "string")),
    ("-object", '{"qom-type":"filter-dump","id":"f","netdev":"n","file":["x"]}',
     bad("file", "string")),
    ("-object", '{"qom-type":"filter-dump","id":"f","netdev":"n","file":"x","queue":1}',
     bad("queue", "string")),
    ("-object", '{"qom-type":"memory-backend-ram","id":"m","size":"1M"}', "Parameter 'size' expects uint64"),
    ("-object", '{"qom-type":"memory-backend-ram","id":"m","size":1,"share":"on"}',
     bad("share", "boolean")),
    ("-object", '{"qom-type":"memory-backend-ram","id":"m","host-nodes":[70000],"share":"x"}',
     "Parameter 'null' expects uint16_t"),
    ("-object", '{"qom-type":"memory-backend-ram","id":"m","host-nodes":5}',
     bad("host-nodes", "array")),
    ("-object", '{"qom-type":"memory-backend-ram","id":"m","host-nodes":["0"]}',
     "Parameter 'host-nodes[0]' expects uint64"),
    ("-object", '{"qom-type":"memory-backend-file","id":"m","size":1,"mem-path":5,"align":"x"}',
     "Parameter 'align' expects uint64"),
    ("-object", '{"qom-type":"memory-backend-memfd","id":"m","size":1,"seal":"x","hugetlb":"x"}',
     bad("hugetlb", "boolean")),
    # numbers at the edges of QAPI's readers, null, missing discriminators, deeper nesting
    ("-netdev", '{"type":"tap","id":"n","queues":-1}', "Parameter 'queues' expects uint32_t"),
    ("-netdev", '{"type":"stream","id":"n","addr":{"type":"inet","host":"h","port":"1","to":-1}}',
     "Parameter 'to' expects uint16_t"),
    ("-netdev", '{"type":"stream","id":"n","addr":{"type":"inet","host":"h","port":"1","keep-alive":"on"}}',
     bad("addr.keep-alive", "boolean")),
    ("-netdev", '{"type":"stream","id":"n","addr":{"type":"vsock","cid":3,"port":"1"}}', bad("addr.cid", "string")),
    ("-netdev", '{"type":"stream","id":"n","addr":{"type":5}}', bad("addr.type", "string")),
    ("-netdev", '{"type":"socket","id":"n","fd":null}', bad("fd", "string")),
    ("-netdev", '{"id":"n"}', "Parameter 'type' is missing"),
    ("-netdev", '{"type":"tap","id":"n","sndbuf":-5,"vhost":"x"}', bad("vhost", "boolean")),
    ("-blockdev", '{"driver":"qcow2","node-name":"a","file":{"driver":"qcow2","file":{"driver":"file","filename":1}}}',
     bad("file.file.filename", "string")),
    ("-blockdev", f'{{{_QCOW2},"backing":{{"driver":"qcow2","file":"x","backing":7}}}}',
     bad("backing", "BlockdevRefOrNull")),
    ("-blockdev", f'{{{_QCOW2},"data-file":5}}', bad("data-file", "BlockdevRef")),
    ("-blockdev", f'{{{_QCOW2},"overlap-check":5}}', bad("overlap-check", "Qcow2OverlapChecks")),
    ("-blockdev", f'{{{_QCOW2},"cache-clean-interval":9223372036854775808}}', bad("cache-clean-interval", "integer")),
    ("-blockdev", '{"driver":"file","node-name":"a","filename":"x","drop-cache":"on"}', bad("drop-cache", "boolean")),
    ("-blockdev", '{"node-name":"a","filename":"x"}', "Parameter 'driver' is missing"),
    # a mandatory member is missed at its place in QAPI's order, before a bad type after it
    ("-blockdev", '{"driver":"file","node-name":"a","aio":5}', "Parameter 'filename' is missing"),
    ("-blockdev", '{"driver":"raw","node-name":"a","offset":"x"}', "Parameter 'file' is missing"),
    ("-blockdev", '{"driver":"qcow2","node-name":"a","file":{"driver":"file","locking":1}}',
     "Parameter 'file.filename' is missing"),
    ("-blockdev", '{"node-name":5}', "Parameter 'driver' is missing"),  # driver comes first
    ("-object", '{"qom-type":"iothread","id":"i","poll-max-ns":null}', bad("poll-max-ns", "integer")),
    ("-object", '{"qom-type":"memory-backend-ram","id":"m","size":-1,"dump":"x"}', bad("dump", "boolean")),
    ("-object", '{"qom-type":"memory-backend-ram","id":"m","size":1.0}', "Parameter 'size' expects uint64"),
    ("-object", '{"id":"x"}', "Parameter 'qom-type' is missing"),
    # each branch's table holds all of QEMU 7.2's members, so an unknown one is QEMU's refusal
    ("-object", '{"qom-type":"iothread","id":"i","bogus":1}', "Parameter 'bogus' is unexpected"),
    ("-object", '{"qom-type":"rng-random","id":"r","filename":"/dev/urandom","x":1}',
     "Parameter 'x' is unexpected"),
    ("-netdev", '{"type":"user","id":"n","bogus":1}', "Parameter 'bogus' is unexpected"),
    ("-netdev", '{"type":"tap","id":"n","bogus":1}', "Parameter 'bogus' is unexpected"),
    ("-netdev", '{"type":"stream","id":"n","addr":{"type":"unix","path":"/s","x":1}}',
     "Parameter 'addr.x' is unexpected"),
]


def _ours(option: str, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        run.to_config(run.parse_args(["-kernel", "k", option, text]))
    message = str(err.value)
    assert message.startswith(f"{option}: "), message
    return message.removeprefix(f"{option}: ")


def _qemu(option: str, text: str) -> str:
    proc = subprocess.run(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", option, text],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
    )
    first = (proc.stderr.splitlines() or [""])[0]
    # (QEMU names the option in most of its refusals, not in all)
    return first.removeprefix(f"qemu-system-x86_64: {option} {text}: ").removeprefix("qemu-system-x86_64: ")


@pytest.mark.parametrize(("option", "text", "message"), CASES)
def test_a_wrong_json_type_is_refused_in_qemus_words(option: str, text: str, message: str) -> None:
    assert _ours(option, text) == message


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_qemu_refuses_each_case_in_the_same_words() -> None:
    with ThreadPoolExecutor(8) as pool:
        said = list(pool.map(lambda case: _qemu(case[0], case[1]), CASES))
    wrong = [(option, text, want, got) for (option, text, want), got in zip(CASES, said, strict=True) if got != want]
    assert wrong == []


def test_the_cli_prints_one_line_and_exits_2() -> None:
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "run", "-blockdev", f'{{{_FILE},"read-only":"on"}}'],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == ("appliance run: -blockdev: Invalid parameter type for 'read-only', "
                           "expected: boolean\n")


# --- what libvirt writes keeps working ----------------------------------------------------


def test_libvirts_file_and_format_nodes(tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(1 << 16))
    storage = BlockdevConfig.parse(
        f'{{"driver":"file","filename":"{image}","node-name":"libvirt-1-storage",'
        '"auto-read-only":true,"discard":"unmap"}')
    fmt = BlockdevConfig.parse(
        '{"node-name":"libvirt-1-format","read-only":false,"discard":"unmap","driver":"raw",'
        '"file":"libvirt-1-storage"}')
    qcow2 = BlockdevConfig.parse(
        '{"node-name":"libvirt-2-format","read-only":false,"discard":"unmap","driver":"qcow2",'
        '"file":"libvirt-1-storage","backing":null}')
    assert (storage.driver, storage.filename, storage.discard) == ("file", image, "unmap")
    assert (fmt.file, fmt.read_only, qcow2.file, qcow2.driver) == ("libvirt-1-storage", False,
                                                                   "libvirt-1-storage", "qcow2")
    nodes = {n.node_name: n for n in (storage, fmt)}
    src = resolve_blockdev(nodes, "libvirt-1-format", what="-device")
    assert (src.path, src.discard, src.read_only) == (image, "unmap", False)


def test_libvirts_cache_none_on_both_nodes(tmp_path: Path) -> None:
    """libvirt's <driver cache='none'/> puts the cache object on the format node too."""
    image = tmp_path / "d.qcow2"
    image.write_bytes(b"")
    cache = '"cache":{"direct":true,"no-flush":false}'
    storage = BlockdevConfig.parse(
        f'{{"driver":"file","filename":"{image}","node-name":"libvirt-1-storage",{cache},'
        '"auto-read-only":true,"discard":"unmap","aio":"native"}')
    fmt = BlockdevConfig.parse(
        f'{{"node-name":"libvirt-1-format","read-only":false,{cache},"driver":"qcow2",'
        '"file":"libvirt-1-storage","backing":null}')
    src = resolve_blockdev({n.node_name: n for n in (storage, fmt)}, "libvirt-1-format",
                           what="-device", check_path=False)
    assert (src.fmt, src.cache, src.aio) == ("qcow2", "none", "native")
    # The key=value form, as a user copies it from QEMU's docs.
    kv = BlockdevConfig.parse("driver=qcow2,node-name=q,file=libvirt-1-storage,cache.direct=on,cache.no-flush=off")
    assert (kv.cache_direct, kv.no_flush, kv.file) == (True, False, "libvirt-1-storage")


def test_inline_file_nodes_and_cache_objects() -> None:
    cfg = BlockdevConfig.parse(
        '{"driver":"qcow2","node-name":"a","read-only":true,"l2-cache-size":1048576,'
        '"file":{"driver":"file","filename":"/x.qcow2","cache":{"direct":true,"no-flush":false},'
        '"aio":"native","locking":"off"}}')
    assert (cfg.filename, cfg.cache_direct, cfg.aio, cfg.locking) == (Path("/x.qcow2"), True, "native", False)
    assert (cfg.read_only, cfg.l2_cache_size) == (True, 1 << 20)
    plain = BlockdevConfig.parse(f'{{{_FILE},"cache":{{"direct":false,"no-flush":true}},"read-only":false}}')
    assert (plain.cache_direct, plain.no_flush) == (False, True)


def test_libvirts_netdevs_and_objects() -> None:
    from appliance.net.netdev import parse_netdev

    stream = parse_netdev('{"type":"stream","id":"n1","server":false,'
                          '"addr":{"type":"unix","path":"/tmp/s"}}')
    dgram = parse_netdev('{"type":"dgram","id":"n2","local":{"type":"inet","host":"127.0.0.1","port":"5000"},'
                         '"remote":{"type":"inet","host":"127.0.0.1","port":"5001"}}')
    tap = parse_netdev('{"type":"tap","id":"hostnet0","ifname":"vnet0","script":"no","downscript":"no",'
                       '"vhost":false,"vnet_hdr":true,"queues":1}')
    assert (stream.id, dgram.id, tap.id) == ("n1", "n2", "hostnet0")
    cfg = run.parse_args([
        "-kernel", "k", "-object", '{"qom-type":"rng-random","id":"objrng0","filename":"/dev/urandom"}',
        "-object", '{"qom-type":"iothread","id":"iothread1","poll-max-ns":32768}',
    ])
    assert cfg is not None


def test_the_checker_takes_what_matches_and_leaves_unknown_members() -> None:
    spec = Union("type", {"type": "string"}, {"a": {"n": "uint32", "l": List("string")}})
    check("-x", {"type": "a", "n": -1 + 2**32, "l": ["p", "q"], "other": [1]}, spec)
    check("-x", {"type": "elsewhere", "n": "anything"}, spec)
    with pytest.raises(ConfigError, match=r"^-x: Parameter 'other' is unexpected$"):
        check("-x", {"type": "a", "other": 1}, spec, closed=True)
    with pytest.raises(ConfigError, match=r"^-x: Invalid parameter type for 'l\[1\]', expected: string$"):
        check("-x", {"type": "a", "l": ["p", 2]}, spec)


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="qemu-storage-daemon is not installed")
@pytest.mark.parametrize(("option", "text"), [
    ("--blockdev", f'{{{_FILE},"cache":{{"direct":"on"}}}}'),
    ("--blockdev", '{"driver":"qcow2","node-name":"a","file":{"driver":"file","filename":"x","locking":false}}'),
    ("--object", '{"qom-type":"iothread","id":"i","poll-max-ns":"5"}'),
    ("--export", "type=bogus,id=e,node-name=a"),
    ("--export", "type=vhost-user-blk,id=e,node-name=a"),
    ("--export", "type=vhost-user-blk,id=e,node-name=a,addr.type=bogus"),
    ("--export", "type=vhost-user-blk,id=e,node-name=a,addr.path=/x"),
])
def test_the_storage_daemon_refuses_as_qemu_storage_daemon(option: str, text: str) -> None:
    import sys

    theirs = subprocess.run(["qemu-storage-daemon", option, text], capture_output=True, text=True, timeout=20)
    ours = subprocess.run([sys.executable, "-m", "appliance", "storage-daemon", option, text],
                          capture_output=True, text=True, timeout=60)
    assert ours.returncode == 2
    assert (ours.stderr.rstrip("\n").removeprefix(f"appliance storage-daemon: {option}: ")
            == theirs.stderr.splitlines()[0].removeprefix(f"qemu-storage-daemon: {option} {text}: "))


# The key=value forms' enum and boolean members, refused in QEMU's words (ours
# names the bad boolean too: ", not 'x'" after QEMU's line).
KEYVAL_CASES = [
    ("-blockdev", f"driver=file,node-name=a,filename={F},aio=x", "Parameter 'aio' does not accept value 'x'"),
    ("-blockdev", f"driver=file,node-name=a,filename={F},discard=on",
     "Parameter 'discard' does not accept value 'on'"),
    ("-blockdev", f"driver=file,node-name=a,filename={F},locking=x",
     "Parameter 'locking' does not accept value 'x'"),
    ("-blockdev", f"driver=file,node-name=a,filename={F},detect-zeroes=x",
     "Parameter 'detect-zeroes' does not accept value 'x'"),
    ("-blockdev", "driver=nope,node-name=a", "Parameter 'driver' does not accept value 'nope'"),
    ("-blockdev", f"driver=file,node-name=a,filename={F},auto-read-only=x",
     "Parameter 'auto-read-only' expects 'on' or 'off'"),
    ("-blockdev", f"driver=file,node-name=a,filename={F},cache.no-flush=2",
     "Parameter 'cache.no-flush' expects 'on' or 'off'"),
    ("-blockdev", "driver=file,node-name=a", "Parameter 'filename' is missing"),
    # the root node's name is checked after the driver's own mandatory members
    ("-blockdev", "driver=file", "Parameter 'filename' is missing"),
    ("-blockdev", "driver=qcow2,read-only=on", "Parameter 'file' is missing"),
    ("-blockdev", f"driver=file,filename={F}", "'node-name' must be specified for the root node"),
    ("-blockdev", f'{{"driver":"file","filename":"{F}"}}', "'node-name' must be specified for the root node"),
    # -drive's legacy readonly is read as read-only, and not both
    ("-drive", f"file={F},readonly=maybe", "Parameter 'read-only' expects 'on' or 'off'"),
    ("-drive", f"file={F},readonly=on,read-only=on",
     "'read-only' and its alias 'readonly' can't be used at the same time"),
    ("-drive", f"file={F},snapshot=2", "Parameter 'snapshot' expects 'on' or 'off'"),
    # -chardev and -mon
    ("-chardev", "null", "chardev: no id specified"),
    ("-chardev", "file,id=c", "chardev: file: no filename given"),
    ("-mon", "bogus=1", "Invalid parameter 'bogus'"),
    ("-mon", "mode=bogus", "Parameter 'mode' does not accept value 'bogus'"),
    ("-smp", "cpus=2,bogus=1", "Parameter 'smp.bogus' is unexpected"),
    # -netdev's key=value forms
    ("-netdev", "tap,id=n,vhost=maybe", "Parameter 'vhost' expects 'on' or 'off'"),
    ("-netdev", "socket,id=n", "exactly one of listen=, connect=, mcast= or udp= is required"),
    ("-netdev", "socket,id=n,bogus=1", "Invalid parameter 'bogus'"),
    ("-netdev", "stream,id=n", "Parameter 'addr' is missing"),
    ("-netdev", "stream,id=n,addr.path=/x", "Parameter 'addr.type' is missing"),
    ("-netdev", "stream,id=n,addr.type=bogus", "Parameter 'type' does not accept value 'bogus'"),
    ("-netdev", "dgram,id=n,local.type=bogus", "Parameter 'type' does not accept value 'bogus'"),
]


def _ours_keyval(option: str, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        run.to_config(run.parse_args(["-kernel", "k", option, text]))
    message = str(err.value).split(": ", 1)[1]
    return re.sub(r", not '[^']*'$", "", message)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_keyval_enum_and_bool_members_are_refused_in_qemus_words() -> None:
    with ThreadPoolExecutor(8) as pool:
        said = list(pool.map(lambda case: _qemu(case[0], case[1]), KEYVAL_CASES))
    assert [got for got in said] == [want for _, _, want in KEYVAL_CASES]
    assert [_ours_keyval(option, text) for option, text, _ in KEYVAL_CASES] == [w for _, _, w in KEYVAL_CASES]
