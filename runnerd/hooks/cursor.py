"""A hook's place in the event log, kept in `<state dir>/hooks/<name>.json`.

`seq`: every event up to it was delivered or is not wanted; `delivered`: the events after
it already delivered (calls for several runs finish out of order), so a restart delivers
none of them again; `last`: the last call's result, for `runnerctl hooks`. The file is
replaced atomically and synced before it counts, and never written or read through a
symlink; one that cannot be used is warned about and ignored.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runnerd_client import trust

log = logging.getLogger(__name__)
MAX_SIZE = 1 << 20


@dataclass
class Cursor:
    seq: int = 0
    delivered: set[int] = field(default_factory=set)
    last: dict[str, Any] | None = None

    def encode(self) -> bytes:
        return json.dumps(
            {"seq": self.seq, "delivered": sorted(self.delivered), "last": self.last}
        ).encode()


def load(folder: Path, name: str) -> Cursor | None:
    """The saved cursor of hook `name`; None if there is none that can be used."""
    path = folder / f"{name}.json"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning(
            "hook %s: cannot read its cursor %s (%s); it starts at the end of the log",
            name,
            path,
            exc,
        )
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            trust.check_own_file(os.fstat(fd), path)
            return _decode(fh.read(MAX_SIZE))
        except (trust.UntrustedPath, ValueError, OSError) as exc:
            log.warning(
                "hook %s: ignoring its cursor %s (%s); it starts at the end of the log",
                name,
                path,
                exc,
            )
            return None


def _decode(data: bytes) -> Cursor:
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    seq, delivered, last = doc.get("seq"), doc.get("delivered", []), doc.get("last")
    if type(seq) is not int or seq < 0:
        raise ValueError("seq is not a seq")
    if not isinstance(delivered, list) or not all(type(s) is int for s in delivered):
        raise ValueError("delivered is not a list of seqs")
    return Cursor(seq, {s for s in delivered if s > seq}, last if isinstance(last, dict) else None)


def save(folder: Path, name: str, cursor: Cursor) -> None:
    """Replace the cursor file: written to a new file, synced, renamed over, folder synced."""
    trust.write_atomically(
        folder, f"{name}.json", cursor.encode(), mode=0o600, create=False, durable=True
    )
