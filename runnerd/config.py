"""Inert daemon settings: defaults, overridden by config.toml, then by the command line."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from runnerd_client import paths
from runnerd_client.protocol import DEFAULT_MAX_FRAME

ARTIFACT_TIMEOUT = 600.0  # seconds to hash one artifact
HOOK_TIMEOUT = 30.0  # seconds per hook call
HOOK_MODES = ("call", "stream")  # a process per event, or one kept running for them all
EVENT_NAMES = (  # what a hook's `events` patterns match: a state change is named by its state
    "pending",
    "running",
    "succeeded",
    "failed_crash",
    "failed_abandoned",
    "failed_timeout",
    "lost",
    "failed_lost",
    "sweep_ended",
    "failure",
    "artifact",
    "checkpoint",
    "memory_warning",
    "stalled",
)


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class Hook:
    """One `[[hooks]]` table: the run events it wants and the command they are sent to."""

    name: str
    events: tuple[str, ...]
    command: tuple[str, ...] | str  # argv, or a line for /bin/sh -c
    experiment: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    timeout: float = HOOK_TIMEOUT
    mode: str = "call"  # "stream": one process, an event per stdin line, an ack per line


@dataclass(frozen=True, slots=True)
class Config:
    socket: Path = field(default_factory=paths.socket_path)
    db: Path = field(default_factory=paths.db_path)
    heartbeat_timeout: float = 15 * 60.0
    stall_timeout: float = 30 * 60.0  # no progress of any kind this long: lost (0: never)
    lost_grace: float = 48 * 3600.0
    max_frame: int = DEFAULT_MAX_FRAME
    max_batch: int = 512
    synchronous: str = "FULL"
    shutdown_grace: float = 5.0
    spool_sweep_interval: float = 10.0
    watched_dirs: tuple[str, ...] = ()
    busy_timeout: float = 5.0
    sample_interval: float = 5.0
    memory_warning: float = 0.9
    retention: float | None = None
    resume_interrupted: bool = False
    max_connections: int = 1024
    max_inflight: int = 128
    frame_timeout: float = 10.0
    idle_timeout: float = 3600.0
    frame_memory: int = 64 << 20
    artifact_timeout: float = ARTIFACT_TIMEOUT
    hooks: tuple[Hook, ...] = ()
    hook_concurrency: int = 4
    mirror: Path | None = None  # a shared folder to keep the records in too (runnerd.mirror)
    mirror_interval: float = 1.0


_CHECKS: dict[str, tuple[type, ...]] = {
    "socket": (str,),
    "db": (str,),
    "heartbeat_timeout": (int, float),
    "stall_timeout": (int, float),
    "lost_grace": (int, float),
    "max_frame": (int,),
    "max_batch": (int,),
    "synchronous": (str,),
    "shutdown_grace": (int, float),
    "spool_sweep_interval": (int, float),
    "watched_dirs": (list,),
    "busy_timeout": (int, float),
    "sample_interval": (int, float),
    "memory_warning": (int, float),
    "retention": (int, float),
    "resume_interrupted": (bool,),
    "max_connections": (int,),
    "max_inflight": (int,),
    "frame_timeout": (int, float),
    "idle_timeout": (int, float),
    "frame_memory": (int,),
    "artifact_timeout": (int, float),
    "hooks": (list,),
    "hook_concurrency": (int,),
    "mirror": (str,),
    "mirror_interval": (int, float),
}
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_ZERO_TURNS_OFF = ("stall_timeout",)


def _convert(source: Path, key: str, value: Any) -> Any:
    if key not in _CHECKS:
        known = ", ".join(f.name for f in fields(Config))
        raise ConfigError(f"{source}: unknown key {key!r} (known: {known})")
    if not isinstance(value, _CHECKS[key]) or (
        isinstance(value, bool) and bool not in _CHECKS[key]
    ):
        raise ConfigError(f"{source}: {key} has the wrong type ({type(value).__name__})")
    if isinstance(value, str):
        return _convert_text(source, key, value)
    if isinstance(value, list):
        return (
            _convert_hooks(source, value) if key == "hooks" else _convert_dirs(source, key, value)
        )
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value <= 0
        and not (key in _ZERO_TURNS_OFF and value == 0)
    ):
        raise ConfigError(f"{source}: {key} must be positive")
    return value


def _convert_dirs(source: Path, key: str, value: list[Any]) -> tuple[str, ...]:
    dirs = []
    for item in value:
        if not isinstance(item, str) or not os.path.isabs(os.path.expanduser(item)):
            raise ConfigError(f"{source}: {key} must be a list of absolute paths ({item!r})")
        dirs.append(os.path.normpath(os.path.expanduser(item)))
    return tuple(dirs)


_HOOK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOOK_KEYS = ("name", "events", "command", "experiment", "tags", "timeout", "mode")


def _convert_hooks(source: Path, tables: list[Any]) -> tuple[Hook, ...]:
    hooks = tuple(_convert_hook(f"{source}: hooks[{n}]", table) for n, table in enumerate(tables))
    names = [hook.name for hook in hooks]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{source}: two hooks are named {name!r}; names must be unique")
    return hooks


def _convert_hook(where: str, table: Any) -> Hook:
    """Check one [[hooks]] table; every mistake is named (a typo in `events` would
    otherwise be a hook that silently never runs)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table ([[hooks]])")
    unknown = sorted(set(table) - set(_HOOK_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_HOOK_KEYS)})")
    name = table.get("name")
    if not isinstance(name, str) or not _HOOK_NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: name is required: 1-64 characters of A-Z, a-z, 0-9, '_', '.' or '-'"
        )
    where = f"{where} ({name})"
    return Hook(
        name=name,
        events=_hook_events(where, table.get("events")),
        command=_hook_command(where, table.get("command")),
        experiment=_hook_experiment(where, table.get("experiment")),
        tags=_hook_tags(where, table.get("tags", {})),
        timeout=_hook_timeout(where, table.get("timeout", HOOK_TIMEOUT)),
        mode=_hook_mode(where, table.get("mode", "call")),
    )


