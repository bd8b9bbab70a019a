"""The mirror: two emulated nodes (two daemons, two registries) keep their records in one
shared folder; a node wiped (SIGTERM, registry deleted) or killed (SIGKILL) is still read
from it with `--from`; a full, read-only or stalled shared folder never blocks a daemon,
which says so in `status` and catches up. The file format's reader and writer on their own.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_many_nodes import Lines, close_nodes, dask_test, double, stop_workers, worker_env

from conftest import Daemon, wait_for
from runnerd import config, mirror
from runnerd.cli.merge import node_state, parse_mirrored
from runnerd.mirror_files import NodeFiles, node_prefix
from runnerd.mirror_format import NODE_FILE, encode_line, read_node, segment_name
from runnerd.registry import NewRun, Registry, Store
from runnerd_client.ids import new_run_id
from runnerd_client.protocol import State

RUNS = textwrap.dedent("""
    import sys
    import runnerd_client as rd
    client = rd.connect()
    ids = []
    for n in range(int(sys.argv[1])):
        run = client.run("night", variation=f"{sys.argv[2]}{n}").start()
        if n % 3 == 2:
            run.fail(message="diverged", failure_class="FloatingPointError")
        else:
            run.succeed()
        ids.append(run.run_id)
    print(*ids, flush=True)
