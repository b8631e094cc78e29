"""cga_jax's import graph, read with ``ast`` from the source (imports inside functions included):
no cycles, no function-local imports of cga_jax modules, the loading stack layered downwards."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "cga_jax"

# the loading stack, bottom to top: a module may import only from its own layer or below
LOADING_LAYERS = (
    ("errors", "resize"),
    ("keymap",),
    ("checkpoint_io", "download"),
    ("loading",),
    ("factory", "torch_export"),
    ("convert",),
    ("cli",),
)


def _modules(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every ``.py`` of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(path: pathlib.Path) -> bool:
    return path.name == "__init__.py"


def import_edges(root: pathlib.Path, package: str) -> list[tuple[str, str, int, bool]]:
    """``(importer, imported, line, inside_a_function)`` for every import of a ``package``
    module. ``from p import name`` points at the module ``p.name`` when there is one, else at
    ``p`` (its ``__init__``). A parent package's ``__init__``, which Python runs first, is not
    counted: only what the source names."""
    modules = _modules(root, package)
    edges = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        base = name if _is_package(path) else name.rpartition(".")[0]
        for node, in_function in _walk(tree, False):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                    mod = ".".join([*anchor, *([node.module] if node.module else [])])
                else:
                    mod = node.module or ""
                targets = [
                    f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names
                ]
            for t in targets:
                while t and t not in modules and "." in t:
                    t = t.rpartition(".")[0]  # `import cga_jax.x.y` with y a name, not a module
                if t in modules and t != name:
                    edges.append((name, t, node.lineno, in_function))
    return edges


def _walk(node: ast.AST, in_function: bool):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        inner = in_function or isinstance(
            child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        )
        yield from _walk(child, inner)


def find_cycles(edges) -> list[list[str]]:
    """Every cycle's modules (one per strongly connected component with a cycle), via DFS."""
    graph: dict[str, set[str]] = {}
    for a, b, *_ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _describe(cycles, edges) -> str:
    lines = []
    for comp in cycles:
        inside = [f"{a} -> {b} (line {n})" for a, b, n, _ in edges if a in comp and b in comp]
        lines.append(f"cycle among {', '.join(comp)}: " + "; ".join(inside))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def edges():
    return import_edges(ROOT, PACKAGE)


def test_no_import_cycles(edges):
    assert len({a for a, *_ in edges}) > 10, "the graph is implausibly small: is the walk broken?"
    cycles = find_cycles(edges)
    assert not cycles, "import cycles in cga_jax:\n" + _describe(cycles, edges)


def test_no_function_local_imports_of_cga_jax(edges):
    local = list(dict.fromkeys(f"{a}:{n} imports {b}" for a, b, n, inside in edges if inside))
    assert not local, (
        "function-local imports of cga_jax modules hide the layering (move them to the top):\n"
        + "\n".join(local)
    )


def test_loading_stack_imports_only_downwards(edges):
    layer = {f"{PACKAGE}.{m}": i for i, mods in enumerate(LOADING_LAYERS) for m in mods}
    assert all((ROOT / PACKAGE / f"{m.split('.')[-1]}.py").exists() for m in layer)
    up = [
        f"{a}:{n} imports {b} (layer {layer[b]} above its own {layer[a]})"
        for a, b, n, _ in edges
        if a in layer and b in layer and layer[b] > layer[a]
    ]
    assert not up, "\n".join(up)


def test_the_checker_sees_cycles_and_local_imports(tmp_path):
    """The walk on a made-up package: a cycle through a function-local and a relative import,
    `from pkg import module`, and a plain `import pkg.mod` are all found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")
    (pkg / "a.py").write_text("import pkg.b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n    return c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import name\nimport os\n")
    got = import_edges(tmp_path, "pkg")
    assert sorted((a, b, inside) for a, b, _, inside in got) == [
        ("pkg", "pkg.a", False),
        ("pkg.a", "pkg.b", False),
        ("pkg.b", "pkg.sub.c", True),
        ("pkg.sub.c", "pkg.a", False),
    ]
    assert find_cycles(got) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    (pkg / "b.py").write_text("X = 1\n")
    assert find_cycles(import_edges(tmp_path, "pkg")) == []
