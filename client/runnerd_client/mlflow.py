"""MLflow runs that end as truthfully as runnerd's (extra `runnerd[mlflow]`).

- Linking. MLflow loads `RunnerdRunContext` through the `mlflow.run_context_provider`
  entry point: every MLflow run started inside a runnerd run (under `runnerctl exec`, in a
  `with rd.run()` block, in a sweep cell) is tagged `runnerd.run_id`, and the runnerd run
  gets a note `mlflow-<pid>.json` (an artifact) with the tracking URI and the MLflow run
  ids. At exit, an uncaught exception ends the process's MLflow runs FAILED (KILLED for
  Ctrl-C), where MLflow's own exit hook would say FINISHED; runs MLflow's exit hook ends
  without a known cause are marked `runnerd.ended_at_exit`.
- Opt-in. With `RUNNERD_MLFLOW=1` a plain MLflow script outside any runnerd run becomes
  its own runnerd run (experiment `$RUNNERD_EXPERIMENT`, else the script's name) when it
  starts its first MLflow run, ended as `with rd.run()` would end it.
- The hook. `python -m runnerd_client.mlflow hook` (runnerd_client.mlflow_hook) ends the
  linked MLflow runs of a runnerd run that ended failed.

MLflow is imported only by the code that needs it.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, NoReturn

from runnerd_client.exits import Terminated, catch_sigterm
from runnerd_client.integration import enclosing_run, write_note
from runnerd_client.mlflow_hook import NOTE_PREFIX, TAG_AT_EXIT, TAG_RUN_ID, linked_runs, main
from runnerd_client.run import ACTIVE, RUN_ID_ENV, Run

if TYPE_CHECKING:
    from mlflow import ActiveRun
    from mlflow.entities import Run as MlflowRun

log = logging.getLogger("runnerd_client.mlflow")

OPT_IN_ENV = "RUNNERD_MLFLOW"
EXPERIMENT_ENV = "RUNNERD_EXPERIMENT"
FIND_FOR = 10.0
"""How long the process looks for the MLflow run it just tagged, to note its id."""
FINISH_WAIT = 2.0
"""How long the exit waits for that look to end."""


def opted_in() -> bool:
    return os.environ.get(OPT_IN_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class RunnerdRunContext:
    """MLflow's run context provider for runnerd (entry point `mlflow.run_context_provider`).

    MLflow calls `tags()` while it starts a run and logs a warning if it raises.
    """

    def in_context(self) -> bool:
        return ACTIVE.get() is not None or RUN_ID_ENV in os.environ or opted_in()

    def tags(self) -> dict[str, str]:
        link = _link_here()
        if link is None:
            return {}
        import mlflow

        uri = mlflow.get_tracking_uri()
        link.note_uri(uri)
        if mlflow.active_run() is None:  # a run is starting (not a nested one, not a model)
            link.look_for_run(uri)
        _EXIT.install()
        return {
            TAG_RUN_ID: link.run.run_id,
            "runnerd.experiment": link.run.experiment,
            "runnerd.variation": link.run.variation,
        }


class _Link:
    """One runnerd run's MLflow runs in this process, and the note that records them."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.uris: list[str] = []
        self.mlflow_runs: dict[str, dict[str, str]] = {}
        self.lock = threading.Lock()
        self.finders: list[threading.Thread] = []

    def note_uri(self, uri: str) -> None:
        """Record the tracking URI before MLflow makes the run, so a hook can find it even
        if the process dies right after."""
        with self.lock:
            if uri in self.uris:
                return
            self.uris.append(uri)
            self._write(wait=True)

    def look_for_run(self, uri: str) -> None:
        """Note, from a thread, the MLflow run about to be made (`finish` waits for it)."""
        finder = threading.Thread(
            target=self.find_runs, args=(uri, time.time()), daemon=True, name="runnerd-mlflow-link"
        )
        self.finders.append(finder)
        finder.start()

    def finish(self, deadline: float) -> None:
        for finder in self.finders:
            finder.join(max(0.0, deadline - time.monotonic()))

    def find_runs(self, uri: str, since: float) -> None:
        """Note the id of the MLflow run just started with our tag (MLflow makes it after
        asking for its tags)."""
        from mlflow.client import MlflowClient

        try:
            client = MlflowClient(uri)
            deadline = time.monotonic() + FIND_FOR
            while time.monotonic() < deadline:
                found = [
                    r
                    for r in linked_runs(client, self.run.run_id)
                    if r.info.run_id not in self.mlflow_runs
                    and r.info.start_time >= int(since * 1000) - 1000
                ]
                if found:
                    self.note_runs(uri, found)
                    return
                time.sleep(0.05)
        except Exception as exc:  # the experiment goes on; the hook searches by tag anyway
            log.warning("MLflow run of runnerd run %s not noted: %s", self.run.run_id, exc)

    def note_runs(self, uri: str, found: list[MlflowRun] | list[ActiveRun]) -> None:
        with self.lock:
            for mlflow_run in found:
                self.mlflow_runs[mlflow_run.info.run_id] = {
                    "run_id": mlflow_run.info.run_id,
                    "tracking_uri": uri,
                    "experiment_id": mlflow_run.info.experiment_id,
                }
            self._write(wait=False)

    def _write(self, wait: bool) -> None:
        write_note(
            self.run,
            f"{NOTE_PREFIX}{os.getpid()}.json",
            {
                "runnerd_run_id": self.run.run_id,
                "tracking_uris": self.uris,
                "mlflow_runs": list(self.mlflow_runs.values()),
            },
            wait=wait,
        )


