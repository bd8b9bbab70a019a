"""The SQLite run registry. Nothing outside this package writes SQL or names a column.

- `schema`: the migrations, one per schema version.
- `opening`: opening the file, and refusing one that is locked, damaged or remote.
- `writer`: `Registry`, the group-commit writer and the reader, on threads of their own.
- `effects`: what a committed batch changed, for the daemon's subscribers.
- `store`: `Store`, the registry on one connection, by subject: `runs` (and their states),
  `attachments` (processes, artifacts, checkpoints, resources), `events`, `failures`,
  `sweeps` (and cells), `indexing` (the crash indexer's bookkeeping), `upkeep`
  (idempotency keys, pruning) and `views` (rows made into the public run objects).
"""

from runnerd.registry.effects import BatchResult, Effects, Transition
from runnerd.registry.opening import DamagedRegistry, StorageError
from runnerd.registry.rows import (
    NO_CHANGE,
    CellRow,
    FailureRecord,
    NewRun,
    NewSweep,
    RunRow,
    RunUpdate,
    SweepRow,
)
from runnerd.registry.schema import MIGRATIONS, SCHEMA_VERSION
from runnerd.registry.store import Store
from runnerd.registry.writer import Op, Registry
from runnerd.times import iso

__all__ = [
    "MIGRATIONS",
    "NO_CHANGE",
    "SCHEMA_VERSION",
    "BatchResult",
    "CellRow",
    "DamagedRegistry",
    "Effects",
    "FailureRecord",
    "NewRun",
    "NewSweep",
    "Op",
    "Registry",
    "RunRow",
    "RunUpdate",
    "StorageError",
    "Store",
    "SweepRow",
    "Transition",
    "iso",
]
