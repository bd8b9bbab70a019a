"""Foreign run folders: what their metadata.json may say, and the run each becomes.

Another tool's run folder holds a metadata.json (status, times, params, the failure) that
the crash indexer imports as a run of ours, in state `succeeded`, `failed_*` or `lost`
(unfinished: nobody reports it). `checked_doc` checks each field it uses and cuts it to
size, naming the field that is wrong, so nothing a file says reaches the registry
unchecked; `imported_state` and `import_run` are the rules of the import.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from typing import Any

from runnerd.crashfiles import MAX_READ
from runnerd.registry import NewRun, RunRow, RunUpdate, Store
from runnerd.states import failure_record
from runnerd_client.ids import is_valid_run_id
from runnerd_client.protocol import FailReason, State

MAX_METADATA = 1 << 20
MAX_NAME = 256
MAX_STATUS = 64
MAX_MESSAGE = 4096
MAX_DEPTH = 64
MAX_RUNTIME = 1e9  # 31 years: more is a broken file, not a run
LATEST_TIME = 253402300799.0  # 9999-12-31 23:59:59 UTC, the last time a date can show
SOURCE = "imported"
IMPORT_CAUSE = "import"  # the transition that creates an imported run
FOREIGN_ID_TAG = "foreign_run_id"


class _Malformed(ValueError):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"'{field}' {why}")


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(doc: dict[str, Any], field: str, limit: int) -> str | None:
    """A text field (a whole number is taken as its digits), cut to `limit` characters."""
    value = doc.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Malformed(field, f"must be a text, not {type(value).__name__} {_brief(value)}")
    text = str(value)
    try:
        text.encode()
    except UnicodeEncodeError:
        raise _Malformed(field, "is not valid Unicode (a lone surrogate escape)") from None
    return text[:limit]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _time(doc: dict[str, Any], field: str) -> float | None:
    """Seconds since the epoch, from a number or an ISO 8601 date, within what a date shows."""
    value = doc.get(field)
    if value is None:
        return None
    seconds = _number(value)
    if isinstance(value, str):
        try:
            seconds = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError, OSError):
            seconds = None
    if seconds is None or not 0 <= seconds <= LATEST_TIME:  # NaN fails both
        raise _Malformed(
            field, f"must be a time from 1970 to 9999 (seconds or ISO 8601), not {_brief(value)}"
        )
    return seconds


def _runtime(doc: dict[str, Any]) -> float | None:
    value = doc.get("runtime_sec")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is None or not 0 <= seconds <= MAX_RUNTIME:
        raise _Malformed(
            "runtime_sec",
            f"must be a number of seconds from 0 to {MAX_RUNTIME:g}, not {_brief(value)}",
        )
    return seconds


def _nesting(value: Any, limit: int) -> int:
    """How deeply lists and maps nest, counted only up to just past `limit`."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_nesting(v, limit - 1) for v in items), default=0)


def _params(doc: dict[str, Any]) -> dict[str, Any]:
    """A JSON object as the protocol takes it: no NaN, not nested past MAX_DEPTH, Unicode."""
    value = doc.get("params")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Malformed("params", f"must be an object, not {type(value).__name__}")
    if _nesting(value, MAX_DEPTH) > MAX_DEPTH:
        raise _Malformed("params", f"nests deeper than {MAX_DEPTH} levels")
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as exc:  # NaN, a lone surrogate
        raise _Malformed("params", f"is not plain JSON: {exc}") from None
    return value


def checked_params(value: Any) -> dict[str, Any] | str:
    """Params read from a file beside the metadata.json, checked as those inside it are;
    or what is wrong with them."""
    try:
        return _params({"params": value})
    except _Malformed as exc:
        return str(exc)


def checked_doc(doc: Any) -> dict[str, Any] | str:
    """The values of a foreign metadata.json that `import_run` uses, checked and cut to
    size; or what is wrong with it, naming the field. Nothing a file says reaches the
    registry unchecked (a NaN time once failed a whole batch of writes)."""
    if not isinstance(doc, dict):
        return f"not a metadata object but a JSON {type(doc).__name__}"
    try:
        status = _text(doc, "status", MAX_STATUS + 1)
        if not status or len(status) > MAX_STATUS:
            raise _Malformed(
                "status",
                f"must be a text of 1 to {MAX_STATUS} characters, not {_brief(doc.get('status'))}",
            )
        names = ("run_id", "experiment", "variation", "failure_class", "state")
        checked: dict[str, Any] = {field: _text(doc, field, MAX_NAME) for field in names}
        for field in ("failure_reason", "error"):
            checked[field] = _text(doc, field, MAX_MESSAGE)
        traceback = _text(doc, "traceback", MAX_METADATA)
        checked |= {
            "status": status,
            "params": _params(doc),
            "traceback": traceback[-MAX_READ:] if traceback else None,
            "start_time": _time(doc, "start_time"),
            "end_time": _time(doc, "end_time"),
            "runtime_sec": _runtime(doc),
        }
        if (checked["start_time"] or 0.0) + (checked["runtime_sec"] or 0.0) > LATEST_TIME:
            raise _Malformed("runtime_sec", "ends the run after the year 9999")
    except _Malformed as exc:
        return str(exc)
    return checked


