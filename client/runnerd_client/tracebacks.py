"""What a failed command's output says went wrong, read as a person would read it.

The last line of stderr is often not the error: a torchrun summary, log lines, a "Killed"
printed by the shell or a progress bar come after it. `explain` finds every exception the
output shows (Python tracebacks, chained ones, bare `pkg.Error: message` lines, C++
`terminate called after throwing ...`), picks the one that explains the failure, and
keeps the lines a person would look at when there is none (native crash banners, Slurm's
`CANCELLED ... DUE TO TIME LIMIT`, NCCL watchdog lines, "Killed"). It only reads: what the
failure means is decided by runnerd's diagnosis table, which reads these pieces.

Standard library only: the Dask side of the client uses it on its workers.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

TAIL = 64 * 1024  # the part of the output that is read
MESSAGE_LINES = 30
MESSAGE_LIMIT = 4000
NOTES = 20
DETAIL_LIMIT = 500
ENDING_LINES = 10

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_LINES = re.compile(r"\r\n|\r|\n")
# What tools put before each line of a process's output: a time stamp, torchrun's
# "[rank3]:", mpirun's "[1,0]<stderr>:", srun -l's "3: ", docker compose's "web-1  | ",
# a wrapper's "SUBPROCESS: ", Ray's "(Actor pid=42) ".
_PREFIX = re.compile(
    r"^(?:\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?\s+"
    r"|\[\d+\]\s+|\[rank\d+\]:\s?|\[default\d+\]:\s?|\[\d+,\d+\]<std(?:out|err)>:\s?"
    r"|\d{1,4}: (?=\S)|[\w.-]+\s+\|\s|[A-Z][A-Z_]{2,}: |\(\w+ pid=\d+(?:, ip=[\d.]+)?\)\s?)"
)
_HEADER = re.compile(r"Traceback \(most recent call")
_FRAME = re.compile(r'^\s*File\s+(?:"[^"]*", line \d+,? in\b|\S+:\d+, in\b)')
_BOX = re.compile(r"^\s*[│╭╰└┌├─━┃┏┗]")
_CHAIN = re.compile(
    r"^(?:During handling of the above exception"
    r"|The above exception was the direct cause)"
)
_LOG = re.compile(r"^(?:DEBUG|INFO|WARN|WARNING|ERROR|CRITICAL|FATAL)\b[:\s-]")
_RULE = re.compile(r"^\s*[-=*_]{10,}\s*$")
_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_CXX = r"[A-Za-z_]\w*(?:::[A-Za-z_]\w*)+"
# An exception line right after a traceback's frames: any name, "Name: message" or "Name".
_RAISED = re.compile(rf"^(?P<cls>{_CXX}|{_NAME})\s*(?::(?P<msg>.*))?$", re.ASCII)
# An exception line on its own: only names that end like exception classes.
_BARE = re.compile(
    r"^\s*(?P<cls>(?:[A-Za-z_]\w*\.)*[A-Za-z_]?\w*?(?:Error|Exception|Exit|Interrupt"
    r"|KilledWorker|BrokenProcessPool|TimeoutExpired|Timeout|gaierror|Warning))"
    r"\s*(?::(?P<msg>.*))?$",
    re.ASCII,
)
_TERMINATE = re.compile(r"terminate called after throwing an instance of '(?P<cls>[^']+)'")
# What Python prints for an exception it could not raise (in __del__, at shutdown).
_IGNORED = re.compile(r"^Exception ignored in\b")
_WHAT = re.compile(r"^\s*what\(\):\s*(?P<msg>.*)$")
# Lines worth a look when no exception explains the failure.
_NOTABLE = re.compile(
    r"\b(?:error|errno|fatal|killed|cancell?ed|segmentation fault|segfault|core dumped"
    r"|aborted|out of memory|oom|timed? ?out|timeout|exceeded|terminate called|exit ?codes?"
    r"|exitcode|signal|sig(?:kill|term|segv|abrt|bus|ill|fpe)|preempt\w*|time limit"
    r"|no space|quota|permission denied|too many open files|bus error|restarting worker"
    r"|failed|fail|cannot|can't|could not|couldn't|unable|not found|too old|incompatible"
    r"|mismatch|unsupported|denied|refused|invalid)\b",
    re.IGNORECASE,
)
# In a command's environment (unless it sets its own): a Python process, or a pool's
# child, that dies of a native crash prints "Fatal Python error: Segmentation fault" and its
# stack on stderr, so a segfault is told apart from a kill.
CRASH_REPORTS = {"PYTHONFAULTHANDLER": "1"}
# Launchers that report a child's failure after the child's own traceback.
WRAPPERS = ("ChildFailedError", "CalledProcessError")


@dataclass(frozen=True)
class Raised:
    """One exception the output shows: its class as printed, and its message."""

    failure_class: str
    message: str

    def __str__(self) -> str:
        return f"{self.failure_class}: {self.message}" if self.message else self.failure_class


@dataclass(frozen=True)
class Explained:
    """What the output says: the exception that explains the failure (if any), every
    exception seen in order (causes first), and the notable lines that are not part of a
    traceback."""

    exception: Raised | None
    raised: tuple[Raised, ...]
    notes: tuple[str, ...]
    ending: str

    @property
    def detail(self) -> str:
        """The one line that best says what happened, for a message."""
        if self.exception is not None:
            return str(self.exception).splitlines()[0]
        return self.notes[-1] if self.notes else self.ending.split("\n", 1)[0]


def _clean(line: str) -> str:
    """A line without what the tools around the program put before it."""
    for _ in range(3):
        stripped = _PREFIX.sub("", line, count=1)
        if stripped == line:
            break
        line = stripped
    return line.rstrip()


def _looks_raised(name: str) -> bool:
    """A traceback's last line names a class: dotted, capitalized or '...error'."""
    return (
        "." in name or "::" in name or name[:1].isupper() or name.endswith("error")
    ) and name not in ("None", "True", "False")


