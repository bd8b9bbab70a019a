"""A command sweep's cells from the command line (--grid, --grid-file), checked before the
sweep is recorded: a usage error names what is wrong, and nothing is stored."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import click

from runnerd_client.cells import SpecError, expand, grid_values, placeholders


def cells_spec(grid: tuple[str, ...], grid_file: str | None) -> dict[str, Any]:
    """{"grid": ...} or {"cells": ...} from --grid K=V1,V2 options and a JSON/TOML file."""
    spec: dict[str, Any] = {}
    if grid_file:
        spec = _read_grid_file(Path(grid_file))
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise click.BadParameter(f"{item!r} is not K=V1,V2,...", param_hint="--grid")
        if "cells" in spec:
            raise click.BadParameter("a list of cells and --grid do not mix", param_hint="--grid")
        try:
            spec.setdefault("grid", {})[key] = grid_values(key, values)
        except SpecError as exc:
            raise click.BadParameter(str(exc), param_hint="--grid") from None
    return spec


def _read_grid_file(path: Path) -> dict[str, Any]:
    """A file of cells (a list, or {"cells": [...]}) or of a grid ({"grid": {...}} or a map
    of value lists), as JSON or, by its suffix, TOML."""
    try:
        data = (
            tomllib.loads(path.read_text())
            if path.suffix == ".toml"
            else json.loads(path.read_text())
        )
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--grid-file") from None
    if isinstance(data, list):
        return {"cells": data}
    if isinstance(data, dict) and ("cells" in data or "grid" in data):
        return {k: data[k] for k in ("cells", "grid") if k in data}
    return {"grid": data}


def checked_cells(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The spec's cells, or a usage error naming what is wrong with them."""
    try:
        cells = list(expand(spec))
    except SpecError as exc:
        raise click.UsageError(str(exc)) from None
    missing = placeholders(spec["command"]) - set().union(*(c.keys() for c in cells))
    if missing:
        raise click.UsageError(f"the command uses {', '.join(sorted(missing))}, which no cell has")
    return cells
