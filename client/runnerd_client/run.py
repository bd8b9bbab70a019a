"""Runs as an experiment sees them: two lines to be tracked, and never broken by us.

Every event goes through `Client.emit` (see reporter.py): delivered, or spooled to
disk while the daemon is away, and never raised into the experiment. What is raised is
the caller's own mistake: a wrong argument (TypeError, ValueError, before anything is
sent), or a run the daemon refused to create, start or attach (RunRefused), which would
otherwise run untracked.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import random
import signal
import socket
import threading
import time
import traceback as tb
from collections.abc import Callable
from concurrent.futures import Future
from contextvars import ContextVar, Token
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from runnerd_client import paths, stacks, trust
from runnerd_client.connection import Reply
from runnerd_client.enums import RetryOn
from runnerd_client.errors import RunRefused
from runnerd_client.fields import (
    Backoff,
    Positive,
    RetryCount,
    RetryWhen,
    check_argument,
    check_fields,
)
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import (
    Artifact,
    Attach,
    Checkpoint,
    Create,
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


def worth_retrying(diagnosis: dict[str, Any] | None, retry_on: str) -> bool:
    """Under retry_on="retryable", only a failure the daemon diagnosed retryable (a bug or
    a bad input fails at once); under "any", every failure."""
    return retry_on == RetryOn.ANY or bool((diagnosis or {}).get("retryable"))


def backoff_delay(backoff: float, attempt: int) -> float:
    """Seconds before the retry after `attempt`: backoff ** attempt, with ±25% jitter so
    that many runs failing together do not retry together."""
    return float(backoff**attempt * random.uniform(0.75, 1.25))


_EVERY_CODE = tuple(ErrorCode)


@dataclass(frozen=True)
class Retries:
    """When a failed attempt is tried again (`rd.retrying`, `runnerctl exec --retries`): at
    most `retries` times, after `backoff ** attempt` seconds, and under `retry_on` only
    failures diagnosed retryable. A value out of bounds raises TypeError or ValueError."""

    retries: RetryCount = 0
    backoff: Backoff = 2.0
    retry_on: RetryWhen = RetryOn.RETRYABLE

    def __post_init__(self) -> None:
        check_fields(self)


def check_callable(name: str, fn: object) -> None:
    """TypeError naming an argument that should be a function and is not."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable, not {type(fn).__name__} {fn!r:.60}")


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM, so `with rd.run()` records the run abandoned."""

    failure_class = "Terminated"
    message = "terminated by SIGTERM"
    cause: str | None = None

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


ACTIVE: ContextVar[Run | None] = ContextVar("runnerd_active_run", default=None)
"""The run whose `with` block (or sweep cell) this code executes in, for `rd.current_run()`
and the integrations (an MLflow run started there is linked to it)."""


@dataclass(frozen=True)
class Cell:
    """A sweep's cell an attempt claims: it runs only if the cell's latest attempt is still
    `claim_after` (None: it has none yet) and no attempt of it is live."""

    sweep_id: str
    index: int
    claim_after: str | None = None
    replication: str | None = None
    """Set: the attempt replicates the cell instead (`sweep replicate`): it is linked to the
    cell and tagged with this replication's id, and claims nothing."""