def _bare_exception(line: str) -> re.Match[str] | None:
    """A line like 'pkg.SomeError: message' (a class is dotted or capitalized: a library's
    'ncclSystemError: ...' line is text, not a Python exception, and so is a bare 'Error:')."""
    found = _BARE.match(line)
    name = found["cls"] if found else ""
    # "Error: ..." alone is how other programs (click, Rust, Go) print an error
    return found if ("." in name or name[:1].isupper()) and name != "Error" else None


def _stops_message(line: str) -> bool:
    return (
        not line.strip()
        or bool(_HEADER.search(line))
        or bool(_FRAME.match(line))
        or bool(_CHAIN.match(line))
        or bool(_LOG.match(line))
        or bool(_IGNORED.match(line))
        or bool(_bare_exception(line))
        or bool(_TERMINATE.search(line))
    )


def _message(lines: list[str], start: int, first: str | None) -> tuple[str, int]:
    """An exception's message: the rest of its line and the lines that continue it (a
    message that starts on its own line runs through rules; one that does not ends there)."""
    parts = [first.strip()] if first and first.strip() else []
    end = start + 1
    while end < len(lines) and len(parts) < MESSAGE_LINES and not _stops_message(lines[end]):
        if parts and parts[0] and _RULE.match(lines[end]):
            break
        parts.append(lines[end].strip())
        end += 1
    return "\n".join(parts)[:MESSAGE_LIMIT], end


