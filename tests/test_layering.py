"""The package's shape: no import cycle, no import from a lower layer to a higher one, no module over
800 lines.

Every import counts: at module level, inside functions, under `if TYPE_CHECKING:` (a type-only
cycle still ties two modules' designs together) and `importlib.import_module` of a literal name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

SRC = Path(__file__).resolve().parent.parent / "src" / "videollava"
MAX_LINES = 800

# A module may import its own layer and the ones below. `name.*` places a package and everything in it;
# an exact name wins over a pattern. A module placed nowhere is an error, so new packages get a layer.
LAYERS = {
    # 0: what every layer may use
    "videollava": 0,  # the package's __init__ runs before any of its modules
    "videollava.errors": 0,
    "videollava.extras": 0,
    "videollava.arguments": 0,
    "videollava.constants": 0,
    # 1: data: media, text, samples, and the synthetic world they can come from
    "videollava.data.*": 1,
    "videollava.shapesworld": 1,
    "videollava.shapesworld.world": 1,
    "videollava.shapesworld.render": 1,
    "videollava.shapesworld.text": 1,
    "videollava.shapesworld.twins": 1,
    "videollava.shapesworld.backdrops": 1,
    "videollava.shapesworld.wide": 1,
    "videollava.shapesworld.description": 1,
    "videollava.shapesworld.generate": 1,
    # 2: the model and its weights
    "videollava.model.*": 2,
    # 3: inference
    "videollava.infer.*": 3,
    # 4: what is built on inference: training, serving, evaluation
    "videollava.train.*": 4,
    "videollava.serve.*": 4,
    "videollava.eval.*": 4,
    "videollava.shapesworld.evaluate": 4,
    "videollava.vllm.*": 4,  # the vLLM model and plugin (imported only inside vLLM)
    "videollava.experiments.*": 4,
    # 5: entry points and the scaffolding of tests and benchmarks
    "videollava.cli": 5,
    "videollava.__main__": 5,
    "videollava.testing": 5,
}


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    how: str  # "" at module level, "in a function" or "type-only"

    def where(self) -> str:
        return f"line {self.line}" + (f", {self.how}" if self.how else "")


def find_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package at `root` (a package is its __init__)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    """The package's own modules that one module imports, each with where and how."""

    def __init__(self, module: str, is_package: bool, modules: dict[str, Path]):
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.root = module.partition(".")[0]
        self.context: list[str] = []
        self.imports: list[Import] = []

    def _add(self, name: str, node: ast.AST) -> None:
        if name != self.root and not name.startswith(self.root + "."):
            return  # another distribution
        while name and name not in self.modules:  # `pkg.module.attribute` -> `pkg.module`
            name = name.rpartition(".")[0]
        if name and name != self.module:
            how = "type-only" if "type-only" in self.context else (self.context[-1] if self.context else "")
            self.imports.append(Import(self.module, name, node.lineno, how))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.context.append("in a function")
        self.generic_visit(node)
        self.context.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.context.append("type-only")
        for statement in node.body:
            self.visit(statement)
        self.context.pop()
        for statement in node.orelse:
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self.package
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        if node.level == 0:
            base = node.module or ""
        elif node.module:
            base = f"{base}.{node.module}"
        for alias in node.names:
            submodule = f"{base}.{alias.name}"  # `from pkg import module` imports the module
            self._add(submodule if submodule in self.modules else base, node)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self._add(node.args[0].value, node)
        self.generic_visit(node)


def find_imports(modules: dict[str, Path]) -> list[Import]:
    imports = []
    for name, path in modules.items():
        collector = _ImportCollector(name, path.name == "__init__.py", modules)
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        imports += collector.imports
    return list(dict.fromkeys(imports))  # `from m import a, b` is one import of m


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    if module in layers:
        return layers[module]
    placed = [
        (len(pattern), layer)
        for pattern, layer in layers.items()
        if pattern.endswith(".*") and (module == pattern[:-2] or module.startswith(pattern[:-1]))
    ]
    return max(placed)[1] if placed else None


def cycles(imports: list[Import]) -> list[str]:
    """One cycle of each group of modules that import each other, hop by hop."""
    graph = nx.DiGraph()
    for found in sorted(imports, key=lambda i: i.line, reverse=True):  # the first import of a pair wins
        graph.add_edge(found.source, found.target, found=found)
    problems = []
    for group in sorted(nx.strongly_connected_components(graph), key=sorted):
        if len(group) < 2:
            continue
        hops = [graph.edges[edge]["found"] for edge in nx.find_cycle(graph.subgraph(group), min(group))]
        problems.append(
            " -> ".join([hops[0].source] + [f"{hop.target} ({hop.where()})" for hop in hops])
            + (f"; the cycle's group: {', '.join(sorted(group))}" if len(group) > len(hops) else "")
        )
    return problems


