"""Imports go down the layers only, and no module imports itself through others.

Every import counts: at the top, inside functions, and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import videollava

# A module's layer is that of its longest listed prefix; a lower layer never imports a higher one.
LAYERS = {
    "videollava": 0,  # the package itself only: its submodules are listed below
    "videollava.errors": 0,
    "videollava.extras": 0,
    "videollava.arguments": 0,
    "videollava.constants": 0,
    "videollava.data": 1,
    "videollava.shapesworld": 1,  # the world, its pictures, text and data sets
    "videollava.model": 2,
    "videollava.infer": 3,
    "videollava.train": 4,
    "videollava.serve": 4,
    "videollava.eval": 4,
    "videollava.shapesworld.evaluate": 4,  # asks a model its questions
    "videollava.cli": 5,
    "videollava.__main__": 5,
    "videollava.testing": 5,
}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name of every module under the package folder `root`."""
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """For each module of the package, the package's modules it imports anywhere in its source."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: up from this module's package
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join([*base, node.module] if node.module else base)
                else:
                    source = node.module or ""
                for alias in node.names:  # `from package import submodule` imports the submodule
                    submodule = f"{source}.{alias.name}"
                    imported.add(submodule if submodule in modules else source)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def layer_of(module: str) -> int | None:
    prefixes = [p for p in LAYERS if p != "videollava" and (module == p or module.startswith(p + "."))]
    if prefixes:
        return LAYERS[max(prefixes, key=len)]
    return LAYERS["videollava"] if module == "videollava" else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            low, high = layer_of(module), layer_of(target)
            if low is None or high is None:
                unknown = module if low is None else target
                problems.append(f"{unknown} has no layer: add it to LAYERS")
            elif high > low:
                problems.append(f"{module} (layer {low}) imports {target} (layer {high})")
    return sorted(set(problems))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per group of modules that import each other, each as the path that closes it."""
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                cycle = path[path.index(target) :] + [target]
                if not any(set(cycle) == set(seen) for seen in cycles):
                    cycles.append(cycle)
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return cycles


def test_the_checks_find_upward_imports_and_cycles(tmp_path):
    """A small package with one upward import (under TYPE_CHECKING) and one cycle (inside a function)."""
    package = tmp_path / "videollava"
    (package / "data").mkdir(parents=True)
    (package / "infer").mkdir()
    for folder in (package, package / "data", package / "infer"):
        (folder / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "data" / "media.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from videollava.infer import engine\n"
    )
    (package / "infer" / "pipeline.py").write_text("def f():\n    from .engine import Engine\n")
    (package / "infer" / "engine.py").write_text("def g():\n    import videollava.infer.pipeline\n")
    graph = import_graph(package)
    assert upward_imports(graph) == [
        "videollava.data.media (layer 1) imports videollava.infer.engine (layer 3)"
    ]
    assert import_cycles(graph) == [
        ["videollava.infer.engine", "videollava.infer.pipeline", "videollava.infer.engine"]
    ]


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph(Path(videollava.__file__).parent)) == []


def test_no_modules_import_each_other():
    assert import_cycles(import_graph(Path(videollava.__file__).parent)) == []
