"""Protocol fuzzer: random, mutated and malformed frames at a live runnerd from many connections.

Each connection plays sessions: connect, (usually) hello, then a stream of frames of
many kinds (random bytes, random msgpack values, requests with real and junk ops and
right- and wrong-typed fields, byte-mutated requests, lying headers, truncated and
deeply nested frames, oversized headers, a bad hello). An oracle replays the daemon's
framing rules on the same bytes (header, frame limit, hello first, `decode_request`),
so every reply is checked: its shape, its id, and its error code wherever framing or
decoding alone decides it. When the daemon must hang up (too_large, version_mismatch)
the session waits for the replies before it, sends the rest, and expects exactly one
reply and then EOF.

The daemon runs as whoever runs this (root on CI), so a safety gate keeps every frame
it decodes from touching files outside a sandbox folder or signalling processes.

Shared with tests/test_fuzz.py, which adds frames drawn by hypothesis. As a script it
starts its own daemon in a temp folder, fuzzes, checks the daemon's health and the
registry's integrity, and prints figures:

    python tests/fuzz.py [--frames 1000000] [--connections 8] [--seed S]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import multiprocessing as mp
import os
import random
import re
import select
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import types
import typing
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from runnerd.diagnosis_rules import RULES
from runnerd.testing import Daemon
from runnerd_client.connection import Connection
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import (
    DEFAULT_MAX_FRAME,
    HEADER,
    INT64_MAX,
    INT64_MIN,
    PROTOCOL_VERSION,
    REQUESTS,
    Create,
    ErrorCode,
    Fail,
    Get,
    Hello,
    Request,
    RunnerdError,
    Start,
    State,
    Succeed,
    decode_request,
    unpack_body,
)

ANY = "*"  # an expected reply the handler decides: ok or any error code but internal
CODES = frozenset(code.value for code in ErrorCode)
CANCEL_SIGNALS = ("TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2")
UINT64_MAX = 2**64 - 1

# Daemon bugs the fuzzing found, each fixed, with a regression test in tests/test_fuzz.py
# named for what it checks. The barrage steers around the first two (pass --no-guard, or
# set this to None, to send them again):
#   - a regex quadratic in the newlines of a traceback (100k newlines froze the daemon);
#   - a diagnosis rule quadratic in a message repeating "expected" without a "got"
#     (both ran inside the registry's write batch, for `fail` and `cancel`);
#   - a request failing after its client hung up, logged as an asyncio ERROR ("...
#     exception was never retrieved"): `log_errors` sets those records apart;
#   - SIGTERM took 5 s with a folder watched (the test unwatches before stopping).
MAX_FAILURE_TEXT: int | None = 4096


# --- request shapes, from the protocol's own dataclasses -------------------------


def _wire_types(annotation: Any) -> tuple[type, ...]:
    """The Python types msgpack may deliver for a field annotation."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(t for arg in typing.get_args(annotation) for t in _wire_types(arg))
    if annotation is type(None):
        return (type(None),)
    origin = typing.get_origin(annotation) or annotation
    return (float, int) if origin is float else (origin,)


@dataclass(frozen=True)
class Shape:
    """One request's fields: name -> wire types, and which are required."""

    fields: dict[str, tuple[type, ...]]
    required: frozenset[str]


SHAPES: dict[str, Shape] = {}
for _op, _cls in REQUESTS.items():
    _hints = typing.get_type_hints(_cls)
    _fields = dataclasses.fields(_cls)
    SHAPES[_op] = Shape(
        {f.name: _wire_types(_hints[f.name]) for f in _fields},
        frozenset(
            f.name
            for f in _fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ),
    )

OPS = tuple(REQUESTS)
OP_WEIGHTS = {
    "create": 16,
    "start": 12,
    "heartbeat": 10,
    "succeed": 6,
    "fail": 6,
    "attach": 4,
    "detach": 3,
    "cancel": 4,
    "checkpoint": 4,
    "artifact": 3,
    "get": 8,
    "list": 4,
    "status": 3,
    "failures": 3,
    "export": 2,
    "watch": 1,
    "unwatch": 1,
    "prune": 2,
    "hello": 2,
}
JUNK_OPS = tuple(
    op
    for op in (
        "subscribe",
        "sweep",
        "resume",
        "frobnicate",
        "",
        " ",
        "HELLO",
        "Create",
        "get\0",
        "create ",
        "status\n",
        "__init__",
        "__class__",
        "shutdown",
        "💥",
    )
    if op not in REQUESTS
)
FIELD_NAMES = tuple(
    sorted({name for shape in SHAPES.values() for name in shape.fields} | {"op", "id"})
)
STATES = tuple(s.value for s in State)
TERMINAL = tuple(s.value for s in State if s.terminal)


def _rule_words() -> list[str]:
    """Words of the diagnosis rules' regexes and class names: a fuzzing dictionary."""
    words: set[str] = set()
    for rule in RULES:
        for pattern in rule.messages:
            words.update(re.findall(r"[a-z]{3,}", pattern))
        words.update(rule.classes)
    return sorted(words)


TOKENS = (
    *OPS,
    *JUNK_OPS,
    *FIELD_NAMES,
    *STATES,
    *sorted(CODES),
    *_rule_words(),
    "crash",
    "abandoned",
    "timeout",
    "lost",
    "class",
    "signature",
    "category",
    "runs",
    "failures",
    "SIGKILL",
    "Signal:SIGSEGV",
    "ProcessExited",
    "9",
    "-1",
    "0",
    "1e309",
    "NaN",
    "null",
    "true",
    "",
    " ",
    "\0",
    "\n",
    "\r\n",
    "\t",
    "'",
    '"',
    "/",
    "..",
    "%",
    "_",
    "*",
    "\\",
    "\U0010ffff",
    "\ufeff",
    "é",
    "😀",
    "日本",
    "\x7f",
    "\u202e",
    "0x7fff",
    "deadbeefcafe",
    'File "train.py", line 12, in step',
    "CUDA out of memory",
    "connection reset",
)
MESSAGES = (
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "loss is nan at step 17",
    "connection reset by peer",
    "expected 3 got 4",
    "No module named 'torch'",
    "division by zero",
    "timed out after 30 s",
    "invalid value 'x' for --lr",
    "",
)
TRACEBACK = (
    'Traceback (most recent call last):\n  File "/src/train.py", line 88, in main\n'
    '    step()\n  File "/src/model.py", line 12, in step\n    raise ValueError(x)\n'
    "ValueError: bad value 3\n"
)
CLASSES = (
    "ValueError",
    "RuntimeError",
    "KeyError",
    "MemoryError",
    "OutOfMemoryError",
    "KeyboardInterrupt",
    "Signal:SIGKILL",
    "Signal:SIGSEGV",
    "ProcessExited",
    "ConnectionResetError",
    "HeartbeatLost",
    "Timeout",
    "pkg.mod.Error",
    "",
)
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
INTERESTING_BYTES = (
    0x00,
    0x01,
    0x7F,
    0x80,
    0x8F,
    0x90,
    0x9F,
    0xA0,
    0xBF,
    0xC0,
    0xC1,
    0xC2,
    0xC3,
    0xC4,
    0xC6,
    0xC7,
    0xC8,
    0xC9,
    0xCA,
    0xCB,
    0xCF,
    0xD3,
    0xD4,
    0xD6,
    0xD7,
    0xD9,
    0xDB,
    0xDC,
    0xDD,
    0xDE,
    0xDF,
    0xE0,
    0xFF,
)
DEPTHS = (2, 10, 63, 64, 65, 66, 200, 511, 512, 1000, 1023, 1024, 1025, 3000)


