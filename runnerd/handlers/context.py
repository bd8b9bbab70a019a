"""Who asks (`Peer`) and what every handler shares (`Context`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from anyio.streams.memory import MemoryObjectSendStream

from runnerd.config import Config
from runnerd.events import Broker
from runnerd.indexer import Indexer
from runnerd.mirror import Mirror
from runnerd.registry import Registry
from runnerd.resources import Sampler
from runnerd.sweeps import ManifestWriter
from runnerd_client.protocol import Artifact

if TYPE_CHECKING:
    from runnerd.hooks.runner import HookRunner

Reply = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Peer:
    """A connected process, as the kernel tells it (SO_PEERCRED), never as it claims."""

    pid: int
    uid: int
    start_time: int | None

    @property
    def source(self) -> str:
        return f"client:{self.pid}"


@dataclass
class Context:
    """What handlers share: settings, the registry and the daemon's runtime facts."""

    config: Config
    registry: Registry
    indexer: Indexer
    broker: Broker
    manifests: ManifestWriter
    started_at: float
    sampler: Sampler | None = None
    connections: int = 0
    spooled_artifacts: MemoryObjectSendStream[Artifact] | None = None
    """Where replayed artifacts go to be hashed in the background (a spooled 6 GiB file must
    not hold up start-up); None: hashed in line."""
    hooks: HookRunner | None = None
    mirror: Mirror | None = None
