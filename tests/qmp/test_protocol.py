"""The QMP session's message handling and the real qemu.qmp client against our server (no KVM).

Error classes and texts are QEMU's (qmp-spec.rst §2.4.2 and QEMU's
qmp-dispatch), because clients branch on the class and people grep for the
text.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient

from appliance.qmp.server import JsonSplitter, QmpServer, Session
from tests.conftest import needs_qemu
from tests.qmp.fakes import FakeMachine


def session(negotiated: bool = True) -> Session:
    s = Session(QmpServer(FakeMachine()))
    s.negotiated = negotiated
    return s


async def ex(client: QMPClient, name: str, args: dict[str, Any] | None = None) -> Any:
    """``client.execute`` typed as what it returns here: plain JSON values."""
    return await client.execute(name, args)


async def ask(s: Session, obj: Any) -> dict[str, Any]:
    reply = await s.handle(json.dumps(obj).encode() if not isinstance(obj, bytes) else obj)
    assert reply is not None
    return reply


async def test_commands_before_qmp_capabilities_are_refused_as_command_not_found() -> None:
    s = session(negotiated=False)
    reply = await ask(s, {"execute": "query-status", "id": 7})
    assert reply == {"error": {"class": "CommandNotFound",
                               "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 7}
    assert await ask(s, {"execute": "qmp_capabilities"}) == {"return": {}}
    assert (await ask(s, {"execute": "query-status"}))["return"]["status"] == "running"


async def test_second_qmp_capabilities_and_oob_are_refused() -> None:
    s = session(negotiated=False)
    assert (await ask(s, {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}))["error"][
        "class"] == "GenericError"
    assert not s.negotiated
    await ask(s, {"execute": "qmp_capabilities"})
    again = await ask(s, {"execute": "qmp_capabilities"})
    assert again["error"]["class"] == "CommandNotFound"


async def test_unknown_command_is_command_not_found_and_id_is_echoed_whatever_its_type() -> None:
    s = session()
    for ident in ("abc", 5, [1, {"x": None}], {"k": "v"}):
        reply = await ask(s, {"execute": "no-such-thing", "id": ident})
        assert reply == {"error": {"class": "CommandNotFound",
                                   "desc": "The command no-such-thing has not been found"}, "id": ident}


@pytest.mark.parametrize(
    ("raw", "desc"),
    [
        (b'{"execute": ', "JSON parse error, expecting value"),
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
        (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "stop", "arguments": []}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "stop", "extra": 1}', "QMP input member 'extra' is unexpected"),
        (b'{"exec-oob": "stop"}', "QMP input member 'exec-oob' is unexpected"),
        (b'{"execute": "set_link", "arguments": {"name": "n"}}', "Parameter 'up' is missing"),
        (b'{"execute": "set_link", "arguments": {"name": "n", "up": 1}}',
         "Invalid parameter type for 'up', expected: boolean"),
        (b'{"execute": "stop", "arguments": {"now": true}}', "Parameter 'now' is unexpected"),
        (b'{"execute": "stop", "x": NaN}', "JSON parse error, invalid keyword 'nan'"),
        (b"\xff\xfe", "JSON parse error, invalid utf-8 sequence"),
    ],
)
async def test_malformed_requests_get_generic_error_replies(raw: bytes, desc: str) -> None:
    reply = await ask(session(), raw)
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].lower() == desc.lower()


async def test_set_link_on_an_unknown_nic_is_device_not_found() -> None:
    reply = await ask(session(), {"execute": "set_link", "arguments": {"name": "nic9", "up": False}})
    assert reply["error"] == {"class": "DeviceNotFound", "desc": "Device 'nic9' not found"}


async def test_deeply_nested_request_is_refused_not_a_recursion_crash() -> None:
    deep = b'{"execute": "stop", "id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    reply = await ask(session(), deep)
    assert reply["error"]["class"] == "GenericError"


def test_splitter_finds_objects_without_newlines_and_across_chunks() -> None:
    sp = JsonSplitter()
    text = b'{"execute":"a","id":"}{"}{"execute":"b","arguments":{"x":[1,{"y":"\\"}"}]}}  \n 12 '
    pieces: list[bytes | None] = []
    for i in range(len(text)):
        pieces += sp.feed(text[i : i + 1])
    assert [json.loads(p) for p in pieces if p is not None] == [
        {"execute": "a", "id": "}{"}, {"execute": "b", "arguments": {"x": [1, {"y": '"}'}]}}, 12,
    ]


def test_splitter_knows_single_quoted_strings_and_ends_a_scalar_where_an_object_begins() -> None:
    """As QEMU's json-lexer: '…' is a string too (a "}" in it ends nothing), and junk before
    a request ends where the request's "{" begins, so the request still comes out whole."""
    sp = JsonSplitter()
    text = (b"{'execute':'a','id':'}\\'{\"'}xyz{\"execute\":\"b\"}5[1]\x01{'x':\"'}\"}"
            b'"s"{"execute":"c"}')
    pieces: list[bytes | None] = []
    for i in range(len(text)):
        pieces += sp.feed(text[i : i + 1])
    assert pieces == [b"{'execute':'a','id':'}\\'{\"'}", b"xyz", b'{"execute":"b"}', b"5", b"[1]", b"\x01",
                      b"{'x':\"'}\"}", b'"s"', b'{"execute":"c"}']