def _hook_events(where: str, events: Any) -> tuple[str, ...]:
    if (
        not isinstance(events, list)
        or not events
        or not all(isinstance(e, str) and e for e in events)
    ):
        raise ConfigError(f'{where}: events must be a list of patterns, e.g. ["failed_*"]')
    for pattern in events:
        if not any(fnmatchcase(known, pattern) for known in EVENT_NAMES):
            raise ConfigError(
                f"{where}: events pattern {pattern!r} matches no event "
                f"(events: {', '.join(EVENT_NAMES)})"
            )
    return tuple(events)


def _hook_command(where: str, command: Any) -> tuple[str, ...] | str:
    if isinstance(command, str) and command.strip():
        return command
    if (
        isinstance(command, list)
        and command
        and all(isinstance(a, str) for a in command)
        and command[0]
    ):
        return tuple(command)
    raise ConfigError(f"{where}: command must be a list of arguments (or a shell line)")


def _hook_experiment(where: str, experiment: Any) -> str | None:
    if experiment is not None and (not isinstance(experiment, str) or not experiment):
        raise ConfigError(f'{where}: experiment must be a pattern, e.g. "lr-*"')
    return experiment


def _hook_tags(where: str, tags: Any) -> dict[str, Any]:
    if not isinstance(tags, dict) or not all(
        isinstance(v, str | int | float | bool) for v in tags.values()
    ):
        raise ConfigError(f'{where}: tags must be a table of values, e.g. {{ team = "vision" }}')
    return dict(tags)


def _hook_timeout(where: str, timeout: Any) -> float:
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError(f"{where}: timeout must be a positive number of seconds")
    return float(timeout)


def _hook_mode(where: str, mode: Any) -> str:
    if mode not in HOOK_MODES:
        raise ConfigError(
            f'{where}: mode must be "call" (a process per event) or "stream" (one process)'
        )
    return str(mode)


def _convert_text(source: Path, key: str, value: str) -> Any:
    if key == "synchronous":
        if value.upper() not in _SYNCHRONOUS:
            raise ConfigError(f"{source}: synchronous must be one of {', '.join(_SYNCHRONOUS)}")
        return value.upper()
    if key == "mirror" and not os.path.isabs(os.path.expanduser(value)):
        raise ConfigError(f"{source}: mirror must be an absolute path ({value!r})")
    return Path(value).expanduser()


def load(path: Path | None = None, **overrides: Any) -> Config:
    """Defaults, then the TOML file if it exists (or was named), then explicit overrides."""
    source = path or paths.config_path()
    values: dict[str, Any] = {}
    if path is not None or source.exists():
        try:
            raw = tomllib.loads(source.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        values = {key: _convert(source, key, value) for key, value in raw.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return replace(Config(), **values)
