"""Bad input on the wire: the daemon answers with an error code, never crashes, serves the rest.

Every case runs against a real daemon and ends with a health check: the clients that were
connected are still served, a fresh client does a full create/start/succeed, and
`runnerctl status` exits 0. Cases at the framing level (and the known crashers) get a
daemon of their own, with a bystander client that said hello before the bad input came;
the request-level cases share one daemon for the module, which they must all leave healthy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from conftest import Daemon, RawClient, Wire, wait_for
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import DEFAULT_MAX_FRAME, HEADER, frame, unpack_body


def call(conn: RawClient, op: str, /, **fields: Any) -> dict[str, Any]:
    """Send one request with a fresh id; check the reply answers that id."""
    return conn.request(op, **fields)


def error_of(reply: dict[str, Any]) -> str:
    """The error code of an error reply, checking the reply's shape on the way."""
    assert reply["ok"] is False, reply
    error = reply["error"]
    assert isinstance(error["message"], str) and error["message"], reply
    return str(error["code"])


def assert_closed(client: RawClient) -> None:
    assert client.closed_by_peer(), "the daemon kept the connection open"


def send_body(client: RawClient, body: bytes) -> None:
    """Send a frame around any bytes at all."""
    client.send_raw(HEADER.pack(len(body)) + body)