""")


def make_runs(daemon: Daemon, count: int, prefix: str) -> list[str]:
    proc = daemon.python(RUNS, str(count), prefix)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.split()


def mirrored(daemon: Daemon, folder: Path) -> dict[str, dict[str, Any]]:
    """The runs `list --from` reads in the shared folder, by run_id."""
    result = daemon.ctl("list", "--from", str(folder), "--limit", "10000", "--json")
    return {r["run_id"]: r for r in json.loads(result.stdout)}


def has_all(daemon: Daemon, folder: Path, run_ids: list[str], state: str | None = None) -> bool:
    runs = mirrored(daemon, folder)
    return all(r in runs and (state is None or runs[r]["state"] == state) for r in run_ids)


def mirror_status(daemon: Daemon) -> dict[str, Any]:
    return dict(daemon.ctl_json("status")["mirror"])


def node_folder(daemon: Daemon) -> Path:
    return Path(wait_for(lambda: mirror_status(daemon)["node"], what="the node's folder"))


@pytest.fixture
def shared(short_tmp: Path) -> Path:
    folder = short_tmp / "shared"
    folder.mkdir()
    return folder


def mirroring(root: Path, shared: Path) -> Daemon:
    root.mkdir(exist_ok=True)
    return Daemon(root, extra_args=["--mirror", str(shared)]).start()


# --- nodes that outlive their registries ------------------------------------------------


def test_every_run_of_a_wiped_node_is_still_listed(short_tmp: Path, shared: Path) -> None:
    a, b = mirroring(short_tmp / "a", shared), mirroring(short_tmp / "b", shared)
    try:
        runs_a, runs_b = make_runs(a, 4, "a"), make_runs(b, 5, "b")
        folder_b = node_folder(b)
        assert b.stop() == 0
        b.db.unlink()  # the job ended: the node's local disk is wiped
        for suffix in ("-wal", "-shm"):
            Path(f"{b.db}{suffix}").unlink(missing_ok=True)
        runs = wait_for(
            lambda: has_all(a, shared, runs_a + runs_b) and mirrored(a, shared),
            what="both nodes' runs in the shared folder",
        )
        assert sorted(runs) == sorted(runs_a + runs_b)
        assert {runs[r]["daemon"] for r in runs_b} == {str(folder_b)}
        assert runs[runs_b[2]]["failure"]["failure_class"] == "FloatingPointError"
        shown = json.loads(a.ctl("show", runs_b[2][:12], "--from", str(shared), "--json").stdout)
        assert [t["to"] for t in shown["transitions"]] == ["pending", "running", "failed_crash"]
        grouped = a.ctl_json("failures", "--from", str(shared), "--group-by", "class")
        assert [(g["key"], g["count"]) for g in grouped] == [("FloatingPointError", 2)]
        body = a.ctl_json("status", "--from", str(shared))
        assert sum(body["counts"].values()) == 9
        states = {d["daemon"]: d["node"]["state"] for d in body["daemons"]}
        assert states[str(folder_b)] == "stopped" and set(states.values()) == {"live", "stopped"}
        # The node's next job starts a fresh registry: a folder of its own; the old one stays.
        b.start()
        again = make_runs(b, 1, "c")
        assert node_folder(b) != folder_b
        wait_for(lambda: has_all(a, shared, runs_a + runs_b + again), what="the third job")
    finally:
        a.stop()
        b.stop()


@dask_test
def test_a_night_on_a_dask_cluster_outlives_its_nodes(short_tmp: Path, shared: Path) -> None:
    """Two nodes, each a daemon mirroring to the shared folder and a Dask worker: tasks run
    on both; `--dask` lists both nodes' runs; node B's job ends (its worker and daemon
    stopped, its registry deleted) and `--from` still lists every run of the night."""
    distributed = pytest.importorskip("distributed")
    from dask_cluster import start_worker

    from runnerd_client.dask import RunnerdWorkerPlugin

    a, b = mirroring(short_tmp / "a", shared), mirroring(short_tmp / "b", shared)
    cluster = distributed.LocalCluster(n_workers=0, dashboard_address=":0")
    client = distributed.Client(cluster)
    procs = [
        start_worker(cluster.scheduler_address, {**node.env, "NODE_NAME": name})
        for name, node in (("a", a), ("b", b))
    ]
    try:
        client.register_plugin(RunnerdWorkerPlugin(experiment="night"))
        workers = {name: worker for worker, name in worker_env(client, 2).items()}
        futures = [
            client.submit(double, i, workers=[workers["ab"[i % 2]]], pure=False) for i in range(8)
        ]
        assert client.gather(futures) == [i * 2 for i in range(8)]
        keys = sorted(f.key for f in futures)

        def night(*source: str) -> list[str]:
            runs = json.loads(a.ctl(*source, "list", "--experiment", "night", "--json").stdout)
            return sorted(r["tags"]["dask_key"] for r in runs if r["state"] == "succeeded")

        wait_for(
            lambda: night("--dask", cluster.scheduler_address) == keys,
            timeout=30,
            what="both nodes' runs through Dask",
        )
        wait_for(lambda: night_from(a, shared) == keys, what="every run mirrored")
        stop_workers(procs[1:])  # node B's job ends: its worker, its daemon, its disk
        assert b.stop() == 0
        b.db.unlink()
        assert night_from(a, shared) == keys
    finally:
        close_nodes(client, cluster, procs, a, b)


def night_from(daemon: Daemon, shared: Path) -> list[str]:
    runs = json.loads(
        daemon.ctl("list", "--from", str(shared), "--experiment", "night", "--json").stdout
    )
    return sorted(r["tags"]["dask_key"] for r in runs if r["state"] == "succeeded")


def test_a_sigkilled_node_loses_at_most_the_last_interval_and_says_so(
    short_tmp: Path, shared: Path
) -> None:
    a = mirroring(short_tmp / "a", shared)
    try:
        early = make_runs(a, 6, "e")
        wait_for(
            lambda: has_all(a, shared, early) and mirror_status(a)["pending"] == 0,
            what="the mirror to catch up",
        )
        a.stop(signal.SIGKILL)
        a.db.unlink()
        result = a.ctl("list", "--from", str(shared), "--json")
        assert sorted(r["run_id"] for r in json.loads(result.stdout)) == sorted(early)
        assert "did not stop cleanly" in result.stderr
        assert "at most the last 1 s of changes" in result.stderr
        text = a.ctl("status", "--from", str(shared)).stdout
        assert "SILENT since" in text and "is missing: at most the last 1 s" in text
    finally:
        a.stop()


def test_a_restarted_daemon_carries_on_in_its_folder_and_catches_up(
    short_tmp: Path, shared: Path
) -> None:
    a = mirroring(short_tmp / "a", shared)
    try:
        first = make_runs(a, 2, "f")
        folder = node_folder(a)
        a.stop()
        plain = Daemon(a.root).start()  # a while without the mirror
        unmirrored = make_runs(plain, 3, "u")
        plain.stop()
        a.start()
        assert node_folder(a) == folder
        wait_for(lambda: has_all(a, shared, first + unmirrored), what="the catch-up")
        assert json.loads((folder / NODE_FILE).read_text())["stopped_at"] is None
    finally:
        a.stop()


def test_follow_from_the_shared_folder(short_tmp: Path, shared: Path) -> None:
    a = mirroring(short_tmp / "a", shared)
    try:
        done = make_runs(a, 3, "x")
        wait_for(
            lambda: (
                has_all(a, shared, done, "failed_crash")
                or has_all(a, shared, done[2:], "failed_crash")
            ),
            what="the runs mirrored",
        )
        ended = a.ctl("follow", done[2], "--from", str(shared), check=False)
        assert ended.returncode == 1  # it failed: its outcome is the exit status
        assert "running -> failed_crash" in ended.stdout and str(node_folder(a)) in ended.stdout
        follower = Lines(a, "follow", "--from", str(shared), "--json")
        try:
            made: list[str] = []

            def following() -> bool:  # the follower shows what changes once it has read
                made.extend(make_runs(a, 1, "w"))
                return any(e["run_id"] in made for e in follower.events())

            wait_for(following, timeout=30, interval=0.5, what="the follower to be reading")
            later = make_runs(a, 1, "y")
            events = wait_for(
                lambda: [
                    e
                    for e in follower.events()
                    if e["run_id"] == later[0] and e["to"] == "succeeded"
                ],
                timeout=30,
                what="the new run's transitions",
            )
            assert events[0]["daemon"] == str(node_folder(a))
            assert not [e for e in follower.events() if e["run_id"] in done]  # from now on
        finally:
            assert follower.stop() == 0
    finally:
        a.stop()


def test_a_folder_another_user_planted_is_not_carried_on(short_tmp: Path, shared: Path) -> None:
    """The shared folder may be writable by others: a node folder in it that claims to be
    this registry's, but is not this user's, is left alone."""
    if os.getuid() != 0:
        pytest.skip("planting a folder as another user needs root")
    root = short_tmp / "a"
    planted = shared / f"{node_prefix(socket.gethostname())}planted"
    planted.mkdir()
    (planted / NODE_FILE).write_text(
        json.dumps(
            {
                "format": 1,
                "host": socket.gethostname(),
                "db": str(Daemon(root).db),
                "base": 0,
                "seq": 0,
                "started_at": "9999-01-01T00:00:00Z",
            }
        )
    )
    for path in (planted, planted / NODE_FILE):
        os.chown(path, 65534, 65534)
    a = mirroring(root, shared)
    try:
        made = make_runs(a, 2, "p")
        assert node_folder(a) != planted
        wait_for(lambda: has_all(a, shared, made), what="the runs in the daemon's own folder")
        assert mirror_status(a)["state"] == "ok"
    finally:
        a.stop()


# --- a shared folder that is full, read-only or stalled ---------------------------------


def namespaces_work() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0 and shutil.which("nsenter") is not None


class OwnMountDaemon(Daemon):
    """A daemon in a mount namespace of its own, where the shared folder is a small tmpfs:
    the test fills it, or remounts it read-only, from outside through /proc/PID/root."""

    shared: Path = Path("/nonexistent")

    def command(self) -> list[str]:
        script = 'mount -t tmpfs -o size=512k tmpfs "$0" && exec "$@"'
        return [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            str(self.shared),
            *super().command(),
        ]

    def seen(self) -> Path:
        """The shared folder as the daemon sees it."""
        return Path(f"/proc/{self.pid}/root") / self.shared.relative_to("/")

    def remount(self, options: str) -> None:
        subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.pid),
                "-m",
                "mount",
                "-o",
                f"remount,{options}",
                str(self.shared),
            ],
            check=True,
            timeout=10,
        )


@pytest.fixture
def own_mount(short_tmp: Path, shared: Path) -> Iterator[OwnMountDaemon]:
    if not namespaces_work():
        pytest.skip("needs mount namespaces (unshare -m and nsenter, as root)")
    (short_tmp / "n").mkdir()
    daemon = OwnMountDaemon(short_tmp / "n", extra_args=["--mirror", str(shared)])
    daemon.shared = shared
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def fill(folder: Path) -> Path:
    """Fill the filesystem of `folder` to the last byte."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_or_read_only_shared_folder_never_blocks_the_daemon(
    own_mount: OwnMountDaemon, fault: str
) -> None:
    daemon = own_mount
    before = make_runs(daemon, 2, "b")
    wait_for(lambda: has_all(daemon, daemon.seen(), before), what="the first runs mirrored")
    filler = fill(daemon.seen()) if fault == "full" else None
    if fault == "read-only":
        daemon.remount("ro")
    during = make_runs(daemon, 12, "d")  # answered while nothing can be written
    error = "No space left on device" if fault == "full" else "Read-only file system"
    behind = wait_for(
        lambda: (m := mirror_status(daemon))["state"] == "behind" and m,
        what="status to say the mirror is behind",
    )
    assert error in behind["error"] and behind["pending"] >= 1
    text = daemon.ctl("status").stdout
    assert "mirror" in text and "BEHIND since" in text and error in text
    assert not has_all(daemon, daemon.seen(), during)
    if filler is not None:
        filler.unlink()
    else:
        daemon.remount("rw")
    wait_for(
        lambda: has_all(daemon, daemon.seen(), before + during),
        timeout=60,
        what="the mirror to catch up",
    )
    assert (
        wait_for(
            lambda: (m := mirror_status(daemon))["state"] == "ok" and m, what="status ok again"
        )["error"]
        is None
    )
    assert "Traceback" not in daemon.log_tail(100_000)


