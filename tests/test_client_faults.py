"""What a client's events go through when the daemon is frozen, killed, starting, on a full
disk or impersonated, and when the experiment forks: every reported event lands once, the
experiment is never held up, and nothing reaches a daemon that is not ours.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_storage_faults import fill, tmpfs

from conftest import Daemon, wait_for

NOBODY = 65534


def fast_sweeps(daemon: Daemon) -> None:
    config = daemon.root / "config" / "runnerd" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("spool_sweep_interval = 0.3\n")


def lines(proc: subprocess.Popen[str]) -> Iterator[str]:
    assert proc.stdout is not None
    while line := proc.stdout.readline():
        yield line.strip()


def say(proc: subprocess.Popen[str], text: str = "go") -> None:
    assert proc.stdin is not None
    proc.stdin.write(text + "\n")
    proc.stdin.flush()


STEPS = textwrap.dedent("""
    import sys
    import runnerd_client as rd

    with rd.run("faults", heartbeat_interval=3600) as run:
        print(run.run_id, flush=True)
        sys.stdin.readline()
        for _ in range(int(sys.argv[1])):
            run.heartbeat()
        run.checkpoint({"step": 1})
        print("reported", flush=True)
        if len(sys.argv) > 2:
            sys.stdin.readline()
""")


def test_a_frozen_then_killed_daemon_loses_no_event_and_blocks_nothing(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    """Frozen mid-run (SIGSTOP), then killed and restarted, as systemd's watchdog does: the
    client goes on and ends meanwhile, and every event it reported lands."""
    proc = daemon.python(STEPS, "1000", stdin=subprocess.PIPE)
    procs.append(proc)
    run_id = next(lines(proc))
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        say(proc)
        _, err = proc.communicate(timeout=60)  # it ends while the daemon is still frozen
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        daemon.stop(signal.SIGKILL)
    daemon.start()
    run = wait_for(
        lambda: (r := daemon.run_if_known(run_id)) and r["state"] == "succeeded" and r,
        what="the spooled end to land",
    )
    assert run["heartbeats"] == 1000
    assert [c["data"] for c in run["checkpoints"]] == [{"step": 1}]
    assert [t["to"] for t in run["transitions"]] == ["pending", "running", "succeeded"]


TIGHT_LOOP = textwrap.dedent("""
    import sys, threading
    import runnerd_client as rd

    client = rd.connect()
    shared = [client.run("loop", variation=f"v{n}", heartbeat_interval=3600).start()
              for n in range(2)]
    def beat(run, count):
        for _ in range(count):
            run.heartbeat()
    beat(shared[0], int(sys.argv[1]))
    threads = [threading.Thread(target=beat, args=(shared[n % 2], 500)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for run in shared:
        run.succeed()
    print(" ".join(run.run_id for run in shared), flush=True)
""")


def test_heartbeats_in_a_tight_loop_and_from_many_threads_never_hang(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    """Sending holds no lock the reading of replies needs: a loop that outpaces the daemon
    fills the socket, and the replies that would drain it are still read."""
    proc = daemon.python(TIGHT_LOOP, "20000")
    procs.append(proc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    first, second = out.split()
    counts = wait_for(
        lambda: (
            (
                c := (
                    daemon.ctl_json("show", first)["heartbeats"],
                    daemon.ctl_json("show", second)["heartbeats"],
                )
            )
            == (22_000, 2_000)
            and c
        ),
        timeout=60,
        what="every heartbeat",
    )
    assert counts == (22_000, 2_000)


FORK_IN_RUN = textwrap.dedent("""
    import os, sys
    import runnerd_client as rd

    with rd.run("forked", heartbeat_interval=3600) as run:
        print(run.run_id, flush=True)
        pid = os.fork()
        if pid == 0:
            try:
                run.succeed()
            except rd.RunnerdError as exc:
                print("child:", exc.code, flush=True)
            sys.exit(0)
        os.waitpid(pid, 0)
        run.heartbeat()
        raise ValueError("the parent's own failure")
""")


def test_a_forked_child_never_acts_for_the_parents_run(daemon: Daemon) -> None:
    proc = daemon.python(FORK_IN_RUN)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "ValueError" in err, err
    run_id, child = out.splitlines()
    assert child == "child: forbidden"
    run = wait_for(
        lambda: (r := daemon.run_if_known(run_id)) and r["state"] != "running" and r,
        what="the run to end",
    )
    assert run["state"] == "failed_crash"
    assert run["failure"]["failure_class"] == "ValueError"
    assert run["heartbeats"] == 1


FORK_WHILE_SPOOLING = textwrap.dedent("""
    import os, sys
    import runnerd_client as rd

    with rd.run("fork-spool", heartbeat_interval=3600) as run:
        print(run.run_id, flush=True)
        assert rd.connect().spooling
        pid = os.fork()
        if pid == 0:
            sys.stdin.readline()
            sys.exit(0)   # its at-exit runs with the daemon back
        print("forked", flush=True)
        sys.stdin.readline()
        os.waitpid(pid, 0)
        for _ in range(100):
            run.heartbeat()
        run.checkpoint({"step": 100})
""")


def test_a_child_forked_while_spooling_leaves_the_parents_spool_alone(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    daemon = Daemon(short_tmp)
    proc = daemon.python(FORK_WHILE_SPOOLING, stdin=subprocess.PIPE)
    procs.append(proc)
    out = lines(proc)
    run_id = next(out)
    assert next(out) == "forked"
    daemon.start()
    try:
        say(proc)
        say(proc)  # both read the same pipe: one line each
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        run = wait_for(
            lambda: (r := daemon.run_if_known(run_id)) and r["state"] == "succeeded" and r,
            timeout=30,
            what="the parent's run to land whole",
        )
        assert run["heartbeats"] == 100
        assert [c["data"] for c in run["checkpoints"]] == [{"step": 100}]
    finally:
        daemon.stop()


def test_the_spool_moves_to_the_runtime_dir_when_the_registry_disk_is_full(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    with tmpfs(short_tmp / "state", "4m") as state:
        daemon = Daemon(short_tmp)
        fast_sweeps(daemon)
        daemon.start()
        try:
            filler = fill(state, 0)
            proc = daemon.python(STEPS, "20", stdin=subprocess.PIPE)
            procs.append(proc)
            run_id = next(lines(proc))
            say(proc)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert list((daemon.socket.parent / "spool").glob("*.spool"))
            filler.unlink()
            run = wait_for(
                lambda: (r := daemon.run_if_known(run_id)) and r["state"] == "succeeded" and r,
                timeout=60,
                what="the spool to land",
            )
            assert run["heartbeats"] == 20
            assert [c["data"] for c in run["checkpoints"]] == [{"step": 1}]
        finally:
            daemon.stop()


HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys
    fds = [os.open(path, os.O_RDONLY) for path in sys.argv[1:]]
    for fd in fds:
        fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.readline()
""")


def test_an_end_spooled_before_the_client_died_wins_over_the_start_up_verdict(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    """The client reported succeed to its spool and died as the daemon started: the spool is
    replayed after the reconcile judged the run, and the client's word wins."""
    fast_sweeps(daemon)
    proc = daemon.python(STEPS, "3", "wait", stdin=subprocess.PIPE)
    procs.append(proc)
    out = lines(proc)
    run_id = next(out)
    daemon.stop(signal.SIGKILL)
    say(proc)
    assert next(out) == "reported"
    say(proc)  # the with-block ends: succeed goes to the spool, then the process lingers
    spools = wait_for(
        lambda: list((daemon.root / "state" / "spool").glob("*.spool")), what="the spool"
    )
    wait_for(
        lambda: b"\xa7succeed" in b"".join(p.read_bytes() for p in spools),
        what="succeed in the spool",
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, *map(str, spools)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(holder)
    proc.kill()  # the spool's lock passes to the holder: the daemon cannot replay it yet
    assert next(lines(holder)) == "held"
    daemon.start()
    assert daemon.ctl_json("show", run_id)["state"] == "failed_crash"
    say(holder)
    run = wait_for(
        lambda: (r := daemon.run_if_known(run_id)) and r["state"] == "succeeded" and r,
        what="the spooled succeed to win",
    )
    assert run["heartbeats"] == 3
    assert run["failure"] is None


def _killed_while_daemon_down(daemon: Daemon, procs: list[subprocess.Popen[str]]) -> str:
    proc = daemon.python(STEPS, "3", "wait", stdin=subprocess.PIPE)
    procs.append(proc)
    run_id = next(lines(proc))
    daemon.stop(signal.SIGKILL)
    proc.kill()
    proc.communicate(timeout=30)
    return run_id


def test_a_client_killed_while_the_daemon_is_down_crashed(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    run_id = _killed_while_daemon_down(daemon, procs)
    daemon.start()
    run = daemon.ctl_json("show", run_id)
    assert run["state"] == "failed_crash"
    assert run["failure"]["failure_class"] == "ProcessExited"


def test_a_client_gone_with_a_reboot_was_interrupted(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    run_id = _killed_while_daemon_down(daemon, procs)
    daemon.as_if_rebooted()
    daemon.start()
    run = daemon.ctl_json("show", run_id)
    assert run["state"] == "failed_abandoned"
    assert run["failure"]["failure_class"] == "Interrupted"


def test_a_big_spooled_artifact_holds_up_no_start(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """Hashing 3 GiB takes seconds: the daemon serves meanwhile, and records it after."""
    big = short_tmp / "big.bin"
    with open(big, "wb") as fh:
        fh.truncate(3 << 30)
    daemon = Daemon(short_tmp)
    code = textwrap.dedent("""
        import sys
        import runnerd_client as rd
        with rd.run("big-file", heartbeat_interval=3600) as run:
            run.artifact(sys.argv[1])
            print(run.run_id, flush=True)
    """)
    proc = daemon.python(code, str(big))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    daemon.start()
    try:
        first = daemon.ctl_json("show", out.strip())
        assert first["state"] == "succeeded"
        assert first["artifacts"] == []
        run = wait_for(
            lambda: (r := daemon.run_if_known(out.strip())) and r["artifacts"] and r,
            timeout=120,
            what="the artifact to be hashed",
        )
        assert [a["size"] for a in run["artifacts"]] == [3 << 30]
    finally:
        daemon.stop()


# --- nobody else gets in ---------------------------------------------------------------


def _as_nobody() -> list[str]:
    if os.getuid() != 0:
        pytest.skip("needs root to act as a second user")
    try:
        import pwd

        pwd.getpwuid(NOBODY)
    except KeyError:
        pytest.skip("this machine has no user 'nobody'")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


LISTEN = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    s.listen()
    print("ready", flush=True)
    s.settimeout(30)
    try:
        conn, _ = s.accept()
    except TimeoutError:
        print("no connection", flush=True)
        sys.exit()
    conn.settimeout(10)
    got = b""
    try:
        while chunk := conn.recv(65536):
            got += chunk
    except TimeoutError:
        pass
    print(len(got), flush=True)
""")

TRY_RUN = textwrap.dedent("""
    import runnerd_client as rd
    with rd.run("secret", params={"token": "s3cr3t"}, heartbeat_interval=3600):
        pass
    print("spooling" if rd.connect().spooling else "live", flush=True)
""")


def test_a_socket_folder_of_another_user_gets_nothing(short_tmp: Path) -> None:
    as_nobody = _as_nobody()
    os.chmod(short_tmp, 0o711)
    daemon = Daemon(short_tmp)
    daemon.socket.parent.mkdir()
    os.chown(daemon.socket.parent, NOBODY, NOBODY)
    listener = subprocess.Popen(
        [*as_nobody, sys.executable, "-c", LISTEN, str(daemon.socket)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert next(lines(listener)) == "ready"
        proc = daemon.python(TRY_RUN)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == "spooling"
        assert f"belongs to uid {NOBODY}" in err
    finally:
        listener.kill()
        out, _ = listener.communicate(timeout=30)
    assert out.split() in ([], ["no connection"])


def test_a_socket_served_by_another_user_gets_nothing(short_tmp: Path) -> None:
    as_nobody = _as_nobody()
    theirs = short_tmp / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    os.chmod(short_tmp, 0o711)
    daemon = Daemon(short_tmp)
    daemon.socket.parent.mkdir(mode=0o700)
    listener = subprocess.Popen(
        [*as_nobody, sys.executable, "-c", LISTEN, str(theirs / "s.sock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert next(lines(listener)) == "ready"
        os.rename(theirs / "s.sock", daemon.socket)  # their socket, in our private folder
        proc = daemon.python(TRY_RUN)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == "spooling"
        assert f"served by uid {NOBODY}" in err
        assert listener.communicate(timeout=30)[0].split() == ["0"]
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate(timeout=30)


@pytest.mark.parametrize("folder", ["state", "run"])
def test_the_daemon_refuses_a_state_or_socket_folder_others_may_write(
    short_tmp: Path, folder: str
) -> None:
    daemon = Daemon(short_tmp)
    (short_tmp / folder).mkdir(mode=0o777)
    os.chmod(short_tmp / folder, 0o777)
    result = subprocess.run(
        [sys.executable, "-m", "runnerd"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert str(short_tmp / folder) in result.stderr
    assert "others may write to it" in result.stderr


def test_the_daemon_never_follows_a_symlinked_socket_folder_of_another_user(
    short_tmp: Path,
) -> None:
    _as_nobody()
    target = short_tmp / "target"
    target.mkdir(mode=0o755)
    daemon = Daemon(short_tmp)
    daemon.socket.parent.symlink_to(target)
    os.lchown(daemon.socket.parent, NOBODY, NOBODY)
    result = subprocess.run(
        [sys.executable, "-m", "runnerd"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "symlink" in result.stderr
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)


def test_a_spool_another_user_planted_is_ignored(short_tmp: Path) -> None:
    _as_nobody()
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        daemon = Daemon(short_tmp)
        forged = daemon.python(
            textwrap.dedent("""
            import os
            import runnerd_client as rd
            with rd.run("forged", heartbeat_interval=3600) as run:
                print(run.run_id, flush=True)
        """)
        )
        out, err = forged.communicate(timeout=60)
        assert forged.returncode == 0, err
        (spool,) = (short_tmp / "state" / "spool").glob("*.spool")
        planted = spool.with_name(f"{victim.pid}-feed.spool")
        spool.rename(planted)
        os.chown(planted, NOBODY, NOBODY)
        daemon.start()
        try:
            wait_for(lambda: "ignoring spool" in daemon.log.read_text(), what="the warning")
            assert daemon.ctl_json("list") == []
            assert planted.exists()
        finally:
            daemon.stop()
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_nothing_is_sent_before_the_daemon_is_known_to_be_ours(short_tmp: Path) -> None:
    """A plain socket, bound by us but in a folder anyone may write to, is refused too."""
    folder = short_tmp / "open"
    folder.mkdir()
    os.chmod(folder, 0o777)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "s.sock"))
    server.listen()
    server.settimeout(0.1)
    daemon = Daemon(short_tmp)
    proc = daemon.python(TRY_RUN, env={"RUNNERD_SOCKET": str(folder / "s.sock")})
    out, err = proc.communicate(timeout=60)
    assert out.strip() == "spooling", err
    assert "others may write to it" in err
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()


def test_a_heartbeat_arriving_after_a_later_one_counts_once(daemon: Daemon) -> None:
    """A heartbeat whose write failed (full disk) is spooled and arrives after later ones:
    it counts, and a replay of any of them does not."""
    from runnerd_client.connection import Connection
    from runnerd_client.ids import new_key, new_run_id
    from runnerd_client.protocol import Create, Heartbeat, Start

    conn = Connection(daemon.socket)
    run_id = new_run_id()
    conn.call(Create(key=new_key(), run_id=run_id, experiment="gaps"))
    conn.call(Start(key=new_key(), run_id=run_id))
    for seq in (1, 4, 2, 3, 3, 4, 1, 5):
        conn.call(Heartbeat(run_id=run_id, seq=seq))
    conn.close()
    assert daemon.ctl_json("show", run_id)["heartbeats"] == 5


def test_requests_sent_on_a_connection_the_daemon_closed_fail_as_unavailable(
    daemon: Daemon,
) -> None:
    """A batch sent after the daemon went away (the spool's replay, say) gets one failed
    future per request, which the caller spools again; it must not raise at the caller."""
    from runnerd_client.connection import Connection, DaemonUnavailable
    from runnerd_client.messages import Status

    conn = Connection(daemon.socket)
    daemon.stop(signal.SIGKILL)
    wait_for(lambda: not conn.alive, what="the client to see the daemon gone")
    futures = conn.send_many([Status(), Status()])
    assert len(futures) == 2
    for future in futures:
        assert isinstance(future.exception(timeout=5), DaemonUnavailable)
    conn.close()
