"""`runnerctl --dask ADDRESS ...`: the daemon of every node of a Dask cluster, asked through
the cluster itself (SPEC §10).

Dask runs a small function on one worker of each node (`Client.run`) that asks that node's
daemon on its local socket (runnerd_client.dask_nodes): no socket forwarding, no port of
runnerd's own, and Dask's own security (its TLS settings) applies. The answers are merged
as those of several `--socket`. A node whose daemon cannot be reached, or a worker that
cannot run the function, is named and left out; only when no node answers does a command
exit 3. Imports `distributed`, and the functions run on the workers (which bring asyncio),
only when used, so that plain runnerctl starts without them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click

from runnerd.cli.common import EXIT_ERROR, EXIT_UNREACHABLE, fail
from runnerd.cli.daemons import Answer
from runnerd.cli.merge import Item
from runnerd_client.connection import DaemonUnavailable
from runnerd_client.protocol import Request, RunnerdError, request_map

CONNECT_TIMEOUT = "10s"


@dataclass
class Cluster:
    """A client of the cluster, and for each node (host:socket) the worker that asks it."""

    client: Any
    address: str
    nodes: dict[str, str] = field(default_factory=dict)
    broken: list[Answer] = field(default_factory=list)  # workers that could not say
    held: dict[str, Item] | None = None  # labels held by the scheduler, once asked


def connect(address: str) -> Cluster:
    """Connect to the scheduler (exit 3 if it cannot be reached) and find the nodes."""
    from runnerd_client import dask_nodes

    try:
        import distributed
    except ImportError:
        fail("--dask needs Dask's distributed (pip install 'runnerd[dask]')", EXIT_ERROR)
    try:
        client = distributed.Client(  # type: ignore[no-untyped-call]
            address, timeout=CONNECT_TIMEOUT, set_as_default=False
        )
    except (OSError, TimeoutError, ValueError) as exc:
        fail(f"cannot reach the Dask scheduler at {address}: {exc}", EXIT_UNREACHABLE)
    cluster = Cluster(client, address)
    found = client.run(dask_nodes.node, on_error="return")
    if not found:
        client.close()  # type: ignore[no-untyped-call]
        fail(f"the Dask cluster at {address} has no workers", EXIT_UNREACHABLE)
    for worker, where in sorted(found.items()):
        if isinstance(where, BaseException):
            cluster.broken.append(
                Answer(
                    f"worker {worker}",
                    error=DaemonUnavailable(
                        f"worker {worker} could not run runnerd's query: {where!r}"
                    ),
                )
            )
        else:
            cluster.nodes.setdefault(f"{where['host']}:{where['socket']}", worker)
    return cluster


def cluster_of(ctx: click.Context) -> Cluster:
    """The command's one connection to the cluster, closed when the command ends."""
    cluster: Cluster | None = ctx.obj.get("cluster")
    if cluster is None:
        cluster = ctx.obj["cluster"] = connect(ctx.obj["dask"])
        ctx.call_on_close(cluster.client.close)
    return cluster


def _answer(name: str, reply: Any) -> Answer:
    if isinstance(reply, BaseException):
        return Answer(
            name, error=DaemonUnavailable(f"{name}: the query failed on its worker: {reply!r}")
        )
    error = reply.get("error")
    if error is None:
        return Answer(name, body=reply["body"])
    if error["unreachable"]:
        return Answer(name, error=DaemonUnavailable(f"{name}: {error['message']}"))
    return Answer(name, error=RunnerdError(error["code"], error["message"]))


def run_on_nodes(
    cluster: Cluster, function: Callable[..., Any], *args: Any, nodes: list[str] | None = None
) -> dict[str, Any]:
    """`function(*args)` on one worker of each node (or of `nodes`): node -> its result."""
    chosen = {name: cluster.nodes[name] for name in nodes or cluster.nodes}
    replies = cluster.client.run(function, *args, workers=list(chosen.values()), on_error="return")
    return {
        name: replies.get(worker, DaemonUnavailable(f"worker {worker} is gone"))
        for name, worker in chosen.items()
    }


def ask_each(ctx: click.Context, req: Request) -> list[Answer]:
    """Every node's answer to `req`, in node order; broken workers named as unreachable."""
    from runnerd_client import dask_nodes

    cluster = cluster_of(ctx)
    replies = run_on_nodes(cluster, dask_nodes.ask, request_map(req))
    return [*(_answer(name, replies[name]) for name in sorted(replies)), *cluster.broken]


def held_labels(ctx: click.Context) -> dict[str, Item]:
    """run_id -> the label the scheduler holds for it (with its `node`), for runs whose node
    has no live worker; none from a scheduler without runnerd's plugin."""
    from runnerd_client.dask_scheduler import held_labels as held

    cluster = cluster_of(ctx)
    if cluster.held is None:
        try:
            found = cluster.client.run_on_scheduler(held)
        except Exception:  # runnerd (or its plugin) not on the scheduler: it holds nothing
            found = []
        cluster.held = {}
        for label in found if isinstance(found, list) else []:
            node = f"{label['host']}:{label['socket']}"
            if node not in cluster.nodes:  # else that node's worker is delivering it
                cluster.held[label["run_id"]] = {**label, "node": node}
    return cluster.held


def follow_nodes(
    ctx: click.Context, filters: dict[str, Any], nodes: list[str] | None = None, wait: float = 1.0
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(node, event) as they happen on every node (or on `nodes`), polled through Dask
    about every `wait` seconds; a node that cannot be followed is said so once."""
    from runnerd_client import dask_nodes

    cluster = cluster_of(ctx)
    follow_id = uuid.uuid4().hex
    warned: set[str] = set()
    try:
        while True:
            replies = run_on_nodes(cluster, dask_nodes.poll, follow_id, filters, wait, nodes=nodes)
            batch: list[tuple[str, dict[str, Any]]] = []
            for name, reply in sorted(replies.items()):
                if isinstance(reply, dict) and "events" in reply:
                    batch += [(name, event) for event in reply["events"]]
                    continue
                error = _answer(name, reply).error
                if error is not None and name not in warned:
                    warned.add(name)
                    click.echo(f"runnerctl: warning: {error.message}", err=True)
            yield from sorted(batch, key=lambda item: str(item[1].get("at")))
    finally:
        run_on_nodes(cluster, dask_nodes.stop_following, follow_id, nodes=nodes)
