"""The mirror's files on shared storage, as a daemon writes them and runnerctl reads them.

    DIR/<host>-<token>/node.json             one folder per registry: who writes it, how far
                                              and how recently it was refreshed
    DIR/<host>-<token>/runs-00000001.jsonl   run objects as `show --json` gives them, one per
                                              line; a later line of a run replaces an earlier

Each folder has one writer, the daemon of that registry. Lines are appended and fsync'd.
A compaction writes the current records whole into the next segment (renamed into place),
then names it in node.json as `base`, then removes the older segments; so a reader reads
node.json, then every segment from `base` on, and starts again if one vanished under it.
node.json is always written whole and renamed. Nothing here is SQLite: a wiped node leaves
plain files that any tool can read.

Light on purpose (no daemon modules): runnerctl imports it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 1
NODE_FILE = "node.json"
_SEGMENT = re.compile(r"runs-(\d{8})\.jsonl")
READ_ATTEMPTS = 5
SILENT_AFTER = 3  # heartbeats missed before a node that did not say it stopped is called silent


def segment_name(number: int) -> str:
    return f"runs-{number:08d}.jsonl"


def segment_number(name: str) -> int | None:
    match = _SEGMENT.fullmatch(name)
    return int(match.group(1)) if match else None


def encode_line(obj: dict[str, Any]) -> bytes:
    """One record as one line (compact; `show --json` keys)."""
    return (json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n").encode()


@dataclass
class MirroredNode:
    """One mirrored registry as read from its folder: node.json and the lines of its
    segments in order (later lines win)."""

    folder: Path
    header: dict[str, Any]
    lines: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line no, text)


class NotMirrored(Exception):
    """A folder that is not (or no longer) a readable mirror node; the message says why."""


def is_node(folder: Path) -> bool:
    return (folder / NODE_FILE).is_file()


def read_header(folder: Path) -> dict[str, Any]:
    try:
        header = json.loads((folder / NODE_FILE).read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise NotMirrored(f"{folder / NODE_FILE}: cannot be read ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("base"), int):
        raise NotMirrored(f"{folder / NODE_FILE}: not a mirror's node.json")
    return header


def read_node(folder: Path) -> MirroredNode:
    """node.json, then every segment from its `base` on. A compaction may remove a segment
    between the two: then start again (the new node.json names the new base)."""
    for _ in range(READ_ATTEMPTS):
        header = read_header(folder)
        numbers = sorted(
            n
            for name in os.listdir(folder)
            if (n := segment_number(name)) is not None and n >= header["base"]
        )
        node = MirroredNode(folder, header)
        try:
            for number in numbers:
                path = folder / segment_name(number)
                with path.open(encoding="utf-8", errors="replace") as lines:
                    node.lines += [
                        (str(path), n, line)
                        for n, line in enumerate(lines, 1)
                        if line.endswith("\n")
                    ]  # not one being appended now
        except FileNotFoundError:
            continue
        return node
    raise NotMirrored(f"{folder}: its segments kept changing while being read")
