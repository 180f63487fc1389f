"""The shape of the package: imports run downward only (module level or inside functions), no import cycles, no
module over 400 lines.

Layers, lowest first (docs in README "Layout"): a module may import its own layer or a lower one.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "meddiff3d"
LAYERS = [
    {"errors", "checks", "utils", "__init__"},  # the package root holds only its version
    {"data", "diffusion"},
    {"engine"},
    {"models"},
    {"anomaly"},
    {"pipelines"},
    {"evaluation"},
    {"label", "tasks", "cli", "__main__"},
]
MAX_LINES = 400


def layer_of(module: str) -> int:
    """``meddiff3d.models.codec`` -> index of the layer holding ``models``."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its top-level package {top!r} has no layer in tests/test_architecture.py")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported meddiff3d module, line, inside a function)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names
                             if a.name.split(".")[0] == "meddiff3d")
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this module's package
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "meddiff3d":
                    if target == "meddiff3d":  # `from meddiff3d import x`: x a subpackage or a name of the root
                        found.extend((f"meddiff3d.{a.name}" if (PACKAGE / a.name).exists()
                                      or (PACKAGE / f"{a.name}.py").exists() else "meddiff3d", child.lineno,
                                      in_function) for a in child.names)
                    else:
                        found.append((target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_import_runs_downward():
    upward = []
    for path in MODULES:
        here = module_name(path)
        for target, line, in_function in imports_of(path):
            if layer_of(target) > layer_of(here):
                where = "inside a function" if in_function else "module level"
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} ({where})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_layer_check_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: an upward import hidden inside a function, and a relative one, are both found."""
    fake = PACKAGE / "models" / "_probe_for_architecture_test.py"
    try:
        fake.write_text("def f():\n    from meddiff3d.pipelines.generation import generate\n"
                        "from ..evaluation import similarity\n")
        found = imports_of(fake)
    finally:
        fake.unlink()
    assert ("meddiff3d.pipelines.generation", 2, True) in found
    assert ("meddiff3d.evaluation", 3, False) in found
    assert all(layer_of(t) > layer_of("meddiff3d.models.x") for t, _, _ in found)


def test_no_import_cycles_between_modules():
    graph = {}
    names = {module_name(p) for p in MODULES}
    for path in MODULES:
        deps = set()
        for target, _, _ in imports_of(path):
            while target and target not in names:  # `from a.b import c` where c is a name, not a module
                target = target.rpartition(".")[0]
            if target and target != module_name(path):
                deps.add(target)
        graph[module_name(path)] = deps
    # a package's __init__ re-exporting its submodules is not a cycle of logic: drop edges from a package to its own
    # submodules
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not d.startswith(name + ".")}
    state, cycles = {}, []

    def walk(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                walk(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_under_the_size_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (limit {MAX_LINES})"
