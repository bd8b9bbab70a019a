"""Runs as an experiment sees them: two lines to be tracked, and never broken by us.

Every event goes through `Reporter.emit` (see reporter.py): delivered, or spooled to
disk while the daemon is away, and never raised into the experiment. What is raised is
the caller's own mistake: a wrong argument (TypeError, ValueError, before anything is
sent), or a run the daemon refused to start or attach (RunRefused), which would
otherwise run untracked. Runs are made and attached by `Client` (client.py); how the
process's end becomes the run's is decided in exits.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import traceback as tb
from collections.abc import Callable
from concurrent.futures import Future
from contextvars import ContextVar, Token
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from runnerd_client import stacks
from runnerd_client.connection import Reply
from runnerd_client.errors import RunRefused
from runnerd_client.exits import (
    catch_sigterm,
    close_crash_log,
    ending,
    open_crash_log,
    raise_terminated,
    release_sigterm,
)
from runnerd_client.ids import new_key
from runnerd_client.protocol import (
    Artifact,
    Checkpoint,
    Detach,
    ErrorCode,
    Fail,
    FailReason,
    Get,
    Heartbeat,
    RunnerdError,
    Start,
    Succeed,
)
from runnerd_client.reporter import Reporter

log = logging.getLogger("runnerd_client")
RUN_ID_ENV = "RUNNERD_RUN_ID"
_EVERY_CODE = tuple(ErrorCode)

ACTIVE: ContextVar[Run | None] = ContextVar("runnerd_active_run", default=None)
"""The run whose `with` block (or sweep cell) this code executes in, for `rd.current_run()`
and the integrations (an MLflow run started there is linked to it)."""


class Run:
    """One run: explicit calls that chain, or a context manager that ends it truthfully."""

    def __init__(
        self,
        client: Reporter,
        run_id: str,
        experiment: str,
        variation: str,
        *,
        params: dict[str, Any],
        run_dir: Path,
        heartbeat_interval: float,
        limits: dict[str, float | None],
        attached: bool = False,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment = experiment
        self.variation = variation
        self.params = params
        self.run_dir = run_dir
        self.attempt: int | None = None
        self.resumed_from: str | None = None
        self.resume_checkpoint: dict[str, Any] | None = None
        self.heartbeat_interval = heartbeat_interval
        self._limits = limits
        self._attached = attached
        self._seq = 0
        self._lock = threading.Lock()
        self._pending: list[tuple[str, Future[dict[str, Any]]]] = []
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None
        self._caught_sigterm = False
        self._crash_log: IO[str] | None = None
        self._active: Token[Run | None] | None = None
        self._ended_outside = False
        self._said_ended = False
        self.diagnosis: dict[str, Any] | None = None
        self.vouch: Callable[[], bool] | None = None
        """If set, the heartbeat thread beats only while it returns True (runnerctl exec:
        while its command is not stopped)."""
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<Run {self.run_id} {self.experiment}/{self.variation} attempt={self.attempt}>"

    # --- explicit calls ---

    def _mine(self, what: str) -> None:
        """Only the process that made or attached the run reports for it: a forked child's
        copy would end the parent's run, or beat with the parent's sequence numbers."""
        if os.getpid() != self._pid:
            raise RunnerdError(
                ErrorCode.FORBIDDEN,
                (
                    f"cannot {what} run {self.run_id} from process {os.getpid()}: it belongs to"
                    f" process {self._pid}; a forked child attaches first"
                    f" (rd.connect().attach({self.run_id!r}))"
                ),
            )

    def answer(
        self, future: Future[Reply], what: str, *, tracks: bool = False, if_active: bool = False
    ) -> Reply | None:
        """The daemon's reply to one of this run's events, None if it was refused.

        A refused event that `tracks` the run (create, start, attach) raises RunRefused. A run
        ended from outside (runnerctl cancel, its deadline) is said so once, and is nothing
        to say with `if_active`. An event spooled while the daemon is away is no refusal.
        """
        try:
            return self.client.wait(future, what, raising=_EVERY_CODE)
        except RunnerdError as exc:
            if exc.code == ErrorCode.INVALID_TRANSITION:
                self._ended_outside = True
                if not if_active:
                    self.say_ended()
            elif exc.code == ErrorCode.UNAVAILABLE:
                pass  # not even spooled: the reporter said so
            elif tracks:
                raise RunRefused(exc.code, exc.message, self.run_id) from None
            else:
                log.warning("runnerd refused %s of run %s: %s", what, self.run_id, exc)
            return None

    def say_ended(self) -> None:
        """Say once, plainly, that the run was ended from outside and how; this process
        no longer reports for it (its heartbeats stop, its own end is not recorded)."""
        self._stop.set()
        with self._lock:
            if self._said_ended:
                return
            self._said_ended = True
        found = (self.client.ask(Get(run=self.run_id)) or {}).get("run") or {}
        failure = found.get("failure") or {}
        how = ": ".join(
            str(part)
            for part in (found.get("state"), failure.get("failure_class"), failure.get("message"))
            if part
        )
        log.warning(
            "run %s was ended from outside%s; this process no longer reports for it",
            self.run_id,
            f" ({how})" if how else "",
        )

    def start(self, *, wait: bool = True) -> Run:
        """Start the run; `wait=False` sends it behind what came before without waiting
        (the daemon applies one connection's events in order). A start the daemon refuses
        raises RunRefused (with `wait`)."""
        self._mine("start")
        future = self.client.emit(
            Start(key=new_key(), run_id=self.run_id, at=time.time(), **self._limits)
        )
        if wait:
            self.answer(future, "start", tracks=True)
        return self

    def heartbeat(self, *, progress: bool = True) -> Run:
        """Tell the daemon the run is alive and, unless `progress=False` (a timer's beat),
        that it moved; does not wait for the reply."""
        self._mine("heartbeat")
        with self._lock:  # numbered and queued together: the daemon drops a seq out of order
            self._seq += 1
            future = self.client.emit(
                Heartbeat(
                    run_id=self.run_id,
                    seq=self._seq,
                    at=time.time(),
                    progress=None if progress else False,
                )
            )
        future.add_done_callback(self._heartbeat_answered)
        return self

    def _heartbeat_answered(self, future: Future[dict[str, Any]]) -> None:
        """On the connection's reader thread, which must not wait for a reply: a run that
        takes no more heartbeats stops its beats, and the beating thread says why."""
        if not future.result().get("ok"):
            error = future.result()["error"]
            if error.get("code") in (ErrorCode.INVALID_TRANSITION, ErrorCode.UNKNOWN_RUN):
                self._ended_outside = True
                self._stop.set()

    def artifact(self, path: str | os.PathLike[str]) -> Run:
        """Register a file the run produced; the daemon records its size and sha256."""
        self._mine("register an artifact of")
        full = Path(path).resolve()
        if not full.is_file():
            raise FileNotFoundError(f"artifact {full} is not an existing file")
        self._track(
            "artifact",
            self.client.emit(
                Artifact(key=new_key(), run_id=self.run_id, path=str(full), at=time.time())
            ),
        )
        return self

    def checkpoint(
        self, data: dict[str, Any] | None = None, *, path: str | os.PathLike[str] | None = None
    ) -> Run:
        """Record a checkpoint (a small map, and optionally the file that holds it)."""
        self._mine("checkpoint")
        self._track(
            "checkpoint",
            self.client.emit(
                Checkpoint(
                    key=new_key(),
                    run_id=self.run_id,
                    data=data or {},
                    path=str(Path(path).resolve()) if path is not None else None,
                    at=time.time(),
                )
            ),
        )
        return self

    def _track(self, what: str, future: Future[dict[str, Any]]) -> None:
        with self._lock:
            self._pending.append((what, future))

    def flush(self) -> Run:
        """Wait until every artifact and checkpoint sent so far is acknowledged."""
        with self._lock:
            pending, self._pending = self._pending, []
        for what, future in pending:
            self.answer(future, what, if_active=self._ended_outside)
        return self

    def succeed(self, *, if_active: bool = False) -> Run:
        """End the run succeeded; with `if_active`, a run something else already ended
        (a launched command through this library, say) is left as it is, silently."""
        self._mine("succeed")
        self.flush()
        self.answer(
            self.client.emit(Succeed(key=new_key(), run_id=self.run_id, at=time.time())),
            "succeed",
            if_active=if_active,
        )
        return self

    def fail(
        self,
        reason: str = FailReason.CRASH,
        message: str | None = None,
        *,
        failure_class: str | None = None,
        traceback: str | None = None,
        exit_code: int | None = None,
        signal: str | None = None,
        category_hint: str | None = None,
        exc: BaseException | None = None,
        cause: str | None = None,
        if_active: bool = False,
    ) -> Run:
        """End the run failed; pass `exc` to record its class, message and traceback.

        The daemon's diagnosis (category, retryable) lands in `self.diagnosis`; it stays
        None while the daemon is away.
        """
        self._mine("fail")
        if exc is not None:
            failure_class = failure_class or type(exc).__name__
            message = message if message is not None else str(exc)
            traceback = traceback or "".join(tb.format_exception(exc))
        self.flush()
        reply = self.answer(
            self.client.emit(
                Fail(
                    key=new_key(),
                    run_id=self.run_id,
                    reason=reason,
                    failure_class=failure_class,
                    message=message,
                    traceback=traceback,
                    exit_code=exit_code,
                    signal=signal,
                    category_hint=category_hint,
                    cause=cause,
                    at=time.time(),
                )
            ),
            "fail",
            if_active=if_active,
        )
        if reply is not None and "retryable" in reply:
            self.diagnosis = {"category": reply["category"], "retryable": reply["retryable"]}
        return self

    def detach(self) -> Run:
        """Leave the run without ending it: this process no longer counts as its owner."""
        self._mine("detach")
        self.flush()
        self.answer(
            self.client.emit(Detach(key=new_key(), run_id=self.run_id, at=time.time())), "detach"
        )
        return self

    # --- context manager ---

    def __enter__(self) -> Run:
        if not self._attached:
            self.start()
        self._crash_log = open_crash_log(self.run_dir, self.run_id)
        stacks.install(self.run_dir)
        self._caught_sigterm = catch_sigterm(raise_terminated)
        self.start_heartbeats()
        self._active = ACTIVE.set(self)
        return self

    def start_heartbeats(self) -> Run:
        """Send a heartbeat every `heartbeat_interval` seconds from a background thread."""
        self._stop.clear()
        self._beater = threading.Thread(target=self._beat, name="runnerd-heartbeat", daemon=True)
        self._beater.start()
        return self

    def stop_heartbeats(self) -> Run:
        self._stop.set()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb_: TracebackType | None,
    ) -> None:
        self.stop_heartbeats()
        if self._caught_sigterm:
            release_sigterm()
            self._caught_sigterm = False
        self._leave_active()
        if os.getpid() != self._pid:
            return  # a forked child leaving the block: the run and its crash.log are the parent's
        if self._crash_log is not None:
            close_crash_log(self._crash_log, self.run_dir)
            self._crash_log = None
        end = ending(exc)
        if end is None:
            self.detach() if self._attached else self.succeed()
        else:
            self.fail(
                end.reason,
                exc=exc,
                failure_class=end.failure_class,
                message=end.message,
                exit_code=end.exit_code,
                cause=end.cause,
            )

    def _leave_active(self) -> None:
        token, self._active = self._active, None
        if token is not None:
            with contextlib.suppress(ValueError):  # left in another context than entered
                ACTIVE.reset(token)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            if self.vouch is not None and not self.vouch():
                continue
            try:
                self.heartbeat(progress=False)  # alive, which is not moving
            except RunnerdError as exc:
                log.warning("heartbeat not sent: %s", exc)
        if self._ended_outside:
            self.say_ended()