def test_a_stalled_write_never_blocks_the_daemon(short_tmp: Path, shared: Path) -> None:
    """The segment is swapped for a FIFO nobody reads: the mirror's next open blocks for
    real, as on a hung NFS server. The daemon serves on and says the mirror is stalled;
    unblocked, the mirror catches up. SIGTERM during a stall exits anyway."""
    daemon = mirroring(short_tmp / "a", shared)
    try:
        before = make_runs(daemon, 2, "b")
        wait_for(lambda: has_all(daemon, shared, before), what="the first runs mirrored")
        folder = node_folder(daemon)
        segment = max(folder.glob("runs-*.jsonl"))
        saved, alias = folder / "saved.jsonl.keep", folder / "stall.fifo"
        segment.rename(saved)
        os.mkfifo(segment)
        os.link(segment, alias)  # a second name, to unblock the writer by later
        during = make_runs(daemon, 5, "d")  # the mirror's open of the FIFO blocks
        stalled = wait_for(
            lambda: (m := mirror_status(daemon))["state"] == "stalled" and m,
            timeout=30,
            what="status to say the mirror is stalled",
        )
        assert stalled["pending"] >= 1 and stalled["writing_for_sec"] >= 10
        assert "STALLED, a write has not returned" in daemon.ctl("status").stdout
        more = make_runs(daemon, 2, "m")
        os.replace(saved, segment)
        reader = os.open(alias, os.O_RDONLY | os.O_NONBLOCK)  # the blocked open returns
        try:
            wait_for(
                lambda: has_all(daemon, shared, before + during + more),
                timeout=60,
                what="the mirror to catch up after the stall",
            )
        finally:
            os.close(reader)
        # Stalled again, then SIGTERM: the daemon gives the flush 10 s and exits.
        segment.rename(saved)
        os.mkfifo(segment)
        last = make_runs(daemon, 1, "l")
        wait_for(lambda: mirror_status(daemon)["writing_for_sec"], what="a blocked write")
        assert daemon.stop(timeout=30) == 0
        assert "not written to" in daemon.log_tail(1 << 20)
        segment.unlink()
        os.replace(saved, segment)
        daemon.start()  # the next start catches up what the stall kept back
        wait_for(
            lambda: has_all(daemon, shared, before + during + more + last),
            what="the catch-up after a restart",
        )
    finally:
        daemon.stop()


