"""One request to each of several daemons on their sockets: each daemon's `Answer`, the
reply or why there is none. Below `nodes` (which merges the answers) and `dask_nodes`
(which gets them through a Dask cluster instead)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runnerd.cli.common import say
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.protocol import Request, RunnerdError


@dataclass(frozen=True, slots=True)
class Answer:
    """One daemon's reply to a request, or why there is none."""

    daemon: str
    body: dict[str, Any] | None = None
    error: RunnerdError | None = None

    @property
    def unreachable(self) -> bool:
        return isinstance(self.error, DaemonUnavailable)


def ask(path: Path, req: Request) -> Answer:
    """The daemon's reply on `path` (without the frame's id and ok), or its error."""
    try:
        conn = Connection(path)
        try:
            body = conn.call(req)
        finally:
            conn.close()
    except RunnerdError as exc:
        return Answer(str(path), error=exc)
    return Answer(str(path), body={k: v for k, v in body.items() if k not in ("id", "ok")})


def ask_sockets(sockets: list[Path], req: Request) -> list[Answer]:
    """Every daemon's answer, asked at once (a forwarded socket may be slow), in order."""
    with ThreadPoolExecutor(max_workers=len(sockets)) as pool:
        return list(pool.map(lambda path: ask(path, req), sockets))


def warn_unreachable(answers: list[Answer]) -> None:
    for answer in answers:
        if isinstance(answer.error, DaemonUnavailable):
            say(f"runnerctl: warning: {answer.error.message}; left out", err=True)
