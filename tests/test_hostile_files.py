"""Files an attacker (or a broken tool) can name or write: the daemon reads them as untrusted
input, writes without following symlinks, and never lets them forge a log line or a
terminal's output."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest

from conftest import Daemon, wait_for
from runnerd.controls import EscapeControls, escape_controls
from runnerd.foreign_runs import checked_doc
from runnerd.indexer import WatchPlan, watch_plan

NOBODY = 65534
HOSTILE = {
    "deep": "[" * 100_000,
    "nan": '{"status": "running", "start_time": NaN}',
    "runtime": '{"status": "complete", "runtime_sec": "x"}',
    "huge": '{"status": "complete", "start_time": 1e308}',
}
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to act as a second user",
)


def write_run(folder: Path, doc: dict[str, Any] | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metadata.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def as_nobody(*command: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


def chown_nobody(*paths: Path) -> None:
    for path in paths:
        os.chown(path, NOBODY, NOBODY)


def warned(daemon: Daemon, text: str) -> bool:
    """Whether the daemon logged a warning that names `text` (as the log shows it)."""
    return any(" WARNING " in line and text in line for line in daemon.log.read_text().splitlines())


def run_ids(daemon: Daemon) -> set[str]:
    """The runs' ids; an imported run's by the id its metadata.json gave (a tag)."""
    return {
        r["tags"].get("foreign_run_id", r["run_id"])
        for r in daemon.ctl_json("list", "--limit", "10000")
    }


def serving(daemon: Daemon) -> bool:
    assert daemon.proc is not None
    return daemon.proc.poll() is None and daemon.ctl("status", check=False).returncode == 0


# --- reading what is in a watched folder --------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"status": "running", "start_time": float("nan")}, "start_time"),
        ({"status": "complete", "start_time": 1e308}, "start_time"),
        ({"status": "complete", "end_time": "not a time"}, "end_time"),
        ({"status": "complete", "runtime_sec": "x"}, "runtime_sec"),
        ({"status": "complete", "runtime_sec": float("inf")}, "runtime_sec"),
        ({"status": "x" * 1000}, "status"),
        ({"status": "failed", "failure_reason": ["a list"]}, "failure_reason"),
        ({"status": "complete", "params": "not a map"}, "params"),
        ({"status": "complete", "experiment": {"a": 1}}, "experiment"),
    ],
)
def test_a_bad_value_in_a_foreign_metadata_file_is_named(doc: dict[str, Any], field: str) -> None:
    problem = checked_doc(doc)
    assert isinstance(problem, str) and field in problem


def test_a_foreign_metadata_file_keeps_its_good_values() -> None:
    doc = checked_doc(
        {
            "status": "complete",
            "start_time": "2023-11-14T22:13:20Z",
            "runtime_sec": 60,
            "experiment": "e" * 300,
            "params": {"lr": 0.1},
        }
    )
    assert isinstance(doc, dict)
    assert doc["start_time"] == 1_700_000_000.0
    assert doc["experiment"] == "e" * 256
    assert doc["params"] == {"lr": 0.1}


def test_hostile_metadata_files_are_warnings_and_the_daemon_survives_restarts(
    short_tmp: Path,
) -> None:
    root = short_tmp / "foreign"
    paths = {name: write_run(root / name, text) for name, text in HOSTILE.items()}
    write_run(root / "good", {"run_id": "good-run", "status": "complete"})
    daemon = Daemon(short_tmp).start()
    try:
        result = daemon.ctl("watch", str(root))
        assert "1 run(s) imported" in result.stdout
        for path in paths.values():
            assert f"warning: {path}" in result.stderr
        assert serving(daemon)
        assert daemon.stop() == 0
        daemon.start()  # the folder is remembered: rescanned at start
        wait_for(lambda: f"rescanned {root}" in daemon.log.read_text(), what="the rescan")
        assert serving(daemon)
        assert all(warned(daemon, str(path)) for path in paths.values())
        assert "good-run" in run_ids(daemon)
    finally:
        daemon.stop()


def test_hostile_metadata_files_in_a_followed_folder_are_warnings(
    daemon: Daemon, short_tmp: Path
) -> None:
    root = short_tmp / "foreign"
    root.mkdir()
    daemon.ctl("watch", str(root))
    paths = [write_run(root / name, text) for name, text in HOSTILE.items()]
    for path in paths:
        wait_for(lambda path=path: warned(daemon, str(path)), what=f"a warning naming {path}")
    write_run(root / "late", {"run_id": "late-run", "status": "failed"})
    wait_for(lambda: "late-run" in run_ids(daemon), what="the follower to go on")
    assert serving(daemon)


def test_a_folder_name_that_is_not_utf8_is_a_warning(daemon: Daemon, short_tmp: Path) -> None:
    root = short_tmp / "foreign"
    root.mkdir()
    bad = os.fsencode(root) + b"/run-\xff"
    os.mkdir(bad)
    with open(bad + b"/metadata.json", "w") as fh:
        fh.write(json.dumps({"run_id": "not-utf8", "status": "complete"}))
    result = daemon.ctl("watch", str(root))
    assert (
        f"warning: {root}/run-\\xff/metadata.json: refused: its path is not valid UTF-8"
        in result.stderr
    )
    assert "not-utf8" not in run_ids(daemon)
    assert serving(daemon)


def test_the_watch_plan_leaves_out_skipped_folders_and_hides_no_other(tmp_path: Path) -> None:
    for name in ("a/skipped", "a/b/c", "a/d", "e"):
        (tmp_path / name).mkdir(parents=True)
    plan = watch_plan([str(tmp_path)], {str(tmp_path / "a" / "skipped")})
    assert plan.flat == (str(tmp_path), str(tmp_path / "a"))
    assert plan.recursive == tuple(str(tmp_path / name) for name in ("a/b", "a/d", "e"))
    assert watch_plan([str(tmp_path)], set()) == WatchPlan((str(tmp_path),), ())


@pytest.mark.parametrize("folder", ["/proc", "/sys", "/dev", "/proc/1"])
def test_watch_refuses_pseudo_filesystems(daemon: Daemon, folder: str) -> None:
    result = daemon.ctl("watch", folder, check=False)
    assert result.returncode == 1
    assert f"refusing {folder}" in result.stderr
    assert serving(daemon)


def test_watch_refuses_a_folder_anyone_may_write_to(daemon: Daemon, short_tmp: Path) -> None:
    open_folder = short_tmp / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    result = daemon.ctl("watch", str(open_folder), check=False)
    assert result.returncode == 1
    assert "anyone may write to it" in result.stderr
    assert serving(daemon)


@needs_root
def test_watch_refuses_another_users_folder(daemon: Daemon, short_tmp: Path) -> None:
    theirs = short_tmp / "theirs"
    theirs.mkdir()
    chown_nobody(theirs)
    result = daemon.ctl("watch", str(theirs), check=False)
    assert result.returncode == 1
    assert f"belongs to uid {NOBODY}" in result.stderr
    assert serving(daemon)


@needs_root
def test_another_users_private_subfolder_is_skipped(daemon: Daemon, short_tmp: Path) -> None:
    root = short_tmp / "shared"
    theirs = write_run(root / "theirs" / "run", {"run_id": "their-run", "status": "failed"})
    write_run(root / "mine", {"run_id": "my-run", "status": "complete"})
    chown_nobody(root / "theirs", theirs.parent, theirs)
    (root / "theirs").chmod(0o700)
    result = daemon.ctl("watch", str(root))
    assert "1 run(s) imported" in result.stdout
    # Skipped as a whole: nothing below a folder of another user is read.
    assert f"{root / 'theirs'}: refused: it belongs to uid {NOBODY}" in result.stderr
    write_run(root / "mine-later", {"run_id": "my-later-run", "status": "complete"})
    wait_for(lambda: "my-later-run" in run_ids(daemon), what="the follower to go on")
    assert "their-run" not in run_ids(daemon)


@needs_root
def test_a_file_another_user_drops_into_a_followed_folder_is_ignored(
    daemon: Daemon, short_tmp: Path
) -> None:
    short_tmp.chmod(0o755)
    root = short_tmp / "shared"
    drop = root / "drop"
    drop.mkdir(parents=True)
    os.chown(drop, os.getuid(), NOBODY)  # ours, and the second user's group may write to it
    drop.chmod(0o775)
    daemon.ctl("watch", str(root))
    planted = drop / "metadata.json"
    subprocess.run(
        as_nobody(
            sys.executable,
            "-c",
            f"open({str(planted)!r}, 'w').write("
            f"{json.dumps({'run_id': 'planted', 'status': 'complete'})!r})",
        ),
        check=True,
    )
    wait_for(
        lambda: warned(daemon, f"{planted}: refused: it belongs to uid {NOBODY}"),
        what="a warning naming the file",
    )
    write_run(root / "mine", {"run_id": "my-run", "status": "complete"})
    wait_for(lambda: "my-run" in run_ids(daemon), what="the follower to go on")
    assert "planted" not in run_ids(daemon)


class NobodyDaemon(Daemon):
    """A daemon run by the second user, so that a folder of root's is one it cannot read."""

    def start(self, timeout: float = 10.0) -> Self:
        imports = subprocess.run(
            as_nobody(sys.executable, "-c", "import runnerd"),
            capture_output=True,
            text=True,
            env=self.env,
        )
        if imports.returncode != 0:
            pytest.skip(
                f"the second user cannot import runnerd from this checkout "
                f"(a private folder above it?): {imports.stderr.strip()[-200:]}"
            )
        return super().start(timeout)

    def command(self) -> list[str]:
        return as_nobody(*super().command())

    def runnerctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            as_nobody(sys.executable, "-m", "runnerd.cli", *args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def make_run_as_nobody(folder: Path, run_id: str) -> None:
    subprocess.run(
        as_nobody(
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import json, pathlib
        folder = pathlib.Path({str(folder)!r})
        folder.mkdir()
        (folder / "metadata.json").write_text(json.dumps(
            {{"run_id": {run_id!r}, "status": "complete"}}))
    """),
        ),
        check=True,
    )


@needs_root
def test_a_subfolder_the_daemon_cannot_read_does_not_stop_the_follower(short_tmp: Path) -> None:
    chown_nobody(short_tmp)
    root = short_tmp / "runs"
    write_run(root / "before", {"run_id": "before", "status": "complete"})
    secret = write_run(root / "secret" / "run", {"run_id": "secret", "status": "complete"})
    (root / "secret").chmod(0o700)
    for folder, _, files in os.walk(root):
        if not folder.startswith(str(root / "secret")):
            chown_nobody(Path(folder), *(Path(folder) / name for name in files))
    daemon = NobodyDaemon(short_tmp).start()
    try:
        result = daemon.ctl("watch", str(root))
        assert "1 run(s) imported" in result.stdout
        assert f"warning: {secret.parent.parent}: cannot read" in result.stderr
        # A new folder beside the one it cannot read, one further down, and (once the new
        # folder is known) a folder inside the new one.
        for names in (("after", "before/nested"), ("after/inside",)):
            for name in names:
                make_run_as_nobody(root / name, name.replace("/", "-"))
            wait_for(
                lambda names=names: {n.replace("/", "-") for n in names} <= run_ids(daemon),
                what=f"runs in new folders {names} to be followed",
            )
        assert serving(daemon)
        assert daemon.stop() == 0
        daemon.start()
        wait_for(lambda: f"rescanned {root}" in daemon.log.read_text(), what="the rescan")
        assert serving(daemon)
        assert "secret" not in run_ids(daemon)
    finally:
        daemon.stop()


# --- writing in a run's folder -----------------------------------------------------------


WAITS_FOR_A_LINE = textwrap.dedent("""
    import sys
    import runnerd_client as rd

    with rd.run("hostile", run_dir=sys.argv[1]) as run:
        print(run.run_id, flush=True)
        sys.stdin.readline()
""")


def metadata_state(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / "metadata.json").read_text())["state"])
    except (OSError, ValueError):
        return None


def test_metadata_is_never_written_through_a_planted_symlink(
    daemon: Daemon, short_tmp: Path
) -> None:
    folder = short_tmp / "rundir"
    folder.mkdir()
    victims = [short_tmp / "victim-1", short_tmp / "victim-2"]
    for victim in victims:
        victim.write_text("precious\n")
    assert daemon.proc is not None
    (folder / f".metadata.json.{daemon.proc.pid}.tmp").symlink_to(victims[0])
    (folder / "metadata.json").symlink_to(victims[1])
    proc = daemon.python(WAITS_FOR_A_LINE, str(folder), stdin=subprocess.PIPE)
    proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    wait_for(lambda: metadata_state(folder) == "succeeded", what="metadata.json")
    assert not (folder / "metadata.json").is_symlink()
    assert [victim.read_text() for victim in victims] == ["precious\n"] * 2


def test_metadata_is_not_written_in_a_folder_anyone_may_write_to_until_it_is_fixed(
    daemon: Daemon, short_tmp: Path
) -> None:
    folder = short_tmp / "open"
    folder.mkdir()
    folder.chmod(0o777)
    proc = daemon.python(WAITS_FOR_A_LINE, str(folder), stdin=subprocess.PIPE)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    wait_for(
        lambda: warned(daemon, f"refusing {folder}: anyone may write to it"),
        what="a warning naming the folder",
    )
    assert not (folder / "metadata.json").exists()
    folder.chmod(0o755)  # fixed: the pending document lands on its next retry
    wait_for(lambda: metadata_state(folder) == "running", timeout=30, what="the retry")
    proc.communicate("\n", timeout=60)
    wait_for(lambda: metadata_state(folder) == "succeeded", what="the final metadata.json")
    assert daemon.run_state(run_id) == "succeeded"


@pytest.fixture
def small_disk(short_tmp: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (skipped where mounting is not allowed)."""
    mount = short_tmp / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """A file that takes all the free space of `folder`'s filesystem."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_a_metadata_write_that_fails_on_a_full_disk_lands_once_there_is_room(
    daemon: Daemon, small_disk: Path
) -> None:
    folder = small_disk / "run"
    proc = daemon.python(WAITS_FOR_A_LINE, str(folder), stdin=subprocess.PIPE)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    wait_for(lambda: metadata_state(folder) == "running", what="metadata.json")
    filler = fill(small_disk)
    proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    assert daemon.run_state(run_id) == "succeeded"
    wait_for(
        lambda: warned(daemon, f"could not write metadata.json for run {run_id}"),
        what="the failed write",
    )
    assert metadata_state(folder) == "running"
    filler.unlink()
    wait_for(lambda: metadata_state(folder) == "succeeded", timeout=30, what="the retry")


# --- exec's log files ---------------------------------------------------------------------


def exec_in(daemon: Daemon, folder: Path) -> subprocess.CompletedProcess[str]:
    return daemon.ctl(
        "exec",
        "--experiment",
        "hostile-exec",
        "--run-dir",
        str(folder),
        "--",
        "echo",
        "hello",
        check=False,
    )


def test_exec_never_writes_its_logs_through_a_planted_symlink(
    daemon: Daemon, short_tmp: Path
) -> None:
    folder = short_tmp / "rundir"
    folder.mkdir()
    victim = short_tmp / "victim"
    victim.write_text("precious\n")
    (folder / "stdout.log").symlink_to(victim)
    result = exec_in(daemon, folder)
    assert result.returncode == 126
    assert f"refusing {folder / 'stdout.log'}" in result.stderr
    assert victim.read_text() == "precious\n"
    run = daemon.ctl_json("list", "--experiment", "hostile-exec")[0]
    assert run["state"] == "failed_crash"
    assert run["failure"]["exit_code"] == 126


def test_exec_refuses_a_run_folder_anyone_may_write_to(daemon: Daemon, short_tmp: Path) -> None:
    folder = short_tmp / "open"
    folder.mkdir()
    folder.chmod(0o777)
    result = exec_in(daemon, folder)
    assert result.returncode == 126
    assert f"refusing {folder}: anyone may write to it" in result.stderr
    assert "hello" not in result.stdout
    assert not (folder / "stdout.log").exists()


def test_exec_still_writes_its_logs_in_a_folder_of_ours(daemon: Daemon, short_tmp: Path) -> None:
    folder = short_tmp / "rundir"
    folder.mkdir()
    (folder / "stdout.log").write_text("from an earlier attempt, much longer than hello\n")
    assert exec_in(daemon, folder).returncode == 0
    assert (folder / "stdout.log").read_text() == "hello\n"


# --- what logs and terminals show ---------------------------------------------------------


def test_escape_controls_shows_every_control_character() -> None:
    assert (
        escape_controls("a\nb\rc\td\x1b[31me\x07f\x00g\x7fh\x9bi")
        == "a\\nb\\rc\\td\\x1b[31me\\x07f\\x00g\\x7fh\\x9bi"
    )
    assert escape_controls("line 1\n\tline 2\x1b", keep="\n\t") == "line 1\n\tline 2\\x1b"
    assert escape_controls("plain text, é and 漢字") == "plain text, é and 漢字"


def test_a_log_record_is_one_line_and_its_traceback_is_indented() -> None:
    record = logging.LogRecord(
        "runnerd.x", logging.ERROR, __file__, 1, "bad %s", ("a\nb\x1b",), None
    )
    try:
        raise ValueError("x\nERROR runnerd.server: forged")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert EscapeControls().filter(record)
    lines = logging.Formatter("%(levelname)s %(name)s: %(message)s").format(record).split("\n")
    assert lines[0] == "ERROR runnerd.x: bad a\\nb\\x1b"
    assert len(lines) > 2 and all(line.startswith("  ") for line in lines[1:])
    assert any("ERROR runnerd.server: forged" in line for line in lines)


def test_a_folder_name_cannot_forge_a_log_line(daemon: Daemon, short_tmp: Path) -> None:
    root = short_tmp / "foreign"
    forged = "x\nERROR runnerd.server: forged\x1b[2K"
    path = write_run(root / forged, "{not json")
    result = daemon.ctl("watch", str(root))
    shown = str(path).replace("\n", "\\n").replace("\x1b", "\\x1b")
    assert f"warning: {shown}" in result.stderr
    assert "\x1b" not in result.stderr
    wait_for(lambda: warned(daemon, shown), what="the warning")
    lines = daemon.log.read_text().splitlines()
    assert [line for line in lines if not LOG_LINE.match(line)] == []


def test_control_characters_from_an_imported_file_are_shown_escaped(
    daemon: Daemon, short_tmp: Path
) -> None:
    reason = "boom\x1b]0;owned\x07\x1b[2J\nFAKE LINE"
    write_run(
        short_tmp / "foreign" / "run",
        {
            "run_id": "ctl-chars",
            "status": "failed",
            "experiment": "exp\x1b[31m",
            "failure_reason": reason,
        },
    )
    daemon.ctl("watch", str(short_tmp / "foreign"))
    [run] = daemon.ctl_json("list")
    for command in (["list"], ["failures"], ["show", run["run_id"]], ["status"]):
        out = daemon.ctl(*command).stdout
        assert "\x1b" not in out and "\x07" not in out, command
        assert "\\x1b" in out, command
        assert not any(line.startswith("FAKE LINE") for line in out.splitlines()), command
    assert daemon.ctl_json("show", run["run_id"])["failure"]["message"] == reason
    assert daemon.ctl_json("list")[0]["experiment"] == "exp\x1b[31m"
    assert daemon.ctl_json("failures")[0]["message"] == reason