# --- the files on their own -------------------------------------------------------------


def record(run_id: str, state: str = "running", **extra: Any) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "experiment": "e",
        "variation": "v",
        "attempt": 1,
        "state": state,
        "host": "n1",
        "created_at": "2026-01-01T00:00:00Z",
        "started_at": None,
        "ended_at": None,
        "last_heartbeat_at": None,
        "failure": None,
        "resources": None,
        **extra,
    }


def header(base: int, **extra: Any) -> dict[str, Any]:
    return {
        "format": 1,
        "host": "n1",
        "base": base,
        "seq": 3,
        "pending": 0,
        "refreshed_at": "2026-01-01T00:00:00Z",
        "stopped_at": None,
        "interval": 2.0,
        "heartbeat": 30.0,
        **extra,
    }


def test_a_compaction_replaces_the_segments_and_readers_see_the_same_runs(tmp_path: Path) -> None:
    node = NodeFiles.create(tmp_path, "n1")
    node.begin_snapshot()
    node.add_to_snapshot([encode_line(record("r1"))])
    node.finish_snapshot(header(0))
    node.append(
        [encode_line(record("r2")), encode_line(record("r1", "succeeded"))], header(node.base)
    )
    assert [r["state"] for r in parse_mirrored("n", read_node(node.folder).lines)[0]] == [
        "running",
        "succeeded",
    ]
    node.begin_snapshot()
    node.add_to_snapshot([encode_line(record("r1", "succeeded")), encode_line(record("r2"))])
    node.finish_snapshot(header(node.base))
    assert sorted(p.name for p in node.folder.iterdir()) == [NODE_FILE, segment_name(2)]
    runs, warnings = parse_mirrored("n", read_node(node.folder).lines)
    assert {r["run_id"]: r["state"] for r in runs} == {"r1": "succeeded", "r2": "running"}
    assert warnings == []


