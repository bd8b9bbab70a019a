"""notata's files and recipes: folders written by the real notata library are imported as
they are (each folder a run, a traceback however deep attached, params read), and
notata's own grep/jq recipes work verbatim on runnerd's run folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import traceback
from pathlib import Path
from typing import Any

import notata
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conftest import Daemon, wait_for
from runnerd.foreign_params import simple_yaml


def notata_run(
    base: Path, run_id: str, error: Exception | None = None, params: dict[str, Any] | None = None
) -> Path:
    """A run written by notata's Logbook, as its README shows: a failure's traceback saved
    with `log.text("artifacts/debug/traceback", tb)` before the exception leaves the block."""
    try:
        with notata.Logbook(run_id, base_dir=base, params=params) as log:
            log.info("training")
            if error is not None:
                try:
                    raise error
                except Exception:
                    log.text("artifacts/debug/traceback", traceback.format_exc())
                    raise
    except Exception as exc:
        assert exc is error
    return Path(log.path)


def imported(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """The imported runs, by their folder."""
    return {
        r["run_dir"]: r
        for r in daemon.ctl_json("list", "--limit", "1000")
        if r["tags"].get("source") == "imported"
    }


def test_real_notata_folders_are_imported_each_folder_a_run(
    daemon: Daemon, short_tmp: Path
) -> None:
    root = short_tmp / "notata"
    stable = notata_run(
        root / "outputs", "stable", params={"lr": 0.001, "model": "ridge", "layers": [64, 32]}
    )
    unstable = notata_run(root / "outputs", "unstable", ZeroDivisionError("division by zero"))
    again = notata_run(root / "outputs2", "unstable", RuntimeError("loss is NaN at step 7"))
    deep = unstable / "artifacts" / "artifacts" / "debug" / "traceback.txt"
    assert deep.is_file()  # where notata 0.3.0 puts it: three folders below the run's

    result = daemon.ctl("watch", str(root))
    assert "3 run(s) imported" in result.stdout, result.stdout + result.stderr
    runs = imported(daemon)
    assert set(runs) == {str(stable), str(unstable), str(again)}
    assert runs[str(stable)]["state"] == "succeeded"
    assert daemon.ctl_json("show", runs[str(stable)]["run_id"])["params"] == {
        "lr": 0.001,
        "model": "ridge",
        "layers": [64, 32],
    }
    first = daemon.ctl_json("show", runs[str(unstable)]["run_id"])
    second = daemon.ctl_json("show", runs[str(again)]["run_id"])
    assert first["run_id"] != second["run_id"]
    for run in (first, second):
        assert run["tags"] == {"source": "imported", "foreign_run_id": "unstable"}
        assert run["state"] == "failed_crash"
    assert first["failure"]["message"] == "division by zero"
    assert second["failure"]["message"] == "loss is NaN at step 7"
    assert [f["path"] for f in first["crash_files"]] == [str(deep)]
    assert "ZeroDivisionError: division by zero" in first["failure"]["traceback"]
    assert "RuntimeError: loss is NaN at step 7" in second["failure"]["traceback"]
    assert (first["experiment"], second["experiment"]) == ("outputs", "outputs2")

    again_scan = daemon.ctl("watch", str(root))
    assert "0 run(s) imported" in again_scan.stdout
    assert "3 already known" in again_scan.stdout
    assert len(imported(daemon)) == 3


def test_a_notata_run_followed_while_it_runs_ends_as_its_file_says(
    daemon: Daemon, short_tmp: Path
) -> None:
    root = short_tmp / "live"
    root.mkdir()
    daemon.ctl("watch", str(root))
    log = notata.Logbook("live", base_dir=root / "outputs", params={"lr": 0.1})
    folder = str(log.path)
    wait_for(
        lambda: imported(daemon).get(folder, {}).get("state") == "lost",
        what="the running notata run to be imported (unfinished: lost)",
    )
    try:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except RuntimeError as exc:
        log.text("artifacts/debug/traceback", traceback.format_exc())
        log.mark_failed(str(exc))

    def ended() -> dict[str, Any] | None:
        run: dict[str, Any] = daemon.ctl_json("show", imported(daemon)[folder]["run_id"])
        failure = run["failure"]
        return run if failure and failure["traceback"] else None

    run = wait_for(ended, what="the run to end as its metadata.json says, with its traceback")
    assert run["state"] == "failed_crash"
    assert run["failure"]["message"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert run["failure"]["category"] == "oom"
    assert "RuntimeError: CUDA out of memory" in run["failure"]["traceback"]
    assert run["params"] == {"lr": 0.1}
    assert [t["to"] for t in run["transitions"]] == ["pending", "lost", "failed_crash"]


def test_params_that_cannot_be_read_are_a_warning_and_the_run_is_imported(
    daemon: Daemon, short_tmp: Path
) -> None:
    root = short_tmp / "odd"
    anchors = notata_run(root / "outputs", "anchors")
    (anchors / "params.yaml").write_text("base: &b 1\nlr: *b\n")
    planted = notata_run(root / "outputs", "planted")
    secret = short_tmp / "secret.json"
    secret.write_text('{"token": "s3cr3t"}')
    (planted / "config.json").symlink_to(secret)
    result = daemon.ctl("watch", str(root))
    assert "2 run(s) imported" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 2, result.stderr
    assert any("params not imported from params.yaml" in w and "line 1" in w for w in warnings), (
        warnings
    )
    assert any("params not imported from config.json" in w for w in warnings), warnings
    for run in imported(daemon).values():
        assert daemon.ctl_json("show", run["run_id"])["params"] == {}


RECIPE_RUNS = textwrap.dedent("""
    import sys
    import runnerd_client as rd

    folder, mode = sys.argv[1], sys.argv[2]
    with rd.run("recipes", mode, run_dir=folder):
        if mode == "diverges":
            raise ValueError("loss diverged at step 42")
