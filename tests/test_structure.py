"""The package's structure: imports run one way (no cycle at any depth) and no function is over 80 lines."""
import ast
import sys
from pathlib import Path

import normswap

PACKAGE = Path(normswap.__file__).parent
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    """One edge per imported module of every import statement, at any depth (inside functions and
    ``if TYPE_CHECKING`` too), resolved to the module it loads: ``from . import x`` is an edge to the module
    ``x`` when there is one, else to the package. The implicit import of a parent package is no edge."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_pkg) in mods.items():
        here = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here.split(".")[: len(here.split(".")) - (node.level - 1)])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                while target not in mods and "." in target:
                    target = target.rpartition(".")[0]
                if target in mods and target != name:
                    graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (every one of them is a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for v in graph:
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_import_cycle_at_any_depth():
    graph = import_graph()
    assert len(graph) > 40 and graph["normswap.engine"], "the walk found the package's modules and their imports"
    assert strongly_connected(graph) == []


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from . import api\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))  # ast.walk reaches imports in functions


def test_imports_run_one_way_between_layers():
    """The core never imports the orchestrator, the API or the CLI; nothing imports the CLI."""
    graph = import_graph()
    top = {"normswap.cli", "normswap.api", "normswap.rewrite"}
    for module, targets in graph.items():
        if module not in ("normswap", "normswap.__main__"):
            assert "normswap.cli" not in targets, module
        if module.startswith(("normswap.catalog", "normswap.passes", "normswap.verify", "normswap.engine",
                              "normswap.registry", "normswap.recipe", "normswap.layers")):
            assert not targets & top, (module, targets & top)


def test_no_function_over_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} "
                                f"({node.end_lineno - start + 1} lines)")
    assert long == []


def _documented_order() -> list[str]:
    """The top-level entries of the layout in docs/ARCHITECTURE.md, in the order listed."""
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("```\nnormswap/\n", 1)[1].split("```", 1)[0]
    names = []
    for line in block.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            entry = line.split()[0]
            names.append(entry.removesuffix(".py").removesuffix("/"))
    return names


def test_architecture_doc_lists_every_module_in_import_order():
    """Every module sits under an entry of the documented layout, and imports only entries listed before
    its own (or modules of its own group)."""
    order = _documented_order()
    graph = import_graph()

    def entry(module: str) -> str:
        return module.split(".")[1]

    undocumented = sorted(m for m in graph if m not in ("normswap", "normswap.__main__") and entry(m) not in order)
    assert undocumented == []
    late = [f"{m} -> {t}" for m, targets in graph.items() for t in targets
            if m not in ("normswap", "normswap.__main__") and t != "normswap"
            and order.index(entry(t)) > order.index(entry(m))]
    assert late == []