def test_a_symlink_planted_at_a_temporary_name_is_never_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone foresaw the temporary names node.json and a compaction's segment are written
    under (here: the random part pinned) and planted symlinks there: those writes fail, the
    links' target is untouched, and the next writes land in the node folder."""
    node = NodeFiles.create(tmp_path, "n1")
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    real = secrets.token_hex
    foreseen = iter(["0badc0de", "0badc0de"])  # the next two temporary names' random part
    monkeypatch.setattr(secrets, "token_hex", lambda n=None: next(foreseen, None) or real(n))
    links = [
        node.folder / f".{NODE_FILE}.0badc0de.tmp",
        node.folder / f".{segment_name(1)}.0badc0de.partial",
    ]
    for link in links:
        link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        node.write_header(header(0))
    with pytest.raises(FileExistsError):
        node.begin_snapshot()
    node.write_header(header(0))  # under a name of its own this time
    node.begin_snapshot()
    node.add_to_snapshot([encode_line(record("r1"))])
    node.finish_snapshot(header(0))
    assert victim.read_text() == "untouched"
    assert all(link.is_symlink() for link in links)
    mirrored = read_node(node.folder)
    assert mirrored.header == header(1)
    assert [json.loads(text)["run_id"] for _, _, text in mirrored.lines] == ["r1"]


