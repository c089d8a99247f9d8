"""The packages' modules import one another without cycles (``TYPE_CHECKING`` and function-level imports included).

A cycle means two modules each need the other: the shared piece belongs in a module below both. The graph is read
from the source (``ast``), so an import hidden inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flora_hf", "serving", "trainers")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports; ``from pkg import name`` counts ``pkg.name`` when that is a module.

    A package's ``__init__`` is left out of its submodules' imports (importing a submodule always runs it).
    """
    name = module_name(path)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known}
    return {m for m in found if m != name and not name.startswith(f"{m}.")}


def import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    paths = [p for pkg in packages for p in (ROOT / pkg).rglob("*.py")]
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) for p in paths}


def test_the_graph_sees_relative_and_package_imports() -> None:
    graph = import_graph(PACKAGES)
    assert "serving.step_metadata" in graph["serving.slot_layers"]  # from .step_metadata import ...
    assert "flora_hf.ops.flora" in graph["flora_hf.ops.adapted"]
    assert "serving.adapters.loader" in graph["serving.routers"]  # from .adapters.loader import ...


def test_no_import_cycle() -> None:
    try:
        list(TopologicalSorter(import_graph(PACKAGES)).static_order())
    except CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_sse_framing_knows_nothing_of_the_app_state() -> None:
    assert "serving.api.state" not in import_graph(PACKAGES)["serving.api.sse"]


TRAINER_PARTS = {  # a part of trainers/ -> the parts it may import (trainers/__init__.py says why)
    "data": {"data"},
    "evaluation": {"evaluation"},
    "offline": {"offline", "data"},
    "recipes": {"recipes", "data", "evaluation", "offline"},
    "cli": {"cli", "recipes", "data", "evaluation", "offline"},
    "demo": {"demo", "cli", "recipes", "data", "evaluation", "offline"},
}
CLI_MODULES = {"trainers.train", "trainers.eval_cli", "trainers.library_noise"}


def trainer_part(module: str) -> str:
    if module in CLI_MODULES:
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in TRAINER_PARTS else "root"


def test_trainer_parts_import_one_way() -> None:
    graph = import_graph(PACKAGES)
    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("trainers.")
        for target in targets
        if target.startswith("trainers.") and trainer_part(target) not in TRAINER_PARTS[trainer_part(module)]
    ]
    assert not [m for m in graph if m.startswith("trainers.") and trainer_part(m) == "root"], (
        "a module outside the parts"
    )
    assert not wrong, "imports against the direction of trainers/__init__.py: " + "; ".join(wrong)


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """Every module imports in a new interpreter, with only its own imports run (none of the test session's): a moved
    or misspelled import fails here, not when a command first runs. Cycles are the static graph's job above."""
    modules = sorted(m for m in import_graph(PACKAGES) if not m.endswith("__main__"))
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run(
        [sys.executable, "-c", script, *modules], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
