"""The package has no import cycles: every `import` and `from ... import` of every module,
at module level or inside a function, read from the source (ast), forms an acyclic graph.

A lazy import inside a function hides a cycle from Python at import time but not from
the reader: the two modules still depend on each other, so it counts here too."""

import ast
from pathlib import Path
from typing import Dict, List, Set

import dlrm_torchrec

PACKAGE_DIR = Path(dlrm_torchrec.__file__).parent


def module_names(root: Path, package: str) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root` (a package's folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _ancestors(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path, package: str) -> Dict[str, Set[str]]:
    """Module -> the package's modules it imports. `from a.b import c` depends on a.b, and
    on a.b.c when that is a module; importing a.b also runs the package a's __init__, unless
    the importer is itself inside a (its own parents are initialised before it)."""
    modules = module_names(root, package)
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            own = set(_ancestors(name)) | {name}
            for target in targets:
                for dep in _ancestors(target) + [target]:
                    if dep in modules and dep not in own:
                        graph[name].add(dep)
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_package_has_no_import_cycles():
    graph = import_graph(PACKAGE_DIR, "dlrm_torchrec")
    assert len(graph) > 40  # every module was read
    assert sum(len(deps) for deps in graph.values()) > 100
    assert find_cycles(graph) == []


def test_a_cycle_through_a_lazy_import_or_a_package_init_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n    return g\n")
    (pkg / "b.py").write_text("from pkg import a\n\ng = a\n")
    # the package's __init__ re-exports c, and c imports a module of another package that
    # needs the first package
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import h\n")
    (pkg / "sub" / "c.py").write_text("import pkg.d\n\nh = 1\n")
    (pkg / "d.py").write_text("from pkg.sub.c import h\n")
    (pkg / "e.py").write_text("from . import d\n")  # relative, no cycle
    cycles = find_cycles(import_graph(pkg, "pkg"))
    assert cycles == [["pkg.a", "pkg.b"], ["pkg.d", "pkg.sub", "pkg.sub.c"]]
