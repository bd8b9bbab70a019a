"""One view over many nodes: `runnerctl --socket A --socket B ...` over two real daemons (two
emulated nodes), `--from DIR` over their export files, the merge functions on their own, and
the daemon's refusal of a registry on a network filesystem."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from conftest import Daemon, wait_for
from runnerd.cli.labels import join_records, join_runs, unshown
from runnerd.cli.merge import (
    counts_once,
    group_failures,
    merge_failures,
    merge_groups,
    merge_runs,
    parse_export,
    total_counts,
)
from runnerd.diagnosis import relabel
from runnerd.mounts import mount_of, network_mount
from runnerd.registry import Registry
from runnerd_client.connection import Connection
from runnerd_client.ids import new_key
from runnerd_client.protocol import Create, Fail, RunnerdError, Start

RUNS = textwrap.dedent("""
    import sys
    import runnerd_client as rd
    client = rd.connect()
    ids = [client.run("train", variation="lr=0.1").start().succeed().run_id]
    for n, failure_class in enumerate(sys.argv[1:]):
        bad = client.run("train", variation=f"bad{n}").start()
        bad.fail(message="it broke", failure_class=failure_class)
        ids.append(bad.run_id)
    print(*ids, flush=True)
""")


@dataclass
class Nodes:
    a: Daemon
    b: Daemon
    runs_a: list[str]
    runs_b: list[str]

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """runnerctl asking both daemons."""
        return self.a.ctl(
            "--socket", str(self.a.socket), "--socket", str(self.b.socket), *args, check=check
        )

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl(*args, "--json").stdout)


def client_runs(daemon: Daemon, *failure_classes: str) -> list[str]:
    """A succeeded run and one failed run per class, made by a client process."""
    proc = daemon.python(RUNS, *failure_classes)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.split()


def create(
    daemon: Daemon, run_id: str, host: str, start: bool = False, experiment: str = "probe"
) -> None:
    """A run with a chosen id and host, as a node's client would have made it."""
    conn = Connection(daemon.socket)
    try:
        conn.call(Create(key=new_key(), run_id=run_id, experiment=experiment, host=host))
        if start:
            conn.call(Start(key=new_key(), run_id=run_id, at=time.time() + 1))
    finally:
        conn.close()


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    """Two daemons, each with its own socket and registry. A holds a succeeded run, a
    FloatingPointError, ZZAMBIG-a and SHARED-1 (pending); B a succeeded run, a
    FloatingPointError, a MemoryError, ZZAMBIG-b and SHARED-1 again, started later."""
    with tempfile.TemporaryDirectory(prefix="rd-", dir="/tmp") as name:
        a = Daemon(Path(name) / "a")
        b = Daemon(Path(name) / "b")
        for daemon in (a, b):
            daemon.root.mkdir()
            daemon.start()
        try:
            runs_a = client_runs(a, "FloatingPointError")
            runs_b = client_runs(b, "FloatingPointError", "MemoryError")
            create(a, "ZZAMBIG-a", "node-a")
            create(b, "ZZAMBIG-b", "node-b")
            create(a, "SHARED-1", "node-a")
            create(b, "SHARED-1", "node-a", start=True)
            yield Nodes(a, b, [*runs_a, "ZZAMBIG-a", "SHARED-1"], [*runs_b, "ZZAMBIG-b"])
        finally:
            a.stop()
            b.stop()


def stopped_daemon(root: Path) -> Daemon:
    """A daemon that ran and was stopped: its socket path leads nowhere."""
    daemon = Daemon(root).start()
    daemon.stop()
    return daemon


# --- several daemons ----------------------------------------------------------------


def test_list_holds_every_run_once_with_its_daemon(nodes: Nodes) -> None:
    runs = nodes.ctl_json("list")
    daemons = {r["run_id"]: r["daemon"] for r in runs}
    assert len(runs) == len(daemons) == 8
    for run_id in nodes.runs_a:
        assert daemons[run_id] == (
            str(nodes.b.socket) if run_id == "SHARED-1" else str(nodes.a.socket)
        )
    for run_id in nodes.runs_b:
        assert daemons[run_id] == str(nodes.b.socket)
    shared = next(r for r in runs if r["run_id"] == "SHARED-1")
    assert shared["state"] == "running" and shared["host"] == "node-a"  # the copy heard last
    assert [r["created_at"] for r in runs] == sorted((r["created_at"] for r in runs), reverse=True)
    assert nodes.ctl_json("list", "--limit", "3") == runs[:3]
    failed = nodes.ctl_json("list", "--state", "failed_crash")
    assert sorted(r["run_id"] for r in failed) == sorted([nodes.runs_a[1], *nodes.runs_b[1:3]])


def test_list_table_names_each_runs_host(nodes: Nodes) -> None:
    lines = nodes.ctl("list").stdout.splitlines()
    assert lines[0].split()[:2] == ["HOST", "RUN"]
    rows = {line.split()[1]: line.split()[0] for line in lines[1:]}
    assert rows["ZZAMBIG-a"] == "node-a" and rows["ZZAMBIG-b"] == "node-b"


def test_one_socket_keeps_todays_output(nodes: Nodes) -> None:
    runs = nodes.a.ctl_json("--socket", str(nodes.a.socket), "list")
    assert sorted(r["run_id"] for r in runs) == sorted(nodes.runs_a)
    assert all("daemon" not in r for r in runs)
    assert nodes.a.ctl("list").stdout.startswith("RUN ")  # $RUNNERD_SOCKET, no HOST column