# --- the sandbox and the safety gate ------------------------------------------------


@dataclass(frozen=True)
class Sandbox:
    """The folder that every path the fuzzer names lives in."""

    root: str

    @property
    def artifact(self) -> str:
        return os.path.join(self.root, "artifact.bin")

    @property
    def watch(self) -> str:
        return os.path.join(self.root, "watch")

    @property
    def fifo(self) -> str:
        return os.path.join(self.root, "fifo")

    @property
    def runs(self) -> str:
        return os.path.join(self.root, "runs")

    def prepare(self) -> Sandbox:
        os.makedirs(os.path.join(self.watch, "sub"), exist_ok=True)
        os.makedirs(self.runs, exist_ok=True)
        with open(self.artifact, "wb") as fh:
            fh.write(os.urandom(4096))
        with open(os.path.join(self.watch, "notes.txt"), "w") as fh:
            fh.write("nothing to index here\n")
        if not os.path.exists(self.fifo):
            os.mkfifo(self.fifo)
        return self

    def contains(self, path: str) -> bool:
        norm = os.path.normpath(path)
        return norm == self.root or norm.startswith(self.root + os.sep)


def unsafe(msg: dict[Any, Any], sandbox: Sandbox) -> str | None:
    """Why the daemon must not be sent this map, or None.

    Any field naming a real place outside the sandbox (run_dir is created, artifacts are
    read, watched folders scanned; and ops to come may take paths too); a cancel with a
    real signal (the attached pids are the fuzzer's own); and, while MAX_FAILURE_TEXT is
    set, a failure text longer than it.
    """
    for name, value in msg.items():
        if outside(value, sandbox):
            return f"{name!r} names a path outside the sandbox"
    op = msg.get("op")
    signal = msg.get("signal")
    if (
        op == "cancel"
        and isinstance(signal, str)
        and signal.upper().removeprefix("SIG") in CANCEL_SIGNALS
    ):
        return "cancel with a real signal"
    if MAX_FAILURE_TEXT is not None and op in ("fail", "cancel"):
        for name in ("message", "traceback"):
            value = msg.get(name)
            if isinstance(value, str) and len(value) > MAX_FAILURE_TEXT:
                return f"guarded: long {name} in {op}"
    return None


def outside(value: Any, sandbox: Sandbox) -> bool:
    """An absolute path (a NUL makes it no path at all) outside the sandbox."""
    return (
        isinstance(value, str)
        and os.path.isabs(value)
        and "\0" not in value
        and not sandbox.contains(value)
    )


def make_safe(msg: dict[Any, Any], sandbox: Sandbox) -> dict[Any, Any]:
    """Steer a generated map clear of the safety gate (mutations are checked, not steered)."""
    if unsafe(msg, sandbox) is None:
        return msg
    for name, value in msg.items():
        if outside(value, sandbox):
            msg[name] = os.path.join(sandbox.runs, "safe")
    if msg.get("op") == "cancel":
        msg["signal"] = "NOPE"
    if MAX_FAILURE_TEXT is not None:
        for name in ("message", "traceback"):
            if isinstance(msg.get(name), str):
                msg[name] = msg[name][:MAX_FAILURE_TEXT]
    return msg


class Unsafe(Exception):
    """A session would hand the daemon a frame the safety gate refuses."""


# --- the oracle -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expect:
    """The reply a frame must get: its id and its code ("ok", an ErrorCode, or ANY)."""

    id: int | None
    code: str
    op: str | None = None  # the op, when the frame decoded to a request


@dataclass
class Plan:
    """What the daemon must answer to one session's bytes.

    `expected` covers the frames before `cut`; `closing` is the frame at `cut` after
    which the daemon hangs up (too_large or version_mismatch), if any.
    """

    expected: list[Expect]
    cut: int
    closing: Expect | None
    greeted: bool


def judge(body: bytes, greeted: bool, sandbox: Sandbox) -> tuple[Expect, bool, bool]:
    """(expected reply, whether the daemon then hangs up, greeted after) for one body."""
    try:
        msg = unpack_body(body)
    except RunnerdError:
        return Expect(None, ErrorCode.BAD_FRAME), False, greeted
    if not isinstance(msg, dict):
        return Expect(None, ErrorCode.BAD_FRAME), False, greeted
    req_id = msg.get("id") if type(msg.get("id")) is int else None
    reason = unsafe(msg, sandbox)
    if reason is not None:
        raise Unsafe(reason)
    try:
        _, req = decode_request(msg)
    except RunnerdError as exc:
        return Expect(req_id, str(exc.code)), False, greeted
    except Exception:  # the daemon would answer `internal`: let the reply check say so
        return Expect(req_id, ANY), False, greeted
    if isinstance(req, Hello):
        if req.v != PROTOCOL_VERSION:
            return Expect(req_id, ErrorCode.VERSION_MISMATCH, req.op), True, greeted
        return Expect(req_id, "ok", req.op), False, True
    if not greeted:
        return Expect(req_id, ErrorCode.BAD_REQUEST, req.op), False, greeted
    return Expect(req_id, ANY, req.op), False, greeted


def plan_session(stream: bytes, limit: int, sandbox: Sandbox) -> Plan:
    """Replay the daemon's frame parser on a fresh connection's bytes."""
    expected: list[Expect] = []
    greeted, pos, size = False, 0, len(stream)
    while size - pos >= HEADER.size:
        (length,) = HEADER.unpack_from(stream, pos)
        if length > limit:
            return Plan(expected, pos, Expect(None, ErrorCode.TOO_LARGE), greeted)
        end = pos + HEADER.size + length
        if end > size:
            break
        outcome, closes, greeted = judge(stream[pos + HEADER.size : end], greeted, sandbox)
        if closes:
            return Plan(expected, pos, outcome, greeted)
        expected.append(outcome)
        pos = end
    return Plan(expected, size, None, greeted)


def reply_problem(reply: Any) -> str | None:
    """What is wrong with a reply's shape (SPEC §4), or None."""
    if not isinstance(reply, dict):
        return f"reply is not a map: {reply!r:.200}"
    if "id" not in reply or "ok" not in reply:
        return f"reply lacks id or ok: {reply!r:.200}"
    if reply["id"] is not None and type(reply["id"]) is not int:
        return f"reply id is not an int: {reply!r:.200}"
    if type(reply["ok"]) is not bool:
        return f"reply ok is not a bool: {reply!r:.200}"
    if reply["ok"]:
        return None
    error = reply.get("error")
    if not isinstance(error, dict) or error.get("code") not in CODES:
        return f"error reply without a known code: {reply!r:.300}"
    if error["code"] == ErrorCode.INTERNAL:
        return f"internal error: {reply!r:.500}"
    if not isinstance(error.get("message"), str) or not error["message"]:
        return f"error reply without a message: {reply!r:.300}"
    return None


