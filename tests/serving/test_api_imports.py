"""The HTTP layer's modules import one another without cycles (``TYPE_CHECKING`` imports included)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import serving.api

API = Path(serving.api.__file__).parent


def api_imports(path: Path) -> set[str]:
    """The ``serving.api`` modules one module imports (its package ``__init__`` is not counted: every submodule
    import runs it)."""
    modules = {f"serving.api.{p.stem}" for p in API.glob("*.py") if p.stem != "__init__"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "serving.api" if node.level == 1 else node.module or ""
            if node.level == 1 and node.module:
                base = f"serving.api.{node.module}"
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def test_serving_api_has_no_import_cycle() -> None:
    graph = {f"serving.api.{p.stem}": api_imports(p) for p in API.glob("*.py") if p.stem != "__init__"}
    assert "serving.api.state" not in graph["serving.api.sse"]  # framing knows nothing of the app's state
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        raise AssertionError(f"import cycle in serving/api: {err.args[1]}") from None