def test_show_by_prefix_finds_the_run_on_its_daemon(nodes: Nodes) -> None:
    run_id = nodes.runs_b[2]
    run = nodes.ctl_json("show", run_id[:13])
    assert run["run_id"] == run_id and run["daemon"] == str(nodes.b.socket)
    assert run["failure"]["failure_class"] == "MemoryError" and run["transitions"]
    text = nodes.ctl("show", run_id[:13]).stdout
    assert text.splitlines()[0].split() == ["daemon", str(nodes.b.socket)]
    assert "MemoryError (crash)" in text


def test_show_of_a_prefix_on_two_daemons_is_ambiguous(nodes: Nodes) -> None:
    result = nodes.ctl("show", "ZZAMBIG", check=False)
    assert result.returncode == 1
    assert "more than one run" in result.stderr
    assert f"ZZAMBIG-a on {nodes.a.socket}" in result.stderr
    assert f"ZZAMBIG-b on {nodes.b.socket}" in result.stderr
    assert nodes.ctl_json("show", "SHARED")["daemon"] == str(nodes.b.socket)  # one run, twice


def test_show_of_an_unknown_run_on_every_daemon_exits_4(nodes: Nodes) -> None:
    result = nodes.ctl("show", "NOSUCHRUN", check=False)
    assert result.returncode == 4 and "any of the 2 daemons" in result.stderr


def test_failures_are_merged_and_grouped(nodes: Nodes) -> None:
    records = nodes.ctl_json("failures")
    assert sorted(f["run_id"] for f in records) == sorted([nodes.runs_a[1], *nodes.runs_b[1:3]])
    assert {f["run_id"]: f["daemon"] for f in records}[nodes.runs_a[1]] == str(nodes.a.socket)
    assert all(f["host"] for f in records)
    groups = {g["key"]: g for g in nodes.ctl_json("failures", "--group-by", "class")}
    fpe = groups["FloatingPointError"]
    assert fpe["count"] == 2
    assert sorted(fpe["run_ids"]) == sorted([nodes.runs_a[1], nodes.runs_b[1]])
    assert sorted(fpe["daemons"]) == sorted([str(nodes.a.socket), str(nodes.b.socket)])
    assert fpe["first_seen"] < fpe["last_seen"]
    assert groups["MemoryError"]["count"] == 1
    assert groups["MemoryError"]["daemons"] == [str(nodes.b.socket)]
    assert nodes.ctl("failures").stdout.split()[:2] == ["HOST", "RUN"]


def test_status_sums_the_daemons(nodes: Nodes) -> None:
    body = nodes.ctl_json("status")
    assert [d["daemon"] for d in body["daemons"]] == [str(nodes.a.socket), str(nodes.b.socket)]
    assert all(d["reachable"] for d in body["daemons"])
    assert sum(total_counts(d["status"]["counts"] for d in body["daemons"]).values()) == 9
    plain = set(nodes.a.ctl_json("status"))
    assert all(set(d["status"]) == plain for d in body["daemons"])  # as one daemon answers


def test_status_counts_a_run_two_daemons_know_once(nodes: Nodes) -> None:
    """SHARED-1 is pending on A and running on B, which heard from it last: counted once,
    as running, like `list` and `report` show it; each daemon's section keeps its own."""
    body = nodes.ctl_json("status")
    listed = nodes.ctl_json("list", "--limit", "100")
    assert body["counts"] == dict(Counter(r["state"] for r in listed))
    assert sum(body["counts"].values()) == 8
    assert [d["status"]["counts"]["pending"] for d in body["daemons"]] == [2, 1]
    assert body["counts"]["pending"] == 2 and body["counts"]["running"] == 1
    text = nodes.ctl("status").stdout
    assert "All daemons (2 of 2 answered): 8 run(s)" in text


def test_status_with_a_stopped_daemon_shows_the_other(nodes: Nodes, short_tmp: Path) -> None:
    gone = stopped_daemon(short_tmp)
    args = ("--socket", str(nodes.a.socket), "--socket", str(gone.socket), "status")
    text = nodes.a.ctl(*args).stdout
    assert f"== {gone.socket} ==\nunreachable: runnerd is not reachable" in text
    assert str(nodes.a.db) in text
    assert "All daemons (1 of 2 answered): 4 run(s)" in text
    body = json.loads(nodes.a.ctl(*args, "--json").stdout)
    assert [d["reachable"] for d in body["daemons"]] == [True, False]
    assert body["daemons"][1]["status"] is None and "not reachable" in body["daemons"][1]["error"]
    listed = nodes.a.ctl("--socket", str(gone.socket), "--socket", str(nodes.a.socket), "list")
    assert "not reachable" in listed.stderr and "ZZAMBIG-a" in listed.stdout
    nowhere = nodes.a.ctl(
        "--socket", str(gone.socket), "--socket", str(short_tmp / "x.sock"), "status", check=False
    )
    assert nowhere.returncode == 3 and "0 of 2 answered" in nowhere.stdout


def test_commands_for_one_daemon_refuse_several(nodes: Nodes) -> None:
    for args in (("cancel", "ZZAMBIG-a"), ("export",), ("status", "--watch")):
        result = nodes.ctl(*args, check=False)
        assert result.returncode == 2, args
        assert "one --socket" in result.stderr
    assert nodes.a.run_state("ZZAMBIG-a") == "pending"


