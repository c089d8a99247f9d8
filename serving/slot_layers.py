"""Adapter slots inside the base model: each adapted linear holds preallocated banks and reads the step metadata.

vLLM's LoRA layout: every wrapped layer owns slot tensors (one row per device slot, row 0 = no adapter), an adapter
occupies the same slot index in every layer, and one metadata object per forward (:mod:`serving.step_metadata`)
says which slot each batch row uses. The math is the core's (flora_hf.ops); this module only holds tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from flora_hf.flora.bnb import is_8bit_linear
from flora_hf.ops import bank_row, base_call_kwargs, flora_linear, ia3_scale, lora_bmm_delta
from flora_hf.ops.milora import add_gated_lora

from .adapters.loader import Role, linear_features
from .step_metadata import AdapterContext


def _neutral(role: Role, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The bank content meaning "no adapter" for one slot."""
    if role in ("lora_a", "lora_b"):
        return torch.zeros(shape, dtype=dtype, device=device)
    if role in ("ia3_in", "ia3_out"):
        return torch.ones(shape, dtype=dtype, device=device)
    rank, dim = shape
    ones = torch.ones(1, dim, dtype=dtype, device=device)
    return bank_row(ones, ones, rank)[0]  # identity in sum form: first rank row ones, the rest zeros


class SlotLinear(nn.Module):
    """A base ``nn.Linear`` / ``Conv1D`` plus slot banks for FLoRA, LoRA and IA3 adapters, created on first use."""

    def __init__(self, base_layer: nn.Module, context: AdapterContext, num_slots: int, max_rank: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.d_in, self.d_out = linear_features(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.quantized = is_8bit_linear(base_layer)  # int8 W0: FLoRA runs as a scaled call of the layer
        self.banks: dict[Role, Tensor] = {}
        self.gate_site: Optional[tuple[str, int]] = None  # (layer path, gate column) once a MiLoRA expert

    def _base_call_kwargs(self) -> dict:
        """How the math core reaches W0 (the same choice the PEFT layers make)."""
        return base_call_kwargs(self.base_layer, quantized=self.quantized, fan_in_fan_out=self.fan_in_fan_out)

    def _bank_shape(self, role: Role) -> tuple[int, ...]:
        dim = self.d_in if role in ("flora_in", "lora_a", "ia3_in") else self.d_out
        return (dim,) if role.startswith("ia3") else (self.max_rank, dim)

    def _new_bank(self, role: Role) -> Tensor:
        weight = self.base_layer.weight
        dtype = torch.float16 if self.quantized else weight.dtype  # int8 weights: keep adapters in half precision
        row = _neutral(role, self._bank_shape(role), dtype, weight.device)
        return row.unsqueeze(0).repeat(self.num_slots + 1, *([1] * row.dim()))

    @torch.no_grad()
    def write_slot(self, slot: int, tensors: dict[Role, Tensor]) -> None:
        """Put an adapter's tensors for this layer in ``slot``; every other bank's slot goes back to neutral.

        Runs on the loader thread while the scheduler may be in a forward: rows of other slots are never touched,
        and new banks are published together by swapping the dict, so a forward never sees half a FLoRA pair.
        """
        banks = dict(self.banks)
        for role in tensors:
            if role not in banks:
                banks[role] = self._new_bank(role)
        for role, bank in banks.items():
            tensor = tensors.get(role)
            if tensor is None:
                bank[slot] = _neutral(role, self._bank_shape(role), bank.dtype, bank.device)
            elif role.startswith("lora"):
                bank[slot].zero_()
                bank[slot, : tensor.shape[0]] = tensor.to(bank.dtype)
            elif role.startswith("ia3"):
                bank[slot] = tensor.to(bank.dtype)
        if "flora_in" in tensors:
            f_in, f_out = bank_row(tensors["flora_in"], tensors["flora_out"], self.max_rank)
            banks["flora_in"][slot] = f_in.to(banks["flora_in"].dtype)
            banks["flora_out"][slot] = f_out.to(banks["flora_out"].dtype)
        self.banks = banks

    def clear_slot(self, slot: int) -> None:
        self.write_slot(slot, {})

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        meta = self.context.current
        if meta is None or not meta.any_adapter or not self.banks:
            return self.base_layer(x, *args, **kwargs)
        idx, banks = meta.slots, self.banks
        if meta.ia3 and "ia3_in" in banks:
            x = ia3_scale(x, banks["ia3_in"], idx)
        if meta.flora_rank and "flora_in" in banks:
            r = meta.flora_rank
            y = flora_linear(x, banks["flora_in"][:, :r], banks["flora_out"][:, :r], idx, **self._base_call_kwargs())
        else:
            y = self.base_layer(x, *args, **kwargs)
        if meta.lora_rank and "lora_a" in banks:
            r = meta.lora_rank
            bank_a, bank_b = banks["lora_a"][:, :r], banks["lora_b"][:, :r]
            routed = meta.expert_gates.get(self.gate_site[0]) if self.gate_site is not None else None
            if routed is None:  # no MiLoRA row routes through this layer
                y = y + lora_bmm_delta(x, bank_a, bank_b, idx)
            else:  # rows with a zero scale (unselected experts, rows without LoRA) cost nothing
                column = self.gate_site[1]
                y = add_gated_lora(y, x, bank_a, bank_b, idx, routed.column(column), routed.rows(column))
        if meta.ia3 and "ia3_out" in banks:
            y = ia3_scale(y, banks["ia3_out"], idx)
        return y


def wrap_module(model: nn.Module, path: str, context: AdapterContext, num_slots: int, max_rank: int) -> SlotLinear:
    """Replace ``model.<path>`` by a SlotLinear around it (idempotent)."""
    module = model.get_submodule(path)
    if isinstance(module, SlotLinear):
        return module
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    wrapped = SlotLinear(module, context, num_slots, max_rank)
    setattr(parent, child, wrapped)
    return wrapped