_links: dict[tuple[int, str], _Link] = {}
_links_lock = threading.Lock()


def _link_here() -> _Link | None:
    """The link of the runnerd run this code executes in; with the opt-in and none, the
    process's own run, made now."""
    run = enclosing_run()
    if run is None:
        if not opted_in():
            return None
        run = _EXIT.own_run()
    with _links_lock:
        key = (os.getpid(), run.run_id)
        if key not in _links:
            _links[key] = _Link(run)
        return _links[key]


class _Exit:
    """How this process is ending, seen from inside: an uncaught exception (sys.excepthook),
    SIGTERM and sys.exit's code (the opt-in's own run only). At exit (before MLflow's own
    exit hook, which was registered earlier), it ends the process's active MLflow runs."""

    def __init__(self) -> None:
        self.installed_in: int | None = None
        self.own: Run | None = None
        self.exception: BaseException | None = None
        self.terminated = False
        self.exit_code: object = None

    def install(self) -> None:
        if self.installed_in == os.getpid():
            return
        self.installed_in = os.getpid()
        previous_hook = sys.excepthook

        def excepthook(
            kind: type[BaseException], exc: BaseException, tb: TracebackType | None
        ) -> None:
            self.exception = exc
            previous_hook(kind, exc, tb)

        sys.excepthook = excepthook
        atexit.register(self.at_exit)

    def own_run(self) -> Run:
        """The opt-in's run: this process, from its first MLflow run to its exit."""
        if self.own is not None and self.installed_in == os.getpid():
            return self.own
        from runnerd_client import connect

        experiment = os.environ.get(EXPERIMENT_ENV) or Path(sys.argv[0] or "mlflow").stem
        run = connect().run(experiment or "mlflow")
        self._catch_exit()
        run.__enter__()
        self.own = run
        self.install()
        return run

    def _catch_exit(self) -> None:
        """SIGTERM raises Terminated (recorded abandoned); sys.exit's code is remembered,
        for no exit hook can see it."""
        real_exit = sys.exit

        def exit_(code: str | int | None = None) -> NoReturn:
            self.exit_code = code
            real_exit(code)

        sys.exit = exit_
        catch_sigterm(self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.terminated = True
        raise Terminated()

    def status(self) -> str | None:
        """The MLflow status the process's end deserves, if known."""
        if self.terminated or isinstance(self.exception, KeyboardInterrupt):
            return "KILLED"
        if self.exception is not None or self.exit_code not in (None, 0):
            return "FAILED"
        return None

    def at_exit(self) -> None:
        deadline = time.monotonic() + FINISH_WAIT
        for (pid, _), link in list(_links.items()):
            if pid == os.getpid():
                link.finish(deadline)
        try:
            _end_active_runs(self.status())
        except Exception as exc:
            log.warning("MLflow runs not ended at exit: %s", exc)
        if self.own is not None and self.installed_in == os.getpid():
            self._end_own(self.own)

    def _end_own(self, run: Run) -> None:
        if self.terminated:
            run.__exit__(Terminated, Terminated(), None)
        elif self.exception is not None:
            run.__exit__(type(self.exception), self.exception, self.exception.__traceback__)
        elif self.exit_code not in (None, 0):
            run.__exit__(SystemExit, SystemExit(self.exit_code), None)
        else:
            run.__exit__(None, None, None)


_EXIT = _Exit()


def _end_active_runs(status: str | None) -> None:
    """End this thread's active MLflow runs that runnerd linked (noting them first): with
    `status` when the process's end is known to be a failure, else as MLflow's exit hook
    would (FINISHED), marked `runnerd.ended_at_exit` so that the hook corrects them if
    runnerd saw a failure."""
    import mlflow

    while (active := mlflow.active_run()) is not None:
        link = _links.get((os.getpid(), active.data.tags.get(TAG_RUN_ID, "")))
        if link is None:
            return
        if active.info.run_id not in link.mlflow_runs:
            link.note_runs(mlflow.get_tracking_uri(), [active])
        if status is None:
            mlflow.set_tag(TAG_AT_EXIT, "true")
            mlflow.end_run()
        else:
            mlflow.end_run(status)


__all__ = ["RunnerdRunContext", "main"]

if __name__ == "__main__":
    sys.exit(main())
