"""The cells of a sweep, as pure functions both sides share: the daemon expands a stored
spec into cells exactly as the CLI and the Python API plan them, so a resume planned by
one and checked by the other always talks about the same cells.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import string
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

MAX_VARIATION = 200


class SpecError(ValueError):
    """A grid, a cell list or a command template that cannot make cells."""


def expand(spec: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The cells of a spec: its explicit `cells`, else the Cartesian product of its `grid`
    (keys in the order given, the last one varying fastest)."""
    cells, grid = _source(spec)
    if cells is not None:
        yield from (dict(c) for c in cells)
        return
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, combo, strict=True))


def count(spec: Mapping[str, Any]) -> int:
    """How many cells a spec makes, without making them."""
    cells, grid = _source(spec)
    return len(cells) if cells is not None else math.prod(len(v) for v in grid.values())


def _source(spec: Mapping[str, Any]) -> tuple[list[dict[str, Any]] | None, dict[str, list[Any]]]:
    """A spec's explicit cells, or else its grid, checked."""
    cells = spec.get("cells")
    if cells is not None:
        if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
            raise SpecError("cells must be a list of maps")
        return cells, {}
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise SpecError("a sweep needs a grid (a map of value lists) or a list of cells")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"grid key {key!r} needs a non-empty list of values")
    return None, grid


def grid_values(key: str, given: str) -> list[Any]:
    """The values of one `--grid KEY=...`. Text that parses as JSON is JSON: a list gives
    the values (`'["ridge","lasso"]'`), anything else is the one value. Otherwise it is a
    comma-separated list, each value JSON where it parses (`0.1` a number, `adam` a
    string). Brackets, braces or quotes in text that is not JSON, or an empty value, are
    ambiguous: SpecError, never a cell named after half a list."""
    try:
        value = json.loads(given)
    except ValueError:
        pass
    else:
        return value if isinstance(value, list) else [value]
    if any(c in given for c in '[]{}"'):
        raise SpecError(
            f"{key}={given} is neither JSON nor a plain comma-separated list;"
            f' give a JSON list, e.g. {key}=\'["a","b,c"]\''
        )
    values = given.split(",")
    if "" in values:
        raise SpecError(f"{key}={given} has an empty value")
    return [_plain(v) for v in values]


def _plain(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def text(value: Any) -> str:
    """A parameter value as it appears in a variation or a command line."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def variation(params: Mapping[str, Any]) -> str:
    """A stable, readable name for a params map, its keys in the order given (a grid's, the
    order Hydra's overrides were written in): `x=3,lr=0.1`; a long one keeps its start and
    a hash of the whole. Compare cells with `cell_key` or `names_cell`, never by name alone:
    the same params in another order are named otherwise."""
    if not params:
        return "default"
    name = ",".join(f"{key}={text(value)}" for key, value in params.items())
    if len(name) <= MAX_VARIATION:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[: MAX_VARIATION - 17]}~{digest}"


def sorted_variation(params: Mapping[str, Any]) -> str:
    """The name of a params map with its keys sorted: what cells were named before names
    followed the order given (`lr=0.1,x=3`), still recorded in older registries."""
    return variation(dict(sorted(params.items())))


def cell_key(params: Mapping[str, Any]) -> str:
    """What a cell's params are, whatever the order of their keys: for matching cells
    (1, 1.0 and true differ, as in their names)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def names_cell(
    name: str, params: Mapping[str, Any], cell_name: str, cell_params: Mapping[str, Any]
) -> bool:
    """Whether an attempt named `name` with `params` is of a recorded cell: it has the
    cell's name, or the cell's params (in any key order) named in their order or sorted,
    as a client reading the cell back, or an older one, names them."""
    if name == cell_name:
        return True
    return cell_key(params) == cell_key(cell_params) and name in (
        variation(params),
        sorted_variation(params),
    )


class _Strict(dict[str, str]):
    def __missing__(self, key: str) -> str:
        raise SpecError(f"the command names {{{key}}}, which is not a parameter of the cell")


def substitute(command: Sequence[str], params: Mapping[str, Any]) -> list[str]:
    """The command of one cell: each `{name}` replaced by that parameter (`{{` is a brace)."""
    values = _Strict({key: text(value) for key, value in params.items()})
    try:
        return [arg.format_map(values) for arg in command]
    except (ValueError, IndexError, AttributeError) as exc:
        raise SpecError(f"bad placeholder in the command: {exc}") from None


def placeholders(command: Sequence[str]) -> set[str]:
    """The parameter names a command template uses."""
    names = set()
    for arg in command:
        for _, field, _, _ in string.Formatter().parse(arg):
            if field:
                names.add(field)
    return names


def differences(
    stored: Mapping[str, Any],
    given: Mapping[str, Any],
    keys: Sequence[str] = ("command", "grid", "cells", "function"),
) -> list[str]:
    """What a spec given again changes in the stored one, one line per changed key."""
    out = []
    for key in keys:
        if key in given and given[key] is not None and given[key] != stored.get(key):
            out.append(
                f"{key}: stored {json.dumps(stored.get(key))}, given {json.dumps(given[key])}"
            )
    return out


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The params keys whose values differ between two attempts (added and removed too)."""
    return sorted(k for k in old.keys() | new.keys() if old.get(k, ...) != new.get(k, ...))
