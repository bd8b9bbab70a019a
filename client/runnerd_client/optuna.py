"""Optuna trials as runnerd runs, and dead trials failed in Optuna's storage (extra
`runnerd[optuna]`).

    from runnerd_client.optuna import tracked

    study = optuna.create_study(study_name="lr", storage=URL, load_if_exists=True)
    study.optimize(tracked(objective, storage=URL), n_trials=100)

- Each trial is a run of experiment `study_name` (or `experiment=`), variation `trial=N`,
  tagged with the study, the trial number and the storage URL (its password hidden). A
  note `optuna-trial.json` on the run (an artifact) holds the trial's params, its value
  and how Optuna should see it. A value ends the run `succeeded`; `TrialPruned` ends it
  `failed_abandoned` with class `TrialPruned` (pruned, not crashed); an exception
  `failed_crash` with its class, message and traceback; SIGTERM `failed_abandoned`.
- The hook. `python -m runnerd_client.optuna hook` (a `[[hooks]]` command on `failed_*`)
  fails in the storage the trial of a run that runnerd saw fail while Optuna never ended it
  (SIGKILL, SIGTERM, an OOM kill: Optuna itself leaves such a trial RUNNING). It acts only
  once the trial's process is gone, and leaves a trial Optuna ended, so it never races
  Optuna. `--storage URL` (repeatable) gives a URL whose password the tag hides.

Optuna is imported only when a trial runs or the hook has a trial to fail; a stream hook
(`mode = "stream"`) imports it before the first event; a storage is opened at the first
event that needs it, never before (opening a new one creates its tables).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

from runnerd_client.exits import Terminated
from runnerd_client.hook_stream import hook
from runnerd_client.integration import GONE_WAIT, HookInput, alive, hook_parser, write_note
from runnerd_client.run import Run

if TYPE_CHECKING:
    import optuna

PROG = "runnerd_client.optuna"
NOTE = "optuna-trial.json"
TAG_STORAGE, TAG_STUDY, TAG_TRIAL = "optuna.storage", "optuna.study", "optuna.trial"
T = TypeVar("T")


class Pruned(Terminated):
    """How a pruned trial's run ends: abandoned by the tuner, class TrialPruned."""

    failure_class = "TrialPruned"
    cause = "pruned"

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message or "pruned by Optuna"


def tracked(
    objective: Callable[[optuna.Trial], T], *, storage: Any = None, experiment: str | None = None
) -> Callable[[optuna.Trial], T]:
    """`objective` with each trial recorded as a runnerd run (see the module). `storage` is
    the study's storage (a URL or an RDBStorage): the hook needs it to fail a dead trial."""
    url = storage if isinstance(storage, str) else getattr(storage, "url", None)

    def run_trial(trial: optuna.Trial) -> T:
        run = _start(trial, url, experiment)
        try:
            result = objective(trial)
        except BaseException as exc:
            _end_raised(run, trial, exc)
            raise
        _end_returned(run, trial, result)
        return result

    run_trial.__name__ = getattr(objective, "__name__", "objective")
    run_trial.__doc__ = objective.__doc__
    return run_trial


def _start(trial: optuna.Trial, url: str | None, experiment: str | None) -> Run:
    from runnerd_client import connect

    study = trial.study.study_name
    tags: dict[str, Any] = {TAG_STUDY: study, TAG_TRIAL: trial.number}
    if url:
        tags[TAG_STORAGE] = hide_password(url)
    run = connect().run(
        experiment or study, f"trial={trial.number}", params=dict(trial.params), tags=tags
    )
    run.__enter__()  # started, beating, SIGTERM raises Terminated, faulthandler on
    return run


def _end_returned(run: Run, trial: optuna.Trial, result: Any) -> None:
    """A returned value: succeeded, unless Optuna will fail the trial for it (NaN, not a
    number), which the run records as a crash saying so."""
    invalid = _invalid(result)
    _note(run, trial, "FAIL" if invalid else "COMPLETE", result)
    if invalid is None:
        run.__exit__(None, None, None)
    else:
        error = ValueError(invalid)
        run.__exit__(ValueError, error, None)


