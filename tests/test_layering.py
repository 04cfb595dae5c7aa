"""The package's layering, checked on its source: no import cycle, and the rules README "Layout" states.

Imports under ``if TYPE_CHECKING:`` are annotations only and do not count; imports inside functions
(lazy imports) do: they are real edges when the function runs.
"""

import ast
from pathlib import Path

import detkd

ROOT = Path(detkd.__file__).parent
# (package, packages it must never import)
RULES = [
    ("detkd.store", ("detkd.distill", "detkd.runs", "detkd.commands", "detkd.bench")),
    ("detkd.distill", ("detkd.config", "detkd.engine", "detkd.runs", "detkd.commands", "detkd.store", "detkd.bench")),
    ("detkd.knowledge", ("detkd.distill", "detkd.store", "detkd.engine", "detkd.runs", "detkd.config")),
    ("detkd.models", ("detkd.distill", "detkd.store", "detkd.knowledge", "detkd.engine", "detkd.runs", "detkd.config")),
    ("detkd.data", ("detkd.models", "detkd.distill", "detkd.store", "detkd.knowledge", "detkd.engine", "detkd.runs")),
    ("detkd.engine", ("detkd.distill", "detkd.store", "detkd.runs", "detkd.commands", "detkd.config")),
    ("detkd.runs", ("detkd.commands", "detkd.bench")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST):
    """ImportFrom/Import nodes outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("detkd"):
                targets = [f"{node.module}.{a.name}" for a in node.names]
                graph[name].update(t if t in modules else node.module for t in targets)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name.startswith("detkd."))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_cycle_detection_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layering_rules():
    graph = import_graph()
    broken = [
        f"{module} imports {target}"
        for package, banned in RULES
        for module, targets in graph.items()
        if module == package or module.startswith(package + ".")
        for target in targets
        if any(target == b or target.startswith(b + ".") for b in banned)
    ]
    assert broken == []