def test_report_counts_a_run_two_daemons_know_once(nodes: Nodes, short_tmp: Path) -> None:
    body = nodes.ctl_json("report")
    assert body["runs"] == sum(body["counts"].values()) == 8  # SHARED-1 once
    assert body["counts"]["failed_crash"] == 3
    assert sorted(g["count"] for g in body["failure_groups"]) == [1, 2]
    page = short_tmp / "report.html"
    text = nodes.ctl("report", "--html", str(page)).stdout
    assert text.startswith("8 run(s) since") and "ZZAMBIG-b" in page.read_text()


def test_diagnose_reads_every_daemon(nodes: Nodes) -> None:
    body = nodes.ctl_json("diagnose")
    assert body["failures"] == 3 and sum(f["count"] for f in body["findings"]) == 3
    mem = nodes.ctl_json("diagnose", nodes.runs_b[2][:12])
    assert mem["failures"] == 1 and mem["findings"][0]["run_ids"] == [nodes.runs_b[2]]
    latest = nodes.ctl_json("diagnose", "--latest")
    assert latest["failures"] == 1
    assert latest["findings"][0]["run_ids"] == [nodes.runs_b[2]]  # the newest of both
    assert nodes.ctl("diagnose", "NOSUCHRUN", check=False).returncode == 4


class Lines:
    """A runnerctl process whose stdout and stderr lines are collected by threads."""

    def __init__(self, daemon: Daemon, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runnerd.cli", *args],
            env=daemon.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.readers = [
            threading.Thread(target=self._read, args=(pipe, into), daemon=True)
            for pipe, into in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors))
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(pipe: Any, into: list[str]) -> None:
        with pipe:
            into.extend(pipe)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.lines)]

    def wait(self) -> int:
        code = self.proc.wait(timeout=30)
        for reader in self.readers:
            reader.join(timeout=30)
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait()


@pytest.fixture
def pair(short_tmp: Path) -> Iterator[Nodes]:
    """Two daemons of their own, for tests that add runs."""
    a, b = Daemon(short_tmp / "a"), Daemon(short_tmp / "b")
    for daemon in (a, b):
        daemon.root.mkdir()
        daemon.start()
    try:
        yield Nodes(a, b, [], [])
    finally:
        a.stop()
        b.stop()


def test_follow_streams_every_daemon_naming_each(pair: Nodes) -> None:
    nodes = pair
    sockets = ("--socket", str(nodes.a.socket), "--socket", str(nodes.b.socket))
    follower = Lines(nodes.a, *sockets, "follow", "--experiment", "watched", "--json")
    try:

        def started() -> bool:
            create(
                nodes.a, f"W-A-{time.monotonic_ns()}", "node-a", start=True, experiment="watched"
            )
            return any(e["daemon"] == str(nodes.a.socket) for e in follower.events())

        wait_for(started, timeout=30, what="the follower to be subscribed")
        create(nodes.b, "W-B-1", "node-b", start=True, experiment="watched")
        seen = wait_for(
            lambda: [
                e
                for e in follower.events()
                if e["run_id"] == "W-B-1" and e["event"] == "transition" and e["to"] == "running"
            ],
            what="node B's event",
        )
        assert seen[0]["daemon"] == str(nodes.b.socket)
    finally:
        assert follower.stop() == 0


def test_follow_a_run_on_another_daemon_until_it_ends(pair: Nodes) -> None:
    nodes = pair
    create(nodes.b, "W-RUN-1", "node-b", start=True, experiment="watched")
    sockets = ("--socket", str(nodes.a.socket), "--socket", str(nodes.b.socket))
    follower = Lines(nodes.a, *sockets, "follow", "W-RUN-1")
    wait_for(
        lambda: any("pending -> running" in line for line in follower.lines),
        what="the run's history replayed",
    )
    conn = Connection(nodes.b.socket)
    try:
        conn.call(
            Fail(
                key=new_key(),
                run_id="W-RUN-1",
                reason="crash",
                failure_class="E",
                message="no",
                exit_code=7,
            )
        )
    finally:
        conn.close()
    assert follower.wait() == 7
    assert any("running -> failed_crash" in line for line in follower.lines)
    assert str(nodes.b.socket) in follower.lines[0]
    result = nodes.ctl("follow", "--since", "3", check=False)
    assert result.returncode == 2 and "one daemon's position" in result.stderr


# --- a Dask cluster, through Dask ---------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def dask_test(test: F) -> F:
    """A test with a real LocalCluster: Dask's own warnings are not ours to fail on."""
    for mark in (
        pytest.mark.filterwarnings("ignore::DeprecationWarning"),
        pytest.mark.filterwarnings("ignore::ResourceWarning"),
        pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
        pytest.mark.timeout(180),
    ):
        test = mark(test)
    return test


def double(x: int) -> int:
    return x * 2


@dataclass
class DaskNodes:
    """Two emulated nodes (a daemon and a `dask worker` each, the worker pointed at its
    node's daemon by its environment) and a third worker whose node has no daemon."""

    a: Daemon
    b: Daemon
    address: str
    client: Any
    workers: dict[str, str]  # node a / b / nowhere -> worker address
    keys: dict[str, list[str]]  # node -> the Dask keys of the tasks it ran

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.a.ctl("--dask", self.address, *args, check=check)

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl(*args, "--json").stdout)


def close_nodes(
    client: Any, cluster: Any, workers: list[subprocess.Popen[bytes]], *daemons: Daemon
) -> None:
    """Tear emulated nodes down: the Dask client and cluster, the workers, the daemons."""
    client.close()
    cluster.close()
    stop_workers(workers)
    for daemon in daemons:
        daemon.stop()


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def worker_env(client: Any, count: int) -> dict[str, str]:
    """Which worker (address) came from which started process, by its environment."""
    client.wait_for_workers(count, timeout=60)
    return dict(client.run(lambda: os.environ.get("NODE_NAME")))


