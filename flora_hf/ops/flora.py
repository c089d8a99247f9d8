"""FLoRA forward for a batch whose rows (or tokens) each carry their own adapter: the one math core.

Notation (docs/DESIGN.md §2): a bank holds ``n`` adapters padded to one rank ``R``; ``bank_in`` is ``(n, R, d_in)``
(the paper's B), ``bank_out`` is ``(n, R, d_out)`` (the paper's A). Row ``k`` of the bank means

    ΔW_k = Σ_j bank_in[k, j]ᵀ ⊗ bank_out[k, j],      y = x (W0 ∘ ΔW_k) + bias

A bank stores each adapter in this *sum form*: the paper's 1/r mean is folded into ``bank_out`` when the bank is
built (:func:`bank_row`), and unused rank rows are zero. So a bank sliced to any rank ≥ the largest rank in a batch
computes the same thing, which lets a server with rank-16 slots run a batch of rank-1 adapters at rank-1 cost.

``indices`` picks a bank row per batch row (shape ``(B,)``) or per token (shape ``x.shape[:-1]``); ``None`` means
the bank has a single row that applies to the whole batch. Every path below evaluates exactly this; the PEFT layers
and the serving engine both call :func:`flora_linear`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .cost import DEFAULT_MAX_MERGE_BYTES, FLoRAPath, FLoRAShape, choose_flora_path

BaseMatmul = Callable[[Tensor], Tensor]
"""``x -> x W0`` over the last dimension, without bias."""


def weight_in_out(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """W0 as ``(d_in, d_out)``: ``nn.Linear`` stores ``(d_out, d_in)``, GPT-2's ``Conv1D`` stores ``(d_in, d_out)``."""
    return weight if fan_in_fan_out else weight.t()


def dense_matmul(weight: Tensor, fan_in_fan_out: bool) -> BaseMatmul:
    if fan_in_fan_out:
        return lambda t: t @ weight
    return lambda t: F.linear(t, weight)


def _rows_view(x: Tensor, indices: Optional[Tensor]) -> tuple[Tensor, bool]:
    """``x`` as ``(B, M, d_in)`` so that indices broadcast over it; also whether indices are per token."""
    if indices is None or indices.dim() == 1:
        lead = x.shape[0] if x.dim() > 1 else 1
        if indices is not None and indices.shape[0] != lead:
            raise ValueError(f"adapter indices cover {indices.shape[0]} rows but the input has {lead}")
        return x.reshape(lead, -1, x.shape[-1]), False
    if tuple(indices.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"per-token adapter indices of shape {tuple(indices.shape)} do not match input {tuple(x.shape)}"
        )
    return x.reshape(indices.shape[0], -1, x.shape[-1]), True


def _gather(bank: Tensor, indices: Optional[Tensor], like: Tensor, per_token: bool) -> Tensor:
    """Bank rows for each row/token of ``like`` (``(B, M, d)``) as ``(B|1, M|1, R, d)`` in ``like``'s dtype."""
    if indices is None:
        return bank[0].to(like.dtype)[None, None]
    rows = bank[indices].to(like.dtype)  # gather first: converting the whole bank would touch every adapter
    if per_token:
        return rows.reshape(like.shape[0], like.shape[1], *bank.shape[1:])
    return rows[:, None]


def flora_rank1(x3: Tensor, g_in: Tensor, g_out: Tensor, base_mm: BaseMatmul) -> Tensor:
    """Semantics: y = A ∘ ((B ∘ x) W0) for R = 1: the base GEMM plus two element-wise scales."""
    return base_mm(x3 * g_in[..., 0, :]) * g_out[..., 0, :]


def flora_stacked(x3: Tensor, g_in: Tensor, g_out: Tensor, base_mm: BaseMatmul) -> Tensor:
    """Semantics: y = Σ_j A_j ∘ ((B_j ∘ x) W0), as one GEMM over R stacked copies of x (reads W0 once)."""
    h = base_mm(x3.unsqueeze(-2) * g_in)  # (B, M, R, d_out)
    return (h * g_out).sum(dim=-2)