class Client(Reporter):
    """What `rd.connect()` returns: makes runs and attaches to them."""

    def run(
        self,
        experiment: str,
        variation: str = "default",
        *,
        params: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None,
        run_dir: str | Path | None = None,
        heartbeat_interval: float = 60.0,
        heartbeat_timeout: float | None = None,
        lost_grace: float | None = None,
        deadline: float | None = None,
        retry_of: str | None = None,
        launch: dict[str, Any] | None = None,
        resume: bool = False,
        cell: Cell | None = None,
        stall_timeout: float | None = None,
        launch_env: dict[str, str] | None = None,
    ) -> Run:
        """Register a new run (pending); `start()` it or use it as a context manager.

        `stall_timeout`: seconds without progress (CPU, output, files, heartbeats) before
        the daemon calls it stalled (0: never; None: the daemon's). `retry_of` links it to
        the attempt it reruns; `launch` is how to launch it again, and `launch_env` the
        environment its command runs with (kept apart: shown only when asked for).
        With `resume`, after an unsuccessful attempt of the same experiment and variation
        the run continues it: `run.resumed_from` names it and `run.resume_checkpoint` holds
        its last checkpoint. `cell` claims a sweep's cell for this attempt.

        A wrong argument raises TypeError or ValueError naming it, before anything is sent.
        A create the daemon refuses (a resume whose params changed, a claim another attempt
        holds: `conflict`) raises RunRefused.
        """
        run_id = new_run_id()
        limits = {
            "heartbeat_timeout": heartbeat_timeout,
            "lost_grace": lost_grace,
            "deadline": deadline,
            "stall_timeout": stall_timeout,
        }
        check_argument("heartbeat_interval", Positive, heartbeat_interval)
        check_fields(Start(key="-", run_id=run_id, **limits))  # refused later, left pending
        folder = Path(run_dir).resolve() if run_dir else paths.default_run_dir(run_id)
        params = {} if params is None else params
        run = Run(
            self,
            run_id,
            experiment,
            variation,
            params=params,
            run_dir=folder,
            heartbeat_interval=heartbeat_interval,
            limits=limits,
        )
        claim: dict[str, Any] = (
            {"sweep_id": cell.sweep_id, "cell": cell.index, "claim_after": cell.claim_after}
            if cell
            else {}
        )
        if cell and cell.replication:
            claim["replicates"] = True
            tags = {**(tags or {}), "replication": cell.replication}
        reply = (
            run.answer(
                self.emit(
                    Create(
                        key=new_key(),
                        run_id=run_id,
                        experiment=experiment,
                        variation=variation,
                        params=params,
                        tags={} if tags is None else tags,
                        cwd=os.getcwd(),
                        run_dir=str(folder),
                        host=socket.gethostname(),
                        retry_of=retry_of,
                        launch=launch,
                        launch_env=launch_env,
                        resume=resume,
                        at=time.time(),
                        **claim,
                    )
                ),
                "create",
                tracks=True,
            )
            or {}
        )
        run.attempt = reply.get("attempt")
        run.resumed_from = reply.get("resumed_from")
        run.resume_checkpoint = reply.get("resume_checkpoint")
        return run

    def attach(self, run_id: str) -> Run:
        """Join an existing run (one launched by `runnerctl exec`, say) from this process.

        With the daemon away the attach is spooled and the run's names are not known yet.
        A run the daemon does not know raises RunRefused; one already ended is said so once.
        """
        run = Run(
            self,
            run_id,
            "",
            "",
            params={},
            run_dir=paths.default_run_dir(run_id),
            heartbeat_interval=60.0,
            limits={},
            attached=True,
        )
        reply = (
            run.answer(
                self.emit(Attach(key=new_key(), run_id=run_id, at=time.time())),
                "attach to",
                tracks=True,
            )
            or {}
        )
        info = reply.get("run")
        if info:
            run.experiment, run.variation = info["experiment"], info["variation"]
            run.params, run.run_dir = info["params"], Path(info["run_dir"])
            run.attempt = info.get("attempt")
            run.resumed_from = info.get("resumed_from")
        run.resume_checkpoint = reply.get("resume_checkpoint")
        return run


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
        self._old_sigterm: Any = None
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
        self._enable_faulthandler()
        stacks.install(self.run_dir)
        self._catch_sigterm()
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
        self._restore_sigterm()
        self._leave_active()
        if os.getpid() != self._pid:
            return  # a forked child leaving the block: the run and its crash.log are the parent's
        self._disable_faulthandler()
        if exc is None or (
            isinstance(exc, SystemExit)
            and not isinstance(exc, Terminated)
            and exc.code in (0, None)
        ):
            self.detach() if self._attached else self.succeed()
        elif isinstance(exc, Terminated):
            self.fail(
                FailReason.ABANDONED,
                exc=exc,
                failure_class=exc.failure_class,
                message=exc.message,
                cause=exc.cause,
            )
        elif isinstance(exc, KeyboardInterrupt):
            self.fail(FailReason.ABANDONED, exc=exc, message="interrupted")
        else:
            exit_code = (
                exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else None
            )
            self.fail(FailReason.CRASH, exc=exc, exit_code=exit_code)

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

    def _catch_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def _enable_faulthandler(self) -> None:
        """A segfault or abort leaves a native-level traceback in run_dir/crash.log."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with trust.open_folder(self.run_dir, create=True) as folder:
                fd = trust.create_file(folder, "crash.log", exclusive=False, append=True)
            self._crash_log = open(fd, "a")  # noqa: SIM115
        except OSError as exc:
            log.warning("no crash.log for run %s: %s", self.run_id, exc)
            return
        faulthandler.enable(self._crash_log, all_threads=True)

    def _disable_faulthandler(self) -> None:
        if self._crash_log is not None:
            faulthandler.disable()
            empty = self._crash_log.tell() == 0
            self._crash_log.close()
            self._crash_log = None
            if empty:
                (self.run_dir / "crash.log").unlink(missing_ok=True)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()
