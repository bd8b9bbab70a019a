"""The morning report: what ran in a window, what failed and why, as data, text or one
self-contained HTML page with a timeline (no network, no external scripts or styles)."""

from __future__ import annotations

import html
import json
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from runnerd.diagnosis import diagnose

Run = dict[str, Any]
COLOURS = {
    "succeeded": "#2e7d32",
    "failed_crash": "#c62828",
    "failed_abandoned": "#ef6c00",
    "failed_timeout": "#8e24aa",
    "failed_lost": "#6d4c41",
    "lost": "#fbc02d",
    "running": "#1565c0",
    "pending": "#90a4ae",
}


def _epoch(ts: str | None) -> float | None:
    return datetime.fromisoformat(ts).timestamp() if ts else None


def runtime(run: Run, now: float) -> float:
    start = _epoch(run["started_at"]) or _epoch(run["created_at"]) or now
    return (_epoch(run["ended_at"]) or now) - start


def failure_groups(runs: Sequence[Run], examples: int = 5) -> list[dict[str, Any]]:
    """Failed runs grouped by signature, with the diagnosis of each group, largest first."""
    groups: dict[str, dict[str, Any]] = {}
    for run in runs:
        failure = run.get("failure")
        if not failure:
            continue
        found = diagnose(failure)
        group = groups.setdefault(
            failure["signature"],
            {
                "signature": failure["signature"],
                "count": 0,
                "run_ids": [],
                "failure_class": failure["failure_class"],
                "message": failure["message"],
                "category": found.category,
                "retryable": found.retryable,
                "suggestion": found.suggestion,
            },
        )
        group["count"] += 1
        if len(group["run_ids"]) < examples:
            group["run_ids"].append(run["run_id"])
    return sorted(groups.values(), key=lambda g: -g["count"])


def build(runs: Sequence[Run], since: float, now: float | None = None) -> dict[str, Any]:
    """The report's data: counts by state, failure groups, the longest and the live runs."""
    now = time.time() if now is None else now
    by_length = sorted(runs, key=lambda r: runtime(r, now), reverse=True)
    return {
        "since": since,
        "until": now,
        "runs": len(runs),
        "counts": dict(Counter(run["state"] for run in runs)),
        "failure_groups": failure_groups(runs),
        "longest": [
            {
                "run_id": r["run_id"],
                "experiment": r["experiment"],
                "state": r["state"],
                "runtime_sec": round(runtime(r, now), 3),
            }
            for r in by_length[:5]
        ],
        "running": [r["run_id"] for r in runs if r["state"] in ("running", "lost", "pending")],
    }


# --- HTML ----------------------------------------------------------------------

