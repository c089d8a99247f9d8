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
