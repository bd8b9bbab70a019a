"""Inert daemon settings: defaults, overridden by config.toml, then by the command line."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from runnerd_client import paths
from runnerd_client.protocol import DEFAULT_MAX_FRAME

ARTIFACT_TIMEOUT = 600.0  # seconds to hash one artifact


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class Config:
    socket: Path = field(default_factory=paths.socket_path)
    db: Path = field(default_factory=paths.db_path)
    heartbeat_timeout: float = 15 * 60.0
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


_CHECKS: dict[str, tuple[type, ...]] = {
    "socket": (str,),
    "db": (str,),
    "heartbeat_timeout": (int, float),
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
}
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def _convert(source: Path, key: str, value: Any) -> Any:
    if key not in _CHECKS:
        known = ", ".join(f.name for f in fields(Config))
        raise ConfigError(f"{source}: unknown key {key!r} (known: {known})")
    if not isinstance(value, _CHECKS[key]) or (isinstance(value, bool)
                                               and bool not in _CHECKS[key]):
        raise ConfigError(f"{source}: {key} has the wrong type ({type(value).__name__})")
    if isinstance(value, str):
        return _convert_text(source, key, value)
    if isinstance(value, list):
        return _convert_dirs(source, key, value)
    if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
        raise ConfigError(f"{source}: {key} must be positive")
    return value


def _convert_dirs(source: Path, key: str, value: list[Any]) -> tuple[str, ...]:
    dirs = []
    for item in value:
        if not isinstance(item, str) or not os.path.isabs(os.path.expanduser(item)):
            raise ConfigError(f"{source}: {key} must be a list of absolute paths ({item!r})")
        dirs.append(os.path.normpath(os.path.expanduser(item)))
    return tuple(dirs)


def _convert_text(source: Path, key: str, value: str) -> Any:
    if key == "synchronous":
        if value.upper() not in _SYNCHRONOUS:
            raise ConfigError(f"{source}: synchronous must be one of {', '.join(_SYNCHRONOUS)}")
        return value.upper()
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