def send_until_hangup(client: RawClient, data: bytes) -> None:
    """Send `data`; the daemon may hang up before reading it all, as it does on too_large."""
    try:
        client.send_raw(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def create_frame(run_id: str, field: str, value_bytes: bytes) -> bytes:
    """A create request whose `field` is the given pre-packed msgpack bytes."""
    head = {"op": "create", "id": 1, "key": new_key(), "run_id": run_id, "experiment": "deep"}
    body = b"".join(
        [
            bytes([0x80 | (len(head) + 1)]),
            *(msgpack.packb(k) + msgpack.packb(v) for k, v in head.items()),
            msgpack.packb(field),
            value_bytes,
        ]
    )
    return HEADER.pack(len(body)) + body


def padded_frame(msg: dict[str, Any], size: int) -> bytes:
    """`msg` plus a padding field, packed to a body of exactly `size` bytes."""
    pad = size - len(msgpack.packb({**msg, "pad": ""})) - 4  # str32 header: 5 bytes, not 1
    body = msgpack.packb({**msg, "pad": "x" * pad})
    assert len(body) == size
    return HEADER.pack(size) + body


def _running(client: RawClient) -> str:
    run_id = new_run_id()
    assert call(client, "create", key=new_key(), run_id=run_id, experiment="e")["ok"] is True
    assert call(client, "start", key=new_key(), run_id=run_id)["ok"] is True
    return run_id


@pytest.fixture
def wire(daemon: Daemon) -> Iterator[Wire]:
    """Clients of a daemon of the test's own, for cases that may take a daemon down."""
    harness = Wire(daemon)
    yield harness
    harness.close()


@pytest.fixture
def shared(shared_daemon: Daemon) -> Iterator[Wire]:
    harness = Wire(shared_daemon)
    yield harness
    harness.close()


@pytest.fixture
def conn(shared: Wire) -> RawClient:
    """A greeted client of the shared daemon, which sends the bad request."""
    return shared.connect()


@pytest.fixture
def bystander(wire: Wire) -> RawClient:
    """A client that said hello before the bad input arrived."""
    return wire.connect()


# --- framing ------------------------------------------------------------------


def test_garbage_bytes_are_refused_as_too_large(wire: Wire, bystander: RawClient) -> None:
    client = wire.connect(hello=False)
    client.send_raw(b"\xff" * 64)
    reply = client.recv()
    assert error_of(reply) == "too_large"
    assert reply["id"] is None
    assert_closed(client)
    wire.assert_serving(bystander)


def test_truncated_frame_then_hangup(wire: Wire, bystander: RawClient) -> None:
    client = wire.connect()
    client.send_raw(HEADER.pack(100) + b"\x85" + b"x" * 9)
    client.close()
    wire.assert_serving(bystander)


def test_truncated_frame_left_hanging_blocks_no_one(wire: Wire, bystander: RawClient) -> None:
    client = wire.connect()
    client.send_raw(HEADER.pack(100) + b"x" * 10)
    wire.assert_serving(bystander)
    client.close()


@pytest.mark.parametrize("with_body", [False, True], ids=["prefix-only", "whole-frame"])
def test_oversized_frame_is_refused_and_closed(
    wire: Wire, bystander: RawClient, with_body: bool
) -> None:
    size = 2 << 20
    client = wire.connect()
    send_until_hangup(client, HEADER.pack(size) + (b"\0" * size if with_body else b"\x80"))
    reply = client.recv()
    assert error_of(reply) == "too_large"
    assert str(size) in reply["error"]["message"]
    assert_closed(client)
    wire.assert_serving(bystander)


def test_frame_of_exactly_the_limit_is_served_one_byte_more_is_not(
    wire: Wire, bystander: RawClient
) -> None:
    client = wire.connect()
    client.send_raw(padded_frame({"op": "status", "id": 7}, DEFAULT_MAX_FRAME))
    reply = client.recv()
    assert (reply["id"], reply["ok"]) == (7, True)
    send_until_hangup(client, padded_frame({"op": "status", "id": 8}, DEFAULT_MAX_FRAME + 1))
    assert error_of(client.recv()) == "too_large"
    assert_closed(client)
    wire.assert_serving(bystander)


NOT_MSGPACK = {
    "reserved-byte": b"\xc1",
    "empty": b"",
    "cut-short": msgpack.packb({"op": "status", "id": 1})[:-2],
    "two-objects": msgpack.packb({"op": "status", "id": 1}) * 2,
    "bad-utf8": b"\x81\xa2op\xa2\xff\xfe",
    "map-as-map-key": b"\x82\xa2op\xa6status\x81\x01\x02\x01",
}


@pytest.mark.parametrize("body", NOT_MSGPACK.values(), ids=NOT_MSGPACK.keys())
def test_body_that_is_not_msgpack_is_bad_frame(
    wire: Wire, bystander: RawClient, body: bytes
) -> None:
    client = wire.connect()
    send_body(client, body)
    assert error_of(client.recv()) == "bad_frame"
    assert call(client, "status")["ok"] is True, "the connection must stay usable"
    client.close()
    wire.assert_serving(bystander)


@pytest.mark.parametrize(
    "value", [[1, 2], 7, "status", None, 1.5], ids=["list", "int", "str", "nil", "float"]
)
def test_msgpack_that_is_not_a_map_is_bad_frame(
    wire: Wire, bystander: RawClient, value: Any
) -> None:
    client = wire.connect()
    send_body(client, msgpack.packb(value))
    assert error_of(client.recv()) == "bad_frame"
    assert call(client, "status")["ok"] is True
    client.close()
    wire.assert_serving(bystander)


def test_deep_nesting_beyond_msgpack_limits(wire: Wire, bystander: RawClient) -> None:
    client = wire.connect()
    client.send_raw(create_frame(new_run_id(), "params", b"\x81\xa1a" + b"\x91" * 10_000 + b"\xc0"))
    try:
        reply: dict[str, Any] | None = client.recv()
    except ConnectionError:
        reply = None
    if reply is not None:
        assert error_of(reply) in ("bad_frame", "bad_request", "too_large")
    wire.assert_serving(bystander)


@pytest.mark.parametrize("field", ["params", "tags"])
def test_deep_nesting_within_msgpack_limits(wire: Wire, bystander: RawClient, field: str) -> None:
    run_id = new_run_id()
    client = wire.connect()
    client.send_raw(create_frame(run_id, field, b"\x81\xa1a" + b"\x91" * 1000 + b"\xc0"))
    try:
        reply: dict[str, Any] | None = client.recv()
    except ConnectionError:
        reply = None
    if reply is not None and reply["ok"]:
        assert call(bystander, "get", run=run_id)["ok"] is True
    elif reply is not None:
        assert error_of(reply) == "bad_request"
    wire.assert_serving(bystander)


# --- requests -----------------------------------------------------------------


def test_unknown_op(conn: RawClient, shared: Wire) -> None:
    reply = call(conn, "frobnicate", run_id="x")
    assert error_of(reply) == "unknown_op"
    assert "frobnicate" in reply["error"]["message"]
    shared.assert_serving(conn)


@pytest.mark.parametrize(
    "msg", [{"id": 3}, {"id": 3, "op": 5}, {"id": 3, "op": None}], ids=["missing", "int", "nil"]
)
def test_op_missing_or_not_a_string(conn: RawClient, shared: Wire, msg: dict[str, Any]) -> None:
    reply = conn.call(msg)
    assert error_of(reply) == "bad_request"
    assert reply["id"] == 3
    shared.assert_serving(conn)


MISSING = [
    ("heartbeat", {"seq": 1}, "run_id"),
    ("heartbeat", {"run_id": "r"}, "seq"),
    ("create", {"key": "k", "run_id": "r"}, "experiment"),
    ("create", {"run_id": "r", "experiment": "e"}, "key"),
    ("succeed", {"run_id": "r"}, "key"),
    ("fail", {"key": "k"}, "run_id"),
    ("get", {}, "run"),
    ("hello", {}, "v"),
]


@pytest.mark.parametrize(
    ("op", "fields", "missing"), MISSING, ids=[f"{op}-{name}" for op, _, name in MISSING]
)
def test_missing_field_is_bad_request_naming_it(
    conn: RawClient, shared: Wire, op: str, fields: dict[str, Any], missing: str
) -> None:
    reply = call(conn, op, **fields)
    assert error_of(reply) == "bad_request"
    assert repr(missing) in reply["error"]["message"]
    shared.assert_serving(conn)


WRONG_TYPE = [
    ("heartbeat", {"run_id": "r", "seq": "1"}, "seq"),
    ("heartbeat", {"run_id": "r", "seq": True}, "seq"),
    ("heartbeat", {"run_id": "r", "seq": 1.0}, "seq"),
    ("heartbeat", {"run_id": 7, "seq": 1}, "run_id"),
    ("create", {"key": "k", "run_id": "r", "experiment": "e", "params": [1, 2]}, "params"),
    ("create", {"key": "k", "run_id": "r", "experiment": "e", "tags": "a=b"}, "tags"),
    ("create", {"key": b"k", "run_id": "r", "experiment": "e"}, "key"),
    ("start", {"key": "k", "run_id": "r", "heartbeat_timeout": "10"}, "heartbeat_timeout"),
    ("start", {"key": "k", "run_id": "r", "deadline": False}, "deadline"),
    ("fail", {"key": "k", "run_id": "r", "exit_code": "3"}, "exit_code"),
    ("fail", {"key": "k", "run_id": "r", "exit_code": True}, "exit_code"),
    ("list", {"limit": True}, "limit"),
    ("hello", {"v": "1"}, "v"),
    ("hello", {"v": True}, "v"),
]


@pytest.mark.parametrize(
    ("op", "fields", "name"),
    WRONG_TYPE,
    ids=[f"{op}-{name}-{type(f[name]).__name__}" for op, f, name in WRONG_TYPE],
)
def test_wrong_type_is_bad_request_naming_the_field(
    conn: RawClient, shared: Wire, op: str, fields: dict[str, Any], name: str
) -> None:
    reply = call(conn, op, **fields)
    assert error_of(reply) == "bad_request"
    assert repr(name) in reply["error"]["message"]
    shared.assert_serving(conn)


def test_id_of_the_wrong_type_is_bad_request(conn: RawClient, shared: Wire) -> None:
    reply = conn.call({"op": "status", "id": "seven"})
    assert error_of(reply) == "bad_request"
    assert reply["id"] is None
    shared.assert_serving(conn)


@pytest.mark.parametrize(
    "op", ["start", "attach", "detach", "succeed", "fail", "cancel", "checkpoint"]
)
def test_mutation_of_an_unknown_run(conn: RawClient, shared: Wire, op: str) -> None:
    reply = call(conn, op, key=new_key(), run_id="NOSUCHRUN")
    assert error_of(reply) == "unknown_run"
    shared.assert_serving(conn)


def test_heartbeat_and_get_of_an_unknown_run(conn: RawClient, shared: Wire) -> None:
    assert error_of(call(conn, "heartbeat", run_id="NOSUCHRUN", seq=1)) == "unknown_run"
    assert error_of(call(conn, "get", run="NOSUCHRUN")) == "unknown_run"
    assert shared.daemon.ctl("show", "NOSUCHRUN", check=False).returncode == 4
    shared.assert_serving(conn)


def test_request_before_hello_is_refused_then_hello_works(wire: Wire, bystander: RawClient) -> None:
    client = wire.connect(hello=False)
    reply = call(client, "status")
    assert error_of(reply) == "bad_request"
    assert "hello" in reply["error"]["message"]
    assert client.hello()["ok"] is True
    assert call(client, "status")["ok"] is True
    client.close()
    wire.assert_serving(bystander)


def test_hello_with_another_protocol_version(wire: Wire, bystander: RawClient) -> None:
    client = wire.connect(hello=False)
    reply = call(client, "hello", v=2, client="future/9")
    assert error_of(reply) == "version_mismatch"
    assert_closed(client)
    wire.assert_serving(bystander)


def test_silent_peers_block_no_one(wire: Wire, bystander: RawClient) -> None:
    silent = wire.connect(hello=False)
    half_header = wire.connect(hello=False)
    half_header.send_raw(b"\x00\x00")
    try:
        wait_for(
            lambda: call(bystander, "status")["daemon"]["clients"] >= 3,
            what="the daemon to count the silent peers as clients",
        )
        wire.assert_serving(bystander)
    finally:
        silent.close()
        half_header.close()
    wire.assert_serving(bystander)


# --- values -------------------------------------------------------------------


NOT_JSONABLE = {
    "bytes-value": {"params": {"blob": b"\x00\x01"}},
    "nested-bytes": {"params": {"a": [1, {"b": b"x"}]}},
    "bytes-key": {"params": {b"k": 1}},
    "nan": {"params": {"loss": float("nan")}},
    "infinity": {"tags": {"best": float("inf")}},
    "tags-bytes": {"tags": {"note": b"x"}},
    "ext-type": {"params": {"when": msgpack.ExtType(5, b"x")}},
}


@pytest.mark.parametrize("fields", NOT_JSONABLE.values(), ids=NOT_JSONABLE.keys())
def test_params_that_are_not_jsonable(
    conn: RawClient, shared: Wire, fields: dict[str, Any]
) -> None:
    run_id = new_run_id()
    reply = call(conn, "create", key=new_key(), run_id=run_id, experiment="e", **fields)
    assert error_of(reply) == "bad_request"
    assert "JSON" in reply["error"]["message"]
    assert error_of(call(conn, "get", run=run_id)) == "unknown_run"
    shared.assert_serving(conn)


def test_checkpoint_data_that_is_not_jsonable(conn: RawClient, shared: Wire) -> None:
    run_id = new_run_id()
    assert call(conn, "create", key=new_key(), run_id=run_id, experiment="e")["ok"] is True
    reply = call(conn, "checkpoint", key=new_key(), run_id=run_id, data={"w": b"\x00"})
    assert error_of(reply) == "bad_request"
    assert call(conn, "get", run=run_id)["run"]["checkpoints"] == []
    shared.assert_serving(conn)


BAD_RUN_IDS = {
    "dotdot": "../x",
    "slash": "a/b",
    "too-long": "a" * 200,
    "65-chars": "a" * 65,
    "empty": "",
    "space": "a b",
    "newline": "abc\n",
    "nul": "a\0b",
    "non-ascii": "r\u00e9sum\u00e9",
}


@pytest.mark.parametrize("run_id", BAD_RUN_IDS.values(), ids=BAD_RUN_IDS.keys())
def test_invalid_run_id_on_create(conn: RawClient, shared: Wire, run_id: str) -> None:
    experiment = f"bad-{new_run_id()}"
    reply = call(conn, "create", key=new_key(), run_id=run_id, experiment=experiment)
    assert error_of(reply) == "bad_request"
    assert "run_id" in reply["error"]["message"]
    assert call(conn, "list", experiment=experiment)["runs"] == []
    shared.assert_serving(conn)


def test_run_id_of_64_characters_is_accepted(conn: RawClient, shared: Wire) -> None:
    reply = call(conn, "create", key=new_key(), run_id=new_run_id().ljust(64, "A"), experiment="e")
    assert reply["ok"] is True, reply
    shared.assert_serving(conn)


BAD_PATHS = {
    "relative-run_dir": {"run_dir": "runs/x"},
    "dot-run_dir": {"run_dir": "./x"},
    "empty-run_dir": {"run_dir": ""},
    "nul-run_dir": {"run_dir": "/tmp/a\0b"},
    "relative-cwd": {"cwd": "somewhere"},
}


@pytest.mark.parametrize("fields", BAD_PATHS.values(), ids=BAD_PATHS.keys())
def test_run_dir_and_cwd_must_be_absolute(
    conn: RawClient, shared: Wire, fields: dict[str, Any]
) -> None:
    experiment = f"bad-{new_run_id()}"
    reply = call(
        conn, "create", key=new_key(), run_id=new_run_id(), experiment=experiment, **fields
    )
    assert error_of(reply) == "bad_request"
    assert next(iter(fields)) in reply["error"]["message"]
    assert call(conn, "list", experiment=experiment)["runs"] == []
    shared.assert_serving(conn)


@pytest.mark.parametrize(
    "fields",
    [{"experiment": ""}, {"experiment": "e" * 257}, {"experiment": "e", "variation": ""}],
    ids=["empty-experiment", "long-experiment", "empty-variation"],
)
def test_experiment_and_variation_names_are_checked(
    conn: RawClient, shared: Wire, fields: dict[str, Any]
) -> None:
    reply = call(conn, "create", key=new_key(), run_id=new_run_id(), **fields)
    assert error_of(reply) == "bad_request"
    shared.assert_serving(conn)


@pytest.mark.parametrize("field", ["heartbeat_timeout", "lost_grace", "deadline"])
def test_start_limits_must_be_positive(conn: RawClient, shared: Wire, field: str) -> None:
    run_id = new_run_id()
    assert call(conn, "create", key=new_key(), run_id=run_id, experiment="e")["ok"] is True
    reply = call(conn, "start", key=new_key(), run_id=run_id, **{field: 0})
    assert error_of(reply) == "bad_request"
    assert field in reply["error"]["message"]
    assert call(conn, "get", run=run_id)["run"]["state"] == "pending"
    shared.assert_serving(conn)


# --- artifacts -------------------------------------------------------------------


BAD_ARTIFACTS = {
    "relative": "model.bin",
    "missing": "/nonexistent/model.bin",
    "directory": "/tmp",
    "nul": "/tmp/a\0b",
}


@pytest.mark.parametrize("path", BAD_ARTIFACTS.values(), ids=BAD_ARTIFACTS.keys())
def test_artifact_that_is_not_a_readable_file(conn: RawClient, shared: Wire, path: str) -> None:
    run_id = _running(conn)
    reply = call(conn, "artifact", key=new_key(), run_id=run_id, path=path)
    assert error_of(reply) == "bad_request"
    assert call(conn, "get", run=run_id)["run"]["artifacts"] == []
    shared.assert_serving(conn)


def test_artifact_that_is_a_fifo_is_refused_at_once(raw: RawClient, wire: Wire) -> None:
    fifo = wire.daemon.root / "pipe"
    os.mkfifo(fifo)
    run_id = _running(raw)
    raw.sock.settimeout(5)
    try:
        reply = call(raw, "artifact", key=new_key(), run_id=run_id, path=str(fifo))
        assert error_of(reply) == "bad_request"
        assert "regular file" in reply["error"]["message"]
        wire.assert_serving(raw)
    finally:
        code = wire.daemon.stop(timeout=5)
    assert code == 0, "SIGTERM must still stop the daemon cleanly"


# --- integers beyond 64 bits, non-finite times ---------------------------------


@pytest.mark.parametrize("seq", [2**63, 2**64 - 1])
def test_heartbeat_seq_beyond_64_bits(raw: RawClient, wire: Wire, seq: int) -> None:
    run_id = _running(raw)
    refused = call(raw, "heartbeat", run_id=run_id, seq=seq)
    innocent = call(wire.connect(), "create", key=new_key(), run_id=new_run_id(), experiment="e")
    assert innocent["ok"] is True, f"another client's create failed: {innocent}"
    assert error_of(refused) == "bad_request"
    assert call(raw, "get", run=run_id)["run"]["heartbeats"] == 0
    wire.assert_serving(raw)


def test_fail_exit_code_beyond_64_bits_changes_nothing(raw: RawClient, wire: Wire) -> None:
    run_id = _running(raw)
    reply = call(raw, "fail", key=new_key(), run_id=run_id, exit_code=2**63)
    run = call(raw, "get", run=run_id)["run"]
    assert (run["state"], run["failure"]) == ("running", None), "a refused fail was applied"
    assert error_of(reply) == "bad_request"
    wire.assert_serving(raw)


@pytest.mark.parametrize("op", ["create", "start"])
def test_nan_event_time_is_not_an_internal_error(raw: RawClient, wire: Wire, op: str) -> None:
    run_id = new_run_id()
    fields: dict[str, Any] = {"experiment": "e"}
    if op == "start":
        assert call(raw, "create", key=new_key(), run_id=run_id, **fields)["ok"] is True
        fields = {}
    reply = call(raw, op, key=new_key(), run_id=run_id, at=float("nan"), **fields)
    assert reply["ok"] is True or error_of(reply) == "bad_request", reply
    wire.assert_serving(raw)


# --- peers of another user ----------------------------------------------------


OTHER_USER = textwrap.dedent("""
    import os, socket, sys
    path, hello = sys.argv[1], bytes.fromhex(sys.argv[2])
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    try:
        sock.sendall(hello)
    except OSError:
        pass
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    sys.stdout.write(data.hex())
""")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_peer_of_another_uid_is_forbidden(daemon: Daemon, wire: Wire, bystander: RawClient) -> None:
    for folder in (daemon.root, daemon.socket.parent):
        folder.chmod(0o755)
    daemon.socket.chmod(0o777)
    hello = frame({"op": "hello", "v": 1, "id": 1, "client": "intruder"})
    proc = subprocess.run(
        [sys.executable, "-c", OTHER_USER, str(daemon.socket), hello.hex()],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr  # it read to EOF: the daemon hung up
    data = bytes.fromhex(proc.stdout)
    (length,) = HEADER.unpack(data[: HEADER.size])
    assert len(data) == HEADER.size + length, "one frame, then the connection closed"
    reply = unpack_body(data[HEADER.size :])
    assert error_of(reply) == "forbidden"
    assert call(bystander, "list")["runs"] == []
    wire.assert_serving(bystander)


def test_peer_of_our_own_uid_is_greeted_with_the_limits(daemon: Daemon, wire: Wire) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        sock.sendall(frame({"op": "hello", "v": 1, "id": 1}))
        (length,) = HEADER.unpack(sock.recv(HEADER.size, socket.MSG_WAITALL))
        reply = unpack_body(sock.recv(length, socket.MSG_WAITALL))
    assert reply["ok"] is True
    assert reply["v"] == 1
    assert reply["max_frame"] == DEFAULT_MAX_FRAME
    wire.assert_serving()
