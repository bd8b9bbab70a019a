"""Randomized proof that bad input never breaks the daemon (SPEC §4).

A live daemon takes a barrage of random, mutated and malformed frames from several
connections at once: the seeded generators of tests/fuzz.py, which predict every reply
(shape, id, and the error code wherever framing or decoding alone decides it), plus frames
drawn by hypothesis. Every example ends with the daemon alive; the barrage ends with a
fresh client running a whole lifecycle, `runnerctl status` exiting 0, no unexpected error
in the daemon's log and `PRAGMA integrity_check` answering "ok".

The seed is printed; replay with RUNNERD_FUZZ_SEED=<seed> (the daemon's timing may still
differ). The bugs the fuzzing found each have a regression test at the end.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fuzz  # the generators, the oracle, the health checks
import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from conftest import Daemon, RawClient
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import HEADER

SEED = int(os.environ.get("RUNNERD_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
CONNECTIONS = 4
EXAMPLES = 8
FRAMES_PER_EXAMPLE = 2000  # seeded frames per example, over all connections
MIN_FRAMES = 10_000


# --- hypothesis strategies --------------------------------------------------------------

INTS = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
)
FLOATS = st.floats()  # nan, inf, -0.0 and subnormals included
TEXT = st.one_of(st.text(max_size=30), st.sampled_from(fuzz.TOKENS))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    FLOATS,
    TEXT,
    st.binary(max_size=30),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 10**9 - 1)),
)
KEYS = st.one_of(
    st.sampled_from(fuzz.FIELD_NAMES),
    TEXT,
    INTS,
    st.none(),
    st.booleans(),
    FLOATS,
    st.binary(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda kids: st.one_of(st.lists(kids, max_size=6), st.dictionaries(KEYS, kids, max_size=6)),
    max_leaves=30,
)
NESTED = st.builds(
    fuzz.nested, st.sampled_from(fuzz.DEPTHS) | st.integers(1, 1500), st.booleans(), SCALARS
)


def typed(allowed: tuple[type, ...], run_ids: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """Values of the wire types a field accepts (and, for strings, real run ids)."""
    parts: list[st.SearchStrategy[Any]] = []
    for kind in allowed:
        if kind is type(None):
            parts.append(st.none())
        elif kind is bool:
            parts.append(st.booleans())
        elif kind in (int, float):
            parts.append(INTS if kind is int else FLOATS)
        elif kind is dict:
            parts.append(st.dictionaries(TEXT, VALUES, max_size=4))
        elif kind is list:
            parts.append(st.lists(VALUES, max_size=4))
        else:
            parts.append(TEXT | st.sampled_from(run_ids))
    return st.one_of(parts)


@st.composite
def requests(draw: st.DrawFn, run_ids: tuple[str, ...], sandbox: fuzz.Sandbox) -> Any:
    """A request map: real or junk op; each field well-typed, missing or anything."""
    ops = st.sampled_from(fuzz.OPS)
    op = draw(st.one_of(ops, ops, ops, st.sampled_from(fuzz.JUNK_OPS), VALUES))
    msg: dict[Any, Any] = {"op": op}
    if draw(st.integers(0, 9)):
        msg["id"] = draw(st.integers(0, 2**31) | INTS | VALUES)
    shape = fuzz.SHAPES.get(op) if isinstance(op, str) else None
    for name, allowed in shape.fields.items() if shape else ():
        how = draw(st.sampled_from(("typed", "typed", "typed", "missing", "any")))
        if how == "typed":
            msg[name] = draw(typed(allowed, run_ids))
        elif how == "any":
            msg[name] = draw(VALUES)
    msg.update(draw(st.dictionaries(KEYS, VALUES, max_size=3)))
    return fuzz.make_safe(msg, sandbox)


@st.composite
def frames(draw: st.DrawFn, run_ids: tuple[str, ...], sandbox: fuzz.Sandbox) -> bytes:
    """One frame: a request, any value, a mutated request, bytes, or deep nesting."""
    kind = draw(
        st.sampled_from(("request", "request", "request", "value", "mutated", "bytes", "deep"))
    )
    if kind == "request":
        body = fuzz.pack(draw(requests(run_ids, sandbox)))
    elif kind == "value":
        body = fuzz.pack(draw(VALUES))
    elif kind == "mutated":
        edited = bytearray(fuzz.pack(draw(requests(run_ids, sandbox))))
        for where, byte in draw(
            st.lists(
                st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4
            )
        ):
            edited[where % len(edited)] = byte
        body = bytes(edited)
    elif kind == "bytes":
        body = draw(st.binary(max_size=200))
    else:
        body = draw(NESTED)
        if draw(st.booleans()):
            body = fuzz.packed_map(
                [
                    ("op", fuzz.pack("create")),
                    ("id", fuzz.pack(1)),
                    ("key", fuzz.pack(new_key())),
                    ("run_id", fuzz.pack(new_run_id())),
                    ("experiment", fuzz.pack("deep")),
                    ("params", b"\x81\xa1a" + body),
                ]
            )
    lie = draw(st.sampled_from((0,) * 12 + (-1, 1, 3)))
    return fuzz.framed(body, max(0, len(body) + lie))


# --- the barrage --------------------------------------------------------------------------


@dataclass
class Arena:
    daemon: Daemon
    target: fuzz.Target


@pytest.fixture(scope="module")
def arena() -> Iterator[Arena]:
    """A daemon of the module's own with a sandbox and runs in every state to aim at."""
    with tempfile.TemporaryDirectory(prefix="rd-", dir="/tmp") as name:  # short socket path
        daemon = Daemon(Path(name), extra_args=["--log-level", "info"]).start()
        try:
            sandbox = fuzz.Sandbox(os.path.join(name, "sb")).prepare()
            run_ids = fuzz.seed_runs(str(daemon.socket))
            yield Arena(
                daemon, fuzz.Target(str(daemon.socket), sandbox, run_ids, timeout=20.0, big=200_000)
            )
            unwatch(daemon, sandbox)
        finally:
            daemon.stop()