def reply_code(reply: dict[str, Any]) -> str:
    return "ok" if reply["ok"] else str(reply["error"]["code"])


def match_replies(replies: Sequence[dict[str, Any]], expected: Sequence[Expect]) -> list[str]:
    """Replies (already well-formed) against the oracle, per id: counts and fixed codes."""
    got: dict[int | None, Counter[str]] = {}
    for reply in replies:
        got.setdefault(reply["id"], Counter())[reply_code(reply)] += 1
    want: dict[int | None, Counter[str]] = {}
    for exp in expected:
        want.setdefault(exp.id, Counter())[exp.code] += 1
    problems = []
    for req_id in set(got) | set(want):
        g, w = got.get(req_id, Counter()), want.get(req_id, Counter())
        if g.total() != w.total():
            problems.append(
                f"id {req_id!r}: {g.total()} replies for {w.total()} frames "
                f"(got {dict(g)}, want {dict(w)})"
            )
            continue
        for code, n in w.items():
            if code != ANY and g[code] < n:
                problems.append(f"id {req_id!r}: want {n} x {code}, got {dict(g)}")
    return problems


# --- frames ---------------------------------------------------------------------------


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def framed(body: bytes, length: int | None = None) -> bytes:
    """A frame around `body`, with the true length unless told otherwise."""
    return HEADER.pack(len(body) if length is None else length) + body


def map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    return b"\xde" + struct.pack(">H", n) if n < 65536 else b"\xdf" + struct.pack(">I", n)


def packed_map(items: Sequence[tuple[Any, bytes]]) -> bytes:
    """A msgpack map whose values are already packed (for nesting packb refuses)."""
    return map_header(len(items)) + b"".join(pack(k) + v for k, v in items)


def nested(depth: int, as_map: bool, leaf: Any = None) -> bytes:
    """A value nested `depth` levels deep, packed by hand (packb stops at 512)."""
    opener = b"\x81\xa1k" if as_map else b"\x91"
    return opener * depth + pack(leaf)


KINDS: dict[str, float] = {
    "request": 46,
    "mutated": 14,
    "junkmap": 9,
    "value": 10,
    "bytes": 10,
    "lying": 1,
    "truncated": 1.5,
    "deep": 2,
    "big": 0.6,
    "too_large": 1,
    "bad_hello": 1,
    "hello": 1,
}
CLOSING_KINDS = ("too_large", "bad_hello")