async def test_a_compaction_keeps_every_change_made_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction writes a page per refresh; a run changed meanwhile lands in the segment
    being replaced, and is written again once the snapshot is in place."""
    monkeypatch.setattr(mirror, "PAGE", 2)
    shared = tmp_path / "shared"
    shared.mkdir()
    registry = Registry(tmp_path / "state" / "registry.sqlite3")
    await registry.open()
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(registry.run_writer)
            ids = [await new_run(registry, n) for n in range(5)]
            copy = mirror.Mirror(
                shared, registry, db=registry.path, socket_path=tmp_path / "sock", host="n1"
            )
            registry.subscribers.append(copy.on_commit)
            await copy._locate()  # a new folder: its first refresh starts a compaction
            assert await copy._refresh() and copy._snapshot is not None
            await registry.submit(partial(started, run_id=ids[0]))  # snapshotted pending
            assert await copy._refresh() and copy._snapshot is not None
            assert await copy._refresh() and copy._snapshot is None  # in place
            assert await copy._refresh()  # what changed meanwhile, again
            registry.stop()
            tasks.cancel_scope.cancel()
    finally:
        await registry.close_db()
    assert copy.node is not None
    assert sorted(p.name for p in copy.node.folder.iterdir()) == [NODE_FILE, segment_name(1)]
    runs = {
        r["run_id"]: r["state"] for r in parse_mirrored("n", read_node(copy.node.folder).lines)[0]
    }
    assert runs == {**dict.fromkeys(ids, "pending"), ids[0]: "running"}
    assert json.loads((copy.node.folder / NODE_FILE).read_text())["base"] == 1


async def new_run(registry: Registry, n: int) -> str:
    run_id = new_run_id()
    await registry.submit(
        lambda store: store.runs.create(
            NewRun(
                run_id=run_id,
                experiment="e",
                variation=f"v{n}",
                params_json="{}",
                tags_json="{}",
                created_at=time.time(),
            ),
            "test",
        )
    )
    return run_id


def started(store: Store, run_id: str) -> None:
    store.runs.set_state(
        store.runs.require(run_id), State.RUNNING, at=time.time(), cause="start", source="test"
    )


def test_a_line_being_appended_is_not_read_and_a_bad_one_is_named(tmp_path: Path) -> None:
    (tmp_path / NODE_FILE).write_text(json.dumps(header(1)))
    (tmp_path / segment_name(1)).write_bytes(
        encode_line(record("r1"))
        + b"{broken\n"
        + b'{"run_id": "r2"}\n'
        + encode_line(record("r1", "lost"))
        + b'{"run_id": "r3", "sta'
    )
    runs, warnings = parse_mirrored("n", read_node(tmp_path).lines)
    assert [(r["run_id"], r["state"]) for r in runs] == [("r1", "lost")]
    where = tmp_path / segment_name(1)
    assert warnings == [
        f"{where}:2: not JSON, skipped",
        f"{where}:3: bad or missing 'experiment', skipped",
    ]


@pytest.mark.parametrize(
    ("extra", "now", "gone", "state"),
    [
        ({"stopped_at": "2026-01-01T00:00:00Z"}, 10_000.0, True, "stopped"),
        ({}, 0.0, None, "live"),
        ({}, 10_000.0, None, "silent"),  # not refreshed for 3 heartbeats
        ({}, 0.0, True, "silent"),  # its daemon is known to be dead
    ],
)
def test_node_state(extra: dict[str, Any], now: float, gone: bool | None, state: str) -> None:
    epoch = 1767225600.0  # 2026-01-01T00:00:00Z
    told = node_state(header(1, pending=2, **extra), epoch + now, gone)
    assert told["state"] == state
    if state == "silent":
        assert told["missing"] == (
            "what changed after 2026-01-01T00:00:00Z is missing: at "
            "most the last 2 s of changes, and 2 run(s) that were "
            "then waiting to be written"
        )
    else:
        assert told["missing"] is None


def test_the_mirror_key_in_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('mirror = "/shared/me/runnerd"\nmirror_interval = 2.5\n')
    loaded = config.load(good)
    assert loaded.mirror == Path("/shared/me/runnerd") and loaded.mirror_interval == 2.5
    bad = tmp_path / "bad.toml"
    bad.write_text('mirror = "relative/dir"\n')
    with pytest.raises(config.ConfigError, match="mirror must be an absolute path"):
        config.load(bad)
