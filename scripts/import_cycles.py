"""Import cycles among the modules of runnerd and runnerd_client.

Reads every module's imports (no module is run) and prints each group of modules that
import one another in a circle, with the imports that close it, at three depths: imports
run when a module loads, those plus the ones under `if TYPE_CHECKING:` (what mypy reads),
and all of those plus imports inside functions (a late import that hides a cycle). Exits
1 if a cycle exists at the depth asked for or a shallower one (`--fail-on`, default
typing).

    python scripts/import_cycles.py [--fail-on runtime|typing|all]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOTS = {"runnerd": Path("runnerd"), "runnerd_client": Path("client/runnerd_client")}
DEPTHS = ("runtime", "typing", "all")
"""Imports that run as a module loads; and under TYPE_CHECKING; and inside functions."""
Graph = dict[str, set[str]]


def modules(base: Path) -> dict[str, Path]:
    """Dotted module name -> its file, for every module of the packages in ROOTS."""
    found = {}
    for package, root in ROOTS.items():
        for path in sorted((base / root).rglob("*.py")):
            parts = [package, *path.relative_to(base / root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, name: str, known: dict[str, Path]) -> list[str]:
    """The dotted names an import statement reaches: `from pkg import mod` reaches the
    submodule, `from pkg import thing` the package."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = name if known[name].name == "__init__.py" else name.rpartition(".")[0]
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parts, base] if base else parts)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def imports(name: str, path: Path, known: dict[str, Path], depth: str) -> set[str]:
    """The modules of ours that `name` imports at `depth`."""
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(body: list[ast.stmt], top: bool) -> None:
        for node in body:
            if isinstance(node, ast.If) and _type_checking(node):
                if depth != "runtime":
                    visit(node.body, top)
                visit(node.orelse, top)
                continue
            if isinstance(node, ast.Import | ast.ImportFrom) and (top or depth == "all"):
                for target in _targets(node, name, known):
                    add(target)
            inner_top = top and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child], inner_top)
                elif isinstance(child, ast.ExceptHandler | ast.match_case):
                    visit(child.body, inner_top)

    visit(ast.parse(path.read_text()).body, True)
    return found


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fail-on",
        choices=DEPTHS,
        default="typing",
        help="exit 1 if there is a cycle at this depth or a shallower one",
    )
    args = parser.parse_args()
    base = Path(__file__).resolve().parent.parent
    known = modules(base)
    failed = False
    for depth in DEPTHS:
        graph = {name: imports(name, path, known, depth) for name, path in known.items()}
        found = cycles(graph)
        print(f"{depth}: {len(found)} cycle(s)")
        for group in found:
            print("  " + ", ".join(group))
            for module in group:
                for target in sorted(graph[module] & set(group)):
                    print(f"    {module} -> {target}")
        if found and depth in DEPTHS[: DEPTHS.index(args.fail_on) + 1]:
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