def unwatch(daemon: Daemon, sandbox: fuzz.Sandbox) -> None:
    """Drop the folders the barrage may have watched: with one watched, SIGTERM used to take
    5 s."""
    client = RawClient(daemon.socket)
    try:
        client.hello()
        for path in (sandbox.watch, os.path.join(sandbox.watch, "sub")):
            client.call({"op": "unwatch", "id": 1, "path": path})
    finally:
        client.close()


def barrage(arena: Arena, label: str, extra: list[bytes]) -> fuzz.Stats:
    """FRAMES_PER_EXAMPLE seeded frames plus `extra`, over CONNECTIONS threads at once."""
    per = FRAMES_PER_EXAMPLE // CONNECTIONS
    fuzzers = [
        fuzz.Fuzzer(arena.target, f"{label}:{i}", extra[i::CONNECTIONS]) for i in range(CONNECTIONS)
    ]
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        results = list(pool.map(lambda f: f.run(per), fuzzers))
    total = fuzz.Stats()
    for stats in results:
        total.merge(stats)
    return total


def alive(daemon: Daemon) -> str:
    assert daemon.proc is not None
    code = daemon.proc.poll()
    return "" if code is None else f"runnerd exited {code}: {daemon.log.read_text()[-3000:]}"


def test_barrage_of_bad_frames_leaves_the_daemon_serving(arena: Arena) -> None:
    print(f"fuzz seed {SEED} (replay: RUNNERD_FUZZ_SEED={SEED})")
    total = fuzz.Stats()
    target = arena.target

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )
    @given(
        salt=st.integers(0, 2**32 - 1),
        extra=st.lists(frames(target.run_ids, target.sandbox), min_size=10, max_size=50),
    )
    def examples_of(salt: int, extra: list[bytes]) -> None:
        stats = barrage(arena, f"{SEED}/{salt}", extra)
        total.merge(stats)
        assert not alive(arena.daemon), alive(arena.daemon)
        assert stats.problem_count == 0, f"seed {SEED}: " + "\n".join(stats.problems)

    examples_of()
    print(
        f"{total.frames} frames ({total.checked} checked, {total.events} events) in "
        f"{total.sessions} sessions: "
        f"{dict(total.codes)}"
    )
    assert total.frames >= total.checked >= MIN_FRAMES, total
    assert total.kinds["hypothesis"] > 0 and total.kinds["too_large"] > 0, total.kinds
    assert total.codes["ok"] > 0 and total.codes["invalid_transition"] > 0, total.codes

    fuzz.check_health(target.socket)
    assert arena.daemon.ctl("status").returncode == 0
    assert not alive(arena.daemon), alive(arena.daemon)
    errors, _gone = fuzz.log_errors(arena.daemon.log)
    assert not errors, "\n".join(errors[:5])
    assert fuzz.integrity_check(arena.daemon.db) == "ok"


def test_oracle_replays_and_judges_sessions(tmp_path: Path) -> None:
    """The generator is a function of its seed, and the oracle reads a session as the daemon
    does: hello first, a lying header swallows what follows, too_large cuts the session."""
    sandbox = fuzz.Sandbox(str(tmp_path))

    def frames_of(label: str) -> list[tuple[str, bytes]]:
        gen = fuzz.FrameGen(random.Random(label), sandbox, ("R" * 16,), clock=lambda: 1.7e9)
        return [frame for _ in range(20) for frame in gen.session()]

    assert frames_of("a") == frames_of("a") != frames_of("b")
    status = fuzz.framed(fuzz.pack({"op": "status", "id": 5}))
    hello = fuzz.framed(fuzz.pack({"op": "hello", "v": 1, "id": 1}))
    plan = fuzz.plan_session(status + hello + status + b"\x00\x00\x00\x09ab", 1 << 20, sandbox)
    assert [(e.id, e.code) for e in plan.expected] == [(5, "bad_request"), (1, "ok"), (5, "*")]
    assert plan.closing is None
    lying = fuzz.framed(fuzz.pack({"op": "status", "id": 6}), 3)
    plan = fuzz.plan_session(hello + lying + HEADER.pack(1 << 21) + status, 1 << 20, sandbox)
    assert [e.code for e in plan.expected] == ["ok", "bad_frame"]
    assert plan.closing == fuzz.Expect(None, "too_large")
    assert plan.cut == len(hello) + 4 + 3  # the status body's tail read as a header


