"""The package keeps its layers: every import points to its own layer or below, no
import cycle, no module past 400 lines and no function past 60 lines of code, and
every subpackage's ``__init__`` names its modules. Read with ``ast``, not imported."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "sae_jax"
# The layers from the bottom up; a module may import from its own layer or below.
LAYERS = [
    {"losses", "corruption", "parallel", "files", "errors"},
    {"config", "data", "models"},
    {"training"},
    {"workdir"},
    {"inference"},
    {"commands"},
    {"cli", "__main__"},
]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``sae_jax.training.loop``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _layer(module: str) -> int | None:
    """The layer of ``sae_jax.X...`` (None for the package's own ``__init__``)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return next(i for i, layer in enumerate(LAYERS) if parts[1] in layer)


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, imported module, at module level)`` of every ``sae_jax`` import."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sae_jax"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n for n in names if n != "sae_jax.__version__"]  # the face's one constant
            found += [(node.lineno, _resolve(n), id(node) in top) for n in names]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, _resolve(a.name), id(node) in top)
                for a in node.names
                if a.name.startswith("sae_jax")
            ]
    return found


def _resolve(name: str) -> str:
    """The module that ``name`` (a module, or a name in a module) lives in."""
    modules = _modules()
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def test_every_module_belongs_to_a_layer():
    for module in _modules():
        if module != "sae_jax":
            assert _layer(module) is not None, module


def test_imports_point_to_their_own_layer_or_below():
    climbing = []
    for module, path in _modules().items():
        own = _layer(module)
        if own is None:
            continue
        for line, target, _ in _imports(path):
            if target == "sae_jax" or _layer(target) > own:
                climbing.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not climbing, "\n".join(climbing)


def test_no_import_cycle():
    graph = {
        module: {t for _, t, top in _imports(path) if top and t != module}
        for module, path in _modules().items()
    }
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join([*trail, module])
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target != "sae_jax":  # the package's lazy face imports nothing eagerly
                visit(target, [*trail, module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def _code_lines(lines: list[str], start: int, end: int) -> int:
    return sum(1 for line in lines[start - 1 : end] if line.strip() and line.strip()[0] != "#")


def test_modules_and_functions_fit_on_a_screen():
    too_long = []
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "experiments").glob("*.py")]:
        source = path.read_text()
        lines = source.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {len(lines)} lines")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            if ast.get_docstring(node) is not None:
                body = body[1:]  # the signature and the docstring aside
            if body and (n := _code_lines(lines, body[0].lineno, node.end_lineno)) > 60:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "\n".join(too_long)


def test_each_subpackage_says_what_its_modules_are():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for module in init.parent.glob("*.py"):
            if module.name != "__init__.py":
                assert f"``{module.stem}``" in doc, f"{init.relative_to(REPO)} omits {module.stem}"
