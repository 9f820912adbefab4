"""No import cycles between the modules of saev_jax.

The graph is read from the source (AST), not by importing it. Every `import` and `from ... import`
counts wherever it stands (module level, inside a function or a class): an import deferred into a
function only hides a cycle; the module still needs the other one to work. Imports under
`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`) are left out: they never run. An edge goes to the
module named (`from . import data` -> `saev_jax.data`, `from .format import Activations` ->
`saev_jax.data.format`), not to its parent packages, and a module importing itself (the
`python -m` trick of reaching the imported copy of one's own module) is not a cycle.
"""

import ast
import pathlib

PKG_DPATH = pathlib.Path(__file__).resolve().parent.parent / "saev_jax"

ALLOWED: set[frozenset[str]] = set()
"""Cycles tolerated for now (none)."""


def module_names(pkg_dpath: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for fpath in sorted(pkg_dpath.rglob("*.py")):
        parts = (pkg_dpath.name, *fpath.relative_to(pkg_dpath).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = fpath
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    # Every Import/ImportFrom node, skipping the bodies of `if TYPE_CHECKING:` (not its else branch).
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_graph(pkg_dpath: pathlib.Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    modules = module_names(pkg_dpath)
    graph = {name: set() for name in modules}
    for name, fpath in modules.items():
        package = name if fpath.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(fpath.read_text(), str(fpath))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import sub` names a module when `pkg.sub` is one; else a name in `pkg`.
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected set of more than one module, as one cycle through it (`[a, b, ..., a]`)."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []

    def visit(v):  # Tarjan's algorithm; the package is small, recursion is fine
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
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(scc)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, scc) for scc in sccs]


def _cycle_through(graph: dict[str, set[str]], scc: set[str]) -> list[str]:
    # A shortest path back to the first module of the set, by breadth-first search inside it.
    start = min(scc)
    parents, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & scc):
                if w == start:
                    path = [v]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"not strongly connected: {sorted(scc)}")


def test_no_import_cycles():
    graph = import_graph(PKG_DPATH)
    assert "saev_jax.data.loader" in graph and "saev_jax.config" in graph["saev_jax.data.loader"]
    found = [c for c in cycles(graph) if frozenset(c) not in ALLOWED]
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


def test_finds_function_level_cycle_and_names_it(tmp_path):
    pkg = write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def f():\n    from .sub import c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import pkg.a\n",
        "pkg/d.py": "from .a import name\n",
    })  # fmt: skip
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": set(),
                     "pkg.sub.c": {"pkg.a"}, "pkg.d": {"pkg.a"}}  # fmt: skip
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_type_checking_and_self_imports_are_not_cycles(tmp_path):
    pkg = write(tmp_path, {
        "pkg/__init__.py": "from .a import x\n",
        "pkg/a.py": "import typing\nif typing.TYPE_CHECKING:\n    from . import b\nelse:\n    from . import c\nx = 1\n",
        "pkg/b.py": "from . import a\nfrom pkg import b\n",
        "pkg/c.py": "import os\n",
    })  # fmt: skip
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.c"}, "pkg.b": {"pkg.a"}, "pkg.c": set()}
    assert cycles(graph) == []
    (pkg / "c.py").write_text("from . import a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.c", "pkg.a"]]
