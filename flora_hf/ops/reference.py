"""Plain-PyTorch references for every fast path, written the obvious way: one example at a time, weights merged.

Slow on purpose. The tests compare each fast path against these.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor


def merged_weight_reference(
    weight_in_out: Tensor, flora_in: Tensor, flora_out: Tensor, *, mean: bool = True
) -> Tensor:
    """W0 ∘ ΔW with ΔW[i, o] = (1/r) Σ_j flora_in[j, i] flora_out[j, o], written as an explicit sum over rank.

    ``mean=False`` reads the factors as a bank row (sum form, the 1/r already folded in).
    """
    delta = torch.zeros_like(weight_in_out)
    for j in range(flora_in.shape[0]):
        delta += torch.outer(flora_in[j], flora_out[j])
    return weight_in_out * (delta / flora_in.shape[0] if mean else delta)


def flora_linear_reference(
    x: Tensor,
    weight_in_out: Tensor,
    bias: Optional[Tensor],
    bank_in: Tensor,
    bank_out: Tensor,
    indices: Tensor,
) -> Tensor:
    """Each row (or token, for 2-D indices) through its own merged weight ``x (W0 ∘ ΔW_k) + bias``."""
    flat_x = x.reshape(-1, x.shape[-1]) if indices.dim() > 1 else x
    flat_idx = indices.reshape(-1)
    outs = []
    for row, k in zip(flat_x, flat_idx.tolist()):
        w = merged_weight_reference(weight_in_out, bank_in[k], bank_out[k], mean=False)
        y = row @ w
        outs.append(y if bias is None else y + bias)
    return torch.stack(outs).reshape(*x.shape[:-1], weight_in_out.shape[1])


def lora_linear_reference(x: Tensor, bank_a: Tensor, bank_b: Tensor, indices: Tensor) -> Tensor:
    """Each row's LoRA update ``x Aᵀ B`` computed alone."""
    return torch.stack([row @ bank_a[k].t() @ bank_b[k] for row, k in zip(x, indices.tolist())])


def ia3_reference(y: Tensor, bank: Tensor, indices: Tensor) -> Tensor:
    """Each row scaled by its own IA3 vector."""
    return torch.stack([row * bank[k] for row, k in zip(y, indices.tolist())])


def rational_reference(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "paper") -> Tensor:
    """R(x) with explicit powers (float64), the paper's formula or the safe denominator."""
    x = x.double()
    num = sum(a * x**j for j, a in enumerate(numerator.double()))
    if form == "safe":
        den = 1 + sum(b.abs() * x.abs() ** i for i, b in enumerate(denominator.double(), start=1))
    else:
        den = 1 + sum(b * x**i for i, b in enumerate(denominator.double(), start=1)).abs()
    return num / den


def pool_reference(hidden: Tensor, prompt_mask: Tensor, pooler: str, query: Optional[Tensor] = None) -> Tensor:
    """Each row's prompt tokens selected explicitly, then pooled."""
    rows = []
    for h, m in zip(hidden.double(), prompt_mask.bool()):
        tokens = h[m]
        if pooler == "mean":
            rows.append(tokens.mean(0))
        elif pooler == "max":
            rows.append(tokens.max(0).values)
        elif pooler == "last":
            rows.append(tokens[-1])
        else:
            rows.append(torch.softmax(tokens @ query.double(), 0) @ tokens)
    return torch.stack(rows)


def route_reference(
    pooled: Tensor, router_weight: Tensor, numerator: Tensor, denominator: Tensor, top_k: int, form: str = "paper"
) -> Tensor:
    """Gates of each row computed alone: normalize, rational, linear, softmax, keep the k largest."""
    gates = []
    for h in pooled.double():
        h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + 1e-5)
        p = torch.softmax(rational_reference(h, numerator, denominator, form) @ router_weight.double().t(), 0)
        keep = p.argsort(descending=True)[:top_k]
        g = torch.zeros_like(p)
        g[keep] = p[keep]
        gates.append(g)
    return torch.stack(gates)


def gated_lora_reference(x: Tensor, bank_a: Tensor, bank_b: Tensor, indices: Tensor, gate: Tensor) -> Tensor:
    """Each row's LoRA update computed alone and scaled by its gate."""
    return torch.stack([g * (row @ bank_a[k].t() @ bank_b[k]) for row, k, g in zip(x, indices.tolist(), gate)])


def adapted_linear_reference(
    x: Tensor,
    weight_in_out: Tensor,
    bias: Optional[Tensor],
    indices: Optional[Tensor],
    *,
    flora: Optional[tuple[Tensor, Tensor]] = None,
    lora: Optional[tuple[Tensor, Tensor]] = None,
    gate: Optional[Tensor] = None,
    ia3_in: Optional[Tensor] = None,
    ia3_out: Optional[Tensor] = None,
) -> Tensor:
    """Each row alone: ``((x ∘ l_in) (W0 ∘ ΔW_F) + bias + g · (x ∘ l_in) Aᵀ B) ∘ l_out`` with its dense merged weight.

    Banks are indexed by ``indices`` (None: row 0 of every bank); ``lora`` given as 2-D ``(A, B)`` is one adapter's
    factors for every row, ``gate`` ``(B,)`` scales the LoRA update of each row.
    """
    ks = [0] * x.shape[0] if indices is None else indices.tolist()
    outs = []
    for b, k in enumerate(ks):
        row = x[b]
        if ia3_in is not None:
            row = row * ia3_in[k]
        w = (
            weight_in_out
            if flora is None
            else merged_weight_reference(weight_in_out, flora[0][k], flora[1][k], mean=False)
        )
        y = row @ w
        if bias is not None:
            y = y + bias
        if lora is not None:
            a, b_t = lora if lora[0].dim() == 2 else (lora[0][k], lora[1][k])
            g = 1.0 if gate is None else gate[b]
            y = y + g * (row @ a.t() @ b_t)
        if ia3_out is not None:
            y = y * ia3_out[k]
        outs.append(y)
    return torch.stack(outs)


def route_groups_reference(hidden: Tensor, prompt_mask: Tensor, groups: Iterable[tuple], num_columns: int) -> Tensor:
    """Gates ``(B, N)`` (float64): each group's rows pooled and routed one at a time, written into its columns."""
    gates = torch.zeros(hidden.shape[0], num_columns, dtype=torch.float64)
    for router, rows, columns in groups:
        for b in range(hidden.shape[0]) if rows is None else rows.tolist():
            pooled = pool_reference(hidden[b : b + 1], prompt_mask[b : b + 1], router.pooler, router.query)
            g = route_reference(
                pooled, router.weight, router.numerator, router.denominator, router.top_k, router.form
            )[0]
            for j, column in enumerate(columns.tolist()):
                gates[b, column] = g[j]
    return gates


def neutral_row_reference(role: str, rank: int, dim: int) -> Tensor:
    """The "no adapter" row written out: IA3 ones ``(dim,)``; LoRA zeros and FLoRA ``e₀ ⊗ 1`` (ΔW ≡ 1) ``(rank, dim)``."""
    if role in ("ia3_in", "ia3_out"):
        return torch.ones(dim)
    row = torch.zeros(rank, dim)
    if role in ("flora_in", "flora_out"):
        row[0] = 1.0
    return row