class FrameGen:
    """Seeded frames of every kind; remembers the run ids and keys it made, to reuse them."""

    def __init__(
        self,
        rng: random.Random,
        sandbox: Sandbox,
        run_ids: Sequence[str],
        limit: int = DEFAULT_MAX_FRAME,
        big: int = 300_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rng = rng
        self.clock = clock
        self.sandbox = sandbox
        self.shared_runs = tuple(run_ids)
        self.limit = limit
        self.big = big
        self.runs: deque[str] = deque(maxlen=200)  # created, as the daemon's replies said
        self.tentative: deque[str] = deque(maxlen=50)  # asked for in this session
        self.keys: deque[str] = deque(maxlen=64)
        self.next_id = rng.randrange(1 << 20)
        self.seq = 0
        self.kinds = list(KINDS)
        self.weights = list(KINDS.values())
        self.ops = list(OP_WEIGHTS) + [op for op in OPS if op not in OP_WEIGHTS]
        self.op_weights = [OP_WEIGHTS.get(op, 2) for op in self.ops]

    # -- scalars and values

    def integer(self) -> int:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.randint(-3, 100)
        if r < 0.8:
            return self.rng.choice(
                (
                    0,
                    -1,
                    1,
                    127,
                    128,
                    255,
                    256,
                    65535,
                    65536,
                    2**31 - 1,
                    -(2**31),
                    2**32,
                    INT64_MAX,
                    INT64_MIN,
                    INT64_MAX + 1,
                    UINT64_MAX,
                    -(2**63) + 1,
                )
            )
        return self.rng.randint(INT64_MIN, UINT64_MAX)

    def real(self) -> float:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.uniform(-1e6, 1e6)
        return self.rng.choice(
            (
                0.0,
                -0.0,
                0.5,
                1e-300,
                5e-324,
                1e308,
                1.7976931348623157e308,
                -1e308,
                math.nan,
                math.inf,
                -math.inf,
                self.clock(),
                self.clock() + 86400 * 365,
                float(2**63),
            )
        )

    def text(self) -> str:
        rng, r = self.rng, self.rng.random()
        if r < 0.35:
            return rng.choice(TOKENS)
        if r < 0.55:
            return "".join(
                rng.choices("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_-", k=rng.randint(0, 24))
            )
        if r < 0.7:
            return "".join(chr(rng.randint(0x20, 0x7E)) for _ in range(rng.randint(0, 24)))
        if r < 0.8:
            points = (rng.randint(0x80, 0x10FFFF) for _ in range(rng.randint(1, 12)))
            return "".join(chr(c if not 0xD800 <= c <= 0xDFFF else 0xFFFD) for c in points)
        if r < 0.92:
            sep = rng.choice(("", " ", "\n", "/", "'", ":", "."))
            return sep.join(rng.choice(TOKENS) for _ in range(rng.randint(2, 5)))
        return "".join(chr(rng.randint(0, 0x1F)) for _ in range(rng.randint(1, 8)))

    def blob(self) -> bytes:
        return self.rng.randbytes(self.rng.choice((0, 1, 4, 8, 16, self.rng.randint(0, 64))))

    def key_value(self) -> Any:
        """A map key: mostly strings, sometimes anything hashable msgpack can carry."""
        r = self.rng.random()
        if r < 0.5:
            return self.rng.choice(FIELD_NAMES)
        if r < 0.8:
            return self.text()
        return self.rng.choice((self.integer(), None, True, False, self.real(), self.blob()))

    def value(self, depth: int = 0) -> Any:
        """Any msgpack value: scalars of every type, lists, maps, ext types."""
        rng, r = self.rng, self.rng.random()
        if depth < 4 and r < 0.12:
            return [self.value(depth + 1) for _ in range(rng.randint(0, 5))]
        if depth < 4 and r < 0.24:
            return {self.key_value(): self.value(depth + 1) for _ in range(rng.randint(0, 5))}
        r = rng.random()
        if r < 0.08:
            return None
        if r < 0.16:
            return rng.random() < 0.5
        if r < 0.36:
            return self.integer()
        if r < 0.5:
            return self.real()
        if r < 0.8:
            return self.text()
        if r < 0.92:
            return self.blob()
        if rng.random() < 0.3:  # ext -1: decodes to a Timestamp, which no field accepts
            return msgpack.Timestamp(rng.randrange(1 << 34), rng.randrange(10**9))
        code = rng.choice((0, 1, 127, rng.randint(0, 127)))
        return msgpack.ExtType(code, rng.randbytes(rng.choice((0, 1, 4, 8, 12, 3))))

    def json_value(self, depth: int = 0) -> Any:
        rng, r = self.rng, self.rng.random()
        if depth < 3 and r < 0.15:
            return [self.json_value(depth + 1) for _ in range(rng.randint(0, 4))]
        if depth < 3 and r < 0.3:
            return self.json_map(depth + 1)
        return rng.choice(
            (
                None,
                True,
                rng.randint(-1000, 1000),
                rng.uniform(-10, 10),
                self.text(),
                self.integer() if rng.random() < 0.2 else 0,
            )
        )

    def json_map(self, depth: int = 0) -> dict[str, Any]:
        return {self.text(): self.json_value(depth) for _ in range(self.rng.randint(0, 5))}

    # -- field values with meaning

    def fresh_run_id(self) -> str:
        return "".join(self.rng.choices(CROCKFORD, k=16))

    def created(self, run_id: str) -> None:
        """Feedback: the daemon created this run (a create's ok reply)."""
        self.runs.append(run_id)

    def run_id(self, creating: bool = False) -> Any:
        rng, r = self.rng, self.rng.random()
        if creating and r < 0.85:
            run_id = self.fresh_run_id()
            self.tentative.append(run_id)
            return run_id
        if r < 0.4 and self.runs:  # mostly the newest: lifecycles get followed through
            return self.runs[-1 - min(int(rng.expovariate(0.3)), len(self.runs) - 1)]
        if r < 0.5 and self.tentative:
            return self.tentative[-1 - min(int(rng.expovariate(0.5)), len(self.tentative) - 1)]
        if r < 0.6 and self.runs:
            return rng.choice(self.runs)
        if r < 0.8 and self.shared_runs:
            return rng.choice(self.shared_runs)
        if r < 0.9:
            return self.fresh_run_id()
        return rng.choice(
            (
                "",
                "x" * 65,
                "bad id",
                "../etc",
                "a/b",
                "é",
                "\0",
                (rng.choice(self.shared_runs)[: rng.randint(1, 15)] if self.shared_runs else "0"),
                self.text(),
            )
        )

    def key(self) -> str:
        if self.keys and self.rng.random() < 0.08:
            return self.rng.choice(self.keys)
        key = f"k{self.rng.getrandbits(64):x}"
        self.keys.append(key)
        return key

    def path(self, op: str) -> str:
        sb, rng = self.sandbox, self.rng
        if op in ("watch", "unwatch"):
            return rng.choice(
                (
                    sb.watch,
                    sb.watch,
                    os.path.join(sb.watch, "sub"),
                    os.path.join(sb.root, "nope"),
                    sb.artifact,
                    "watch",
                    "",
                    "/\0",
                )
            )
        return rng.choice(
            (
                sb.artifact,
                sb.artifact,
                sb.watch,
                sb.fifo,
                os.path.join(sb.root, "missing.bin"),
                os.path.join(sb.runs, "x", ".."),
                "relative/file",
                "",
                "/\0x",
                self.text(),
            )
        )

    def run_dir(self) -> Any:
        rng = self.rng
        if rng.random() < 0.7:
            return os.path.join(self.sandbox.runs, f"r{rng.randrange(50)}")
        return rng.choice(
            (
                os.path.join(self.sandbox.runs, self.text().replace("\0", "")),
                self.sandbox.runs + "/a/../b",
                "relative/dir",
                "",
                "/\0",
            )
        )

    def limit_value(self) -> int:
        r = self.rng.random()
        if r < 0.85:
            return self.rng.randint(1, 60)
        return self.rng.choice((0, -1, 101, 1000, 10_000, 10_001, INT64_MAX))

    def seconds(self) -> float:
        return self.rng.choice(
            (3600.0, 3600.0, 86400.0, 86400, 0.05, 0.2, 1, 0, -1, 1e308, 5e-324, 1e-3)
        )

    def at(self) -> float:
        now = self.clock()
        return self.rng.choice((now, now - 10, now + 3600, 0, -1, 1e300, -1e300, 1.5, 2**62))

    def semantic(self, op: str, name: str) -> Any:
        """A well-typed, meaningful value for field `name` of `op`."""
        allowed = SHAPES[op].fields.get(name, (str,))
        maker = SEMANTIC.get(name)
        value = maker(self, op) if maker is not None else None
        # A name can mean another type in another op (`since`: a time, or an event seq).
        return value if maker is not None and isinstance(value, allowed) else self.typed(allowed)

    def next_seq(self) -> int:
        self.seq += 1
        return self.rng.choice(
            (self.seq, self.seq, self.seq, self.rng.randint(1, 50), 0, -5, INT64_MAX)
        )

    def signal(self, op: str) -> str:
        if op == "cancel":
            return self.rng.choice(("", "NOPE", "SIGNOPE", "9", "STOP", "sig"))
        return self.rng.choice(("SIGKILL", "SIGSEGV", "9", "TERM", "", self.text()))

    def typed(self, allowed: tuple[type, ...]) -> Any:
        """Some value of one of the `allowed` types."""
        kind = self.rng.choice(allowed)
        if kind is type(None):
            return None
        if kind is bool:
            return self.rng.random() < 0.5
        if kind is int:
            return self.integer()
        if kind is float:
            return self.real()
        if kind is dict:
            return self.json_map()
        if kind is list:
            return [self.value(2) for _ in range(self.rng.randint(0, 3))]
        return self.text()

    def wrong(self, allowed: tuple[type, ...]) -> Any:
        """A value of another type than `allowed` (or, rarely, a right one: it happens)."""
        for _ in range(4):
            value = self.value(2)
            if not isinstance(value, allowed):
                return value
        return value

    def req_id(self) -> Any:
        r = self.rng.random()
        self.next_id += 1
        if r < 0.9:
            return self.next_id
        if r < 0.95:
            return self.rng.choice((0, -1, INT64_MAX, INT64_MIN, UINT64_MAX, self.integer()))
        return self.rng.choice(("7", 1.0, True, None, [1], {"id": 1}, b"\x01"))

    # -- requests

    def request(self, op: str | None = None) -> dict[Any, Any]:
        """A request map: a real op (mostly) with valid or damaged fields."""
        rng = self.rng
        if op is None:
            r = rng.random()
            op = rng.choices(self.ops, self.op_weights)[0] if r < 0.9 else rng.choice(JUNK_OPS)
        msg: dict[Any, Any] = {"op": op}
        if rng.random() < 0.97:
            msg["id"] = self.req_id()
        shape = SHAPES.get(op)
        if shape is None:
            for _ in range(rng.randint(0, 4)):
                msg[rng.choice(FIELD_NAMES)] = self.value(1)
        else:
            self.fill(msg, op, shape)
        if rng.random() < 0.1:  # shuffle: fields arrive in any order
            items = list(msg.items())
            rng.shuffle(items)
            msg = dict(items)
        return self.make_safe(msg)

    def fill(self, msg: dict[Any, Any], op: str, shape: Shape) -> None:
        """Fields of a real op: all meaningful, or (a third of the time) damaged."""
        rng = self.rng
        damaged = rng.random() < 0.3
        for name, allowed in shape.fields.items():
            required = name in shape.required
            if not damaged:
                if required or rng.random() < 0.4:
                    msg[name] = self.semantic(op, name)
                continue
            r = rng.random()
            if r < 0.12:
                continue  # missing
            if r < 0.3:
                msg[name] = self.wrong(allowed)
            elif r < 0.38:
                msg[name] = self.typed(allowed)
            elif required or r < 0.7:
                msg[name] = self.semantic(op, name)
        if damaged and rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):
                msg[self.key_value()] = self.value(1)

    def make_safe(self, msg: dict[Any, Any]) -> dict[Any, Any]:
        return make_safe(msg, self.sandbox)

    def junkmap(self) -> dict[Any, Any]:
        """A map of real and junk field names with values of any type."""
        msg: dict[Any, Any] = {
            self.key_value(): self.value(1) for _ in range(self.rng.randint(0, 6))
        }
        if self.rng.random() < 0.8:
            msg["op"] = self.rng.choice(OPS) if self.rng.random() < 0.8 else self.value(2)
        return self.make_safe(msg)

    def mutate(self, body: bytes) -> bytes:
        rng, data = self.rng, bytearray(body)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data) + 1)
            r = rng.random()
            if r < 0.3 and i < len(data):
                data[i] ^= 1 << rng.randrange(8)
            elif r < 0.55 and i < len(data):
                data[i] = rng.choice(INTERESTING_BYTES)
            elif r < 0.7:
                data[i:i] = bytes([rng.choice(INTERESTING_BYTES)])
            elif r < 0.8:
                del data[i : i + rng.randint(1, 4)]
            elif r < 0.88:
                j = rng.randrange(i, len(data) + 1)
                data[j:j] = data[i:j][:64]
            elif r < 0.94:
                del data[i:]
            else:
                data[i : i + 4] = rng.choice(
                    (
                        b"\xff\xff\xff\xff",
                        b"\x7f\xff\xff\xff",
                        b"\x80\x00\x00\x00",
                        b"\x00\x00\x00\x00",
                    )
                )
        return bytes(data)

    def big_string(self, size: int) -> str:
        token = self.rng.choice(
            (
                "\n",
                " ",
                "'",
                '"',
                "/a",
                "0x1f ",
                "é",
                "a",
                "expected ",
                'File "x.py", line 1, in f\n',
                self.text() or "z",
            )
        )
        return (token * (size // max(1, len(token.encode())) + 1))[:size]

    # -- frames and sessions

    def frame(self, kind: str) -> bytes:
        rng = self.rng
        if kind == "request":
            return framed(pack(self.request()))
        if kind == "junkmap":
            return framed(pack(self.junkmap()))
        if kind == "value":
            return framed(pack(self.value()))
        if kind == "bytes":
            size = rng.choice(
                (0, 1, 2, 5, rng.randint(0, 64), rng.randint(0, 64), rng.randint(64, 4096))
            )
            return framed(rng.randbytes(size))
        if kind == "mutated":
            body = self.mutate(pack(self.request()))
            return framed(body) if rng.random() < 0.97 else framed(body, len(body) + 1)
        if kind == "lying":
            body = pack(self.request())
            return framed(body, max(0, len(body) + rng.choice((-9, -2, -1, 1, 2, 40))))
        if kind == "truncated":
            body = pack(self.request())
            return framed(body)[: rng.randint(1, HEADER.size + len(body) - 1)]
        if kind == "deep":
            depth, as_map = rng.choice(DEPTHS), rng.random() < 0.5
            if rng.random() < 0.3:
                return framed(nested(depth, as_map))
            head = self.request("create")
            name = rng.choice(("params", "tags", "launch", "run_id", "experiment"))
            head.pop(name, None)
            return framed(
                packed_map(
                    [
                        *((k, pack(v)) for k, v in head.items()),
                        (name, b"\x81\xa1a" + nested(depth, as_map)),
                    ]
                )
            )
        if kind == "big":
            return self.big_frame()
        if kind == "too_large":
            length = rng.choice(
                (
                    self.limit + 1,
                    0x7FFFFFFF,
                    0x80000000,
                    0xFFFFFFFF,
                    0xFFFFFFFE,
                    rng.randint(self.limit + 1, 0xFFFFFFFF),
                )
            )
            return HEADER.pack(length) + rng.randbytes(rng.choice((0, 1, 10, 100)))
        if kind == "bad_hello":
            v = rng.choice((0, 2, -1, 99, INT64_MAX, INT64_MIN))
            return framed(pack({"op": "hello", "v": v, "id": self.req_id(), "client": "fz"}))
        if kind == "hello":
            return framed(
                pack(
                    self.make_safe(
                        {
                            "op": "hello",
                            "v": PROTOCOL_VERSION,
                            "id": self.req_id(),
                            "client": self.text(),
                        }
                    )
                )
            )
        raise ValueError(f"unknown frame kind {kind!r}")

    def big_frame(self) -> bytes:
        """A request with one huge field; now and then exactly at the frame limit."""
        rng = self.rng
        op = rng.choice(
            ("create", "fail", "checkpoint", "get", "heartbeat", "artifact", "cancel", "junk")
        )
        msg = self.request(op if op != "junk" else "frobnicate")
        if op in ("fail", "checkpoint", "heartbeat", "cancel") and self.runs:
            msg["run_id"] = self.runs[-1]  # a live run: the handler reads the whole field
        name = rng.choice(
            ("experiment", "message", "traceback", "params", "path", "run_id", "key", "pad")
        )
        size = rng.choice((4096, rng.randint(4096, 65536), rng.randint(65536, self.big)))
        if (
            MAX_FAILURE_TEXT is not None
            and op in ("fail", "cancel")
            and name in ("message", "traceback")
        ):
            name = "phase" if op == "fail" else "pad"
        value: Any = self.big_string(size)
        if name == "params":
            value = {"blob": value}
        elif name == "path" and op == "artifact":
            value = os.path.join(self.sandbox.root, value.replace("\0", ""))[:size]
        msg[name] = value
        body = pack(self.make_safe(msg))
        if rng.random() < 0.05:  # pad to exactly the limit: the largest frame served
            msg["pad2"] = ""
            overhead = len(pack(msg)) + 4  # the str32 header of the padding
            if overhead <= self.limit:
                msg["pad2"] = "p" * (self.limit - overhead)
                body = pack(msg)
        return framed(body)

    def session(self, extra: deque[bytes] | None = None) -> list[tuple[str, bytes]]:
        """One connection's frames, (kind, bytes) each; ends early after a closing kind."""
        rng = self.rng
        count = rng.choice(
            (rng.randint(1, 10), rng.randint(10, 100), rng.randint(10, 100), rng.randint(100, 400))
        )
        frames: list[tuple[str, bytes]] = []
        if rng.random() < 0.92:
            frames.append(("hello", self.frame("hello")))
        while len(frames) < count:
            if extra and rng.random() < 0.1:
                frames.append(("hypothesis", extra.popleft()))
                continue
            kind = rng.choices(self.kinds, self.weights)[0]
            frames.append((kind, self.frame(kind)))
            if (
                kind in CLOSING_KINDS
                or kind == "truncated"
                or (kind == "lying" and rng.random() < 0.7)
            ):
                break  # the daemon hangs up, waits for bytes, or reads the rest askew
        return frames


Maker = Callable[[FrameGen, str], Any]
SEMANTIC: dict[str, Maker] = {
    "run_id": lambda g, op: g.run_id(creating=op == "create"),
    "run": lambda g, op: g.run_id(),
    "retry_of": lambda g, op: g.run_id(),
    "after": lambda g, op: g.run_id(),
    "key": lambda g, op: g.key(),
    "seq": lambda g, op: g.next_seq(),
    "v": lambda g, op: PROTOCOL_VERSION,
    "experiment": lambda g, op: g.rng.choice(
        ("fuzz", "mnist", "sweep-a", f"e{g.rng.randrange(20)}", f"e{g.rng.randrange(20)}")
        if g.rng.random() < 0.9
        else ("", "x" * 257, g.text())
    ),
    "params": lambda g, op: g.json_map() if g.rng.random() < 0.93 else {g.text(): g.value()},
    "run_dir": lambda g, op: g.run_dir(),
    "cwd": lambda g, op: g.rng.choice(
        (g.sandbox.root, g.sandbox.root, g.sandbox.runs, "relative", "", "/\0")
    ),
    "path": lambda g, op: g.path(op),
    "heartbeat_timeout": lambda g, op: g.seconds(),
    "at": lambda g, op: g.at(),
    "before": lambda g, op: (
        g.rng.choice((0, 1e9, -1.0)) if g.rng.random() < 0.97 else g.clock() + 1e6
    ),
    "dry_run": lambda g, op: g.rng.random() < 0.7,
    "states": lambda g, op: [
        g.rng.choice((*TERMINAL, *TERMINAL, "running", "nope", ""))
        for _ in range(g.rng.randint(0, 3))
    ],
    "state": lambda g, op: g.rng.choice((*STATES, "nope", "", "RUNNING")),
    "reason": lambda g, op: g.rng.choice(
        ("crash", "crash", "abandoned", "timeout", "lost", "", "CRASH")
    ),
    "failure_class": lambda g, op: g.rng.choice(CLASSES) if g.rng.random() < 0.7 else g.text(),
    "message": lambda g, op: g.rng.choice(MESSAGES) if g.rng.random() < 0.6 else g.text(),
    "traceback": lambda g, op: TRACEBACK if g.rng.random() < 0.6 else g.text(),
    "signal": lambda g, op: g.signal(op),
    "category_hint": lambda g, op: g.rng.choice(("oom", "OOM", "", "network", g.text())),
    "exit_code": lambda g, op: g.rng.choice((0, 1, 137, 139, -9, 255, 256, g.integer())),
    "limit": lambda g, op: g.limit_value(),
    "group_by": lambda g, op: g.rng.choice(("class", "signature", "category", "run", "", "CLASS")),
    "what": lambda g, op: g.rng.choice(("runs", "failures", "artifacts", "")),
    "client": lambda g, op: g.text(),
}
for _alias, _same in (
    ("variation", "experiment"),
    ("tags", "params"),
    ("launch", "params"),
    ("data", "params"),
    ("lost_grace", "heartbeat_timeout"),
    ("deadline", "heartbeat_timeout"),
    ("since", "at"),
    ("host", "client"),
    ("phase", "client"),
):
    SEMANTIC[_alias] = SEMANTIC[_same]


# --- playing sessions against the daemon ------------------------------------------------


class Hangup(Exception):
    """The daemon stopped answering or could not be reached."""


class Link:
    """One non-blocking client socket: writes a byte stream while it reads the replies."""

    def __init__(self, path: str, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise Hangup(f"cannot connect to {path}: {exc}") from None
        sock.setblocking(False)
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        self.inbuf = bytearray()
        self.replies: list[Any] = []
        self.events = 0  # event frames of a subscribed connection: no id, not replies
        self.garbled: list[str] = []
        self.eof = False
        self.write_closed = False

    def pump(
        self, data: bytes, want: int, deadline: float, chunk: Callable[[], int] | None = None
    ) -> None:
        """Write `data`, reading all the while; return once it is written (or the daemon
        hung up) and `want` replies have arrived (or EOF). Raise Hangup at the deadline."""
        view, sent = memoryview(data), 0
        while True:
            writing = sent < len(view) and not self.write_closed and not self.eof
            if not writing and (len(self.replies) >= want or self.eof):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hangup(
                    f"{len(self.replies)} of {want} replies after the deadline "
                    f"({sent} of {len(view)} bytes written)"
                )
            self.poller.modify(
                self.sock.fileno(), select.POLLIN | (select.POLLOUT if writing else 0)
            )
            for _, event in self.poller.poll(min(left, 1.0) * 1000):
                if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self.read()
                if writing and event & select.POLLOUT:
                    end = len(view) if chunk is None else sent + chunk()
                    sent += self.write(view[sent:end])

    def write(self, data: memoryview) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError):
            self.write_closed = True
            return 0

    def read(self) -> None:
        while not self.eof:
            try:
                data = self.sock.recv(1 << 18)
            except BlockingIOError:
                return
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                return
            self.inbuf += data
            self.parse()

    def parse(self) -> None:
        buf, pos = self.inbuf, 0
        while len(buf) - pos >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, pos)
            if len(buf) - pos - HEADER.size < length:
                break
            body = bytes(buf[pos + HEADER.size : pos + HEADER.size + length])
            pos += HEADER.size + length
            try:
                msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
            except Exception as exc:
                self.garbled.append(f"reply is not msgpack ({exc}): {body[:80]!r}")
                continue
            if isinstance(msg, dict) and "event" in msg and "id" not in msg:
                self.events += 1
            else:
                self.replies.append(msg)
        del buf[:pos]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Stats:
    """What one or more fuzzing connections did and saw."""

    frames: int = 0
    checked: int = 0  # frames whose reply was matched against the oracle
    sessions: int = 0
    abandoned: int = 0
    unsafe: int = 0
    bytes: int = 0
    replies: int = 0
    events: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    ok_ops: Counter[str] = field(default_factory=Counter)  # ok replies by op (unique ids)
    kinds: Counter[str] = field(default_factory=Counter)
    hangups: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    slowest: float = 0.0

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < 25:
            self.problems.append(text)

    def merge(self, other: Stats) -> None:
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "slowest":
                self.slowest = max(mine, theirs)
            elif f.name == "problems":
                self.problems += theirs[: max(0, 25 - len(self.problems))]
            elif isinstance(mine, Counter):
                mine.update(theirs)
            else:
                setattr(self, f.name, mine + theirs)


@dataclass(frozen=True)
class Target:
    """Where to fuzz and with what."""

    socket: str
    sandbox: Sandbox
    run_ids: tuple[str, ...]
    limit: int = DEFAULT_MAX_FRAME
    timeout: float = 30.0  # per session: longer means the daemon stalled
    reconnect_for: float = 0.0  # keep retrying to connect this long (a daemon restart)
    big: int = 300_000


class Fuzzer:
    """One connection's worth of sessions, from a seed."""

    def __init__(self, target: Target, seed: str, extra: Sequence[bytes] = ()) -> None:
        self.target = target
        self.seed = seed
        self.rng = random.Random(seed)
        self.gen = FrameGen(self.rng, target.sandbox, target.run_ids, target.limit, target.big)
        self.extra: deque[bytes] = deque(extra)
        self.stats = Stats()

    def run(self, frames: int, until: float = math.inf) -> Stats:
        """Play sessions until `frames` frames (and every extra frame) went out."""
        while (self.stats.frames < frames or self.extra) and time.monotonic() < until:
            session = self.gen.session(self.extra)
            try:
                self.play(session)
            except Hangup as exc:
                self.stats.problem(f"[seed {self.seed} session {self.stats.sessions}] {exc}")
                self.stats.hangups[str(exc).split(":")[0]] += 1
                return self.stats
        return self.stats

    def chunker(self, size: int) -> Callable[[], int] | None:
        """How the stream is cut into writes: whole, in random pieces, or byte by byte."""
        r = self.rng.random()
        if r < 0.7:
            return None
        if r < 0.95 or size > 4096:
            return lambda: self.rng.randint(1, 4096)
        return lambda: self.rng.randint(1, 7)

    def connect(self) -> Link:
        give_up = time.monotonic() + self.target.reconnect_for
        while True:
            try:
                return Link(self.target.socket, self.target.timeout)
            except Hangup:
                if time.monotonic() > give_up:
                    raise
                self.stats.hangups["reconnect"] += 1
                time.sleep(0.2)

    def play(self, session: list[tuple[str, bytes]]) -> None:
        stats, target = self.stats, self.target
        stream = b"".join(data for _, data in session)
        try:
            plan = plan_session(stream, target.limit, target.sandbox)
        except Unsafe:
            stats.unsafe += 1
            return
        label = f"[seed {self.seed} session {stats.sessions}]"
        stats.sessions += 1
        stats.frames += len(session)
        stats.bytes += len(stream)
        stats.kinds.update(kind for kind, _ in session)
        chunk = self.chunker(len(stream))
        started = time.monotonic()
        deadline = started + target.timeout
        link = self.connect()
        try:
            if self.rng.random() < 0.04:  # a client that sends and goes away
                link.pump(stream, 0, deadline, chunk)
                stats.abandoned += 1
                return
            link.pump(stream[: plan.cut], len(plan.expected), deadline, chunk)
            link.read()
            if len(link.replies) < len(plan.expected):
                stats.problem(
                    f"{label} the daemon hung up after {len(link.replies)} of "
                    f"{len(plan.expected)} replies"
                )
            self.check(label, link.replies, plan.expected)
            if plan.closing is not None:
                link.replies = []
                link.pump(stream[plan.cut :], 1 << 30, deadline, chunk)  # until EOF
                self.check(label, link.replies, [plan.closing])
            stats.slowest = max(stats.slowest, time.monotonic() - started)
            stats.events += link.events
            for text in link.garbled:
                stats.problem(f"{label} {text}")
        finally:
            link.close()

    def check(self, label: str, replies: list[Any], expected: list[Expect]) -> None:
        stats = self.stats
        ids = Counter(e.id for e in expected)
        ops_by_id = {e.id: e.op for e in expected if ids[e.id] == 1 and e.op}
        stats.replies += len(replies)
        good = []
        for reply in replies:
            problem = reply_problem(reply)
            if problem is None:
                good.append(reply)
                stats.codes[reply_code(reply)] += 1
                if reply["ok"] and "attempt" in reply and isinstance(reply.get("run_id"), str):
                    self.gen.created(reply["run_id"])
                if reply["ok"] and ops_by_id.get(reply["id"]):
                    stats.ok_ops[ops_by_id[reply["id"]]] += 1
            else:
                stats.problem(f"{label} {problem}")
                stats.codes["malformed"] += 1
        if len(good) == len(replies):
            for problem in match_replies(good, expected):
                stats.problem(f"{label} {problem}")
        stats.checked += len(expected)


# --- the daemon's health -------------------------------------------------------------


def seed_runs(socket_path: str, count: int = 30) -> tuple[str, ...]:
    """Runs in every client-reachable state for the fuzzers to aim at (this pid attached)."""
    run_ids = []
    with contextlib.closing(Connection(socket_path, client="fuzz-seed")) as conn:
        for i in range(count):
            run_id = new_run_id()
            run_ids.append(run_id)
            conn.call(
                Create(
                    key=new_key(),
                    run_id=run_id,
                    experiment="fuzz-seed",
                    variation=f"v{i % 3}",
                    params={"i": i},
                )
            )
            stage = i % 5
            if stage == 0:
                continue  # pending
            timeout = 0.3 if stage == 2 else 3600.0  # stage 2 goes lost
            conn.call(Start(key=new_key(), run_id=run_id, heartbeat_timeout=timeout))
            if stage == 3:
                conn.call(Succeed(key=new_key(), run_id=run_id))
            elif stage == 4:
                conn.call(
                    Fail(
                        key=new_key(),
                        run_id=run_id,
                        failure_class="ValueError",
                        message=f"bad value {i}",
                        traceback=TRACEBACK,
                    )
                )
    return tuple(run_ids)


def _call(conn: Connection, req: Request) -> dict[str, Any]:
    reply = conn.send(req).result(30)
    if not reply.get("ok"):
        raise AssertionError(f"{req.op} answered {reply}")
    return reply


def check_health(socket_path: str) -> None:
    """A fresh client: hello, create/start/succeed a run, read it back, replay, refuse."""
    run_id, params = new_run_id(), {"lr": 0.1, "layers": [64, 64], "name": "héalth"}
    keys = [new_key() for _ in range(3)]
    with contextlib.closing(Connection(socket_path, client="fuzz-health", timeout=30)) as conn:
        assert conn.hello["v"] == PROTOCOL_VERSION, conn.hello
        created = _call(
            conn, Create(key=keys[0], run_id=run_id, experiment="fuzz-health", params=params)
        )
        assert created["state"] == "pending" and created["attempt"] >= 1, created
        assert _call(conn, Start(key=keys[1], run_id=run_id))["state"] == "running"
        assert _call(conn, Succeed(key=keys[2], run_id=run_id))["state"] == "succeeded"
        run = _call(conn, Get(run=run_id))["run"]
        assert (run["run_id"], run["state"], run["experiment"], run["params"]) == (
            run_id,
            "succeeded",
            "fuzz-health",
            params,
        ), run
        assert [(t["from"], t["to"]) for t in run["transitions"]] == [
            (None, "pending"),
            ("pending", "running"),
            ("running", "succeeded"),
        ], run
        replay = _call(conn, Succeed(key=keys[2], run_id=run_id))
        assert replay["state"] == "succeeded", replay
        again = conn.send(Succeed(key=new_key(), run_id=run_id)).result(30)
        assert again["error"]["code"] == "invalid_transition", again


def integrity_check(db: str | Path) -> str:
    """PRAGMA integrity_check of the registry, opened read-only beside the running daemon."""
    uri = f"{Path(db).resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
        return "\n".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", re.M)


def unretrieved(record: str) -> bool:
    """A request that failed after its client hung up, logged as an ERROR by asyncio (a
    registry future, or the task of an async handler): the fuzzing found it, now fixed."""
    return (
        "Future exception was never retrieved" in record
        or "Task exception was never retrieved" in record
    ) and "exception=RunnerdError(" in record


def log_errors(log: Path) -> tuple[list[str], list[str]]:
    """The daemon's ERROR/CRITICAL log records (with their tracebacks): (unexpected, those
    of a request whose client had gone)."""
    if not log.exists():
        return [], []
    text = log.read_text(errors="replace")
    starts = [m.start() for m in LOG_RECORD.finditer(text)] + [len(text)]
    records = [text[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    errors = [r for r in records if re.match(r"\S+ \S+ (ERROR|CRITICAL) ", r)]
    return [r for r in errors if not unretrieved(r)], [r for r in errors if unretrieved(r)]


def registry_summary(db: str | Path) -> dict[str, dict[str, int]]:
    """Runs by state and transitions by cause, read-only: how far the state machine went."""
    uri = f"{Path(db).resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
        return {
            "runs": dict(conn.execute("SELECT state, COUNT(*) FROM runs GROUP BY state")),
            "transitions": dict(
                conn.execute("SELECT cause, COUNT(*) FROM transitions GROUP BY cause")
            ),
        }


# --- the benchmark ---------------------------------------------------------------------


FORK = mp.get_context("fork")


def _worker(target: Target, seed: str, frames: int, queue: Any) -> None:
    try:
        stats = Fuzzer(target, seed).run(frames)
    except BaseException as exc:  # report anything, so the parent never waits forever
        stats = Stats()
        stats.problem(f"[seed {seed}] worker died: {exc!r}")
    queue.put(stats)


@contextlib.contextmanager
def temp_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="rdfz-", dir="/tmp"))  # unix socket paths are short
    try:
        yield root
    finally:
        if not os.environ.get("FUZZ_KEEP"):
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames in all")
    parser.add_argument("--connections", type=int, default=8, help="concurrent connections")
    parser.add_argument("--seed", default=None, help="seed (printed when not given)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds a session may wait for its replies"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="fuzz in rounds, with the daemon's RSS after each"
    )
    parser.add_argument(
        "--no-guard",
        action="store_true",
        help="send failure texts longer than MAX_FAILURE_TEXT too",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    global MAX_FAILURE_TEXT
    args = parse_args(argv)
    if args.no_guard:
        MAX_FAILURE_TEXT = None
    seed = args.seed if args.seed is not None else str(random.randrange(1 << 32))
    print(f"fuzz: {args.frames:,} frames over {args.connections} connections, seed {seed}")
    with temp_root() as root:
        server = Daemon(root, log_level="warning").start()
        try:
            return _bench(args, seed, root, server)
        finally:
            server.stop(timeout=120)


def _round(
    target: Target, seed: str, frames: int, connections: int, server: Daemon
) -> tuple[list[Stats], int, list[int]]:
    """One round: `connections` forked fuzzers; (their stats, daemon restarts, RSS samples)."""
    queue = FORK.Queue()
    per = -(-frames // connections)
    workers = [
        FORK.Process(target=_worker, args=(target, f"{seed}:{i}", per, queue), daemon=True)
        for i in range(connections)
    ]
    for w in workers:
        w.start()
    results: list[Stats] = []
    restarts, rss = 0, []
    while len(results) < len(workers):
        with contextlib.suppress(Exception):
            results.append(queue.get(timeout=0.5))
        if server.proc is not None and server.proc.poll() is not None:
            restarts += 1
            print(f"daemon exited with {server.proc.returncode}; restarting", file=sys.stderr)
            server.start()
        with contextlib.suppress(OSError):
            rss.append(rss_kib(server.pid))
    for w in workers:
        w.join(10)
    return results, restarts, rss


def _bench(args: argparse.Namespace, seed: str, root: Path, server: Daemon) -> int:
    sandbox = Sandbox(str(root / "sb")).prepare()
    target = Target(
        str(server.socket),
        sandbox,
        seed_runs(str(server.socket)),
        timeout=args.timeout,
        reconnect_for=120.0,
    )
    rss, restarts, total = [rss_kib(server.pid)], 0, Stats()
    began = time.monotonic()
    for n in range(args.rounds):
        round_seed = seed if args.rounds == 1 else f"{seed}/{n}"
        results, again, samples = _round(
            target, round_seed, args.frames // args.rounds, args.connections, server
        )
        restarts += again
        rss += samples
        for stats in results:
            total.merge(stats)
        if args.rounds > 1:
            runs = sum(registry_summary(server.env["RUNNERD_DB"])["runs"].values())
            print(
                f"round {n + 1}: {total.frames:,} frames so far, {runs:,} runs in the "
                f"registry, daemon RSS {rss_kib(server.pid) / 1024:.1f} MiB",
                flush=True,
            )
    elapsed = time.monotonic() - began
    rss.append(rss_kib(server.pid))
    health = "ok"
    try:
        check_health(str(server.socket))
    except Exception as exc:
        health = f"FAILED: {exc!r}"
    ctl = subprocess.run(
        [sys.executable, "-m", "runnerd.cli", "status"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    integrity = integrity_check(server.env["RUNNERD_DB"])
    errors, unretrieved_errors = log_errors(server.log)
    _report(total, elapsed, restarts, health, ctl.returncode, integrity, rss, errors)
    print(f"errors of requests whose client had gone {len(unretrieved_errors)}")
    summary = registry_summary(server.env["RUNNERD_DB"])
    print(f"registry runs      {summary['runs']}")
    print(f"transitions        {summary['transitions']}")
    good = (
        restarts == 0
        and health == "ok"
        and ctl.returncode == 0
        and integrity == "ok"
        and total.problem_count == 0
        and not errors
    )
    return 0 if good else 1


def _report(
    total: Stats,
    elapsed: float,
    restarts: int,
    health: str,
    ctl_rc: int,
    integrity: str,
    rss: list[int],
    errors: list[str],
) -> None:
    rate = total.frames / elapsed if elapsed else 0.0
    print(
        f"frames sent        {total.frames:>12,}   ({total.bytes / 1e6:,.1f} MB in "
        f"{total.sessions:,} sessions, {total.abandoned:,} abandoned, {total.unsafe:,} "
        f"left unsent by the safety gate)"
    )
    print(f"frames checked     {total.checked:>12,}   (replies matched against the oracle)")
    print(f"event frames       {total.events:>12,}   (to subscribed connections)")
    print(f"elapsed            {elapsed:>12.1f} s")
    print(f"frames/s           {rate:>12,.0f}")
    print(f"slowest session    {total.slowest:>12.2f} s")
    print("replies by code:")
    for code, n in total.codes.most_common():
        print(f"  {code:<20} {n:>12,}")
    print("frames by kind:    " + ", ".join(f"{k} {n:,}" for k, n in total.kinds.most_common()))
    print("ok replies by op:  " + ", ".join(f"{k} {n:,}" for k, n in total.ok_ops.most_common()))
    print(f"daemon restarts    {restarts:>12}")
    print(f"reconnects/hangups {dict(total.hangups)}")
    print(f"problems           {total.problem_count:>12}")
    for text in total.problems[:10]:
        print(f"  {text[:400]}")
    print(f"health check       {health}")
    print(f"runnerctl status   exit {ctl_rc}")
    print(f"integrity_check    {integrity}")
    quarters = ", ".join(f"{rss[round(q * (len(rss) - 1))] / 1024:.1f}" for q in (0.25, 0.5, 0.75))
    print(
        f"daemon RSS         {rss[0] / 1024:.1f} MiB before, {rss[-1] / 1024:.1f} MiB after, "
        f"peak {max(rss) / 1024:.1f} (at 1/4, 1/2, 3/4 of the run: {quarters})"
    )
    print(f"daemon log errors  {len(errors)} (besides those)")
    for record in errors[:5]:
        print(f"  {record[:600]}")


if __name__ == "__main__":
    sys.exit(main())
