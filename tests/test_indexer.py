"""The crash indexer against real folders: foreign runs imported, crash files filed."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for
from runnerd.foreign_runs import imported_state
from runnerd.index_files import FileKind, classify


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("metadata.json", FileKind.METADATA),
        ("crash.log", FileKind.CRASH_LOG),
        ("traceback.txt", FileKind.TRACEBACK),
        ("traceback-rank3.txt", FileKind.TRACEBACK),
        ("worker.traceback", FileKind.TRACEBACK),
        ("core", FileKind.CORE),
        ("core.12345", FileKind.CORE),
        ("model.pt", None),
        ("metadata.json.tmp", None),
        ("score.txt", None),
    ],
)
def test_classify(name: str, kind: FileKind | None) -> None:
    assert classify(f"/runs/x/{name}") == kind


@pytest.mark.parametrize(
    ("doc", "state"),
    [
        ({"status": "complete"}, "succeeded"),
        ({"status": "SUCCESS"}, "succeeded"),
        ({"status": "failed"}, "failed_crash"),
        ({"status": "failed", "failure_reason": "timeout"}, "failed_timeout"),
        ({"status": "cancelled"}, "failed_abandoned"),
        ({"status": "running"}, "lost"),
        # Another registry's folder: its precise finished state is taken, an unfinished one lost.
        (
            {"status": "failed", "state": "failed_timeout", "failure_reason": "took too long"},
            "failed_timeout",
        ),
        ({"status": "running", "state": "running"}, "lost"),
    ],
)
def test_foreign_status_mapping(doc: dict[str, str], state: str) -> None:
    assert imported_state(doc).value == state


def make_foreign_runs(root: Path, count: int, malformed: int) -> dict[str, str]:
    """Foreign run folders: a third failed, the rest complete, plus malformed ones."""
    expected = {}
    for n in range(count):
        folder = root / "sweep-a" / f"run-{n:04d}"
        folder.mkdir(parents=True)
        failed = n % 3 == 0
        doc = {
            "run_id": f"foreign-{n:04d}",
            "status": "failed" if failed else "complete",
            "start_time": 1_700_000_000 + n,
            "end_time": 1_700_000_060 + n,
            "runtime_sec": 60,
        }
        if failed:
            doc["failure_reason"] = f"CUDA out of memory on shard {n}"
        (folder / "metadata.json").write_text(json.dumps(doc))
        expected[doc["run_id"]] = "failed_crash" if failed else "succeeded"
    bad = ["{not json", "[1, 2, 3]", json.dumps({"run_id": "no-status"})]
    for n in range(malformed):
        folder = root / "sweep-b" / f"broken-{n}"
        folder.mkdir(parents=True)
        (folder / "metadata.json").write_text(bad[n % len(bad)])
    return expected


def by_foreign_id(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """The imported runs, by the run_id their folder's metadata.json gave (a tag)."""
    return {
        r["tags"]["foreign_run_id"]: r
        for r in daemon.ctl_json("list", "--limit", "10000")
        if "foreign_run_id" in r["tags"]
    }


def test_watch_imports_foreign_runs_once_warns_on_malformed_and_follows(
    daemon: Daemon, short_tmp: Path
) -> None:
    root = short_tmp / "elsewhere"
    expected = make_foreign_runs(root, 190, 10)
    foreign = root / "sweep-a" / "run-0003" / "metadata.json"
    original = foreign.read_bytes()
    result = daemon.ctl("watch", str(root))
    assert "190 run(s) imported" in result.stdout
    assert result.stderr.count("warning:") == 10
    runs = by_foreign_id(daemon)
    assert {k: runs[k]["state"] for k in expected} == expected
    failed = daemon.ctl_json("show", runs["foreign-0003"]["run_id"])
    assert failed["failure"]["message"] == "CUDA out of memory on shard 3"
    assert failed["failure"]["category"] == "oom"
    assert failed["tags"] == {"source": "imported", "foreign_run_id": "foreign-0003"}
    assert failed["run_dir"] == str(root / "sweep-a" / "run-0003")
    assert failed["transitions"][0]["source"] == "imported"
    assert failed["started_at"].startswith("2023-11-14")
    assert foreign.read_bytes() == original  # the other tool's file is never rewritten
    again = daemon.ctl("watch", str(root))
    assert "0 run(s) imported" in again.stdout and "190 already known" in again.stdout
    assert len(daemon.ctl_json("list", "--limit", "10000")) == 190
    late = root / "sweep-c" / "late-run"
    late.mkdir(parents=True)
    (late / "metadata.json").write_text(
        json.dumps({"run_id": "late", "status": "failed", "failure_reason": "disk quota exceeded"})
    )
    wait_for(lambda: "late" in by_foreign_id(daemon), what="the new folder to be indexed")
    assert by_foreign_id(daemon)["late"]["state"] == "failed_crash"
    daemon.ctl("unwatch", str(root))
    assert daemon.ctl("unwatch", str(root), check=False).returncode == 1


def test_watched_directories_survive_a_restart(short_tmp: Path) -> None:
    root = short_tmp / "elsewhere"
    root.mkdir()
    first = Daemon(short_tmp).start()
    first.ctl("watch", str(root))
    first.stop()
    second = Daemon(short_tmp).start()
    try:
        folder = root / "after-restart"
        folder.mkdir()
        (folder / "metadata.json").write_text(json.dumps({"run_id": "after", "status": "done"}))
        wait_for(
            lambda: "after" in by_foreign_id(second),
            what="the followed directory to be indexed after a restart",
        )
    finally:
        second.stop()


DIES_WITH_FILES = textwrap.dedent("""
    import os, signal, traceback
    from pathlib import Path
    import runnerd_client as rd

    with rd.run("crashfiles") as run:
        try:
            {}["missing-key"]
        except KeyError:
            (Path(run.run_dir) / "traceback.txt").write_text(traceback.format_exc())
        (Path(run.run_dir) / "core.4242").write_bytes(b"\\0" * 4096)
        print(run.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_crash_files_in_a_failed_runs_folder_are_attached(daemon: Daemon) -> None:
    proc = daemon.python(DIES_WITH_FILES)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run_id = out.strip()

    def indexed() -> dict[str, object] | None:
        run = daemon.ctl_json("show", run_id)
        return run if len(run["crash_files"]) == 2 and run["failure"]["traceback"] else None

    run = wait_for(indexed, what="the crash files to be indexed")
    kinds = {os.path.basename(f["path"]): (f["kind"], f["size"]) for f in run["crash_files"]}
    assert kinds == {
        "traceback.txt": ("traceback", kinds["traceback.txt"][1]),
        "core.4242": ("core", 4096),
    }
    failure = run["failure"]
    assert failure["failure_class"] == "ProcessExited"
    assert "KeyError: 'missing-key'" in failure["traceback"]
    assert "traceback.txt" in daemon.ctl("show", run_id).stdout