class _Reader:
    """One pass over the output's lines, collecting exceptions and notable lines."""

    def __init__(self, raw: list[str]) -> None:
        self.raw = raw
        self.lines = [_clean(line) for line in raw]
        self.raised: list[tuple[int, Raised]] = []
        self.ignored: set[int] = set()  # positions in `raised` of ignored exceptions
        self.taken: set[int] = set()
        self._ignoring = False

    def read(self) -> None:
        in_block, since_frame, index = False, 0, 0
        while index < len(self.lines):
            line = self.lines[index]
            if _IGNORED.match(line):
                self._ignoring = True
            if _HEADER.search(line) or _FRAME.match(line) or _BOX.match(line):
                in_block, since_frame = True, 0
                self.taken.add(index)
            elif in_block and line[:1].isspace():
                self.taken.add(index)  # source lines and carets
            elif in_block and line.strip():
                found = _RAISED.match(line)
                if found and _looks_raised(found["cls"]):
                    index = self._add(index, found["cls"], found["msg"])
                    in_block = False
                    continue
                since_frame += 1
                in_block = since_frame <= 12
            elif not in_block:
                index = self._bare(index, line)
                continue
            index += 1

    def _bare(self, index: int, line: str) -> int:
        """An exception printed without a traceback, or a C++ one; else the next line."""
        terminate = _TERMINATE.search(line)
        if terminate:
            self.taken.add(index)
            following = index + 1
            what = _WHAT.match(self.lines[following]) if following < len(self.lines) else None
            if what:
                return self._add(following, terminate["cls"], what["msg"])
            self.raised.append((index, Raised(terminate["cls"], "")))
            return following
        found = _bare_exception(line)
        if found and (not found["cls"].endswith("Warning") or self._is_last(index)):
            return self._add(index, found["cls"], found["msg"])
        return index + 1

    def _is_last(self, index: int) -> bool:
        return not any(line.strip() for line in self.lines[index + 1 :])

    def _add(self, index: int, name: str, first: str | None) -> int:
        message, end = _message(self.lines, index, first)
        if self._ignoring:
            self.ignored.add(len(self.raised))
            self._ignoring = False
        self.raised.append((index, Raised(name.strip(), message)))
        self.taken.update(range(index, end))
        return end

    def notes(self) -> tuple[str, ...]:
        found = [
            self.raw[i].strip()
            for i in range(len(self.raw))
            if i not in self.taken and _NOTABLE.search(self.raw[i])
        ]
        return tuple(line[:DETAIL_LIMIT] for line in found[-NOTES:])


def _explaining(raised: list[Raised]) -> Raised | None:
    """The last exception; past a launcher's summary, the child's own exception."""
    if not raised:
        return None
    last = raised[-1]
    if last.failure_class.endswith(WRAPPERS):
        inner = [r for r in raised[:-1] if not r.failure_class.endswith(WRAPPERS)]
        return inner[-1] if inner else last
    return last


def explain(text: str) -> Explained:
    """Read the tail of a command's output (see the module docstring)."""
    raw = _LINES.split(_ANSI.sub("", text[-TAIL:]))
    reader = _Reader(raw)
    reader.read()
    raised = [r for _, r in reader.raised]
    ended = [r for i, r in enumerate(raised) if i not in reader.ignored] or raised
    return Explained(_explaining(ended), tuple(raised), reader.notes(), _ending(raw))


def _ending(raw: list[str]) -> str:
    """The output's last paragraph (up to ENDING_LINES lines): how a program that printed
    its error without a traceback usually ends."""
    lines: list[str] = []
    for line in reversed(raw):
        if not line.strip():
            if lines:
                break
            continue
        lines.append(line.strip()[:DETAIL_LIMIT])
        if len(lines) == ENDING_LINES:
            break
    return "\n".join(reversed(lines))


@dataclass(frozen=True)
class Ending:
    """How a command that did not exit 0 is recorded: a failure record's class, message,
    traceback (the output's tail, so a later diagnosis can read it again) and signal."""

    failure_class: str
    message: str
    traceback: str | None
    signal: str | None = None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def command_ending(output: bytes | str, returncode: int, killer: str = "") -> Ending:
    """The failure record of a command that exited `returncode` (negative: killed by that
    signal) after printing `output` on stderr. The exception it shows is its class; a
    signal stays the class unless the program died of a C++ exception. `killer` is added
    to a signal's message (e.g. " (OOM killer)")."""
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
    text = text[-TAIL:]
    found = explain(text)
    traceback = text if text.strip() else None
    if returncode >= 0:
        if found.exception is not None:
            return Ending(
                found.exception.failure_class,
                found.exception.message or f"exit code {returncode}",
                traceback,
            )
        detail = f": {found.detail}" if found.detail else ""
        return Ending("ExitCode", f"exit code {returncode}{detail}", traceback)
    name = _signal_name(-returncode)
    native = next((r for r in reversed(found.raised) if "::" in r.failure_class), None)
    detail = f": {found.detail[:DETAIL_LIMIT]}" if found.detail else ""
    message = f"command killed by {name}{killer}{detail}"
    return Ending(native.failure_class if native else f"Signal:{name}", message, traceback, name)
