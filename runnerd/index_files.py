"""The files the crash indexer reads: which they are, what each says, where they are found.

`classify` is the filter (is this a file we index?, by its name alone); `read_fact` reads
one file on a worker thread (never whole for a core dump, metadata.json checked by
`runnerd.foreign_runs`) into a `Fact`; `scan` walks a folder for them. Only regular files
of ours, in folders of ours that others cannot write to, are read; anything else is a Fact
with a problem, a warning, never an error.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from runnerd.crashfiles import CRASH_LOG, open_untrusted, tail
from runnerd.foreign_params import params_file, parse_params
from runnerd.foreign_runs import MAX_METADATA, checked_doc, checked_params
from runnerd_client.trust import UntrustedPath, check_own_folder

_OPEN_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class FileKind(enum.StrEnum):
    """The files the indexer reads (a folder only appears in a warning about it)."""

    METADATA = "metadata"
    CRASH_LOG = "crash_log"
    TRACEBACK = "traceback"
    CORE = "core"
    FOLDER = "folder"


def classify(path: str) -> FileKind | None:
    """What kind of indexed file `path` names, by its name alone; None for anything else."""
    name = os.path.basename(path)
    if name == "metadata.json":
        return FileKind.METADATA
    if name == CRASH_LOG:
        return FileKind.CRASH_LOG
    if fnmatch.fnmatch(name, "traceback*.txt") or name.endswith(".traceback"):
        return FileKind.TRACEBACK
    if name == "core" or fnmatch.fnmatch(name, "core.*"):
        return FileKind.CORE
    return None


@dataclass(frozen=True, slots=True)
class Fact:
    """What one file says (the checked metadata, the text of a crash file, a core's size),
    or why it was not read."""

    path: str
    kind: FileKind
    size: int
    text: str | None = None
    doc: dict[str, Any] | None = None
    problem: str | None = None
    note: str | None = None
    """A warning about a fact filed all the same (params beside it that cannot be read)."""


def shown_path(path: str) -> str:
    """A path as text even when its name is not valid UTF-8 (bytes shown as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_folder_of(path: str) -> None:
    folder = os.path.dirname(path)
    try:
        check_own_folder(os.stat(folder), folder)
    except UntrustedPath as exc:
        raise UntrustedPath(path, f"its folder {shown_path(folder)}: {exc.why}") from None


def _read(path: str, kind: FileKind) -> Fact | None:
    try:
        path.encode()
    except UnicodeEncodeError:
        raise UntrustedPath(path, "its path is not valid UTF-8") from None
    _check_folder_of(path)
    with os.fdopen(open_untrusted(path), "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if kind is FileKind.CORE:
            return Fact(path, kind, size)
        if kind is not FileKind.METADATA:
            # An empty crash.log is the client's faulthandler file with nothing to say.
            return Fact(path, kind, size, text=tail(fh, size)) if size else None
        if size > MAX_METADATA:
            return Fact(path, kind, size, problem=f"larger than {MAX_METADATA} bytes")
        doc = checked_doc(json.loads(fh.read(MAX_METADATA + 1)))
    if isinstance(doc, str):
        return Fact(path, kind, size, problem=doc)
    note = None
    if not doc["params"]:
        doc["params"], note = _params_beside(path)
    return Fact(path, kind, size, doc=doc, note=note)


def _params_beside(path: str) -> tuple[dict[str, Any], str | None]:
    """The params of the file beside a foreign metadata.json (notata's params.yaml, a
    config.json); for one that cannot be read, none and why (the run is imported all the
    same)."""
    params = params_file(os.path.dirname(path))
    if params is None:
        return {}, None
    try:
        with os.fdopen(open_untrusted(params), "rb") as fh:
            data = fh.read(MAX_METADATA + 1)
        if len(data) > MAX_METADATA:
            raise ValueError(f"larger than {MAX_METADATA} bytes")
        found = checked_params(parse_params(params, data))
    except (OSError, UntrustedPath, ValueError, RecursionError) as exc:
        found = f"{type(exc).__name__}: {exc}"
    if isinstance(found, str):
        return {}, f"params not imported from {os.path.basename(params)}: {found}"
    return found, None


def read_fact(path: str) -> Fact | None:
    """Read one file; None if it vanished or has nothing to say. A file that is not a
    regular file of ours in a folder of ours, or says something malformed, is a Fact
    with a problem: a warning, never an error."""
    kind = classify(path)
    if kind is None:
        return None
    try:
        return _read(path, kind)
    except FileNotFoundError:
        return None
    except UntrustedPath as exc:
        return Fact(path, kind, 0, problem=f"refused: {exc.why}")
    except Exception as exc:  # whatever a hostile file makes parsing raise: RecursionError...
        return Fact(path, kind, 0, problem=f"unreadable: {type(exc).__name__}: {exc}")


def _entries(folder: str) -> list[os.DirEntry[str]]:
    """The entries of a folder of ours that others cannot write to (UntrustedPath if it is
    not one); the watched folder itself may be reached through a symlink, nothing below."""
    fd = os.open(folder, _OPEN_FOLDER)
    try:
        check_own_folder(os.fstat(fd), folder)
        with os.scandir(fd) as found:
            return list(found)
    finally:
        os.close(fd)


def _folders(folder: str, skipped: list[Fact]) -> Iterator[tuple[str, list[os.DirEntry[str]]]]:
    """`folder` and each folder below it that may be read, with its entries. A folder that
    is not ours, that anyone may write to or that cannot be read is skipped, as a Fact with
    a problem put in `skipped`; a symlink to a folder is not followed."""
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = _entries(current)
        except UntrustedPath as exc:
            skipped.append(Fact(current, FileKind.FOLDER, 0, problem=f"refused: {exc.why}"))
            continue
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                skipped.append(
                    Fact(current, FileKind.FOLDER, 0, problem=f"cannot read: {exc.strerror or exc}")
                )
            continue
        yield current, entries
        pending += [
            os.path.join(current, e.name)
            for e in entries
            if classify(e.name) is None and e.is_dir(follow_symlinks=False)
        ]


def scan(folder: str) -> list[Fact]:
    """Every indexed file below `folder`, read; and each folder skipped (`_folders`)."""
    facts: list[Fact] = []
    for current, entries in _folders(folder, facts):
        for entry in entries:
            if (
                classify(entry.name) is not None
                and (fact := read_fact(os.path.join(current, entry.name))) is not None
            ):
                facts.append(fact)
    return facts


def skipped_below(dirs: Iterable[str]) -> set[str]:
    """The folders below `dirs` that scanning skips (listing folders, reading no file)."""
    skipped: list[Fact] = []
    for folder in dirs:
        for _ in _folders(folder, skipped):
            pass
    return {fact.path for fact in skipped}


def read_all(paths: list[str]) -> list[Fact]:
    """The facts of changed files, and of everything in new folders (not through a
    symlink)."""
    facts = []
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            facts += scan(path)
        elif (fact := read_fact(path)) is not None:
            facts.append(fact)
    return facts


def scan_folders(folders: list[str]) -> list[Fact]:
    """The crash files in each folder (a failed run's run_dir) and below it, however deep
    (notata's `log.text("artifacts/debug/traceback", ...)` is three folders down); a
    folder that cannot be read is passed over."""
    paths = []
    for folder in dict.fromkeys(folders):
        for current, entries in _folders(folder, []):
            # Not metadata.json: follow_failures drops it, so do not read and parse it.
            paths += [
                os.path.join(current, e.name)
                for e in entries
                if classify(e.name) not in (None, FileKind.METADATA)
                and e.is_file(follow_symlinks=False)
            ]
    return read_all(paths)
