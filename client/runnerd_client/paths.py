"""Default locations (SPEC §4, §7), shared by the daemon, the CLI and the client."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def socket_path() -> Path:
    """$RUNNERD_SOCKET, else $XDG_RUNTIME_DIR/runnerd/runnerd.sock, else /tmp/runnerd-$UID/."""
    explicit = os.environ.get("RUNNERD_SOCKET")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "runnerd" / "runnerd.sock"
    return Path(f"/tmp/runnerd-{os.getuid()}") / "runnerd.sock"


def db_path() -> Path:
    """$RUNNERD_DB, else $XDG_STATE_HOME/runnerd/registry.sqlite3."""
    explicit = os.environ.get("RUNNERD_DB")
    if explicit:
        return Path(explicit)
    return _xdg("XDG_STATE_HOME", ".local/state") / "runnerd" / "registry.sqlite3"


def spool_dirs(db: Path | None = None, socket: Path | None = None) -> list[Path]:
    """Where clients keep events the daemon has not acknowledged, in order of preference:
    beside the registry; if that disk refuses them (full, say), beside the socket (the
    runtime dir, usually in memory); then the temp dir (a folder per daemon socket there, so
    that several daemons of one user replay only their own). The daemon replays all three."""
    import tempfile  # with shutil and the compressors it imports: 10 ms runnerctl skips

    socket = socket or socket_path()
    daemon = hashlib.sha256(os.fsencode(os.path.abspath(socket))).hexdigest()[:16]
    folders = [
        (db or db_path()).parent / "spool",
        socket.parent / "spool",
        Path(tempfile.gettempdir()) / f"runnerd-spool-{os.getuid()}" / daemon,
    ]
    return list(dict.fromkeys(folders))


def data_dir() -> Path:
    """$XDG_DATA_HOME/runnerd: run folders and sweep folders live below it."""
    return _xdg("XDG_DATA_HOME", ".local/share") / "runnerd"


def config_path() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "runnerd" / "config.toml"


def default_run_dir(run_id: str) -> Path:
    return data_dir() / "runs" / run_id
