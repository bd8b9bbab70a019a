"""Real failure outputs from public issue threads (tests/data/failures/): each one is read
as `runnerctl exec` reads a command's stderr and diagnosed right, and each one replayed
through a real `runnerctl exec`, ending as the user's process ended, is recorded right."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon
from runnerd.diagnosis import diagnose
from runnerd.diagnosis_rules import CATEGORIES
from runnerd_client.tracebacks import command_ending

CORPUS = Path(__file__).parent / "data" / "failures"
SEPARATOR = "\n----\n"


@dataclass(frozen=True)
class Case:
    """One output, what it should be read as, and where it was found."""

    path: Path
    source: str
    failure_class: str
    category: str
    retryable: bool
    exit: str  # an exit code ("1", "137") or the signal that ended the process ("SIGTERM")
    output: str

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def returncode(self) -> int:
        """As subprocess reports it: negative for a signal."""
        return -signal.Signals[self.exit] if self.exit.startswith("SIG") else int(self.exit)


def load(path: Path) -> Case:
    head, output = path.read_text(encoding="utf-8").split(SEPARATOR, 1)
    fields = dict(line.split(": ", 1) for line in head.splitlines())
    return Case(
        path,
        fields["source"],
        fields["class"],
        fields["category"],
        {"yes": True, "no": False}[fields["retryable"]],
        fields["exit"],
        output,
    )


CASES = [load(path) for path in sorted(CORPUS.glob("*.txt"))]
IDS = [case.name for case in CASES]


def test_the_corpus_is_large_varied_and_sourced() -> None:
    assert len(CASES) >= 80
    assert all(case.source.startswith("https://github.com/") for case in CASES)
    assert all(case.category in CATEGORIES for case in CASES)
    assert {
        "oom",
        "timeout",
        "walltime",
        "network",
        "dependency",
        "disk",
        "permission",
        "resource",
        "bug",
        "numerical",
        "validation",
        "signal",
        "killed_worker",
    } <= {case.category for case in CASES}
    assert all(case.output.strip() for case in CASES)


def record_of(case: Case) -> dict[str, Any]:
    """The failure record `runnerctl exec` makes of this ending."""
    ending = command_ending(case.output, case.returncode)
    return {
        "failure_class": ending.failure_class,
        "message": ending.message,
        "traceback": ending.traceback,
        "reason": "crash",
        "exit_code": case.returncode,
        "signal": ending.signal,
    }


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_output_is_read_and_diagnosed_right(case: Case) -> None:
    record = record_of(case)
    assert record["failure_class"] == case.failure_class
    found = diagnose(record)
    assert (found.category, found.retryable) == (case.category, case.retryable), found.pattern


REPLAY = textwrap.dedent("""
    import faulthandler, os, resource, signal, sys

    faulthandler.disable()
    head, output = open(sys.argv[1], encoding="utf-8").read().split("\\n----\\n", 1)
    ending = dict(line.split(": ", 1) for line in head.splitlines())["exit"]
    sys.stderr.write(output)
    sys.stderr.flush()
    if ending.startswith("SIG"):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(getattr(signal, ending), signal.SIG_DFL)  # SIGINT would raise
        os.kill(os.getpid(), getattr(signal, ending))
    sys.exit(int(ending))
""")


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = tmp_path_factory.mktemp("replay") / "replay.py"
    script.write_text(REPLAY)
    return script


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_output_replayed_through_exec_is_recorded_right(
    shared_daemon: Daemon, replay: Path, case: Case
) -> None:
    experiment = f"corpus-{case.name}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runnerd.cli",
            "exec",
            "--experiment",
            experiment,
            "--",
            sys.executable,
            str(replay),
            str(case.path),
        ],
        env=shared_daemon.env,
        capture_output=True,
        timeout=120,
    )
    code = case.returncode
    assert result.returncode == (code if code >= 0 else 128 - code), result.stderr[-2000:]
    assert result.stderr.decode() == case.output  # the user sees the output as it was
    [failure] = shared_daemon.ctl_json("failures", "--experiment", experiment)
    assert failure["failure_class"] == case.failure_class
    assert (failure["category"], failure["retryable"]) == (case.category, case.retryable)
    assert failure["exit_code"] == code
