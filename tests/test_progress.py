"""Hung runs found from outside, with real processes: stopped, stalled, and never a busy or
quietly writing one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for
from runnerd.evidence import describe, look_at_files, stopped_note
from runnerd.progress import Progress, Watched
from runnerd.usage import Group
from runnerd_client.procinfo import process_facts
from runnerd_client.protocol import State

CTL = [sys.executable, "-m", "runnerd.cli"]


def configured(root: Path, text: str) -> Daemon:
    config = root / "config" / "runnerd" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(textwrap.dedent(text))
    return Daemon(root).start()


@pytest.fixture
def quick(short_tmp: Path) -> Iterator[Daemon]:
    """Heartbeats within 2 s, stalls after 2 s, a lost run fails after 3 s more."""
    daemon = configured(
        short_tmp,
        """
        sample_interval = 0.2
        heartbeat_timeout = 2
        stall_timeout = 2
        lost_grace = 3
    """,
    )
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def execs() -> Iterator[list[subprocess.Popen[str]]]:
    """runnerctl exec processes; each one's process group is killed at the end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        for pid in [proc.pid, *children(proc.pid)]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.communicate(timeout=30)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def launch(
    daemon: Daemon, execs: list[subprocess.Popen[str]], code: str, *options: str
) -> tuple[subprocess.Popen[str], str, int]:
    """`runnerctl exec` of a Python script; (runnerctl, run id, the command's pid) once
    the command has printed its first line."""
    script = daemon.root / f"cmd{len(execs)}.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.Popen(
        [*CTL, "exec", "--experiment", "progress", *options, "--", sys.executable, str(script)],
        env=daemon.env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    execs.append(proc)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first, proc.stderr.read() if proc.stderr else ""
    command = wait_for(lambda: children(proc.pid), what="the command")[0]
    run_id = (
        Path(f"/proc/{command}/environ")
        .read_bytes()
        .split(b"RUNNERD_RUN_ID=")[1]
        .split(b"\0")[0]
        .decode()
    )
    wait_for(lambda: daemon.run_state(run_id) == "running", what="the run to run")
    return proc, run_id, command


def show(daemon: Daemon, run_id: str) -> dict[str, Any]:
    run: dict[str, Any] = daemon.ctl_json("show", run_id)
    return run


SLEEPER = """
    import time
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
"""


def test_a_stopped_command_goes_lost_stopped_then_back_to_running(
    short_tmp: Path, execs: list[subprocess.Popen[str]]
) -> None:
    daemon = configured(
        short_tmp,
        """
        sample_interval = 0.2
        heartbeat_timeout = 2
    """,
    )
    try:
        _proc, run_id, command = launch(daemon, execs, SLEEPER)
        os.kill(command, signal.SIGSTOP)
        run = wait_for(
            lambda: (r := show(daemon, run_id))["state"] == "lost" and r,
            timeout=15,
            what="the stopped run to be lost",
        )
        assert run["transitions"][-1]["cause"] == "stopped"
        assert run["transitions"][-1]["source"] == "watchdog"
        os.kill(command, signal.SIGCONT)
        run = wait_for(
            lambda: (r := show(daemon, run_id))["state"] == "running" and r,
            timeout=15,
            what="the run to be running again",
        )
        assert run["transitions"][-1]["from"] == "lost"
    finally:
        daemon.stop()


POOL = """
    import multiprocessing as mp
    import sys

    def spin(_):
        while True:
            pass

    if __name__ == "__main__":
        with mp.Pool(1) as pool:
            result = pool.map_async(spin, [1])
            print(" ".join(str(p.pid) for p in mp.active_children()), flush=True)
            print("waiting for the pool", flush=True)
            result.get()
"""


def test_a_pool_whose_child_was_killed_stalls_then_fails_lost_and_diagnose_names_it(
    quick: Daemon, execs: list[subprocess.Popen[str]]
) -> None:
    proc, run_id, command = launch(quick, execs, POOL)
    assert proc.stdout is not None
    wait_for(lambda: children(command), what="the pool's worker")
    worker = children(command)[0]
    os.kill(worker, signal.SIGKILL)  # the parent now waits forever for its result
    run = wait_for(
        lambda: (r := show(quick, run_id))["state"] == "lost" and r,
        timeout=20,
        what="the run to stall",
    )
    assert run["transitions"][-1]["cause"] == "stalled"
    run = wait_for(
        lambda: (r := show(quick, run_id))["state"] == "failed_lost" and r,
        timeout=20,
        what="the stalled run to fail",
    )
    failure = run["failure"]
    assert failure["failure_class"] == "Stalled" and failure["reason"] == "lost"
    assert "no progress for" in failure["message"]
    assert f"process {command} (python" in failure["message"]
    assert "last output: 'waiting for the pool'" in failure["message"]
    diagnosis = quick.ctl("diagnose", run_id).stdout
    assert "stalled" in diagnosis and "runnerctl stack" in diagnosis
    assert "Stalled: no progress" in diagnosis
    assert f"process {command} (python" in diagnosis and "'waiting for the pool'" in diagnosis


