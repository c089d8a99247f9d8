"""Bank rows: how one adapter's tensors sit in a bank, and the row that means "no adapter" (docs/DESIGN.md §2).

A bank holds one row per adapter, padded to the bank's rank ``R``: FLoRA ``(n, R, d_in)`` / ``(n, R, d_out)`` in sum
form, LoRA ``(n, R, d_in)`` / ``(n, R, d_out)`` with ``Bᵀ`` and its scaling, IA3 ``(n, d)``. Zero rank rows are exact
padding for all of them (FLoRA's sum form adds nothing for a zero row, LoRA is additive). The neutral row
(row 0, and every empty serving slot) is FLoRA's identity (ΔW ≡ 1), LoRA's zeros and IA3's ones.

Training stacks banks from the parameters every step (``build_*_bank``, differentiable); the server writes rows into
preallocated slot banks (:func:`neutral_row`, :func:`adapter_rows`). Both get their rows here.
"""

from __future__ import annotations

from typing import Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BankRole = Literal["flora_in", "flora_out", "lora_a", "lora_b", "ia3_in", "ia3_out"]
"""A bank of one layer: FLoRA's two factors, LoRA's two factors, IA3's input or output scale."""

INPUT_ROLES: frozenset[str] = frozenset({"flora_in", "lora_a", "ia3_in"})
"""Roles whose last dimension is the layer's input width (the others: its output width)."""


def role_dim(role: BankRole, d_in: int, d_out: int) -> int:
    return d_in if role in INPUT_ROLES else d_out


def pad_rank(factor: Tensor, rank: int) -> Tensor:
    """Semantics: ``factor`` ``(r, d)`` with ``rank - r`` zero rows appended (exact for every bank's rank rows)."""
    r = factor.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad a rank-{r} adapter down to rank {rank}")
    return F.pad(factor, (0, 0, 0, rank - r))


def bank_row(flora_in: Tensor, flora_out: Tensor, rank: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Semantics: an adapter's parameters (mean over its r components) in the bank's sum form, zero-padded to ``rank``."""
    r = flora_in.shape[0]
    rank = r if rank is None else rank
    return pad_rank(flora_in, rank), pad_rank(flora_out / r, rank)


def identity_row(rank: int, d_in: int, d_out: int, *, dtype=None, device=None) -> tuple[Tensor, Tensor]:
    """The FLoRA bank row that means "no adapter" (ΔW ≡ 1), in sum form."""
    return bank_row(
        torch.ones(1, d_in, dtype=dtype, device=device), torch.ones(1, d_out, dtype=dtype, device=device), rank
    )


def lora_bank_row(lora_a: Tensor, lora_b: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Semantics: PEFT's LoRA factors ``A`` ``(r, d_in)``, ``B`` ``(d_out, r)`` as a bank row: ``A`` and ``scaling · Bᵀ``."""
    return lora_a, lora_b.t() * scaling


def neutral_row(role: BankRole, rank: int, dim: int, *, dtype=None, device=None) -> Tensor:
    """Semantics: the row of ``role`` meaning "no adapter": FLoRA's identity, LoRA zeros, IA3 ones."""
    if role in ("ia3_in", "ia3_out"):
        return torch.ones(dim, dtype=dtype, device=device)
    if role in ("lora_a", "lora_b"):
        return torch.zeros(rank, dim, dtype=dtype, device=device)
    ones = torch.ones(1, dim, dtype=dtype, device=device)
    return bank_row(ones, ones, rank)[0]  # first rank row ones, the rest zeros (the same row for in and out)


def neutral_bank(role: BankRole, slots: int, rank: int, dim: int, *, dtype=None, device=None) -> Tensor:
    """Semantics: ``slots + 1`` copies of :func:`neutral_row` (row 0 and every empty slot mean "no adapter")."""
    row = neutral_row(role, rank, dim, dtype=dtype, device=device)
    return row.unsqueeze(0).repeat(slots + 1, *([1] * row.dim()))


def adapter_rows(tensors: Mapping[BankRole, Tensor], rank: int) -> dict[BankRole, Tensor]:
    """Semantics: one adapter's tensors of a layer as bank rows of ``rank``.

    FLoRA factors come in PEFT's mean form and are folded into sum form; LoRA factors come in bank form
    (:func:`lora_bank_row`) and are zero-padded; IA3 vectors are their own row.
    """
    rows: dict[BankRole, Tensor] = {}
    for role, tensor in tensors.items():
        if role in ("lora_a", "lora_b"):
            rows[role] = pad_rank(tensor, rank)
        elif role in ("ia3_in", "ia3_out"):
            rows[role] = tensor
    if "flora_in" in tensors or "flora_out" in tensors:
        rows["flora_in"], rows["flora_out"] = bank_row(tensors["flora_in"], tensors["flora_out"], rank)
    return rows


def build_flora_bank(
    adapters: list[tuple[Tensor, Tensor]], d_in: int, d_out: int, *, dtype=None, device=None
) -> tuple[Tensor, Tensor]:
    """Stack adapters (``(r_k, d_in)``, ``(r_k, d_out)`` parameter pairs) into a bank whose row 0 is the identity.

    Differentiable: in training the bank is rebuilt from the parameters each step and gradients reach each one.
    """
    rank = max((f_in.shape[0] for f_in, _ in adapters), default=1)
    rows = [identity_row(rank, d_in, d_out, dtype=dtype, device=device)]
    rows += [bank_row(f_in.to(dtype), f_out.to(dtype), rank) for f_in, f_out in adapters]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def build_lora_bank(
    adapters: list[tuple[Tensor, Tensor, float]], d_in: int, d_out: int, *, dtype=None, device=None
) -> tuple[Tensor, Tensor]:
    """Stack PEFT LoRA factors ``(lora_A (r, d_in), lora_B (d_out, r), scaling)`` into a zero-row-0 bank.

    Differentiable, like :func:`build_flora_bank` (MiLoRA trains its experts through it).
    """
    rank = max((a.shape[0] for a, _, _ in adapters), default=1)
    rows_a = [neutral_row("lora_a", rank, d_in, dtype=dtype, device=device)]
    rows_b = [neutral_row("lora_b", rank, d_out, dtype=dtype, device=device)]
    for a, b, scaling in adapters:
        to = {"device": device, "dtype": dtype}
        row_a, row_b = lora_bank_row(a.to(**to), b.to(**to), scaling)
        rows_a.append(pad_rank(row_a, rank))
        rows_b.append(pad_rank(row_b, rank))
    return torch.stack(rows_a), torch.stack(rows_b)


def build_ia3_bank(vectors: list[Tensor], dim: int, *, dtype=None, device=None) -> Tensor:
    """Stack IA3 vectors (any shape with ``dim`` elements) into a bank whose row 0 is ones."""
    rows = [neutral_row("ia3_in", 0, dim, dtype=dtype, device=device)]
    rows += [v.reshape(dim).to(dtype) for v in vectors]
    return torch.stack(rows)