def _end_raised(run: Run, trial: optuna.Trial, exc: BaseException) -> None:
    import optuna

    if isinstance(exc, optuna.TrialPruned):
        _note(run, trial, "PRUNED", None)
        pruned = Pruned(str(exc))
        run.__exit__(Pruned, pruned, None)
        return
    _note(run, trial, "FAIL", None)
    run.__exit__(type(exc), exc, exc.__traceback__)


def _invalid(result: Any) -> str | None:
    """Why Optuna would refuse a returned value, or None."""
    values = result if isinstance(result, Sequence) and not isinstance(result, str) else [result]
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"the objective returned {value!r}, not a number; Optuna fails the trial"
        if math.isnan(number):
            return "the objective returned NaN; Optuna fails the trial"
    return None


def _note(run: Run, trial: optuna.Trial, state: str, result: Any) -> None:
    value = list(result) if isinstance(result, Sequence) and not isinstance(result, str) else result
    try:
        write_note(
            run,
            NOTE,
            {
                "study": trial.study.study_name,
                "number": trial.number,
                "params": trial.params,
                "state": state,
                "value": value,
            },
        )
    except (OSError, TypeError, ValueError) as exc:  # never break the study for a note
        print(f"runnerd: trial {trial.number} not noted: {exc}", file=sys.stderr)


def hide_password(url: str) -> str:
    """The URL with its password replaced by `***` (tags are shown and logged)."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    user, colon, _ = credentials.partition(":")
    if not (sep and at and colon):
        return url
    return f"{scheme}://{user}:***@{host}"


# --- the hook ---


def handle(event: HookInput, storages: Sequence[str] = ()) -> None:
    """Fail the trial of a failed run in Optuna's storage, if Optuna did not end it."""
    tags = event.run.get("tags") or {}
    hidden, study, number = tags.get(TAG_STORAGE), tags.get(TAG_STUDY), tags.get(TAG_TRIAL)
    if not (
        event.failed
        and isinstance(hidden, str)
        and isinstance(study, str)
        and isinstance(number, int)
    ):
        return
    url = next((s for s in storages if hide_password(s) == hidden), hidden)
    fail_dead_trial(url, study, number, event.run)


def fail_dead_trial(url: str, study: str, number: int, run: dict[str, Any]) -> None:
    """Wait until Optuna ended the trial (leave it) or its process is gone (fail it)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = _storage(url)
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study), number
        )
    except KeyError:
        print(
            f"no trial {number} of study {study} in {hide_password(url)}: nothing to fail",
            file=sys.stderr,
        )
        return
    pids = [int(pid) for pid in run.get("pids") or []]
    deadline = time.monotonic() + GONE_WAIT
    while not storage.get_trial(trial_id).state.is_finished():
        if not any(alive(pid) for pid in pids):
            try:
                storage.set_trial_user_attr(
                    trial_id,
                    "runnerd",
                    {
                        "run_id": run["run_id"],
                        "state": run["state"],
                        "failure_class": (run.get("failure") or {}).get("failure_class"),
                    },
                )
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                return  # Optuna ended it meanwhile: its word stands
            print(
                f"Optuna trial {study}#{number}: RUNNING -> FAIL"
                f" (runnerd run {run['run_id']} {run['state']})",
                file=sys.stderr,
            )
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"trial {number} of {study} is still RUNNING in a live process"
                f" ({', '.join(map(str, pids))}); it is left to Optuna for now"
            )
        time.sleep(0.02)


@cache
def _storage(url: str) -> optuna.storages.RDBStorage:
    """The storage at `url`, opened once per process (a stream hook's events share it)."""
    import optuna

    return optuna.storages.RDBStorage(url)


def _warm() -> None:
    """A stream's start: Optuna and its RDB storage imported, no storage opened: opening one
    creates its tables, which would race the user's own `create_study` on a new store."""
    import optuna.storages  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    parser = hook_parser(PROG)
    parser.add_argument(
        "--storage",
        action="append",
        default=[],
        metavar="URL",
        help="a storage URL with its password, for trials tagged with it",
    )
    args = parser.parse_args(argv)
    return hook(PROG, lambda event: handle(event, args.storage), _warm)


if __name__ == "__main__":
    sys.exit(main())