""")


def test_notatas_recipes_work_on_runnerd_folders(daemon: Daemon, short_tmp: Path) -> None:
    root = short_tmp / "runs"
    for mode in ("converges", "diverges"):
        proc = daemon.python(RECIPE_RUNS, str(root / mode), mode)
        proc.communicate(timeout=60)

    def written() -> dict[str, Any] | None:
        docs = {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/metadata.json")}
        done = len(docs) == 2 and all(d["end_time"] for d in docs.values())
        return docs if done else None

    docs = wait_for(written, what="both metadata.json files")
    assert (docs["converges"]["status"], docs["converges"]["state"]) == ("complete", "succeeded")
    failed = docs["diverges"]
    assert (failed["status"], failed["state"]) == ("failed", "failed_crash")
    assert failed["failure_class"] == "ValueError" and "category" in failed

    def shell(recipe: str) -> str:
        return subprocess.run(
            ["sh", "-c", recipe], cwd=root, capture_output=True, text=True, check=True
        ).stdout

    assert shell("""grep -l '"status": "failed"' */metadata.json""") == "diverges/metadata.json\n"
    assert shell("jq '.failure_reason' */metadata.json") == 'null\n"loss diverged at step 42"\n'

    # The crash indexer knows these folders for runs of ours: none is imported again.
    result = daemon.ctl("watch", str(root))
    assert "0 run(s) imported" in result.stdout and "2 already known" in result.stdout
    assert not imported(daemon)
    # A copy of one of our folders (rsync'd results, say) names a run of ours: not imported.
    copy = short_tmp / "copied" / "diverges"
    shutil.copytree(root / "diverges", copy)
    result = daemon.ctl("watch", str(copy.parent))
    assert "0 run(s) imported" in result.stdout and "1 already known" in result.stdout
    assert len(daemon.ctl_json("list")) == 2


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=30),
    st.floats(allow_nan=False, allow_infinity=False),
)
params = st.recursive(
    st.dictionaries(
        st.text(min_size=1, max_size=10), st.one_of(scalars, st.lists(scalars)), max_size=6
    ),
    lambda inner: st.dictionaries(st.text(min_size=1, max_size=10), inner, max_size=4),
    max_leaves=12,
)


@given(params)
def test_a_params_yaml_is_read_as_pyyaml_reads_it_or_refused(value: dict[str, Any]) -> None:
    text = yaml.dump(value, sort_keys=True)  # as notata writes it
    try:
        read = simple_yaml(text)
    except ValueError:
        return
    assert read == yaml.safe_load(text)


@pytest.mark.parametrize(
    "value",
    [
        {"lr": 0.001, "model": "ridge", "layers": [64, 32], "seed": 7, "dropout": None},
        {"optimizer": {"name": "adam", "betas": [0.9, 0.999]}, "tag": "run 3", "debug": False},
        {"path": "/data/x.csv", "note": "yes", "when": "2025-01-01", "big": 1e-05, "empty": []},
    ],
)
def test_notatas_usual_params_are_read(value: dict[str, Any]) -> None:
    assert simple_yaml(yaml.dump(value, sort_keys=True)) == value


@pytest.mark.parametrize(
    "text",
    [
        "a: &x 1\nb: *x\n",
        "a: !!python/tuple [1, 2]\n",
        "a: |\n  two\n  lines\n",
        "a: 012\n",
        "a: 1e5\n",
        "a: yes\n",
        "- 1\n",
        "a: {b: 1}\n",
        "a: 2001-12-14 21:59:43\n",
        "a:\n- b: 1\n",
        "a: 1\na: 2\n",
    ],
)
def test_what_is_not_plain_yaml_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="line|mapping"):
        simple_yaml(text)