# --- what it becomes ----------------------------------------------------------------


_SUCCEEDED = (
    "succeeded",
    "success",
    "successful",
    "completed",
    "complete",
    "finished",
    "done",
    "ok",
)
_TERMINAL = frozenset(s.value for s in State if s.terminal)
_FAILED_BY_REASON = {
    "abandoned": State.FAILED_ABANDONED,
    "timeout": State.FAILED_TIMEOUT,
    "lost": State.FAILED_LOST,
}


def imported_state(doc: dict[str, Any]) -> State:
    """A foreign status in our terms; an unfinished one is `lost` (nobody reports it). A
    finished `state` of ours (a copy of one of our folders) is taken as it is."""
    ours = doc.get("state")
    if ours in _TERMINAL:
        return State(ours)
    status = doc["status"].lower()
    if status in _SUCCEEDED:
        return State.SUCCEEDED
    if status.startswith(("fail", "error", "crash", "abort", "kill", "cancel")):
        return _FAILED_BY_REASON.get(
            str(doc.get("failure_reason") or "").lower(),
            State.FAILED_ABANDONED if "cancel" in status else State.FAILED_CRASH,
        )
    return State.LOST


def _ours(store: Store, run_id: str | None) -> bool:
    """Whether `run_id` names a run of ours (not one imported): its metadata.json, in its
    folder or a copy of it, is never imported."""
    if not run_id or not is_valid_run_id(run_id):
        return False
    row = store.runs.get(run_id)
    return row is not None and row.tags().get("source") != SOURCE


def import_run(store: Store, path: str, doc: dict[str, Any], at: float) -> str:
    """Import a foreign run folder's checked metadata (`checked_doc`, read from `path`) as
    a run, never twice, never one of ours. The folder is the run: two folders saying one
    run_id (notata's `log_<id>` under two outputs) are two runs, their id kept as a tag."""
    folder = os.path.dirname(path)
    if (known := store.indexing.run_in_dir(folder)) is not None:
        return _follow_up(store, store.runs.require(known), doc, at)
    run_id = "imp-" + hashlib.sha1(os.fsencode(folder)).hexdigest()[:16]
    if _ours(store, doc["run_id"]) or store.runs.get(run_id) is not None:
        return "known"
    state = imported_state(doc)
    start = at if doc["start_time"] is None else doc["start_time"]
    experiment = doc["experiment"] or os.path.basename(os.path.dirname(folder)) or "-"
    variation = doc["variation"] or os.path.basename(folder) or "default"
    experiment, variation = experiment[:MAX_NAME], variation[:MAX_NAME]
    tags = {"source": SOURCE} | ({FOREIGN_ID_TAG: doc["run_id"]} if doc["run_id"] else {})
    store.runs.create(
        NewRun(
            run_id=run_id,
            experiment=experiment,
            variation=variation,
            params_json=json.dumps(doc["params"]),
            tags_json=json.dumps(tags),
            run_dir=folder,
            created_at=start,
        ),
        SOURCE,
    )
    _set_state(store, store.runs.require(run_id), state, doc, start, at, IMPORT_CAUSE)
    return "imported"


def _follow_up(store: Store, row: RunRow, doc: dict[str, Any], at: float) -> str:
    """A run imported unfinished (notata writes its metadata.json as the run begins) takes
    the end its file says now; a run of ours, or one already finished, is left alone."""
    state = imported_state(doc)
    if row.tags().get("source") != SOURCE or row.state.terminal or not state.terminal:
        return "known"
    start = row.started_at if doc["start_time"] is None else doc["start_time"]
    _set_state(store, row, state, doc, start or at, at, "import_end")
    return "imported"


def _set_state(
    store: Store,
    row: RunRow,
    state: State,
    doc: dict[str, Any],
    start: float,
    at: float,
    cause: str,
) -> None:
    """Move an imported run to the state its file says, with its failure."""
    end = None
    if state.terminal:
        end = (
            doc["end_time"] if doc["end_time"] is not None else start + (doc["runtime_sec"] or 0.0)
        )
    store.runs.set_state(
        row,
        state,
        at=end or at,
        cause=cause,
        source=SOURCE,
        change=RunUpdate(
            started_at=start,
            ended_at=end,
            lost_at=None if state.terminal else at,
            last_heartbeat_at=start,
        ),
    )
    if state.value.startswith("failed"):
        store.failures.put(
            row.run_id,
            failure_record(
                doc["failure_class"] or "Imported",
                doc["failure_reason"] or doc["error"] or doc["status"],
                FailReason.CRASH if state is State.FAILED_CRASH else state.value.split("_")[1],
                end or at,
                traceback=doc["traceback"],
            ),
        )
