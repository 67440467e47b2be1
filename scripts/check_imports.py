#!/usr/bin/env python3
"""Check that src/trp has no import circles and that imports flow one way between its folders.

Reads the source with ``ast`` (imports inside functions included); imports nothing from trp.
Exit status 0 when clean, 1 with one line per problem otherwise. Run by the test suite.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "trp"
# Which top-level folders each folder may import from (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "models": set(),
    "data": set(),
    "methods": {"core"},
    "deploy": {"core", "methods"},
    "integrations": {"core", "methods", "deploy", "models", "data"},
    "app": {"core", "methods", "deploy", "integrations", "models", "data"},
}
# Top-level modules every folder may import: the error family and the limits on untrusted input.
BASE = {"errors", "limits"}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of the package that ``path`` (module ``name``) imports, resolved to known names."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from X import name``: name is a module of X, or else something X defines
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
                       for alias in node.names]
        for target in targets:
            # the longest known module that the target names
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def check(src: Path) -> list[str]:
    """Problems found in the package under ``src``; empty when clean."""
    files = {module_name(p, src): p for p in sorted((src / PACKAGE).rglob("*.py"))}
    known = set(files)
    graph = {name: imported_modules(path, name, known) for name, path in files.items()}
    problems = []
    for name, deps in sorted(graph.items()):
        here = folder(name)
        if here not in ALLOWED:
            if here and (src / PACKAGE / here).is_dir():
                problems.append(f"{name}: folder {here!r} has no rule in ALLOWED")
            continue  # the top-level modules (__init__, __main__) may import anything
        # a folder's own __init__ re-exporting its modules is fine
        for dep in sorted(deps):
            there = folder(dep)
            if there and there != here and there not in ALLOWED[here] and there not in BASE:
                problems.append(f"{name} imports {dep}: {here}/ may import only from "
                                f"{sorted(ALLOWED[here]) or 'itself'}")
            elif not there and dep == PACKAGE:
                problems.append(f"{name} imports the top-level package {dep}: import the module itself")
    # top-level modules import everything by design; leave them out of the cycle search
    inner = {n: {d for d in deps if folder(d)} for n, deps in graph.items() if folder(n)}
    for cycle in find_cycles(inner):
        problems.append("import circle: " + " <-> ".join(cycle))
    return problems


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "src"
    problems = check(src)
    for line in problems:
        print(line)
    if not problems:
        print(f"{PACKAGE}: no import circles, imports flow one way")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
