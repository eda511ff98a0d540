"""The package's modules import one another without a circle, lazy (function-level) imports included:
data flows one way, dataset -> capture -> shards -> reader -> loss -> trainer."""

from __future__ import annotations

import ast

from tests.helpers import ROOT


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file (``from amid_pipeline.x import y``
    counts as x.y where that is a module, else x)."""
    files = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
             for path in (ROOT / "amid_pipeline").rglob("*.py")}
    graph = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("amid_pipeline"):
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("amid_pipeline")}
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: a path from a module back to itself, one per module that starts one."""
    found = []
    for start in sorted(graph):
        paths = [[start]]
        seen = set()
        while paths:
            path = paths.pop()
            for target in sorted(graph[path[-1]]):
                if target == start:
                    found.append(path + [start])
                elif target not in seen:
                    seen.add(target)
                    paths.append(path + [target])
    return found


def test_the_finder_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})[0] == ["a", "b", "c", "a"]


def test_no_module_of_the_package_imports_itself_round_a_circle():
    graph = import_graph()
    assert "amid_pipeline.train.loop" in graph and graph["amid_pipeline.train.loop"]
    assert circles(graph) == []
