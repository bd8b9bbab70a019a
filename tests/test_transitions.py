"""The run state machine (SPEC §2), through the wire: every event a client can send, from every
state a client can reach, plus idempotent replay and attempt numbering.

The whole table, including the daemon's own events (heartbeat_missed, grace_expired,
deadline, process_exited), is checked by a unit test of `next_state`. Over the wire a run
reaches `lost` by starting with a short heartbeat_timeout and not beating; `failed_lost`
is left to the liveness tests. One daemon serves the whole module; each case uses a fresh run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from conftest import Daemon, Wire, wait_for
from runnerd.states import TRANSITIONS, Event, next_state
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import ErrorCode, RunnerdError, State

P, R, L = State.PENDING, State.RUNNING, State.LOST
OK, CRASH, ABANDONED = State.SUCCEEDED, State.FAILED_CRASH, State.FAILED_ABANDONED
TIMEOUT, FAILED_LOST = State.FAILED_TIMEOUT, State.FAILED_LOST

# The table of SPEC §2, written out here so that a change to runnerd/states.py is a
# visible change of contract. An absent (event, state) pair is an invalid transition.
EXPECTED: dict[Event, dict[State, State]] = {
    Event.START: {P: R, L: R},
    Event.ATTACH: {P: P, R: R, L: R},
    Event.HEARTBEAT: {R: R, L: R},
    Event.SUCCEED: {R: OK, L: OK},
    Event.FAIL_CRASH: {P: CRASH, R: CRASH, L: CRASH},
    Event.FAIL_ABANDONED: {P: ABANDONED, R: ABANDONED, L: ABANDONED},
    Event.FAIL_TIMEOUT: {P: TIMEOUT, R: TIMEOUT, L: TIMEOUT},
    Event.CANCEL: {P: ABANDONED, R: ABANDONED, L: ABANDONED},
    Event.HEARTBEAT_MISSED: {R: L},
    Event.GRACE_EXPIRED: {L: FAILED_LOST},
    Event.DEADLINE: {R: TIMEOUT, L: TIMEOUT},
    Event.PROCESS_EXITED: {P: CRASH, R: CRASH, L: CRASH},
    Event.INTERRUPTED: {P: ABANDONED, R: ABANDONED, L: ABANDONED},
}
TERMINAL = {OK, CRASH, ABANDONED, TIMEOUT, FAILED_LOST}

# What a client sends for each event it can cause: (op, extra fields).
CLIENT_EVENTS: dict[Event, tuple[str, dict[str, Any]]] = {
    Event.START: ("start", {}),
    Event.ATTACH: ("attach", {}),
    Event.HEARTBEAT: ("heartbeat", {"seq": 1}),
    Event.SUCCEED: ("succeed", {}),
    Event.FAIL_CRASH: (
        "fail",
        {"reason": "crash", "failure_class": "ValueError", "message": "loss is nan at step 42"},
    ),
    Event.FAIL_ABANDONED: ("fail", {"reason": "abandoned", "failure_class": "KeyboardInterrupt"}),
    Event.FAIL_TIMEOUT: ("fail", {"reason": "timeout", "failure_class": "Timeout"}),
    Event.CANCEL: ("cancel", {"message": "not needed any more"}),
}
FAILURE_OF = {  # event -> (failure_class, reason) of the record it leaves
    Event.FAIL_CRASH: ("ValueError", "crash"),
    Event.FAIL_ABANDONED: ("KeyboardInterrupt", "abandoned"),
    Event.FAIL_TIMEOUT: ("Timeout", "timeout"),
    Event.CANCEL: ("Cancelled", "abandoned"),
}

# How a client brings a fresh run to each state it can reach.
ROUTES: dict[State, list[Event]] = {
    P: [],
    R: [Event.START],
    OK: [Event.START, Event.SUCCEED],
    CRASH: [Event.START, Event.FAIL_CRASH],
    ABANDONED: [Event.START, Event.CANCEL],
    TIMEOUT: [Event.START, Event.FAIL_TIMEOUT],
}

# A run started with this heartbeat_timeout that does not beat goes lost this soon.
LOST_AFTER = 0.25


class Runs(Wire):
    """conftest's Wire, with the requests these tests make."""

    def create(self, experiment: str = "transitions", **fields: Any) -> str:
        run_id = new_run_id()
        self.ok("create", key=new_key(), run_id=run_id, experiment=experiment, **fields)
        return run_id

    def send(
        self, event: Event, run_id: str, key: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        op, fields = CLIENT_EVENTS[event]
        if op != "heartbeat":
            fields = {**fields, "key": key or new_key()}
        return self.call(op, run_id=run_id, **fields, **extra)

    def lost_run(self) -> str:
        """A run that started with a short heartbeat_timeout and never beat: lost."""
        run_id = self.create()
        self.ok(
            "start",
            key=new_key(),
            run_id=run_id,
            heartbeat_timeout=LOST_AFTER,
            lost_grace=3600.0,
            deadline=3600.0,
        )
        wait_for(lambda: self.get(run_id)["state"] == "lost", what=f"run {run_id} to go lost")
        return run_id

    def run_in(self, state: State) -> str:
        run_id = self.create()
        for event in ROUTES[state]:
            assert self.send(event, run_id)["ok"] is True
        assert self.get(run_id)["state"] == state
        return run_id

    def get(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self.ok("get", run=run_id)["run"]
        return run


@pytest.fixture
def wire(shared_daemon: Daemon) -> Iterator[Runs]:
    harness = Runs(shared_daemon)
    yield harness
    harness.close()


def error_of(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"], reply
    return str(reply["error"]["code"])


def state_in(reply: dict[str, Any]) -> str:
    """The state a mutation's reply reports (attach answers the whole run)."""
    return str(reply["run"]["state"] if "run" in reply else reply["state"])


def without_id(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k != "id"}


def source_of(event: Event) -> str:
    return "cancel" if event == Event.CANCEL else f"client:{os.getpid()}"


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# --- the table itself, including the daemon's own events -----------------------


@pytest.mark.parametrize("state", list(State), ids=str)
@pytest.mark.parametrize("event", list(Event), ids=str)
def test_next_state_follows_the_spec(event: Event, state: State) -> None:
    target = EXPECTED[event].get(state)
    if target is not None:
        assert next_state(event, state) == target
        return
    with pytest.raises(RunnerdError) as caught:
        next_state(event, state)
    assert caught.value.code == ErrorCode.INVALID_TRANSITION
    assert event.value in caught.value.message and state.value in caught.value.message


def test_table_covers_every_event_and_matches_the_spec() -> None:
    assert TRANSITIONS == EXPECTED


def test_terminal_states_accept_no_event() -> None:
    assert {s for s in State if s.terminal} == TERMINAL
    assert all(state not in targets for targets in TRANSITIONS.values() for state in TERMINAL)


def test_lost_is_recoverable_and_failed_lost_is_final() -> None:
    assert not L.terminal
    for event in (Event.HEARTBEAT, Event.ATTACH, Event.START):
        assert next_state(event, L) == R
    assert next_state(Event.SUCCEED, L) == OK
    assert next_state(Event.HEARTBEAT_MISSED, R) == L
    assert next_state(Event.GRACE_EXPIRED, L) == FAILED_LOST
    assert FAILED_LOST.terminal


# --- every client event from every state a client can reach ---------------------


def check_effects(event: Event, before: dict[str, Any], after: dict[str, Any]) -> None:
    """What a legal event leaves on the run besides its state."""
    if event in FAILURE_OF:
        failure = after["failure"]
        assert (failure["failure_class"], failure["reason"]) == FAILURE_OF[event]
        assert failure["run_id"] == after["run_id"] and failure["signature"]
    if after["state"] in TERMINAL:
        assert after["ended_at"] is not None
    if event == Event.SUCCEED:
        assert after["failure"] is None
    if event == Event.START:
        assert after["started_at"] is not None
    if event == Event.HEARTBEAT:
        assert after["heartbeats"] == before["heartbeats"] + 1
    if event in (Event.START, Event.ATTACH):
        assert os.getpid() in after["pids"]


@pytest.mark.parametrize("state", list(ROUTES), ids=str)
@pytest.mark.parametrize("event", list(CLIENT_EVENTS), ids=str)
def test_client_event_from_state(wire: Runs, event: Event, state: State) -> None:
    run_id = wire.run_in(state)
    before = wire.get(run_id)
    reply = wire.send(event, run_id)
    after = wire.get(run_id)
    target = EXPECTED[event].get(state)
    if target is None:
        assert error_of(reply) == "invalid_transition"
        assert state.value in reply["error"]["message"]
        assert after == before, "an invalid transition changed the run"
        return
    assert reply["ok"] is True, reply
    assert state_in(reply) == after["state"] == target
    recorded = [
        (t["from"], t["to"], t["cause"], t["source"])
        for t in after["transitions"][len(before["transitions"]) :]
    ]
    assert recorded == ([] if target == state else [(state, target, event.value, source_of(event))])
    check_effects(event, before, after)


@pytest.mark.parametrize("event", list(CLIENT_EVENTS), ids=str)
def test_client_event_from_lost(wire: Runs, event: Event) -> None:
    run_id = wire.lost_run()
    before = wire.get(run_id)
    reply = wire.send(event, run_id)
    after = wire.get(run_id)
    target = EXPECTED[event][L]
    assert reply["ok"] is True, reply
    assert state_in(reply) == target
    first = after["transitions"][len(before["transitions"])]
    assert (first["from"], first["to"], first["cause"], first["source"]) == (
        "lost",
        target,
        event.value,
        source_of(event),
    )
    if target in TERMINAL:  # a running run may go lost again; a finished one stays
        assert after["state"] == target
        assert after["transitions"][-1] == first
    check_effects(event, before, after)


@pytest.mark.parametrize(
    "event",
    [
        Event.HEARTBEAT,
        Event.START,
        Event.ATTACH,
    ],
    ids=str,
)
def test_a_run_back_from_lost_has_a_full_heartbeat_timeout(wire: Runs, event: Event) -> None:
    run_id = wire.lost_run()
    extra = {"heartbeat_timeout": LOST_AFTER} if event == Event.START else {}
    assert state_in(wire.send(event, run_id, **extra)) == "running"
    wait_for(lambda: wire.get(run_id)["state"] == "lost", what="the run to go lost again")
    back, lost_again = wire.get(run_id)["transitions"][-2:]
    assert (back["to"], back["cause"]) == ("running", event.value)
    assert (lost_again["to"], lost_again["source"]) == ("lost", "watchdog")
    assert seconds(lost_again["at"]) - seconds(back["at"]) >= LOST_AFTER - 0.01


def test_start_from_lost_keeps_the_runs_own_limits(wire: Runs) -> None:
    run_id = wire.lost_run()
    names = ("heartbeat_timeout", "lost_grace", "deadline")
    limits = {name: wire.get(run_id)[name] for name in names}
    assert limits == {"heartbeat_timeout": LOST_AFTER, "lost_grace": 3600.0, "deadline": 3600.0}
    assert state_in(wire.send(Event.START, run_id)) == "running"
    after = wire.get(run_id)
    assert {name: after[name] for name in names} == limits


def test_a_run_is_created_pending_with_one_transition(wire: Runs) -> None:
    run = wire.get(wire.create(params={"lr": 0.1}, tags={"team": "vision"}))
    assert run["state"] == "pending"
    assert (run["params"], run["tags"]) == ({"lr": 0.1}, {"team": "vision"})
    [created] = run["transitions"]
    assert (created["from"], created["to"], created["cause"]) == (None, "pending", "create")
    assert created["source"] == f"client:{os.getpid()}"


def test_fail_reason_lost_is_the_daemons_alone(wire: Runs) -> None:
    run_id = wire.run_in(R)
    before = wire.get(run_id)
    for reason in ("lost", "bogus"):
        reply = wire.call("fail", key=new_key(), run_id=run_id, reason=reason)
        assert error_of(reply) == "bad_request"
        assert "reason" in reply["error"]["message"]
    assert wire.get(run_id) == before


# --- idempotent replay ----------------------------------------------------------


REPLAYS: dict[str, tuple[State | None, dict[str, Any]]] = {
    # op -> (state the run is in first, or None for create; fields of the request)
    "create": (None, {"experiment": "replay", "params": {"lr": 0.5}}),
    "start": (P, {"heartbeat_timeout": 60.0}),
    "attach": (R, {}),
    "succeed": (R, {}),
    "fail": (R, {"reason": "crash", "failure_class": "OSError", "message": "disk full"}),
    "cancel": (R, {"message": "enough"}),
}


@pytest.mark.parametrize("op", list(REPLAYS))
def test_replayed_mutation_answers_the_same_and_applies_once(wire: Runs, op: str) -> None:
    state, fields = REPLAYS[op]
    run_id = new_run_id() if state is None else wire.run_in(state)
    recorded = 0 if state is None else len(wire.get(run_id)["transitions"])
    key = new_key()
    first = wire.ok(op, key=key, run_id=run_id, **fields)
    applied = wire.get(run_id)
    assert len(applied["transitions"]) == recorded + (0 if op == "attach" else 1)
    second = wire.ok(op, key=key, run_id=run_id, **fields)
    assert without_id(second) == without_id(first)
    assert wire.get(run_id) == applied, "the replay changed the run"
    assert wire.daemon.ctl_json("show", run_id)["transitions"] == applied["transitions"]


def test_replay_of_create_does_not_use_up_an_attempt(wire: Runs) -> None:
    experiment, run_id, key = f"replay-{new_run_id()}", new_run_id(), new_key()
    for _ in range(2):
        reply = wire.ok("create", key=key, run_id=run_id, experiment=experiment)
        assert reply["attempt"] == 1
    assert wire.get(wire.create(experiment))["attempt"] == 2
    assert len(wire.ok("list", experiment=experiment)["runs"]) == 2


def test_replays_pipelined_in_one_batch_apply_once(wire: Runs) -> None:
    run_id, key = new_run_id(), new_key()
    request = {"op": "create", "key": key, "run_id": run_id, "experiment": "pipelined"}
    for req_id in (901, 902, 903):
        wire.client.send({**request, "id": req_id})
    replies = sorted((wire.client.recv() for _ in range(3)), key=lambda r: r["id"])
    assert [r["id"] for r in replies] == [901, 902, 903]
    assert all(r["ok"] for r in replies), replies
    assert len({r["attempt"] for r in replies}) == 1
    assert len(wire.get(run_id)["transitions"]) == 1


def test_replay_after_the_run_moved_on_answers_the_first_reply(wire: Runs) -> None:
    run_id, key = wire.create(), new_key()
    first = wire.send(Event.START, run_id, key=key)
    assert state_in(first) == "running"
    assert wire.send(Event.SUCCEED, run_id)["ok"] is True
    finished = wire.get(run_id)
    replayed = wire.send(Event.START, run_id, key=key)
    assert without_id(replayed) == without_id(first)
    assert wire.get(run_id) == finished
    assert error_of(wire.send(Event.START, run_id)) == "invalid_transition"


def test_heartbeat_counts_once_per_seq(wire: Runs) -> None:
    run_id = wire.run_in(R)
    for seq, count in ((1, 1), (1, 1), (2, 2), (1, 2), (2, 2), (5, 3)):
        reply = wire.ok("heartbeat", run_id=run_id, seq=seq)
        assert reply["state"] == "running"
        assert wire.get(run_id)["heartbeats"] == count, f"after seq {seq}"
    assert [t["cause"] for t in wire.get(run_id)["transitions"]] == ["create", "start"]


def test_heartbeat_replay_on_a_finished_run_is_ok_a_new_one_is_not(wire: Runs) -> None:
    run_id = wire.run_in(R)
    wire.ok("heartbeat", run_id=run_id, seq=1)
    assert wire.send(Event.SUCCEED, run_id)["ok"] is True
    finished = wire.get(run_id)
    assert wire.ok("heartbeat", run_id=run_id, seq=1)["state"] == "succeeded"
    assert error_of(wire.call("heartbeat", run_id=run_id, seq=2)) == "invalid_transition"
    assert wire.get(run_id) == finished


def test_a_key_reused_for_another_run_is_not_taken_for_a_replay(wire: Runs) -> None:
    first, second = wire.run_in(R), wire.run_in(R)
    key = new_key()
    assert state_in(wire.send(Event.SUCCEED, first, key=key)) == "succeeded"
    reply = wire.send(Event.FAIL_CRASH, second, key=key)
    after = wire.get(second)
    if reply["ok"]:
        assert state_in(reply) == after["state"] == "failed_crash", reply
    else:
        assert error_of(reply) in ("conflict", "bad_request")
        assert after["state"] == "running"


def test_create_of_an_existing_run_with_a_new_key_conflicts(wire: Runs) -> None:
    run_id = wire.create("conflict", params={"lr": 0.1})
    before = wire.get(run_id)
    reply = wire.call(
        "create", key=new_key(), run_id=run_id, experiment="conflict", params={"lr": 0.2}
    )
    assert error_of(reply) == "conflict"
    assert run_id in reply["error"]["message"]
    assert wire.get(run_id) == before


# --- attempts ---------------------------------------------------------------------


def test_attempts_count_per_experiment_and_variation(wire: Runs) -> None:
    experiment = f"attempts-{new_run_id()}"

    def attempt(exp: str, variation: str) -> int:
        reply = wire.ok(
            "create", key=new_key(), run_id=new_run_id(), experiment=exp, variation=variation
        )
        assert wire.get(reply["run_id"])["attempt"] == reply["attempt"]
        return int(reply["attempt"])

    assert [attempt(experiment, "lr=0.1") for _ in range(3)] == [1, 2, 3]
    assert attempt(experiment, "lr=0.2") == 1
    assert attempt(f"{experiment}-other", "lr=0.1") == 1
    assert attempt(experiment, "lr=0.1") == 4
    assert attempt(experiment, "lr=0.2") == 2


def test_attempts_do_not_depend_on_how_earlier_attempts_ended(wire: Runs) -> None:
    experiment = f"attempts-{new_run_id()}"
    first = wire.create(experiment)
    assert wire.send(Event.FAIL_CRASH, first)["ok"] is True
    second = wire.create(experiment)
    assert wire.send(Event.CANCEL, second)["ok"] is True
    assert wire.get(wire.create(experiment))["attempt"] == 3
