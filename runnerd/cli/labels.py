"""Labels the Dask scheduler still holds (`oom`, `walltime`, `retired`, `killed_worker`)
for runs whose node has no live worker to deliver them to its daemon
(runnerd_client.dask_labels), joined at query time to what `runnerctl --dask` shows: each
as that daemon will apply it once a worker of the node is back and delivers it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from runnerd.cli.merge import Item

SHOWN_PER_NODE = 5  # held runs named in a node's note


def relabelled(failure: Item, label: Item) -> Item:
    """A failure record re-diagnosed with the label, as its daemon will on delivery (the
    diagnosis rules imported only then: plain runnerctl starts without them)."""
    from runnerd.diagnosis import relabel

    message, found = relabel(failure, label["category"], label["note"])
    return {**failure, "message": message, "category": found.category, "retryable": found.retryable}


def held(label: Item) -> Item:
    """What a run or record shows of the label: `held` says its daemon has not had it."""
    return {
        "category": label["category"],
        "note": label["note"],
        "node": label["node"],
        "held": True,
    }


def join_runs(runs: Iterable[Item], labels: Mapping[str, Item]) -> list[Item]:
    """Runs with the labels held for them: `label`, and a failure re-diagnosed with it."""
    joined = []
    for run in runs:
        label = labels.get(run["run_id"])
        if label is not None:
            failure = run.get("failure")
            run = {**run, "label": held(label)}
            if failure:
                run["failure"] = relabelled(failure, label)
        joined.append(run)
    return joined


def join_records(records: Iterable[Item], labels: Mapping[str, Item]) -> list[Item]:
    """Failure records re-diagnosed with the labels held for their runs."""
    return [
        {**relabelled(record, labels[record["run_id"]]), "label": held(labels[record["run_id"]])}
        if record["run_id"] in labels
        else record
        for record in records
    ]


def unshown(labels: Mapping[str, Item], shown: Iterable[str | None]) -> list[str]:
    """For each node with held labels for runs not shown (its daemon cannot be asked: no
    worker of it is alive), a line naming it and those runs."""
    seen = set(shown)
    by_node: dict[str, list[Item]] = {}
    for run_id, label in labels.items():
        if run_id not in seen:
            by_node.setdefault(label["node"], []).append(label)
    lines = []
    for node, held_here in sorted(by_node.items()):
        named = ", ".join(f"{h['run_id']} {h['category']}" for h in held_here[:SHOWN_PER_NODE])
        more = len(held_here) - SHOWN_PER_NODE
        lines.append(
            f"node {node} has no live worker; the Dask scheduler holds the label of "
            f"{len(held_here)} run(s) there until one is back: {named}"
            + (f" and {more} more" if more > 0 else "")
        )
    return lines
