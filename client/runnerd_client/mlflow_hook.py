"""The MLflow hook: `python -m runnerd_client.mlflow hook`, a `[[hooks]]` command on
`failed_*` and `lost` (best with `mode = "stream"`, which imports MLflow once).

It ends the MLflow runs linked to a runnerd run that ended failed (see
runnerd_client.mlflow for the link): FAILED, or KILLED for `failed_abandoned`. It ends
those still RUNNING and those MLflow's exit hook ended FINISHED, and never touches a run
the script itself ended. For a `lost` run it only tags them: a lost run may come back.

In call mode MLflow is imported only for a run that has MLflow runs linked. A stream
imports it before the first event, so the first death does not wait for it; stores are
opened at their first event, never before (opening a new store creates it).
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any

from runnerd_client.hook_stream import hook
from runnerd_client.integration import HookInput, hook_parser, notes, wait_gone
from runnerd_client.protocol import State

if TYPE_CHECKING:
    from mlflow.client import MlflowClient
    from mlflow.entities import Run as MlflowRun

PROG = "runnerd_client.mlflow"
TAG_RUN_ID = "runnerd.run_id"
TAG_STATE = "runnerd.state"
TAG_AT_EXIT = "runnerd.ended_at_exit"
NOTE_PREFIX = "mlflow-"


def linked_runs(client: MlflowClient, run_id: str) -> list[MlflowRun]:
    """The MLflow runs tagged with runnerd run `run_id`, in every experiment."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not experiments:
        return []
    return list(
        client.search_runs(
            experiments,
            filter_string=f"tags.`{TAG_RUN_ID}` = '{run_id}'",
            run_view_type=ViewType.ALL,
        )
    )


def target_status(state: str) -> str:
    """The MLflow status of a run whose runnerd run ended in `state`."""
    return "KILLED" if state == State.FAILED_ABANDONED else "FAILED"


def needs_ending(mlflow_run: MlflowRun) -> bool:
    """Still running, or ended FINISHED by MLflow's exit hook (not by the script)."""
    status = mlflow_run.info.status
    return status in ("RUNNING", "SCHEDULED") or (
        status == "FINISHED" and mlflow_run.data.tags.get(TAG_AT_EXIT) == "true"
    )


def handle(event: HookInput) -> None:
    """End the MLflow runs linked to a runnerd run that ended failed (see the module)."""
    run = event.run
    if not (event.failed or event.state == State.LOST):
        return
    found = notes(run, NOTE_PREFIX)
    uris = sorted({uri for note in found for uri in note.get("tracking_uris") or []})
    if not uris:
        return
    noted = {
        (r.get("tracking_uri"), r.get("run_id"))
        for note in found
        for r in note.get("mlflow_runs") or []
    }
    if event.failed:
        wait_gone(run.get("pids") or [])
    from mlflow.client import MlflowClient

    for uri in uris:
        client = MlflowClient(uri)
        ids = sorted(str(i) for u, i in noted if u == uri and i)
        for mlflow_id in ids:  # the noted runs first: one read each
            settle(client, client.get_run(mlflow_id), run)
        for mlflow_run in linked_runs(client, str(run["run_id"])):  # then any not noted
            if mlflow_run.info.run_id not in ids:
                settle(client, mlflow_run, run)


def settle(client: MlflowClient, mlflow_run: MlflowRun, run: dict[str, Any]) -> None:
    """Bring one linked MLflow run in line with its runnerd run."""
    from mlflow.entities import RunTag

    mlflow_id, state = mlflow_run.info.run_id, str(run["state"])
    if not needs_ending(mlflow_run):
        return
    tags = [RunTag(TAG_STATE, state)]
    if state == State.LOST:
        client.log_batch(mlflow_id, tags=tags)  # it may come back: not ended
        return
    failure_class = (run.get("failure") or {}).get("failure_class")
    if failure_class:
        tags.append(RunTag("runnerd.failure_class", str(failure_class)))
    client.log_batch(mlflow_id, tags=tags)
    status = target_status(state)
    end = mlflow_run.info.end_time or _millis(run.get("ended_at"))
    client.set_terminated(mlflow_id, status, end_time=end)
    print(
        f"MLflow run {mlflow_id}: {mlflow_run.info.status} -> {status}"
        f" (runnerd run {run['run_id']} {state})",
        file=sys.stderr,
    )


def _millis(iso: object) -> int | None:
    if not isinstance(iso, str):
        return None
    try:
        return int(datetime.fromisoformat(iso).timestamp() * 1000)
    except ValueError:
        return None


def warm() -> None:
    """A stream's start: MLflow and its SQL store imported, no store opened: opening one
    creates it and its tables, which would race the user's own first run on a new store."""
    import mlflow.client  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    hook_parser(PROG).parse_args(argv)
    return hook(PROG, handle, warm)


if __name__ == "__main__":
    sys.exit(main())
