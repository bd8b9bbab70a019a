"""Labels reach the node where the run lived: the scheduler plugin's infrastructure labels
(`oom`, `walltime`, `retired`, `killed_worker`) are told to the daemon of the dead worker's
node, through a live worker of that node (Dask's `Client.run`), not to the daemon beside
the scheduler.

Each worker's plugin announces its node (host and daemon socket) when it is set up. When a
worker dies, its runs' labels go to another worker of the same node; if there is none
right then (the nanny is still restarting it after an OOM kill), they are held until a
worker of that node announces itself. Nothing here blocks the scheduler's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

from runnerd_client import dask_nodes, paths

log = logging.getLogger("runnerd_client.dask")
NODE_TOPIC = "runnerd-node"  # the event a worker logs once, naming its node
Node = tuple[str, str]  # (host, daemon socket)
Label = tuple[str, str, str]  # (run_id, label, note)


def announce(worker: Any, socket_path: str | None) -> None:
    """On a worker being set up: tell the scheduler which node's daemon its runs go to."""
    path = Path(socket_path) if socket_path else paths.socket_path()
    worker.log_event(
        NODE_TOPIC, {"worker": worker.address, "host": socket.gethostname(), "socket": str(path)}
    )


def local_node(socket_path: str | None) -> Node:
    """This process's node: its host, and the daemon socket it would report to."""
    return (socket.gethostname(), str(Path(socket_path) if socket_path else paths.socket_path()))


class NodeLabels:
    """The scheduler side: each worker's node, and the labels on their way to a node."""

    def __init__(self, local: Node) -> None:
        self.local = local  # the scheduler's own node: its daemon is reached directly
        self.nodes: dict[str, Node] = {}  # worker address -> its node
        self.held: dict[Node, list[Label]] = {}
        self.delivered: list[tuple[str, str, Node]] = []  # (run_id, label, node), to inspect
        self._client: Any = None
        self._connecting = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def seen(self, scheduler: Any, msg: dict[str, Any]) -> None:
        """A worker announced its node: labels held for that node can go now."""
        node = (str(msg.get("host")), str(msg.get("socket")))
        self.nodes[str(msg.get("worker"))] = node
        for held in self.held.pop(node, []):
            self._spawn(self._deliver(scheduler, node, held))

    def send(self, scheduler: Any, worker: str | None, label: Label) -> bool:
        """Label a run of `worker` in its node's daemon; False if its node is unknown."""
        node = self.nodes.get(worker or "")
        if node is None:
            return False
        self._spawn(self._deliver(scheduler, node, label))
        return True

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, scheduler: Any, node: Node, label: Label) -> None:
        if node == self.local:
            reply = await asyncio.to_thread(dask_nodes.label_at, node[1], *label)
            self._done(node, label, reply)
            return
        live = [w for w, n in self.nodes.items() if n == node and w in scheduler.workers]
        if not live:
            log.info(
                "run %s: label %s held until a worker of %s:%s is back", label[0], label[1], *node
            )
            self.held.setdefault(node, []).append(label)
            return
        try:
            client = await self._client_of(scheduler)
            replies = await client.run(
                dask_nodes.label, *label, workers=live[:1], on_error="return"
            )
        except Exception as exc:  # the scheduler's loop must go on: say why, keep nothing
            log.warning("run %s not labelled %s on %s:%s: %r", label[0], label[1], *node, exc)
            return
        self._done(node, label, next(iter(replies.values()), None))

    def _done(self, node: Node, label: Label, reply: Any) -> None:
        if not isinstance(reply, dict) or "error" in reply:
            log.warning(
                "run %s not labelled %s on %s:%s: %s",
                label[0],
                label[1],
                *node,
                reply.get("error") if isinstance(reply, dict) else reply,
            )
            return
        self.delivered.append((label[0], label[1], node))

    async def _client_of(self, scheduler: Any) -> Any:
        """A client of this scheduler, with its security, made once."""
        async with self._connecting:
            if self._client is None:
                from distributed import Client

                self._client = await Client(  # type: ignore[no-untyped-call]
                    scheduler.address,
                    asynchronous=True,
                    security=scheduler.security,
                    set_as_default=False,
                )
            return self._client

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.close()