# --- what the fuzzing found, each fixed -------------------------------------------------------


def fail_with(daemon: Daemon, **fail_fields: Any) -> None:
    """Fail a run with `fail_fields` and get the reply; a daemon frozen by a quadratic regex
    would not answer within the socket timeout (and the test's)."""
    client = RawClient(daemon.socket, timeout=120)
    try:
        client.hello()
        run_id = new_run_id()
        created = client.call(
            {"op": "create", "id": 1, "key": new_key(), "run_id": run_id, "experiment": "bug"}
        )
        assert created["ok"], created
        reply = client.call(
            {"op": "fail", "id": 2, "key": new_key(), "run_id": run_id, **fail_fields}
        )
        assert reply["ok"] is True, reply
        assert client.call({"op": "no-such-op", "id": 3})["error"]["code"] == "unknown_op"
    finally:
        client.close()


def test_a_huge_traceback_of_blank_lines_does_not_freeze_the_daemon(daemon: Daemon) -> None:
    """Was quadratic in the newlines (80,000 froze the daemon 4.6 s; this is 900,000)."""
    fail_with(daemon, traceback="\n" * 900_000)


def test_a_huge_message_repeating_expected_does_not_freeze_the_daemon(daemon: Daemon) -> None:
    """Was quadratic in the repeats of 'expected' (72 KB froze the daemon 2.5 s)."""
    fail_with(daemon, message="expected " * 100_000)


def test_a_client_gone_before_its_error_replies_leaves_no_error_in_the_log(daemon: Daemon) -> None:
    gone = RawClient(daemon.socket)
    gone.hello()
    gone.send_raw(
        b"".join(
            fuzz.framed(
                fuzz.pack({"op": "start", "id": i, "key": new_key(), "run_id": f"NOSUCHRUN{i}"})
            )
            for i in range(20)
        )
    )
    gone.close()
    bystander = RawClient(daemon.socket)
    bystander.hello()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # each new batch frees the futures of the one before
        bystander.call({"op": "heartbeat", "id": 1, "run_id": "NOSUCHRUN", "seq": 1})
        if fuzz.log_errors(daemon.log)[1]:
            break
    bystander.close()
    assert fuzz.log_errors(daemon.log) == ([], [])


def test_sigterm_with_a_watched_folder_stops_within_3_s(daemon: Daemon, short_tmp: Path) -> None:
    folder = short_tmp / "watched"
    folder.mkdir()
    client = RawClient(daemon.socket)
    client.hello()
    assert client.call({"op": "watch", "id": 1, "path": str(folder)})["ok"] is True
    client.close()
    assert daemon.stop(timeout=3.0) == 0  # it took 5 s, and got killed, before the fix


def test_prune_finds_each_runs_idempotency_keys_by_index(daemon: Daemon) -> None:
    runs, keys = 2000, 150_000  # a registry some weeks old has far more
    daemon.stop()
    with contextlib.closing(sqlite3.connect(daemon.db, isolation_level=None)) as db:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO runs (run_id, experiment, variation, attempt, state, params, tags,"
            " created_at, ended_at, heartbeat_seq, heartbeats)"
            " VALUES (?, 'old', 'v', ?, 'succeeded', '{}', '{}', 1.0, 2.0, 0, 0)",
            [(f"OLD{i:06d}", i + 1) for i in range(runs)],
        )
        db.executemany(
            "INSERT INTO idempotency (key, op, run_id, reply, at)"
            " VALUES (?, 'start', ?, '{}', 1.0)",
            [(f"k{i}", f"OLD{i % runs:06d}") for i in range(keys)],
        )
        db.execute("COMMIT")
    daemon.start()
    client = RawClient(daemon.socket, timeout=120)
    try:
        client.hello()
        reply = client.call({"op": "prune", "id": 1, "before": 1000.0})
    finally:
        client.close()
    assert reply["count"] == runs, reply
    with contextlib.closing(sqlite3.connect(daemon.db)) as db:
        assert db.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0] == 0
        indexes = {row[1] for row in db.execute("PRAGMA index_list('idempotency')")}
    assert "idempotency_by_run" in indexes  # without it, one full scan per pruned run