def test_busy_and_quietly_writing_commands_are_never_stalled(
    quick: Daemon, execs: list[subprocess.Popen[str]], short_tmp: Path
) -> None:
    _, busy, _ = launch(
        quick,
        execs,
        """
        print("spinning", flush=True)
        while True:
            pass
    """,
    )
    folder = short_tmp / "writer"
    _, writer, _ = launch(
        quick,
        execs,
        f"""
        import time
        print("writing", flush=True)
        with open({str(folder / "data.bin")!r}, "ab") as out:
            while True:
                out.write(b"x" * 100)
                out.flush()
                time.sleep(0.3)
    """,
        "--run-dir",
        str(folder),
    )
    for _ in range(2):  # by the time a silent run stalled twice, the others had the chance
        _, idle, _ = launch(quick, execs, SLEEPER.replace("0.05", "0.5"))
        wait_for(
            lambda run_id=idle: quick.run_state(run_id) == "failed_lost",
            timeout=30,
            what="a silent run to stall and fail",
        )
    assert quick.run_state(busy) == "running"
    assert quick.run_state(writer) == "running"
    assert show(quick, busy)["resources"]["progress"]["kind"] == "cpu"
    wait_for(
        lambda: show(quick, writer)["resources"]["progress"]["kind"] == "files",
        what="the writer's files to be seen",
    )
    text = quick.ctl("show", writer).stdout
    assert "progress" in text and "(files)" in text
    assert "MOVED" in quick.ctl("status").stdout


HUNG_CLIENT = """
    import threading
    import runnerd_client as rd
    with rd.run("hung", heartbeat_interval=0.2, stall_timeout=1) as run:
        print(run.run_id, flush=True)
        threading.Event().wait()
"""