async def test_single_quoted_strings_are_read_as_qemu_reads_them() -> None:
    s = session()
    assert (await ask(s, b"{'execute':'query-status'}"))["return"]["status"] == "running"
    reply = await ask(s, b"{'execute':'nope','id':{'k':['a\"b\\'c}', \"d\\'e\"], 'u':'\\u0041\\n'}}")
    assert reply["id"] == {"k": ["a\"b'c}", "d'e"], "u": "A\n"}
    assert reply["error"]["class"] == "CommandNotFound"
    # Unterminated, or a bad escape: a parse error as before.
    for bad in (b"{'execute':'query-status}", b"{'execute':'query-status\\x'}"):
        assert (await ask(s, bad))["error"]["desc"].startswith("JSON parse error")


# Requests after junk or in single quotes, each followed by a marker request whose reply
# ends what it got. The junk's own error is worded differently from QEMU's (xyz: QEMU
# says "invalid keyword 'xyz'", ours "expecting value"); its class, and all the rest, agree.
_SENT = [
    b"{'execute':'nope','id':'a\"b\\'c}'}",
    b'{"execute":"nope","id":"a\\\'b"}',
    b"{'execute':'nope','id':{'k':['x','y\"'],'u':'\\u0041\\n'}}",
    b'xyz{"execute":"nope","id":1}',
    b'5{"execute":"nope","id":2}',
    b'\x01{"execute":"nope","id":3}',
    b'"s"[1]{"execute":"nope","id":4}',
    b"{'execute':'qmp_capabilities','id':'}'}{'execute':'nope','id':5}",
]


