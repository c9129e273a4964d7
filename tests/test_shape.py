"""The promises the README makes about the code's shape: imports go one way (no circle among the top-level
modules), every top-level file is at most 600 lines and every function at most 60.

Run: python -m pytest -q tests/test_shape.py
"""
import ast

from conftest import ROOT

MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def project_imports(path):
    """The project's modules that `path` imports, at any depth of the file (functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & MODULES.keys()


def find_cycle(graph):
    """-> a list of modules forming a circle, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None
    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def test_imports_go_one_way():
    graph = {m: project_imports(p) - {m} for m, p in MODULES.items()}
    assert graph["plan"] >= {"train", "distill"}, graph["plan"]  # the graph is read, not empty
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_files_and_functions_are_short():
    assert len(MODULES) >= 15
    for name, path in MODULES.items():
        text = path.read_text()
        assert len(text.splitlines()) <= 600, f"{name}.py has {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{name}.py: {node.name} has {length} lines"