def test_an_rd_run_script_hung_with_its_heartbeat_thread_alive_stalls(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    daemon = configured(short_tmp, "sample_interval = 0.2\n")  # the run's own stall_timeout
    try:
        proc = daemon.python(textwrap.dedent(HUNG_CLIENT))
        procs.append(proc)
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        last: dict[str, Any] = {}

        def stalled() -> dict[str, Any] | None:
            last.update(show(daemon, run_id))
            return dict(last) if last["state"] == "lost" else None

        try:
            run = wait_for(stalled, timeout=20, what="the hung client to stall")
        except pytest.fail.Exception:  # once in a full run: say what the daemon saw
            pytest.fail(
                f"not lost after 20 s: transitions {last.get('transitions')}, "
                f"resources {last.get('resources')}, log: {daemon.log_tail(1500)}"
            )
        assert run["transitions"][-1]["cause"] == "stalled"
        assert run["heartbeats"] > 0  # beating all along: alive is not moving
    finally:
        daemon.stop()


def test_stall_timeout_must_not_be_negative(daemon: Daemon) -> None:
    proc = daemon.python(
        textwrap.dedent("""
        import runnerd_client as rd
        from runnerd_client.protocol import RunnerdError
        try:
            rd.connect().run("bad", stall_timeout=-1).start()
        except RunnerdError as exc:
            print(exc)
    """)
    )
    out, err = proc.communicate(timeout=60)
    assert "stall_timeout must be 0 (never) or positive" in out + err


# --- the evidence itself, on real processes -----------------------------------------


def test_stopped_note_names_a_stopped_process_and_not_a_sleeping_one() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        wait_for(
            lambda: (f := process_facts(proc.pid)) and f["state"] == "S", what="sleep to sleep"
        )
        assert stopped_note([proc.pid]) is None
        os.kill(proc.pid, signal.SIGSTOP)
        note = wait_for(lambda: stopped_note([proc.pid]), what="the stop to show")
        assert note["cause"] == "stopped"
        assert f"process {proc.pid} (sleep) stopped" in note["message"]
    finally:
        proc.kill()
        proc.wait()


def test_a_supervisor_waiting_on_its_stopped_child_counts_as_stopped() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess; subprocess.run(['sleep', '60'])"]
    )
    try:
        child = wait_for(lambda: children(parent.pid), what="the child")[0]
        os.kill(child, signal.SIGSTOP)
        note = wait_for(lambda: stopped_note([parent.pid]), what="the stop to show")
        assert str(child) in note["message"] and str(parent.pid) not in note["message"]
    finally:
        for pid in children(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_files_show_the_newest_write_and_its_kind(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "stdout.log").write_text("hello\n")
    os.utime(tmp_path / "stdout.log", (1000, 1000))
    (tmp_path / "sub" / "ckpt.bin").write_bytes(b"x" * 10)
    (tmp_path / "link").symlink_to("/etc/passwd")
    seen = look_at_files(str(tmp_path), [])
    assert seen.kind == "files" and seen.bytes == 16
    assert seen.output == [str(tmp_path / "stdout.log")]
    os.utime(tmp_path / "stdout.log")
    os.utime(tmp_path / "sub" / "ckpt.bin", (1000, 1000))
    assert look_at_files(str(tmp_path), []).kind == "output"


def test_runnerds_own_metadata_json_is_not_the_runs_progress(tmp_path: Path) -> None:
    """runnerd rewrites metadata.json at each state change, a stall's too: counted as the
    run's files, a hung run came back from `lost` at the next look, again and again."""
    (tmp_path / "ckpt.bin").write_bytes(b"x")
    os.utime(tmp_path / "ckpt.bin", (1000, 1000))
    (tmp_path / "metadata.json").write_text("{}")
    (tmp_path / ".metadata.json.0a1b2c.tmp").write_text("{")
    seen = look_at_files(str(tmp_path), [])
    assert seen.at == 1000 and seen.kind == "files"
    (tmp_path / "sub").mkdir()  # the run's own file of that name, deeper, is its own
    (tmp_path / "sub" / "metadata.json").write_text("{}")
    assert look_at_files(str(tmp_path), []).at != 1000


def test_describe_says_what_a_process_waits_in() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        facts = wait_for(
            lambda: (f := process_facts(proc.pid)) and f["state"] == "S" and f,
            what="sleep to sleep",
        )
        text = describe(facts)
        assert text.startswith(f"process {proc.pid} (sleep) sleeping")
    finally:
        proc.kill()
        proc.wait()


# --- runnerctl stack ------------------------------------------------------------------


HUNG = """
    import threading
    {setup}

    def hang_here():
        threading.Event().wait()

    {enter}
        print({run_id}, flush=True)
        hang_here()
"""


def test_stack_of_a_hung_rd_run_script_by_py_spy_and_by_signal(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    proc = daemon.python(
        textwrap.dedent(
            HUNG.format(
                setup="import runnerd_client as rd",
                enter='with rd.run("hung") as run:',
                run_id="run.run_id",
            )
        )
    )
    procs.append(proc)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    for via in ("auto", "signal"):
        out = daemon.ctl("stack", run_id, "--via", via).stdout
        assert f"== process {proc.pid} (python" in out
        assert "hang_here" in out and "wait" in out, out
    assert (
        "hang_here" in (Path(show(daemon, run_id)["run_dir"]) / f"stack-{proc.pid}.txt").read_text()
    )


def test_stack_of_a_hung_plain_script_under_exec(
    daemon: Daemon, execs: list[subprocess.Popen[str]]
) -> None:
    _, run_id, command = launch(
        daemon, execs, HUNG.format(setup="", enter="if True:", run_id="'ready'")
    )
    out = daemon.ctl("stack", run_id).stdout
    assert f"== process {command} (python" in out
    assert "hang_here" in out, out
    plain = daemon.ctl("stack", run_id, "--via", "signal", check=False)
    assert plain.returncode == 1
    assert "it dumps no stack on a signal" in plain.stdout
    assert "no stack could be read" in plain.stderr


def test_the_tracker_judges_a_still_run_at_its_due_time_and_takes_it_back_on_progress() -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        group = Group(frozenset({sleeper.pid}))
        tracker = Progress(stall_timeout=10.0)
        tracker.learn("r", Watched(State.RUNNING, "start"))
        assert tracker.check(lambda _: group, 100.0) == []  # watched from 100
        group.moved_at = 105.0  # its CPU moved: the due time moves, no timer is touched
        assert tracker.check(lambda _: group, 112.0) == []
        (verdict,) = tracker.check(lambda _: group, 115.5)
        assert verdict.cause == "stalled" and verdict.note is not None
        assert "no progress for 10 s" in verdict.note["message"]
        assert f"process {sleeper.pid} (sleep)" in verdict.note["message"]
        tracker.learn("r", Watched(State.LOST, "stalled"))
        assert tracker.check(lambda _: group, 116.0) == []
        group.moved_at = 117.0
        (back,) = tracker.check(lambda _: group, 118.0)
        assert back.cause == "progress" and back.note == {"kind": "cpu"}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_run_with_stall_timeout_0_is_never_judged() -> None:
    tracker = Progress(stall_timeout=10.0)
    tracker.learn("r", Watched(State.RUNNING, "start", stall_timeout=0.0))
    group = Group(frozenset({os.getpid()}))
    assert tracker.check(lambda _: group, 0.0) == []
    assert tracker.check(lambda _: group, 1e6) == []
