"""Plain-PyTorch references for every fast path, written the obvious way: one example at a time, weights merged.

Slow on purpose. The tests compare each fast path against these.
"""

from __future__ import annotations

from typing import Optional

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
