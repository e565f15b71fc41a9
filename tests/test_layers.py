"""Imports run one way — pipeline/ -> stages/ -> storage_schemas/ — and no modules import each other
in a circle. Read from the source with `ast`, so imports inside functions and literal
`importlib.import_module("...")` / `__import__("...")` / "module:attr" registry strings count too."""
import ast
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("pipeline", "stages", "storage_schemas")  # each may import only itself and those after it


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = REPO) -> dict[str, Path]:
    return {module_name(p, root): p for layer in LAYERS for p in sorted((root / layer).rglob("*.py"))}


def _literal_targets(node: ast.AST) -> list[str]:
    """Module names in importlib.import_module("x") / __import__("x") calls and "x.y:attr" strings."""
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__"):
            return [node.args[0].value]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value:
        head = node.value.split(":", 1)[0]
        if head.split(".")[0] in LAYERS and head.replace(".", "").replace("_", "").isalnum():
            return [head]
    return []


def imported_modules(path: Path, package: str) -> set[str]:
    """Every project module `path` imports, wherever the import statement sits."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        found.update(_literal_targets(node))
    return {name for name in found if name.split(".")[0] in LAYERS}


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from a import b` counts a.b only if it is a module)."""
    modules = project_modules(root)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = {m for m in imported_modules(path, package) if m in modules and m != name}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted(f"{src} imports {dst}" for src, dsts in graph.items() for dst in dsts
                  if rank[dst.split(".")[0]] < rank[src.split(".")[0]])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """`from stages.student import x` names the package stages.student: importing a submodule also
    runs its package's __init__, which is fine; drop module -> own-ancestor-package edges."""
    return {src: {d for d in dsts if not src.startswith(d + ".")} for src, dsts in graph.items()}


def copy_tree(out: Path) -> None:
    for layer in LAYERS:
        shutil.copytree(REPO / layer, out / layer, ignore=shutil.ignore_patterns("__pycache__"))


def test_every_import_runs_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_no_modules_import_each_other_in_a_circle():
    assert cycles(_package_edges(import_graph())) == []


@pytest.mark.parametrize("source, expect", [
    ("def f():\n    from pipeline.config import load_config\n", "storage_schemas.codecs imports pipeline.config"),
    ("import importlib\nX = importlib.import_module('stages.student.runner')\n", "storage_schemas.codecs imports stages.student.runner"),
])
def test_the_checks_catch_a_hidden_upward_import(tmp_path, source, expect):
    """The same analysis over a copy of the tree with one upward import planted inside a function."""
    copy_tree(tmp_path)
    codecs = tmp_path / "storage_schemas" / "codecs.py"
    codecs.write_text(codecs.read_text() + "\n" + source)
    assert expect in upward_imports(import_graph(tmp_path))


def test_the_cycle_check_finds_a_planted_circle(tmp_path):
    copy_tree(tmp_path)
    (tmp_path / "stages" / "a_mod.py").write_text("def f():\n    from stages import b_mod\n")
    (tmp_path / "stages" / "b_mod.py").write_text("import stages.a_mod\n")
    assert ["stages.a_mod", "stages.b_mod"] in cycles(_package_edges(import_graph(tmp_path)))
