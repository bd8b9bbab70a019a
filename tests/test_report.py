"""runnerctl report: the counts, the failure groups, and the HTML page in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for
from runnerd.cli.report import COLOURS

MIXED = textwrap.dedent("""
    import os, signal, sys
    import runnerd_client as rd
    client = rd.connect()
    for n in range(2):
        client.run("nightly", variation=f"ok-{n}").start().succeed()
    for n in range(2):
        run = client.run("nightly", variation=f"bad-{n}").start()
        try:
            raise ValueError(f"bad learning rate {n}.5")
        except ValueError as exc:
            run.fail(exc=exc)
    client.run("nightly", variation="gave-up").start().fail("abandoned", "gave up")
""")


def runnerctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runnerd.cli", *args],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def nightly(daemon: Daemon) -> Daemon:
    """Runs that succeeded, crashed two ways, timed out and were abandoned."""
    proc = daemon.python(MIXED)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (
        runnerctl(
            daemon,
            "exec",
            "--experiment",
            "nightly",
            "--variation",
            "slow",
            "--timeout",
            "0.5",
            "--",
            "sleep",
            "30",
        ).returncode
        != 0
    )
    assert (
        runnerctl(
            daemon,
            "exec",
            "--experiment",
            "nightly",
            "--variation",
            "killed",
            "--",
            "sh",
            "-c",
            "kill -KILL $$",
        ).returncode
        == 137
    )
    return daemon


def test_report_json_counts_each_outcome(nightly: Daemon) -> None:
    body: dict[str, Any] = nightly.ctl_json("report", "--since", "1h")
    assert body["runs"] == 7
    assert body["counts"] == {
        "succeeded": 2,
        "failed_crash": 3,
        "failed_abandoned": 1,
        "failed_timeout": 1,
    }
    groups = {g["failure_class"]: g for g in body["failure_groups"]}
    assert groups["ValueError"]["count"] == 2
    assert groups["ValueError"]["category"] == "validation"
    assert groups["Signal:SIGKILL"]["retryable"] is True
    assert groups["Timeout"]["category"] == "timeout"
    assert all(g["suggestion"] for g in body["failure_groups"])
    assert len(body["longest"]) == 5
    assert body["running"] == []
    assert "Failures by signature" in nightly.ctl("report").stdout


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    chromium() is None, reason="chromium is not installed (.ci/run installs Debian's chromium)"
)
def test_report_html_renders_offline_in_a_browser(nightly: Daemon, short_tmp: Path) -> None:
    page = short_tmp / "report.html"
    result = runnerctl(nightly, "report", "--since", "1h", "--html", str(page))
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert not re.search(r"(src|href)\s*=|https?://|@import|url\(", text)
    browser = chromium()
    assert browser is not None
    profile = short_tmp / "chromium-profile"
    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    bars = re.findall(r'<rect class="bar state-([a-z_]+)"[^>]*fill="(#[0-9a-f]+)"', dom.stdout)
    assert len(bars) == 7
    assert all(COLOURS[state] == colour for state, colour in bars)
    assert sorted(state for state, _ in bars) == sorted(
        ["succeeded"] * 2 + ["failed_crash"] * 3 + ["failed_abandoned", "failed_timeout"]
    )
    assert dom.stdout.count('class="failure-mark"') == 5
    assert dom.stdout.count('<tr class="group">') == 4
    shot = short_tmp / "report.png"
    subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1300,900",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    wait_for(lambda: shot.exists() and shot.stat().st_size > 10_000, what="the screenshot")