ROW, LEFT, WIDTH = 18, 260, 900

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; text-align: left; }
tr:nth-child(even) { background: #f4f4f4; }
.bar { cursor: pointer; } .bar:hover { opacity: 0.75; }
.label { font: 11px monospace; fill: #333; }
#details { white-space: pre-wrap; font: 12px monospace; background: #f7f7f7; padding: 8px;
           min-height: 2em; border: 1px solid #ddd; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px; }
"""

SCRIPT = """
const runs = JSON.parse(document.getElementById('runs').textContent);
document.querySelectorAll('.bar').forEach(bar => bar.addEventListener('click', () => {
  document.getElementById('details').textContent =
    JSON.stringify(runs[bar.dataset.run], null, 2);
}));
"""


def _span_of(runs: Sequence[Run], since: float, until: float) -> tuple[float, float]:
    """The stretch of time the runs cover (within the window), with a little margin."""
    if not runs:
        return since, until
    first = max(since, min(_epoch(r["created_at"]) or since for r in runs))
    last = max(_epoch(r["ended_at"]) or until for r in runs)
    margin = max((last - first) * 0.03, 0.5)
    return first - margin, min(until, last + margin)


def _x(ts: float, since: float, until: float) -> float:
    return LEFT + (ts - since) / max(until - since, 1e-9) * WIDTH


def _bar(index: int, run: Run, since: float, until: float) -> str:
    start = max(_epoch(run["started_at"]) or _epoch(run["created_at"]) or since, since)
    end = _epoch(run["ended_at"]) or until
    x0, x1 = _x(start, since, until), _x(end, since, until)
    y = 30 + index * ROW
    title = html.escape(
        f"{run['run_id']} {run['experiment']}/{run['variation']} #{run['attempt']}: {run['state']}"
    )
    parts = [
        f'<text class="label" x="4" y="{y + 12}">{html.escape(run["experiment"][:18])} '
        f"{html.escape(run['run_id'][-8:])}</text>",
        f'<rect class="bar state-{run["state"]}" data-run="{html.escape(run["run_id"])}" '
        f'x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 2):.1f}" height="{ROW - 4}" '
        f'fill="{COLOURS.get(run["state"], "#999")}"><title>{title}</title></rect>',
    ]
    if run.get("failure"):
        parts.append(
            f'<circle class="failure-mark" cx="{x1:.1f}" cy="{y + (ROW - 4) / 2}" '
            f'r="5" fill="#000"><title>{html.escape(run["failure"]["failure_class"])}'
            f"</title></circle>"
        )
    return "".join(parts)


def _axis(since: float, until: float, height: int) -> str:
    ticks = []
    for i in range(6):
        ts = since + (until - since) * i / 5
        x = _x(ts, since, until)
        label = datetime.fromtimestamp(ts).strftime("%H:%M:%S")
        anchor = "end" if i == 5 else "middle"
        ticks.append(
            f'<line x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{height}" stroke="#ddd"/>'
            f'<text class="label" x="{x:.1f}" y="14" text-anchor="{anchor}">'
            f"{label}</text>"
        )
    return "".join(ticks)


def _groups_table(report: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr class="group"><td>{g["count"]}</td><td>{html.escape(g["category"])}</td>'
        f"<td>{'yes' if g['retryable'] else 'no'}</td>"
        f"<td>{html.escape(g['failure_class'])}: {html.escape(g['message'][:120])}</td>"
        f"<td>{html.escape(g['suggestion'])}</td>"
        f"<td>{html.escape(' '.join(g['run_ids']))}</td></tr>"
        for g in report["failure_groups"]
    )
    return (
        '<table id="groups"><tr><th>count</th><th>category</th><th>retryable</th>'
        f"<th>failure</th><th>suggestion</th><th>runs</th></tr>{rows}</table>"
    )


def render_html(report: dict[str, Any], runs: Sequence[Run]) -> str:
    """One self-contained page: summary, timeline, failure groups, details on click."""
    ordered = sorted(runs, key=lambda r: r["created_at"])
    since, until = _span_of(ordered, report["since"], report["until"])
    height = 40 + len(ordered) * ROW
    bars = "".join(_bar(i, run, since, until) for i, run in enumerate(ordered))
    axis = _axis(since, until, height)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(report["counts"].items()))
    legend = "".join(f'<span><i style="background:{c}"></i>{s}</span>' for s, c in COLOURS.items())
    data = json.dumps({r["run_id"]: r for r in ordered}).replace("</", "<\\/")
    window = (
        f"{datetime.fromtimestamp(since):%Y-%m-%d %H:%M} to "
        f"{datetime.fromtimestamp(until):%Y-%m-%d %H:%M}"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>runnerd report</title>
<style>{STYLE}</style></head><body>
<h1>runnerd report: {window}</h1>
<p id="summary">{report["runs"]} run(s): {html.escape(counts) or "none"}</p>
<div class="legend">{legend}</div>
<h2>Timeline</h2>
<svg id="timeline" width="{LEFT + WIDTH + 20}" height="{height}">{axis}{bars}</svg>
<h2>Run details (click a bar)</h2><div id="details"></div>
<h2>Failures by signature</h2>{_groups_table(report)}
<script type="application/json" id="runs">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""
