"""Adapter slots inside the base model: each adapted linear holds preallocated banks and reads the step metadata.

vLLM's LoRA layout: every wrapped layer owns slot tensors (one row per device slot, row 0 = no adapter), an adapter
occupies the same slot index in every layer, and one metadata object per forward (:mod:`serving.step_metadata`)
says which slot each batch row uses. The rows and the math are the core's (:mod:`flora_hf.ops`): this module only
holds tensors and picks the banks a step needs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from flora_hf.flora.bnb import is_8bit_linear
from flora_hf.ops import BankRole, LoRATerm, adapted_linear, adapter_rows, neutral_bank, neutral_row, role_dim

from .adapters.loader import linear_features
from .step_metadata import AdapterContext


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
        self.banks: dict[BankRole, Tensor] = {}
        self.gate_site: Optional[tuple[str, int]] = None  # (layer path, gate column) once a MiLoRA expert

    def _neutral(self, role: BankRole, dtype: torch.dtype, device: torch.device) -> Tensor:
        return neutral_row(role, self.max_rank, role_dim(role, self.d_in, self.d_out), dtype=dtype, device=device)

    def _new_bank(self, role: BankRole) -> Tensor:
        weight = self.base_layer.weight
        dtype = torch.float16 if self.quantized else weight.dtype  # int8 weights: keep adapters in half precision
        dim = role_dim(role, self.d_in, self.d_out)
        return neutral_bank(role, self.num_slots, self.max_rank, dim, dtype=dtype, device=weight.device)

    @torch.no_grad()
    def write_slot(self, slot: int, tensors: dict[BankRole, Tensor]) -> None:
        """Put an adapter's tensors for this layer in ``slot``; every other bank's slot goes back to neutral.

        Runs on the loader thread while the scheduler may be in a forward: rows of other slots are never touched,
        and new banks are published together by swapping the dict, so a forward never sees half a FLoRA pair.
        """
        banks = dict(self.banks)
        for role in tensors:
            if role not in banks:
                banks[role] = self._new_bank(role)
        rows = adapter_rows(tensors, self.max_rank)
        for role, bank in banks.items():
            row = rows.get(role)
            bank[slot] = self._neutral(role, bank.dtype, bank.device) if row is None else row.to(bank.dtype)
        self.banks = banks

    def clear_slot(self, slot: int) -> None:
        self.write_slot(slot, {})

    def _lora_term(self, banks: dict[BankRole, Tensor], rank: int, slots: Tensor) -> LoRATerm:
        """The LoRA banks at the step's rank; gated per row where MiLoRA experts of this layer are routed."""
        term = LoRATerm(banks["lora_a"][:, :rank], banks["lora_b"][:, :rank], slots)
        milora = self.context.current.milora
        if self.gate_site is not None and milora is not None:
            layer, column = self.gate_site
            scales = milora.expert_scales(layer)
            if scales is not None:  # rows with a zero scale (unselected experts, rows without LoRA) cost nothing
                term.gate, term.rows = scales.column(column), scales.rows(column)
        return term

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        meta = self.context.current
        banks = self.banks
        if meta is None or not meta.any_adapter or not banks:
            return self.base_layer(x, *args, **kwargs)
        flora = None
        if meta.flora_rank and "flora_in" in banks:
            r = meta.flora_rank
            flora = (banks["flora_in"][:, :r], banks["flora_out"][:, :r])
        has_lora = meta.lora_rank and "lora_a" in banks
        return adapted_linear(
            x,
            self.base_layer,
            meta.slots,
            flora=flora,
            lora=[self._lora_term(banks, meta.lora_rank, meta.slots)] if has_lora else [],
            ia3_in=banks.get("ia3_in") if meta.ia3 else None,
            ia3_out=banks.get("ia3_out") if meta.ia3 else None,
            quantized=self.quantized,
            fan_in_fan_out=self.fan_in_fan_out,
            base_args=args,
            base_kwargs=kwargs,
        )


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