@pytest.fixture(scope="module")
def dask_nodes() -> Iterator[DaskNodes]:
    distributed = pytest.importorskip("distributed")
    import dask_cluster

    from runnerd_client.dask import RunnerdWorkerPlugin

    with tempfile.TemporaryDirectory(prefix="rd-", dir="/tmp") as name:
        a, b = Daemon(Path(name) / "a"), Daemon(Path(name) / "b")
        for daemon in (a, b):
            daemon.root.mkdir()
            daemon.start()
        cluster = distributed.LocalCluster(n_workers=0, dashboard_address=":0")
        client = distributed.Client(cluster)
        nowhere = {**a.env, "RUNNERD_SOCKET": str(Path(name) / "nowhere" / "runnerd.sock")}
        procs = [
            dask_cluster.start_worker(cluster.scheduler_address, {**env, "NODE_NAME": node})
            for node, env in (("a", a.env), ("b", b.env), ("nowhere", nowhere))
        ]
        try:
            by_worker = worker_env(client, 3)
            workers = {node: worker for worker, node in by_worker.items()}
            client.register_plugin(RunnerdWorkerPlugin(experiment="cluster"))
            keys: dict[str, list[str]] = {}
            for node in ("a", "b"):
                futures = [
                    client.submit(double, i, workers=[workers[node]], pure=False)
                    for i in range(3 if node == "a" else 4)
                ]
                assert client.gather(futures) == [i * 2 for i in range(len(futures))]
                keys[node] = [f.key for f in futures]
            for node, daemon in (("a", a), ("b", b)):
                wait_for(
                    lambda d=daemon, n=node: (
                        len(
                            [
                                r
                                for r in d.ctl_json("list", "--experiment", "cluster")
                                if r["state"] == "succeeded"
                            ]
                        )
                        == len(keys[n])
                    ),
                    timeout=30,
                    what=f"node {node}'s tasks recorded",
                )
            yield DaskNodes(a, b, cluster.scheduler_address, client, workers, keys)
        finally:
            close_nodes(client, cluster, procs, a, b)


def node_name(daemon: Daemon) -> str:
    return f"{os.uname().nodename}:{daemon.socket}"


@dask_test
def test_dask_lists_every_nodes_runs_and_names_the_one_without_a_daemon(
    dask_nodes: DaskNodes,
) -> None:
    result = dask_nodes.ctl("list", "--experiment", "cluster", "--json")
    runs = json.loads(result.stdout)
    by_node: dict[str, list[str]] = {}
    for run in runs:
        by_node.setdefault(run["daemon"], []).append(run["tags"]["dask_key"])
    assert {node: sorted(keys) for node, keys in by_node.items()} == {
        node_name(dask_nodes.a): sorted(dask_nodes.keys["a"]),
        node_name(dask_nodes.b): sorted(dask_nodes.keys["b"]),
    }
    assert "nowhere/runnerd.sock" in result.stderr and "left out" in result.stderr
    table = dask_nodes.ctl("list", "--experiment", "cluster").stdout
    assert table.splitlines()[0].split()[:2] == ["HOST", "RUN"]


@dask_test
def test_dask_status_has_a_section_per_node(dask_nodes: DaskNodes) -> None:
    body = dask_nodes.ctl_json("status")
    reachable = {d["daemon"]: d["reachable"] for d in body["daemons"]}
    assert reachable[node_name(dask_nodes.a)] and reachable[node_name(dask_nodes.b)]
    assert [ok for name, ok in reachable.items() if "nowhere" in name] == [False]
    assert body["counts"]["succeeded"] >= 7
    text = dask_nodes.ctl("status").stdout
    assert "All daemons (2 of 3 answered)" in text


@dask_test
def test_dask_show_and_failures_find_the_node(dask_nodes: DaskNodes) -> None:
    run_id = make_failure(dask_nodes.b, "ZeroDivisionError")
    shown = dask_nodes.ctl_json("show", run_id)
    assert shown["daemon"] == node_name(dask_nodes.b) and shown["transitions"]
    groups = dask_nodes.ctl_json("failures", "--group-by", "class")
    assert any(
        g["key"] == "ZeroDivisionError" and g["daemons"] == [node_name(dask_nodes.b)]
        for g in groups
    )


@dask_test
def test_dask_diagnose_report_and_follow(dask_nodes: DaskNodes) -> None:
    report = dask_nodes.ctl_json("report", "--experiment", "cluster")
    assert report["runs"] == report["counts"]["succeeded"] == 7
    run_id = make_failure(dask_nodes.a, "RecursionError")
    diagnosed = dask_nodes.ctl_json("diagnose", run_id)
    assert diagnosed["failures"] == 1 and diagnosed["findings"][0]["run_ids"] == [run_id]
    follower = Lines(
        dask_nodes.a, "--dask", dask_nodes.address, "follow", "--experiment", "cluster", "--json"
    )
    try:

        def seen_on_b() -> list[dict[str, Any]]:
            future = dask_nodes.client.submit(
                double, time.monotonic_ns(), workers=[dask_nodes.workers["b"]], pure=False
            )
            future.result()
            return [e for e in follower.events() if e["daemon"] == node_name(dask_nodes.b)]

        events = wait_for(seen_on_b, timeout=60, interval=1.0, what="node B's events")
        assert {e["event"] for e in events} >= {"transition"}
    finally:
        assert follower.stop() == 0


