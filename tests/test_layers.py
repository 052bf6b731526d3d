"""The package's layering, read from the source with ``ast``: imports run one way.

Every import of every module (those inside functions too, but not those under
``if TYPE_CHECKING:``, which never run) goes to a module of its own layer or of a layer
below it, and no two modules import each other, however indirectly. The bottom layer and
the command-line parser import no torch, so that ``netslim --help`` answers at once.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import netslim

SRC = Path(netslim.__file__).parent

# Bottom to top; a module belongs to the first layer whose prefix names it.
LAYERS = [
    ("core", ["netslim.errors", "netslim.limits", "netslim.files", "netslim.recipes",
              "netslim.config"]),
    ("models", ["netslim.models"]),
    ("runtime", ["netslim.runtime"]),
    ("data", ["netslim.data"]),
    ("engine", ["netslim.engine"]),
    ("adapters", ["netslim.adapters"]),
    ("files", ["netslim.checkpoint", "netslim.official"]),
    ("train", ["netslim.train"]),
    ("prune, export, time", ["netslim.slim", "netslim.export", "netslim.benchmark",
                             "netslim.latency"]),
    ("experiments", ["netslim.lab", "netslim.yolo"]),
    ("command line", ["netslim.cli", "netslim.__main__"]),
]  # fmt: skip
TORCH_FREE = ["netslim.config", "netslim.cli.parser"]
# The engine knows no library but torch, and no architecture: adapters above it hold those.
OTHER_LIBRARIES = {"torchvision", "timm", "ultralytics"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    if module == "netslim":  # the package itself: lazy names only (importlib), no imports
        return 0
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(module: str, top_level_only: bool = False) -> set[str]:
    """The netslim modules ``module`` imports (each ``from a import b`` that names a
    submodule counts as that submodule)."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            inside = top and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.Import) and (top or not top_level_only):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "netslim")
            elif isinstance(child, ast.ImportFrom) and (top or not top_level_only):
                base = child.module or ""
                if child.level:  # a relative import
                    package = (
                        module
                        if MODULES[module].name == "__init__.py"
                        else module.rpartition(".")[0]
                    )
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - child.level + 1]
                        + ([base] if base else [])
                    )
                if base.split(".")[0] != "netslim":
                    continue
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in MODULES else base)
            visit(child, inside)

    visit(tree, True)
    return {m for m in found if m != module}


def test_every_module_belongs_to_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    """No module imports one of a higher layer (``netslim`` itself, the package, imports
    its public names lazily and is exempt)."""
    here = layer_of(module)
    upward = sorted(m for m in imports(module) if m != "netslim" and layer_of(m) > here)
    assert not upward, f"{module} (layer {LAYERS[here][0]!r}) imports " + ", ".join(
        f"{m} (layer {LAYERS[layer_of(m)][0]!r})" for m in upward
    )


def test_no_two_modules_import_each_other():
    """The import graph (function-level imports included) has no cycle."""
    graph = {m: imports(m) - {"netslim"} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n) :] + [m, n]))
            if n not in state:
                walk(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [])


def _loaded_with(module: str) -> set[str]:
    """What importing ``module`` runs: its parent packages and its module-level imports,
    followed through netslim (function-level imports run only when called)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        parts = m.split(".")
        for k in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            name = ".".join(parts[:k])
            if name in MODULES and name not in seen:
                seen.add(name)
                todo.extend(imports(name, top_level_only=True))
    return seen


def _third_party(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_bottom_layer_and_the_parser_import_no_torch(module):
    loaded = _loaded_with(module)
    assert module in loaded
    heavy = {m: _third_party(m) & {"torch", "numpy", "matplotlib", "PIL"} for m in loaded}
    assert not any(heavy.values()), {m: h for m, h in heavy.items() if h}


def _all_imports(module: str) -> set[str]:
    """Every module name ``module`` imports, at any level (functions included), netslim's
    or not; relative imports are resolved by :func:`imports` and left out here."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("netslim.engine")))
def test_the_engine_imports_no_architecture_and_no_other_library(module):
    """Engine modules import nothing of netslim.models (every architecture loads with it) and
    none of torchvision, timm, Ultralytics: their quirks live in netslim.adapters."""
    found = _all_imports(module) | imports(module)
    assert not [m for m in found if m == "netslim.models" or m.startswith("netslim.models.")]
    assert not [m for m in found if m.split(".")[0] in OTHER_LIBRARIES]


# A lower layer may find a higher one's code by name, at first use, only at these declared
# plug-in points: the lookup is how the layer above extends the one below, as a third-party
# package would (the engine also reads entry points), not a way around the layering.
PLUGIN_LOOKUPS = {
    ("netslim.engine.rules", "netslim.adapters"): "the built-in adapters, loaded when the "
    "default rules are first built (a library's quirks live outside the engine)",
    ("netslim.export", "netslim.yolo.export"): "an Ultralytics model goes to Ultralytics' "
    "own exporter, so netslim.export(model, path) writes what `yolo export` writes",
}


def lookups(module: str) -> set[str]:
    """The netslim modules ``module`` imports by name (``importlib.import_module`` of a
    string, or of a module-level constant holding one)."""
    tree = ast.parse(MODULES[module].read_text())
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name) and isinstance(node.value.value, str)
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            arg = node.args[0] if node.args else None
            name = (
                arg.value
                if isinstance(arg, ast.Constant)
                else constants.get(getattr(arg, "id", None))
            )
            if isinstance(name, str) and name.split(".")[0] == "netslim":
                found.add(name)
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_lookups_by_name_go_up_only_at_declared_plugin_points(module):
    upward = sorted(
        m
        for m in lookups(module)
        if layer_of(m) > layer_of(module) and (module, m) not in PLUGIN_LOOKUPS
    )
    assert not upward, f"{module} imports {', '.join(upward)} by name: a hidden upward import"


def test_every_declared_plugin_point_exists():
    for module, target in PLUGIN_LOOKUPS:
        assert target in lookups(module), (module, target)