def flora_merged(
    x3: Tensor, g_in: Tensor, g_out: Tensor, w0: Tensor, max_merge_bytes: int = DEFAULT_MAX_MERGE_BYTES
) -> Tensor:
    """Semantics: y = x (W0 ∘ ΔW_b) with ΔW_b = B_bᵀ A_b built once per row; cheaper than stacking when M ≫ R.

    Rows are merged in chunks so that at most ``max_merge_bytes`` of merged weights exist at once.
    """
    b_in, b_out = g_in[:, 0], g_out[:, 0]  # (B|1, R, d)
    w0 = w0.to(x3.dtype)
    per_row = w0.numel() * x3.element_size()
    chunk = max(1, max_merge_bytes // per_row)
    if b_in.shape[0] == 1:
        return torch.matmul(x3, (b_in.transpose(-1, -2) @ b_out).mul_(w0))
    outs = []
    for start in range(0, x3.shape[0], chunk):
        rows = slice(start, start + chunk)
        merged = (b_in[rows].transpose(-1, -2) @ b_out[rows]).mul_(w0)  # (chunk, d_in, d_out), one live copy
        outs.append(torch.matmul(x3[rows], merged))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def flora_linear(
    x: Tensor,
    bank_in: Tensor,
    bank_out: Tensor,
    indices: Optional[Tensor] = None,
    *,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    fan_in_fan_out: bool = False,
    base_mm: Optional[BaseMatmul] = None,
    path: FLoRAPath | str = "auto",
    max_merge_bytes: int = DEFAULT_MAX_MERGE_BYTES,
) -> Tensor:
    """Semantics: y[b] = x[b] (W0 ∘ ΔW_{indices[b]}) + bias, by the cheapest exact path.

    ``weight`` is W0 in its storage layout (``fan_in_fan_out`` as in PEFT). A quantized base that cannot expose W0
    passes ``base_mm`` (its own call on scaled inputs, bias removed) and ``weight=None``; the merged path is then
    unavailable.
    """
    if base_mm is None:
        if weight is None:
            raise ValueError("flora_linear needs the base weight or a base_mm callable")
        base_mm = dense_matmul(weight, fan_in_fan_out)
    x3, per_token = _rows_view(x, indices)
    rank = bank_in.shape[-2]
    d_out = bank_out.shape[-1]
    if path == "auto":
        shape = FLoRAShape(
            rows=x3.shape[0],
            tokens=x3.shape[0] * x3.shape[1],
            d_in=x3.shape[-1],
            d_out=d_out,
            rank=rank,
            itemsize=x.element_size(),
            per_token=per_token,
            shared=indices is None,
        )
        path = choose_flora_path(shape, x.device, can_merge=weight is not None, max_merge_bytes=max_merge_bytes)
    g_in = _gather(bank_in, indices, x3, per_token)
    g_out = _gather(bank_out, indices, x3, per_token)
    if path == "rank1":
        if rank != 1:
            raise ValueError(f"the rank1 path needs a rank-1 bank, got rank {rank}")
        y = flora_rank1(x3, g_in, g_out, base_mm)
    elif path == "stacked":
        y = flora_stacked(x3, g_in, g_out, base_mm)
    elif path == "merged":
        if weight is None or per_token:
            raise ValueError("the merged path needs a dense base weight and per-row (not per-token) indices")
        y = flora_merged(x3, g_in, g_out, weight_in_out(weight, fan_in_fan_out), max_merge_bytes)
    else:
        raise ValueError(f"unknown FLoRA path {path!r}; expected 'auto', 'rank1', 'stacked' or 'merged'")
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], d_out)


def flora_delta_weight(flora_in: Tensor, flora_out: Tensor, *, fan_in_fan_out: bool = True) -> Tensor:
    """Semantics: ΔW = (1/r) flora_inᵀ · flora_out for an adapter's own parameters, ``(d_in, d_out)``; in
    ``nn.Linear``'s ``(d_out, d_in)`` storage layout when ``fan_in_fan_out`` is False (as the merge needs it)."""
    delta = flora_in.transpose(-1, -2) @ flora_out / flora_in.shape[-2]
    return weight_in_out(delta, fan_in_fan_out)


MERGE_EPS = 1e-8
"""Where |ΔW| is below this, unmerging divides by it instead (the division cannot be exact there)."""


def flora_merge_weight(weight: Tensor, delta: Tensor) -> Tensor:
    """Semantics: W0 ∘ ΔW, the merged weight (``delta`` in the weight's own layout)."""
    return weight * delta.to(weight.dtype)


def flora_unmerge_weight(weight: Tensor, delta: Tensor) -> Tensor:
    """Semantics: W ⊘ ΔW, undoing :func:`flora_merge_weight` (inexact where |ΔW| < :data:`MERGE_EPS`)."""
    delta = delta.to(weight.dtype)
    return weight / torch.where(delta.abs() < MERGE_EPS, MERGE_EPS, delta)


def scaled_base_matmul(base_layer: torch.nn.Module) -> BaseMatmul:
    """``x -> x W0`` through the layer's own call (for quantized weights), with its bias taken back off."""
    bias = base_layer.bias

    def call(t: Tensor) -> Tensor:
        y = base_layer(t)
        return y if bias is None else y - bias.to(y.dtype)

    return call


def base_call_kwargs(base_layer: torch.nn.Module, *, quantized: bool, fan_in_fan_out: bool) -> dict:
    """How :func:`flora_linear` reaches W0 for ``base_layer``: its dense weight, or, for a quantized base whose
    weight cannot be multiplied elementwise, a scaled call of the layer itself (``y = (x ∘ b) W0 ∘ a``)."""
    if quantized:
        return {"weight": None, "base_mm": scaled_base_matmul(base_layer), "bias": base_layer.bias}
    return {"weight": base_layer.weight, "bias": base_layer.bias, "fan_in_fan_out": fan_in_fan_out}


def compose_flora(first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Semantics: one adapter of rank r1·r2 whose ΔW is ΔW_1 ∘ ΔW_2 (how several active adapters stack exactly)."""
    (in1, out1), (in2, out2) = first, second
    d_in, d_out = in1.shape[-1], out1.shape[-1]
    composed_in = (in1[:, None, :] * in2[None, :, :]).reshape(-1, d_in)
    composed_out = (out1[:, None, :] * out2[None, :, :]).reshape(-1, d_out)
    return composed_in, composed_out
