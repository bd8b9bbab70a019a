"""The node daemons of a Dask cluster, reached through Dask itself.

What runs on a worker (`Client.run`) to ask, follow or tell the daemon of the worker's node
on its local socket: `runnerctl --dask ADDRESS ...` asks every node this way, and the
scheduler plugin labels a run in the daemon of the node where it lived. No socket is
forwarded and no port of runnerd's own is opened: Dask's own connections (and its TLS)
carry everything.

Each function is a coroutine that does its socket work in a thread, so a slow or frozen
daemon never holds up the worker's event loop. They take and return plain maps (a request's
wire map, a reply's body), which any version of the client on the worker can read.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runnerd_client import paths
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.ids import new_key
from runnerd_client.protocol import Label, RunnerdError, Subscribe, decode_request

PLUGIN_NAME = "runnerd"  # the worker plugin's name (runnerd_client.dask)
ASK_TIMEOUT = 30.0
FOLLOW_IDLE = 60.0  # a follower not polled for this long is closed


def daemon_socket() -> Path:
    """The socket this worker's runs go to: its plugin's, else the node's default."""
    plugin = None
    try:
        from distributed import get_worker

        plugin = get_worker().plugins.get(PLUGIN_NAME)
    except (ImportError, ValueError):  # not on a worker
        pass
    explicit = getattr(plugin, "socket_path", None)
    return Path(explicit) if explicit else paths.socket_path()


def node() -> dict[str, str]:
    """This worker's node as runnerctl names it: its host and its daemon's socket."""
    return {"host": socket.gethostname(), "socket": str(daemon_socket())}


def _error(exc: RunnerdError) -> dict[str, Any]:
    return {
        "code": str(exc.code),
        "message": exc.message,
        "unreachable": isinstance(exc, DaemonUnavailable),
    }


def _ask(request: dict[str, Any], timeout: float) -> dict[str, Any]:
    here = node()
    try:
        _, req = decode_request(request)
        conn = Connection(here["socket"], timeout=5.0)
        try:
            body = conn.call(req, timeout=timeout)
        finally:
            conn.close()
    except RunnerdError as exc:
        return {**here, "error": _error(exc)}
    return {**here, "body": {k: v for k, v in body.items() if k not in ("id", "ok")}}


async def ask(request: dict[str, Any], timeout: float = ASK_TIMEOUT) -> dict[str, Any]:
    """On a worker: one request (its wire map) to this node's daemon. `host`, `socket`, and
    the reply's `body` or the `error` (code, message, whether the daemon is unreachable)."""
    return await asyncio.to_thread(_ask, request, timeout)


@dataclass
class _Follower:
    """A subscription kept open on a worker between polls."""

    conn: Connection
    polled: float = field(default_factory=time.monotonic)


_FOLLOWERS: dict[str, _Follower] = {}


def _close_when_idle(follow_id: str, follower: _Follower) -> None:
    """Close a subscription nobody has polled for FOLLOW_IDLE seconds (runnerctl gone)."""
    while time.monotonic() - follower.polled < FOLLOW_IDLE:
        time.sleep(FOLLOW_IDLE / 6)
    if _FOLLOWERS.get(follow_id) is follower:
        del _FOLLOWERS[follow_id]
    follower.conn.close()


def _poll(follow_id: str, filters: dict[str, Any], wait: float) -> dict[str, Any]:
    here = node()
    follower = _FOLLOWERS.get(follow_id)
    try:
        if follower is None:
            conn = Connection(here["socket"], timeout=5.0)
            follower = _FOLLOWERS[follow_id] = _Follower(conn)
            threading.Thread(
                target=_close_when_idle,
                args=(follow_id, follower),
                name="runnerd-follow-idle",
                daemon=True,
            ).start()
            conn.call(Subscribe(**filters))
        follower.polled = time.monotonic()
        events = _drain(follower.conn, wait)
    except RunnerdError as exc:
        stopped = _FOLLOWERS.pop(follow_id, None)
        if stopped is not None:
            stopped.conn.close()
        return {**here, "error": _error(exc)}
    return {**here, "events": events}


def _drain(conn: Connection, wait: float) -> list[dict[str, Any]]:
    """The events that arrive within `wait` seconds (less once some have come)."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        event = conn.next_event(timeout=min(left, 0.2) if events else left)
        if event is None and events:
            break
        if event is not None:
            events.append(event)
    return events


async def poll(follow_id: str, filters: dict[str, Any], wait: float = 1.0) -> dict[str, Any]:
    """On a worker: the events of this node's daemon since the last poll of `follow_id`
    (`subscribe` filters: run, experiment, sweep, since), waiting up to `wait` seconds."""
    return await asyncio.to_thread(_poll, follow_id, filters, wait)


async def stop_following(follow_id: str) -> None:
    follower = _FOLLOWERS.pop(follow_id, None)
    if follower is not None:
        follower.conn.close()


def label_at(socket_path: str, run_id: str, category: str, note: str) -> dict[str, Any]:
    """Tell the daemon at `socket_path` what killed one of its runs (blocking)."""
    here = {"host": socket.gethostname(), "socket": socket_path}
    try:
        conn = Connection(socket_path, timeout=5.0)
        try:
            conn.call(Label(key=new_key(), run_id=run_id, category=category, note=note))
        finally:
            conn.close()
    except RunnerdError as exc:
        return {**here, "error": _error(exc)}
    return {**here, "labelled": run_id}


async def label(run_id: str, category: str, note: str) -> dict[str, Any]:
    """On a worker: tell this node's daemon what killed one of its runs."""
    return await asyncio.to_thread(label_at, str(daemon_socket()), run_id, category, note)