def upward_imports(imports: list[Import], layers: dict[str, int]) -> list[str]:
    problems = []
    for found in imports:
        low, high = layer_of(found.source, layers), layer_of(found.target, layers)
        if low is not None and high is not None and high > low:
            problems.append(
                f"{found.source} (layer {low}) imports {found.target} (layer {high}) at {found.where()}"
            )
    return problems


def unplaced(modules: dict[str, Path], layers: dict[str, int]) -> list[str]:
    return [f"{name} has no layer" for name in modules if layer_of(name, layers) is None]


def oversized(modules: dict[str, Path], max_lines: int = MAX_LINES) -> list[str]:
    problems = []
    for name, path in modules.items():
        lines = len(path.read_text().splitlines())
        if lines > max_lines:
            problems.append(f"{name} ({path.name}) has {lines} lines, over {max_lines}")
    return problems


def report(title: str, problems: list[str]) -> str:
    return f"{title}:\n  " + "\n  ".join(problems)


def test_no_import_cycle():
    problems = cycles(find_imports(find_modules(SRC)))
    assert not problems, report("modules that import each other", problems)


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones():
    modules = find_modules(SRC)
    problems = unplaced(modules, LAYERS) + upward_imports(find_imports(modules), LAYERS)
    assert not problems, report("layering", problems)


def test_no_module_over_800_lines():
    problems = oversized(find_modules(SRC))
    assert not problems, report("modules to split", problems)


# ---------------------------------------------------------------- the checks themselves, on a toy package


TOY_LAYERS = {"toy": 0, "toy.base": 0, "toy.edge": 0, "toy.low.*": 1, "toy.high": 2}
TOY = {
    "__init__.py": "",
    # upward, twice: inside a function and by name
    "base.py": "import importlib\n\n\ndef late():\n    from toy.high import value\n\n"
    "    return value, importlib.import_module('toy.high')\n",
    "low/__init__.py": "from toy.base import late\n",  # down: allowed
    # a cycle, one side relative
    "low/a.py": "from . import b\n",
    "low/b.py": "import toy.low.a\n",
    # a cycle closed by a type-only import
    "low/c.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from toy.low.d import D\n",
    "low/d.py": "from .c import *\n\n\nclass D:\n    pass\n",
    "high.py": "value = 1\n" + "\n" * MAX_LINES,  # only just too long
    "stray.py": "",  # placed nowhere
    "edge.py": "\n" * MAX_LINES,  # as long as allowed
}


def write_toy(root: Path) -> dict[str, Path]:
    for name, text in TOY.items():
        path = root / "toy" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return find_modules(root / "toy")


def test_the_checks_find_cycles_type_only_cycles_upward_imports_unplaced_and_long_modules(tmp_path):
    modules = write_toy(tmp_path)
    assert sorted(modules) == [
        "toy",
        "toy.base",
        "toy.edge",
        "toy.high",
        "toy.low",
        "toy.low.a",
        "toy.low.b",
        "toy.low.c",
        "toy.low.d",
        "toy.stray",
    ]
    imports = find_imports(modules)
    assert cycles(imports) == [
        "toy.low.a -> toy.low.b (line 1) -> toy.low.a (line 1)",
        "toy.low.c -> toy.low.d (line 4, type-only) -> toy.low.c (line 1)",
    ]
    assert upward_imports(imports, TOY_LAYERS) == [
        "toy.base (layer 0) imports toy.high (layer 2) at line 5, in a function",
        "toy.base (layer 0) imports toy.high (layer 2) at line 7, in a function",
    ]
    assert unplaced(modules, TOY_LAYERS) == ["toy.stray has no layer"]
    assert oversized(modules) == [f"toy.high (high.py) has {MAX_LINES + 1} lines, over {MAX_LINES}"]


def test_a_package_that_keeps_the_rules_passes(tmp_path):
    modules = write_toy(tmp_path)
    fixed = {"base.py": "import os\n", "low/b.py": "from toy import base\n", "low/c.py": "", "high.py": ""}
    for name, text in fixed.items():
        (tmp_path / "toy" / name).write_text(text)
    imports = find_imports(modules)
    assert {(i.source, i.target) for i in imports} == {
        ("toy.low", "toy.base"),
        ("toy.low.a", "toy.low.b"),
        ("toy.low.b", "toy.base"),
        ("toy.low.d", "toy.low.c"),
    }
    assert cycles(imports) == []
    assert upward_imports(imports, TOY_LAYERS) == []
    assert unplaced(modules, {**TOY_LAYERS, "toy.stray": 2}) == []
    assert oversized(modules) == []


def test_layers_place_by_exact_name_then_by_the_longest_pattern():
    layers = {"p.*": 1, "p.q.*": 2, "p.q.r": 3}
    assert [layer_of(name, layers) for name in ("p", "p.x", "p.q", "p.q.x.y", "p.q.r", "pq", "o")] == [
        1,
        1,
        2,
        2,
        3,
        None,
        None,
    ]