async def _replies_to(path: Path) -> list[list[tuple[Any, ...]]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        await asyncio.wait_for(reader.readline(), 10)  # the greeting
        writer.write(b'{"execute":"qmp_capabilities"}\n')
        await asyncio.wait_for(reader.readline(), 10)
        out = []
        for data in _SENT:
            writer.write(data + b'\n{"execute":"nope","id":"end"}\n')
            got: list[tuple[Any, ...]] = []
            while (reply := json.loads(await asyncio.wait_for(reader.readline(), 10))).get("id") != "end":
                error = reply.get("error", {})
                junk = "id" not in reply and error.get("desc", "").startswith("JSON parse error")
                got.append((reply.get("id"), error.get("class"), None if junk else error.get("desc")))
            out.append(got)
        return out
    finally:
        writer.close()


@needs_qemu
async def test_single_quotes_and_junk_before_a_request_are_answered_as_qemu_answers_them(tmp_path: Path) -> None:
    machine, server, path = await serve(tmp_path)
    try:
        ours = await _replies_to(path)
    finally:
        await server.close()
    sock = tmp_path / "qemu.sock"
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
        "-qmp", f"unix:{sock},server=on,wait=off",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(400):
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        theirs = await _replies_to(sock)
    finally:
        proc.kill()
        await proc.wait()
    assert ours == theirs
    nope = ("CommandNotFound", "The command nope has not been found")
    assert ours[0] == [("a\"b'c}", *nope)]
    assert ours[3] == [(None, "GenericError", None), (1, *nope)]  # the junk's error, then the request


def test_splitter_bounds_an_endless_request() -> None:
    sp = JsonSplitter(limit=100)
    out = sp.feed(b'{"execute": "stop", "id": "' + b"x" * 500 + b'"}\n')
    assert out == [None]
    assert [json.loads(p) for p in sp.feed(b'{"execute":"x"}') if p] == [{"execute": "x"}]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
async def test_fuzz_any_bytes_get_a_json_reply_and_never_an_exception(data: bytes) -> None:
    s = session(negotiated=False)
    for piece in JsonSplitter(limit=200).feed(data) + [data]:
        if piece is None:
            continue
        reply = await s.handle(piece)
        if reply is not None:
            json.dumps(reply)
            assert ("return" in reply) != ("error" in reply)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
def _single_quoted(value: Any) -> str:
    """``value`` as JSON with every string in single quotes, QEMU's way ("" plain, ' escaped)."""
    if isinstance(value, str):
        return "'" + json.dumps(value)[1:-1].replace('\\"', '"').replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(_single_quoted(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_single_quoted(k)}:{_single_quoted(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_any_value_written_with_single_quotes_reads_back_the_same(value: Any) -> None:
    from appliance.qmp.server import standard_json

    text = _single_quoted(value)
    assert json.loads(standard_json(text)) == value
    # Split as one request, whatever quotes and brackets its strings hold.
    pieces = JsonSplitter().feed(f'{{"id":{text}}} '.encode())
    assert [json.loads(standard_json(p.decode())) for p in pieces if p is not None] == [{"id": value}]


_names = st.sampled_from(["qmp_capabilities", "query-status", "set_link", "object-add", "object-del",
                          "query-cpus-fast", "stop", "cont", "query-name", "nope"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["execute", "arguments", "id", "x"]), _json | _names, max_size=4),
       st.dictionaries(st.sampled_from(["name", "up", "id", "qom-type", "netdev", "file", "enable"]), _json,
                       max_size=4),
       _names)
async def test_fuzz_structured_requests_never_raise(msg: dict[str, Any], args: dict[str, Any], name: str) -> None:
    s = session()
    for obj in (msg, {"execute": name, "arguments": args, "id": 1}):
        reply = await ask(s, obj)
        assert ("return" in reply) != ("error" in reply)
        if "error" in reply:
            assert set(reply["error"]) == {"class", "desc"}


# --- the real client ------------------------------------------------------------------


async def serve(tmp_path: Path) -> tuple[FakeMachine, QmpServer, Path]:
    machine = FakeMachine()
    server = QmpServer(machine)
    path = tmp_path / "qmp.sock"
    await server.listen_unix(path)
    return machine, server, path


async def test_qemu_qmp_client_negotiates_runs_commands_and_gets_events(tmp_path: Path) -> None:
    machine, server, path = await serve(tmp_path)
    client = QMPClient("t")
    try:
        await client.connect(str(path))
        assert client.greeting is not None
        version = await ex(client, "query-version")
        assert version["qemu"]["major"] == 7
        names = {c["name"] for c in await ex(client, "query-commands")}
        assert {"stop", "cont", "set_link", "object-add", "object-del", "quit"} <= names
        with client.listener() as listener:
            assert await ex(client, "stop") == {}
            event = await asyncio.wait_for(listener.get(), 5)
        assert event["event"] == "STOP"
        assert set(cast(dict[str, int], event["timestamp"])) == {"seconds", "microseconds"}
        assert (await ex(client, "query-status"))["status"] == "paused"
        with pytest.raises(ExecuteError) as err:
            await ex(client, "frobnicate")
        assert err.value.error_class == "CommandNotFound"
        with client.listener() as listener:
            await ex(client, "quit")
            event = await asyncio.wait_for(listener.get(), 5)
        assert (event["event"], event["data"]) == ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    finally:
        await client.disconnect()
        await server.close()
    assert not path.exists()


async def test_two_clients_both_get_events_and_a_garbage_client_does_not_disturb_them(tmp_path: Path) -> None:
    machine, server, path = await serve(tmp_path)
    a, b = QMPClient("a"), QMPClient("b")
    try:
        await a.connect(str(path))
        await b.connect(str(path))
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(path))
        raw.sendall(b"\x00\xff}}}{{" + b"x" * 5000 + b"\n")
        raw.close()
        with a.listener() as la, b.listener() as lb:
            await ex(a, "system_powerdown")
            ea = await asyncio.wait_for(la.get(), 5)
            eb = await asyncio.wait_for(lb.get(), 5)
        assert ea["event"] == eb["event"] == "POWERDOWN"
        assert machine.powerdowns == 1
        assert (await ex(b, "query-status"))["running"] is True
    finally:
        await a.disconnect()
        await b.disconnect()
        await server.close()


async def test_human_monitor_command_runs_the_common_words_and_answers_others_in_text() -> None:
    s = session()

    async def hmp(line: str) -> Any:
        return (await ask(s, {"execute": "human-monitor-command", "arguments": {"command-line": line}}))["return"]

    assert await hmp("info status") == "VM status: running\r\n"
    assert await hmp("stop") == ""
    assert await hmp("info status") == "VM status: paused\r\n"
    assert await hmp("c") == ""
    assert await hmp("info status") == "VM status: running\r\n"
    assert await hmp("savevm x") == "unknown command: 'savevm'\r\n"


async def test_query_block_lists_the_disks_of_the_command_line(tmp_path: Path) -> None:
    from appliance.cli.run import parse_args, to_config

    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    s = session()
    s.machine.config.devices = to_config(parse_args(
        ["-kernel", "/dev/null", "-drive", f"file={disk},format=raw,id=root,readonly=on,cache=none"])).devices
    [blk] = (await ask(s, {"execute": "query-block"}))["return"]
    assert blk["device"] == "root"
    # QEMU makes the device of an if=virtio drive itself, without an id.
    assert blk["qdev"] == "/machine/peripheral-anon/device[0]/virtio-backend"
    assert blk["inserted"]["file"] == str(disk)
    assert (blk["inserted"]["ro"], blk["inserted"]["drv"], blk["inserted"]["cache"]["direct"]) == (True, "raw", True)
    # Scripts read the size here (compared member by member with QEMU's in test_machine_qmp).
    assert blk["inserted"]["image"]["virtual-size"] == 1 << 20
