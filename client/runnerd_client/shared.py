"""The process's own client: one connection shared by all its threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from runnerd_client.client import Client

_shared: tuple[int, Client] | None = None
_shared_lock = threading.Lock()


def connect(socket_path: str | Path | None = None) -> Client:
    """The process's client: one connection shared by all its threads (new after a fork);
    with `socket_path`, a client of its own to that daemon."""
    global _shared
    with _shared_lock:
        if socket_path is not None:
            return Client(socket_path)
        if _shared is None or _shared[0] != os.getpid():
            _shared = (os.getpid(), Client())
        return _shared[1]