@dask_test
def test_dask_refuses_commands_for_one_daemon(dask_nodes: DaskNodes) -> None:
    result = dask_nodes.ctl("cancel", "x", check=False)
    assert result.returncode == 2 and "--dask" in result.stderr


@dask_test
def test_dask_with_no_scheduler_there_exits_3(short_tmp: Path) -> None:
    pytest.importorskip("distributed")
    daemon = Daemon(short_tmp)
    result = daemon.ctl("--dask", "tcp://127.0.0.1:9", "list", check=False)
    assert result.returncode == 3 and "cannot reach the Dask scheduler" in result.stderr


def make_failure(daemon: Daemon, failure_class: str) -> str:
    return client_runs(daemon, failure_class)[1]


@dataclass
class ScheduledNodes:
    """Nodes A and B, each a daemon and a worker, with the scheduler (and its plugin) on A."""

    a: Daemon
    b: Daemon
    client: Any
    address: str
    procs: list[subprocess.Popen[bytes]]


@contextmanager
def scheduled_nodes(
    root: Path, monkeypatch: pytest.MonkeyPatch, experiment: str, *b_worker: str
) -> Iterator[ScheduledNodes]:
    """Two emulated nodes on one Dask cluster whose scheduler sits on node A; `b_worker`
    are extra options of B's worker (a memory limit, say)."""
    distributed = pytest.importorskip("distributed")
    import dask_cluster

    from runnerd_client.dask import RunnerdSchedulerPlugin, RunnerdWorkerPlugin

    a, b = Daemon(root / "a"), Daemon(root / "b")
    for daemon in (a, b):
        daemon.root.mkdir()
        daemon.start()
    monkeypatch.setenv("RUNNERD_SOCKET", str(a.socket))  # the scheduler's own node is A
    cluster = distributed.LocalCluster(n_workers=0, dashboard_address=":0")
    client = distributed.Client(cluster)
    client.register_plugin(RunnerdSchedulerPlugin())
    client.register_plugin(RunnerdWorkerPlugin(experiment=experiment))
    address = cluster.scheduler_address
    procs = [
        dask_cluster.start_worker(address, {**a.env, "NODE_NAME": "a"}),
        dask_cluster.start_worker(address, {**b.env, "NODE_NAME": "b"}, *b_worker),
    ]
    try:
        yield ScheduledNodes(a, b, client, address, procs)
    finally:
        close_nodes(client, cluster, procs, a, b)


