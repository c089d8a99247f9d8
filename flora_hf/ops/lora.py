"""Per-row LoRA and IA3 over a bank of adapters: what the server needs besides FLoRA, from the same core.

LoRA banks follow PEFT's factor names: ``bank_a`` is ``(n, R, d_in)`` (lora_A.weight), ``bank_b`` is
``(n, R, d_out)`` (lora_B.weightᵀ with the adapter's ``alpha / r`` scaling folded in). Row 0 is all zeros (no
adapter); adapters of lower rank are zero-padded, which is exact for an additive update.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """Semantics: the factor PEFT multiplies a LoRA update by, ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _row_factors(bank: Tensor, indices: Tensor, x3: Tensor) -> Tensor:
    return bank[indices].to(x3.dtype)  # gather first: converting the whole bank would touch every adapter


def lora_bmm_delta(x: Tensor, bank_a: Tensor, bank_b: Tensor, indices: Tensor) -> Tensor:
    """Semantics: Δy[b] = (x[b] A_{indices[b]}ᵀ) B_{indices[b]}: the paper's appendix B.1 gather + two bmm."""
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    a = _row_factors(bank_a, indices, x3)  # (B, R, d_in)
    b = _row_factors(bank_b, indices, x3)  # (B, R, d_out)
    delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b)
    return delta.reshape(*x.shape[:-1], bank_b.shape[-1])


def lora_delta(x: Tensor, a: Tensor, b: Tensor, indices: Optional[Tensor]) -> Tensor:
    """Semantics: Δy = (x Aᵀ) B: per row from the banks with ``indices`` (:func:`lora_bmm_delta`), or, without,
    ``a`` ``(R, d_in)`` and ``b`` ``(R, d_out)`` one adapter's factors for every row (two plain GEMMs)."""
    if indices is None:
        return (x @ a.to(x.dtype).t()) @ b.to(x.dtype)
    return lora_bmm_delta(x, a, b, indices)


def lora_loop_delta(x: Tensor, bank_a: Tensor, bank_b: Tensor, indices: Tensor) -> Tensor:
    """Semantics: as :func:`lora_bmm_delta`, computed PEFT's way (one masked pass per distinct adapter).

    Kept as the baseline the benchmarks compare against; it loops in Python over the adapters present.
    """
    out = x.new_zeros(*x.shape[:-1], bank_b.shape[-1])
    for k in torch.unique(indices).tolist():
        if k == 0:
            continue
        rows = (indices == k).nonzero(as_tuple=True)[0]
        sub = x[rows]
        a, b = bank_a[k].to(x.dtype), bank_b[k].to(x.dtype)
        out[rows] = (sub @ a.t()) @ b
    return out


def ia3_scale(y: Tensor, bank: Tensor, indices: Optional[Tensor]) -> Tensor:
    """Semantics: y[b] ∘ l_{indices[b]}: IA3's per-row scaling of a layer's input or output (bank ``(n, d)``, row 0 ones)."""
    if indices is None:
        return y * bank[0].to(y.dtype)
    rows = bank[indices].to(y.dtype)
    return y * rows.reshape(rows.shape[0], *([1] * (y.dim() - 2)), rows.shape[-1])
