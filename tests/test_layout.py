"""The layer rule of docs/ARCHITECTURE.md, read from the source with `ast` (nothing is imported).

- each folder is one layer and imports point down only (LAYERS, bottom first);
- no import circle between modules;
- library code imports project modules at module level only: a function-level import hides a
  cycle or an upward edge. The five commands in LAZY import on first use, each for the reason
  given there;
- only the commands know argparse / LightningCLI and the data layer; the model and the math
  (core, interop, eval, model, sampling) import no Lightning.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ditfuse", "datamodules", "callbacks")

# Bottom first. A layer may import the layers before it; layers on one line sit side by side and
# do not import each other. "ditfuse" is the files directly in ditfuse/ (module.py, pipeline.py,
# checkpoint_io.py); ditfuse.cli is the console entry point above everything.
LAYERS: list[tuple[str, ...]] = [
    ("ditfuse.core",),
    ("ditfuse.interop", "ditfuse.eval"),
    ("ditfuse.model",),
    ("ditfuse.sampling",),
    ("ditfuse",),
    ("datamodules", "callbacks"),
    ("ditfuse.commands",),
    ("ditfuse.cli",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
# the data layer reads the shared vocabulary and images only (docs/DESIGN.md): never the model
DATA_MAY_IMPORT = {"datamodules", "ditfuse.core", "ditfuse.interop"}
LAZY = {
    "ditfuse.cli": "the dispatcher imports a subcommand only when it runs: `ditfuse --version` and "
                   "`ditfuse shards --help` import neither torch nor Lightning (test_cli_errors)",
    "ditfuse.commands.shards": "`ditfuse shards --help` answers in < 2 s without torch, cv2 or "
                               "webdataset (test_data_stream); each subcommand imports its writer",
    "ditfuse.commands.sweep": "`ditfuse sweep --help` and a bad --grid answer in 0.3 s; Lightning and "
                              "the model stack load only to compose the configs",
    "ditfuse.commands.fuse": "`ditfuse fuse --help` and every argument error answer in seconds, before "
                             "Lightning and diffusers load (test_official); the pipeline loads to fuse",
    "ditfuse.commands.evaluate": "the IQA metrics are optional (pyiqa, `ditfuse[iqa]`): imported "
                                 "only for --iqa-weights, a missing install is one error line",
}
ARGPARSERS = ("argparse", "jsonargparse", "lightning.pytorch.cli")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str:
    """The project module an imported name lives in (`from ditfuse.eval import metrics`)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported name, line, inside a function) for every import statement of a file."""
    found = []

    def walk(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_func) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.extend((f"{child.module}.{a.name}", child.lineno, in_func) for a in child.names)
            walk(child, in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(path.read_text(), str(path)), False)
    return found


def _edges() -> list[tuple[str, str, int, bool]]:
    """(importer, imported project module, line, inside a function)."""
    edges = []
    for mod, path in MODULES.items():
        for name, line, in_func in _imports(path):
            if name.split(".")[0] in PACKAGES:
                edges.append((mod, _resolve(name), line, in_func))
    return edges


EDGES = _edges()


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "ditfuse":
        return parts[0]
    if len(parts) > 1 and ".".join(parts[:2]) in RANK:
        return ".".join(parts[:2])
    return "ditfuse"


def _where(mod: str, line: int) -> str:
    return f"{MODULES[mod].relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    assert {layer(m) for m in MODULES} == set(RANK), "a folder without a layer (or a layer without a folder)"


def test_imports_point_down_only():
    bad = sorted({f"{_where(a, line)}: {a} ({layer(a)}) imports {b} ({layer(b)})"
                  for a, b, line, _ in EDGES if layer(a) != layer(b) and RANK[layer(b)] >= RANK[layer(a)]})
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_the_data_layer_imports_only_the_shared_vocabulary():
    bad = sorted({f"{_where(a, line)}: {a} imports {b}" for a, b, line, _ in EDGES
                  if layer(a) == "datamodules" and layer(b) not in DATA_MAY_IMPORT})
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _, _ in EDGES:
        if a != b and not a.startswith(b + "."):  # a module's own package __init__ is not an edge back
            graph[a].add(b)
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_library_code_has_no_function_level_project_import():
    bad = sorted({f"{_where(a, line)}: {a} imports {b} inside a function" for a, b, line, in_func in EDGES
                  if in_func and a not in LAZY})
    assert not bad, "move these to the top of the file (a cycle they dodge is a layering bug):\n" + "\n".join(bad)
    assert set(LAZY) <= {a for a, _, _, in_func in EDGES if in_func}, "LAZY names a module that is not lazy anymore"


def test_only_the_commands_parse_arguments():
    bad = [f"{_where(mod, line)}: {mod} imports {name}" for mod, path in MODULES.items()
           if layer(mod) not in ("ditfuse.commands", "ditfuse.cli")
           for name, line, _ in _imports(path) if name.startswith(ARGPARSERS)]
    assert not bad, "argument parsing belongs in ditfuse/commands/:\n" + "\n".join(bad)


def test_the_model_and_the_math_import_no_lightning():
    pure = ("ditfuse.core", "ditfuse.interop", "ditfuse.eval", "ditfuse.model", "ditfuse.sampling")
    bad = [f"{_where(mod, line)}: {mod} imports {name}" for mod, path in MODULES.items() if layer(mod) in pure
           for name, line, _ in _imports(path) if name.split(".")[0] in ("lightning", "pytorch_lightning")]
    assert not bad, "\n".join(bad)


def test_package_discovery_finds_every_sub_package():
    """pyproject's `packages.find` (include ditfuse*, datamodules*, callbacks*) installs every folder."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert packages <= set(find_packages(str(ROOT), include=include))