def grow(limit_mb: int) -> None:
    chunks = []
    for _ in range(limit_mb * 2 // 20):
        chunks.append(bytearray(20 << 20))
        time.sleep(0.05)


@dask_test
def test_a_worker_oom_killed_on_node_b_is_labelled_in_node_bs_record(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler sits on node A; node B's worker is OOM-killed by its nanny. The label
    reaches B's daemon through B's restarted worker, not A's daemon."""
    from runnerd_client.dask import RunnerdSchedulerPlugin

    with scheduled_nodes(short_tmp, monkeypatch, "oom", "--memory-limit", "400MiB") as nodes:
        a, b, client = nodes.a, nodes.b, nodes.client
        workers = {node: worker for worker, node in worker_env(client, 2).items()}
        future = client.submit(grow, 400, workers=[workers["b"]], retries=0)
        oom = wait_for(
            lambda: next(
                (
                    r
                    for r in b.ctl_json("list", "--experiment", "oom")
                    if (r["failure"] or {}).get("category") == "oom"
                ),
                None,
            ),
            timeout=90,
            what="node B's run labelled oom",
        )
        assert oom["tags"]["worker"] == workers["b"] and oom["state"].startswith("failed")
        assert "memory" in oom["failure"]["message"]
        assert a.ctl_json("list", "--experiment", "oom") == []

        def delivered(dask_scheduler: Any) -> list[Any]:
            plugin = dask_scheduler.plugins[RunnerdSchedulerPlugin.name]
            return [
                [run_id, label, list(node)] for run_id, label, node in plugin.node_labels.delivered
            ]

        assert [
            oom["run_id"],
            "oom",
            [os.uname().nodename, str(b.socket)],
        ] in client.run_on_scheduler(delivered)
        future.cancel()


def nap(seconds: float) -> None:
    time.sleep(seconds)


@dask_test
def test_a_label_held_for_a_node_without_a_worker_joins_dask_queries(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node B's only worker is closed by a walltime's SIGTERM while its task runs: no worker
    of B is left to deliver the label, so the scheduler holds it. `--dask` names the held
    run (list, failures) and `show` says why it cannot show it (exit 3); with B's records
    read from a folder (`--from`, its mirror or an export), the held label joins them; a new
    worker on B delivers the label, and B's record then shows it."""
    import dask_cluster

    from runnerd_client.dask import RunnerdSchedulerPlugin
    from runnerd_client.dask_scheduler import held_labels

    with scheduled_nodes(short_tmp, monkeypatch, "held") as nodes:
        a, b, client, procs = nodes.a, nodes.b, nodes.client, nodes.procs
        address = nodes.address
        node_b = node_name(b)
        workers = {node: worker for worker, node in worker_env(client, 2).items()}
        future = client.submit(nap, 120, workers=[workers["b"]], retries=0)
        run_id = wait_for(
            lambda: next((r["run_id"] for r in b.ctl_json("list", "--state", "running")), None),
            timeout=60,
            what="the task's run on node B",
        )

        def in_ledger(dask_scheduler: Any) -> bool:
            return future.key in dask_scheduler.plugins[RunnerdSchedulerPlugin.name].ledger

        wait_for(lambda: client.run_on_scheduler(in_ledger), what="the ledger entry")
        os.kill(procs[1].pid, signal.SIGTERM)  # B's nanny: its worker closes, as at a walltime
        procs[1].wait(60)
        held = wait_for(
            lambda: client.run_on_scheduler(held_labels), timeout=30, what="the label held"
        )
        assert [(h["run_id"], h["category"], f"{h['host']}:{h['socket']}") for h in held] == [
            (run_id, "walltime", node_b)
        ]
        note = f"node {node_b} has no live worker"
        for command in (("list",), ("failures",)):
            result = a.ctl("--dask", address, *command)
            assert note in result.stderr and f"{run_id} walltime" in result.stderr, command
        shown = a.ctl("--dask", address, "show", run_id[:12], check=False)
        assert shown.returncode == 3
        assert f"{run_id} lived on node {node_b}" in shown.stderr
        assert "holds its label walltime" in shown.stderr
        morning = short_tmp / "morning"  # B's records, as its mirror or an export keeps them
        morning.mkdir()
        (morning / "b.jsonl").write_text(b.ctl("export").stdout)
        from_b = ("--from", str(morning), "--json")
        listed = json.loads(a.ctl("--dask", address, "list", *from_b).stdout)
        (held_run,) = [r for r in listed if r["run_id"] == run_id]
        assert held_run["label"]["category"] == "walltime" and held_run["label"]["held"]
        assert held_run["failure"]["category"] == "walltime"
        (record,) = json.loads(a.ctl("--dask", address, "failures", *from_b).stdout)
        assert record["run_id"] == run_id and record["category"] == "walltime"
        one = json.loads(a.ctl("--dask", address, "show", run_id[:12], *from_b).stdout)
        assert one["label"]["category"] == "walltime"

        procs.append(dask_cluster.start_worker(address, {**b.env, "NODE_NAME": "b"}))
        wait_for(lambda: not client.run_on_scheduler(held_labels), what="the label delivered")
        run = wait_for(
            lambda: (
                (r := json.loads(a.ctl("--dask", address, "show", run_id, "--json").stdout))
                and (r["failure"] or {}).get("category") == "walltime"
                and r
            ),
            timeout=30,
            what="node B's record labelled walltime",
        )
        assert "label" not in run and run["daemon"] == node_b
        assert "no live worker" not in a.ctl("--dask", address, "list").stderr
        future.cancel()


def test_held_labels_join_runs_and_records_as_the_daemon_will_apply_them() -> None:
    label = {
        "run_id": "R1",
        "category": "oom",
        "note": "the nanny restarted the worker",
        "node": "n2:/s",
    }
    failure = {
        "failure_class": "ProcessExited",
        "message": "killed by SIGKILL",
        "reason": "crash",
        "signal": "SIGKILL",
        "category": "crash",
        "retryable": False,
    }
    runs = [{"run_id": "R1", "failure": failure}, {"run_id": "R2", "failure": None}]
    joined = join_runs(runs, {"R1": label})
    assert joined[1] == runs[1]
    assert joined[0]["label"] == {
        "category": "oom",
        "note": label["note"],
        "node": "n2:/s",
        "held": True,
    }
    message, found = relabel(failure, "oom", label["note"])
    assert joined[0]["failure"] == {
        **failure,
        "message": message,
        "category": found.category,
        "retryable": found.retryable,
    }
    assert found.category == "oom" and "nanny" in message
    record = join_records([{**failure, "run_id": "R1"}], {"R1": label})[0]
    assert record["category"] == "oom" and record["label"]["held"] is True
    assert unshown({"R1": label}, ["R1"]) == []
    assert unshown({"R1": label}, ["R2"]) == [
        "node n2:/s has no live worker; the Dask scheduler holds the label of 1 run(s) there "
        "until one is back: R1 oom"
    ]


# --- export files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(nodes: Nodes) -> Iterator[Path]:
    """Both daemons' runs and failures exports in one folder, as a shared folder holds them."""
    with tempfile.TemporaryDirectory(prefix="rd-exports-") as name:
        folder = Path(name)
        for tag, daemon in (("a", nodes.a), ("b", nodes.b)):
            for what in ("runs", "failures"):
                out = daemon.ctl("export", "--what", what).stdout
                (folder / f"{tag}-{what}.jsonl").write_text(out)
        (folder / "README.txt").write_text("not an export\n")
        yield folder


def test_list_from_a_folder_of_exports(nodes: Nodes, exports: Path) -> None:
    runs = nodes.a.ctl_json("list", "--from", str(exports))
    files = {r["run_id"]: r["daemon"] for r in runs}
    assert len(runs) == len(files) == 8
    assert files[nodes.runs_b[0]] == str(exports / "b-runs.jsonl")
    assert files["SHARED-1"] == str(exports / "b-runs.jsonl")  # the copy heard last
    assert [
        r["run_id"]
        for r in nodes.a.ctl_json("list", "--from", str(exports), "--experiment", "probe")
    ] == [r["run_id"] for r in runs if r["experiment"] == "probe"]


def test_failures_from_a_folder_are_deduplicated(nodes: Nodes, exports: Path) -> None:
    records = nodes.a.ctl_json("failures", "--from", str(exports))
    assert sorted(f["run_id"] for f in records) == sorted([nodes.runs_a[1], *nodes.runs_b[1:3]])
    assert all(f["host"] and "details" not in f for f in records)
    groups = nodes.a.ctl_json("failures", "--from", str(exports), "--group-by", "class")
    assert [(g["key"], g["count"]) for g in groups] == [
        ("FloatingPointError", 2),
        ("MemoryError", 1),
    ]


def test_diagnose_and_report_from_a_folder_count_each_failure_once(
    nodes: Nodes, exports: Path
) -> None:
    body = nodes.a.ctl_json("diagnose", "--from", str(exports))
    assert body["failures"] == 3  # each is in a runs export and a failures export
    report = nodes.a.ctl_json("report", "--from", str(exports))
    assert report["runs"] == sum(report["counts"].values()) == 8


def test_a_malformed_export_line_is_warned_and_skipped(
    nodes: Nodes, exports: Path, short_tmp: Path
) -> None:
    folder = short_tmp / "shared"
    folder.mkdir()
    good = (exports / "a-runs.jsonl").read_text().splitlines()
    (folder / "a.jsonl").write_text(
        "\n".join([good[0], "{not json", '{"state": 3}', "[1, 2]", "", *good[1:]]) + "\n"
    )
    (folder / "b.jsonl").write_bytes(b"\xff\xfe\n")
    result = nodes.a.ctl("list", "--from", str(folder), "--json")
    assert sorted(r["run_id"] for r in json.loads(result.stdout)) == sorted(nodes.runs_a)
    assert f"{folder / 'a.jsonl'}:2: not JSON, skipped" in result.stderr
    assert f"{folder / 'a.jsonl'}:3: bad or missing 'run_id', skipped" in result.stderr
    assert f"{folder / 'a.jsonl'}:4: neither a run nor a failure record" in result.stderr
    assert f"{folder / 'b.jsonl'}:1: not JSON" in result.stderr


def test_from_a_folder_without_exports_is_an_error(nodes: Nodes, short_tmp: Path) -> None:
    result = nodes.a.ctl("list", "--from", str(short_tmp), check=False)
    assert result.returncode == 1 and "no mirrored nodes or export files" in result.stderr


# --- the merge functions ------------------------------------------------------------


def run(run_id: str, created: str, daemon: str, ended: str | None = None) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "created_at": f"2026-01-01T00:00:{created}Z",
        "daemon": daemon,
        "ended_at": f"2026-01-01T00:01:{ended}Z" if ended else None,
    }


def test_merge_runs_keeps_the_copy_heard_last_newest_first() -> None:
    runs = [
        run("r1", "01", "A"),
        run("r2", "03", "A"),
        run("r1", "01", "B", ended="00"),
        run("r3", "02", "B"),
    ]
    merged = merge_runs(runs)
    assert [(r["run_id"], r["daemon"]) for r in merged] == [("r2", "A"), ("r3", "B"), ("r1", "B")]
    assert merge_runs(runs, limit=2) == merged[:2]


def failure(run_id: str, at: str, daemon: str, cls: str = "E") -> dict[str, Any]:
    return {
        "run_id": run_id,
        "at": f"2026-01-01T00:00:{at}Z",
        "daemon": daemon,
        "failure_class": cls,
        "message": f"m{run_id}",
        "signature": cls,
    }


def test_merge_failures_one_per_run_newest_first() -> None:
    merged = merge_failures(
        [failure("r1", "01", "A"), failure("r2", "05", "B"), failure("r1", "01", "B")], limit=5
    )
    assert [(f["run_id"], f["daemon"]) for f in merged] == [("r2", "B"), ("r1", "A")]


def group(
    key: str, count: int, first: str, last: str, run_ids: list[str], daemon: str
) -> dict[str, Any]:
    return {
        "key": key,
        "count": count,
        "first_seen": f"2026-01-01T00:00:{first}Z",
        "last_seen": f"2026-01-01T00:00:{last}Z",
        "run_ids": run_ids,
        "daemon": daemon,
        "example": {"failure_class": key, "message": daemon},
    }


def test_merge_groups_adds_counts_and_widens_the_window() -> None:
    merged = merge_groups(
        [
            group("E", 3, "10", "20", ["a1", "a2", "a3"], "A"),
            group("F", 4, "05", "06", ["b9"], "B"),
            group("E", 2, "05", "30", ["b1", "b2", "b3", "b4"], "B"),
        ]
    )
    assert [(g["key"], g["count"]) for g in merged] == [("E", 5), ("F", 4)]
    e = merged[0]
    assert (e["first_seen"], e["last_seen"]) == ("2026-01-01T00:00:05Z", "2026-01-01T00:00:30Z")
    assert e["run_ids"] == ["b1", "b2", "b3", "b4", "a1"]
    assert e["daemons"] == ["B", "A"] and e["example"]["message"] == "B"
    assert "daemon" not in e
    assert merge_groups([group("E", 1, "01", "01", ["x"], "A")], limit=1)[0]["count"] == 1


def test_group_failures_groups_records_like_a_daemon() -> None:
    records = merge_failures(
        [failure("r1", "01", "A"), failure("r2", "02", "B"), failure("r3", "03", "B", cls="G")]
    )
    groups = group_failures(records, "class")
    assert [(g["key"], g["count"], g["run_ids"]) for g in groups] == [
        ("E", 2, ["r2", "r1"]),
        ("G", 1, ["r3"]),
    ]
    assert group_failures(records, "category")[0]["key"] == "unknown"


def test_total_counts_adds_states() -> None:
    assert total_counts([{"running": 1, "succeeded": 2}, {"succeeded": 3}]) == {
        "running": 1,
        "succeeded": 5,
    }


def heard(**states: list[tuple[str, int]]) -> dict[str, dict[str, str]]:
    """A daemon's status `runs`: by state, (run id, heard at ms) joined as it sends them."""
    return {
        state: {"ids": " ".join(r for r, _ in runs), "heard": " ".join(str(t) for _, t in runs)}
        for state, runs in states.items()
    }


def test_counts_once_keeps_the_copy_merge_runs_keeps() -> None:
    a = heard(pending=[("R1", 100), ("R2", 100)], succeeded=[("R3", 100)])
    b = heard(running=[("R1", 200)], failed_crash=[("R2", 100), ("R4", 50)])
    c = heard(succeeded=[("R1", 300), ("R5", 10)])
    # R1 ends succeeded (heard last on C); R2 keeps A's copy (equal times: the first).
    assert counts_once([a, b, c]) == {"pending": 1, "succeeded": 3, "failed_crash": 1}
    assert counts_once([a, b]) == {"pending": 1, "running": 1, "succeeded": 1, "failed_crash": 1}
    assert counts_once([a]) == {"pending": 2, "succeeded": 1}
    assert counts_once([]) == {}
    ids = [{state: {"ids": one["ids"]} for state, one in h.items()} for h in (a, b)]
    assert counts_once(ids) is None  # R1 known twice: which copy counts needs the times
    assert counts_once([ids[0], heard(running=[("R9", 1)])]) == {
        "pending": 2,
        "succeeded": 1,
        "running": 1,
    }
    runs = [
        {**run(r, "00.000", d, ended), "state": st}
        for r, d, st, ended in (
            ("R1", "a", "pending", None),
            ("R2", "a", "pending", None),
            ("R3", "a", "succeeded", None),
            ("R1", "b", "running", "00.200"),
            ("R2", "b", "failed_crash", None),
            ("R4", "b", "failed_crash", None),
        )
    ]
    assert counts_once([a, b]) == dict(Counter(r["state"] for r in merge_runs(runs)))


def test_parse_export_sorts_lines_and_warns() -> None:
    record = {
        **failure("r1", "01", "x"),
        "reason": "crash",
        "experiment": "e",
        "timestamp": "t",
        "details": {},
    }
    lines = [json.dumps(record), '{"state": "running"}', "42", "{"]
    runs, records, warnings = parse_export("f.jsonl", lines)
    assert runs == []
    assert records == [
        {
            **{k: v for k, v in record.items() if k not in ("timestamp", "details")},
            "daemon": "f.jsonl",
        }
    ]
    assert warnings == [
        "f.jsonl:2: bad or missing 'run_id', skipped",
        "f.jsonl:3: neither a run nor a failure record, skipped",
        "f.jsonl:4: not JSON, skipped",
    ]


# --- a registry on a network filesystem ---------------------------------------------

MOUNTINFO = textwrap.dedent("""\
    27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
    40 27 0:50 / /home rw,relatime - nfs4 filer:/home rw,vers=4.2
    41 40 0:51 / /home/me/local\\040disk rw shared:7 - ext4 /dev/vdb rw
    42 27 0:52 / /data rw - ext4 /dev/vdc rw
    43 42 0:53 / /data rw - fuse.sshfs me@login:/data rw
    44 27 0:54 / /databases rw - xfs /dev/vdd rw
    bad line
""")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/home/me/.local/state/runnerd", ("/home", "nfs4")),
        ("/home", ("/home", "nfs4")),
        ("/home/me/local disk/runnerd", ("/home/me/local disk", "ext4")),
        ("/data/x", ("/data", "fuse.sshfs")),  # the mount stacked last is the one seen
        ("/databases/x", ("/databases", "xfs")),
        ("/var/tmp", ("/", "ext4")),
    ],
)
def test_mount_of_finds_the_longest_mount_point(path: str, expected: tuple[str, str]) -> None:
    assert mount_of(path, MOUNTINFO) == expected


