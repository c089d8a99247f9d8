"""The adapter formulas live in ``flora_hf.ops`` only: the layers hold tensors and call the core (docs/DESIGN.md §4).

Read from the source: no module of ``flora_hf`` (outside ``ops``) or ``serving`` multiplies matrices, routes, or
scales adapter updates itself, and every adapted layer imports its math from ``flora_hf.ops``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = {"serving/sampling.py"}  # token sampling (softmax, top-k over the vocabulary), not adapter math

MATH_CALLS = {
    "addmm", "baddbmm", "bmm", "einsum", "index_add", "index_add_", "index_copy", "index_put", "layer_norm",
    "linear", "matmul", "mm", "scatter", "softmax", "t", "topk", "transpose",
}  # fmt: skip
ADAPTER_FACTORS = ("scaling", "alpha", "gate", "delta", "lora_", "flora_", "ia3")
"""Names an adapter formula multiplies or divides by: a ``*`` or ``/`` on one of them is adapter arithmetic."""

LAYERS = {
    "flora_hf/flora/layer.py": "adapted_linear",
    "flora_hf/milora/layer.py": "adapted_linear",
    "flora_hf/milora/router.py": "route_groups",
    "serving/slot_layers.py": "adapted_linear",
    "serving/routers.py": "route_groups",
    "flora_hf/vllm_plugin/layers.py": "flora_linear",  # per output slice of vLLM's packed layers
}
"""Each adapted layer and router, and the core function that computes its forward."""


def sources() -> list[Path]:
    files = [p for p in (ROOT / "flora_hf").rglob("*.py") if "ops" not in p.relative_to(ROOT).parts[1:2]]
    files += list((ROOT / "serving").rglob("*.py"))
    return [p for p in files if str(p.relative_to(ROOT)) not in SAMPLING]


def _names(node: ast.AST) -> str:
    return " ".join(
        n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node) if isinstance(n, (ast.Name, ast.Attribute))
    )


def adapter_arithmetic(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and isinstance(node.op, ast.MatMult):
            found.append((node.lineno, "@"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MATH_CALLS:
            found.append((node.lineno, f".{node.func.attr}()"))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            operands = f"{_names(node.left)} {_names(node.right)}"
            if any(factor in operands for factor in ADAPTER_FACTORS):
                found.append((node.lineno, f"{ast.unparse(node)}"))
    return found


def core_imports(tree: ast.AST) -> set[str]:
    """Names a module imports from ``flora_hf.ops`` or one of its submodules (absolute, or relative inside flora_hf)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if parts[:2] == ["flora_hf", "ops"] or (node.level >= 1 and parts[0] == "ops"):
                names |= {alias.name for alias in node.names}
    return names


def test_no_adapter_arithmetic_outside_the_core() -> None:
    offenders = {
        str(path.relative_to(ROOT)): hits
        for path in sources()
        if (hits := adapter_arithmetic(ast.parse(path.read_text())))
    }
    assert not offenders, f"adapter math outside flora_hf/ops (move it into the core): {offenders}"


def test_the_check_sees_arithmetic() -> None:
    tree = ast.parse("y = x @ w\nz = a.t()\nu = gate * scaling\nv = torch.bmm(p, q)\nok = rows * 2\n")
    assert [line for line, _ in adapter_arithmetic(tree)] == [1, 2, 3, 4]


def test_every_adapted_layer_computes_through_the_core() -> None:
    for rel, function in LAYERS.items():
        tree = ast.parse((ROOT / rel).read_text())
        assert function in core_imports(tree), f"{rel} does not import {function} from flora_hf.ops"
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert function in called, f"{rel} imports {function} but never calls it"
