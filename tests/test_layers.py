"""The package map of docs/ARCHITECTURE.md holds: imports go one way, commands -> train /
eval / serve / datagen -> model / data -> core utilities, with no cycle between packages."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import vistune

LAYERS = {
    "commands": 3, "cli": 3,
    "train": 2, "eval": 2, "serve": 2, "datagen": 2,
    "model": 1, "data": 1, "features": 1, "chat_client": 1, "local_chat": 1, "interop": 1,
    "config": 0, "errors": 0, "files": 0, "weights": 0,
}  # fmt: skip
"""Each top-level package or module of src/vistune and its layer (3 on top)."""


def imports() -> dict[str, set[tuple[str, str]]]:
    """package -> {(imported package, "file:line")} for every `vistune.X` import (lazy
    imports inside functions included) between different top-level packages."""
    root = Path(vistune.__file__).parent
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        source = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "vistune" and len(parts) > 1 and parts[1] != source:
                    edges[source].add((parts[1], f"{rel}:{node.lineno}"))
    return edges


def test_every_package_has_a_layer():
    root = Path(vistune.__file__).parent
    found = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    found |= {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    assert found == set(LAYERS)


def test_no_import_reaches_up_a_layer():
    upward = [
        f"{where}: {source} (layer {LAYERS[source]}) imports {target} (layer {LAYERS[target]})"
        for source, targets in imports().items()
        for target, where in targets
        if LAYERS[target] > LAYERS[source]
    ]
    assert upward == []


def test_no_cycle_between_packages():
    graph = {s: {t for t, _ in targets} for s, targets in imports().items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in seen and (cycle := visit(nxt, [*path, node])):
                return cycle
        seen[node] = 2
        return None

    cycles = [c for start in sorted(graph) if start not in seen if (c := visit(start, []))]
    assert cycles == []