def test_network_mount_only_names_network_filesystems(tmp_path: Path) -> None:
    here = str(tmp_path.resolve())
    assert network_mount(tmp_path, "1 0 0:1 / / rw - ext4 /dev/vda rw\n") is None
    assert network_mount(tmp_path, f"1 0 0:1 / {here} rw - cifs //srv/x rw\n") == (here, "cifs")
    assert network_mount(tmp_path, "") is None


async def test_the_registry_refuses_a_network_filesystem(tmp_path: Path) -> None:
    db = tmp_path / "state" / "registry.sqlite3"
    fake = f"1 0 0:1 / / rw - ext4 /dev/vda rw\n2 1 0:2 / {tmp_path.resolve()} rw - nfs s:/x rw\n"
    registry = Registry(db, mountinfo=lambda: fake)
    with pytest.raises(RunnerdError) as caught:
        await registry.open()
    message = caught.value.message
    assert str(db) in message and "on nfs" in message and "WAL" in message
    assert "/var/tmp" in message and "$TMPDIR" in message
    assert not db.exists()


def test_the_daemon_exits_1_naming_the_path_and_type(short_tmp: Path) -> None:
    """The real `runnerd` entry point, with the mount table it reads swapped for a fake."""
    fake = short_tmp / "mountinfo"
    fake.write_text(
        "1 0 0:1 / / rw - ext4 /dev/vda rw\n"
        f"2 1 0:2 / {short_tmp.resolve()} rw - lustre mds@o2ib:/fs rw\n"
    )
    daemon = Daemon(short_tmp)
    code = (
        "import sys; from pathlib import Path; import runnerd.mounts as m; "
        f"m.MOUNTINFO = Path({str(fake)!r}); from runnerd.server import main; "
        "sys.argv[0] = 'runnerd'; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=daemon.env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert f"refusing the registry {daemon.db}" in result.stderr and "lustre" in result.stderr
    assert not daemon.db.exists() and not daemon.socket.exists()
