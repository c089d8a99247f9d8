"""Adapter slots inside the base model: each adapted linear holds preallocated banks and reads the step metadata.

vLLM's LoRA layout: every wrapped layer owns slot tensors (one row per device slot, row 0 = no adapter), an adapter
occupies the same slot index in every layer, and one metadata object per forward says which slot each batch row
uses. The math is the core's (flora_hf.ops); this module only holds tensors and routes.

MiLoRA adapters use the LoRA banks for their experts and add a :class:`SlotRouter` per transformer layer. At a
prefill the router pools each MiLoRA row's prompt and routes it (``flora_hf.ops.milora``), once per prompt; the
resulting gates ``(B, N)`` (one column per linear module of the layer) travel with the :class:`~serving.batch.Batch`
and come back in the metadata of every decoding step, where each expert's LoRA update is scaled by its column.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from flora_hf.flora.bnb import is_8bit_linear
from flora_hf.ops import bank_row, base_call_kwargs, flora_linear, ia3_scale, lora_bmm_delta
from flora_hf.ops.milora import RoutedGates, add_gated_lora, pool_prompt, route

from .adapters.loader import Role, RouterWeights, linear_features


@dataclass
class PromptRouting:
    """What the routers need at a prefill holding MiLoRA rows, and where they leave their gates."""

    prompt_mask: Tensor  # (B, T) bool: the prompt tokens (left padding masked)
    groups: dict[int, Tensor]  # slot -> the rows (device, long) of the MiLoRA adapter in that slot
    lora_rows: Optional[Tensor] = None  # (B,) bool: plain LoRA rows, whose LoRA update keeps scale 1
    gates: dict[str, Tensor] = field(default_factory=dict)  # layer path -> (B, N) router gates, 0 for other rows


@dataclass
class StepMetadata:
    """Per-forward adapter routing: a slot per batch row and which adapter kinds the batch uses.

    ``lora_rank`` covers LoRA and MiLoRA rows (both live in the LoRA banks). ``expert_gates`` scales the LoRA update
    of a MiLoRA expert row by row (its gate for MiLoRA rows, 1 for LoRA rows, 0 for rows without either): filled by
    the routers at a prefill (``routing``), handed over from the batch at a decoding step.
    """

    slots: Tensor  # (B,) long, on the model's device; 0 = base model
    flora_rank: int = 0  # largest FLoRA rank among the rows (0: no FLoRA row)
    lora_rank: int = 0
    ia3: bool = False
    routing: Optional[PromptRouting] = None
    expert_gates: dict[str, RoutedGates] = field(default_factory=dict)

    @property
    def any_adapter(self) -> bool:
        return bool(self.flora_rank or self.lora_rank or self.ia3)


def expert_gates(gates: Tensor, lora_rows: Optional[Tensor]) -> RoutedGates:
    """Row scales of one layer's LoRA bank: router gates on MiLoRA rows, 1 on plain LoRA rows (``lora_rows``)."""
    scale = gates if lora_rows is None else torch.where(lora_rows[:, None], torch.ones_like(gates), gates)
    return RoutedGates(scale)


class AdapterContext:
    """Shared by every slot layer and router of a model: the engine sets ``current`` around each forward."""

    def __init__(self) -> None:
        self.current: Optional[StepMetadata] = None
        self.routers: dict[str, SlotRouter] = {}  # transformer layer path -> its MiLoRA router


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


def expert_columns(layer: nn.Module) -> tuple[str, ...]:
    """The gate columns of a transformer layer: every linear module in it (path inside the layer), sorted.

    Fixed when the layer's router is created, so gates computed before a later adapter arrived keep their meaning.
    """
    names: list[str] = []
    for name, module in layer.named_modules():
        if any(name.startswith(f"{n}.") for n in names):
            continue  # inside a slot layer: its base layer
        if isinstance(module, (SlotLinear, nn.Linear, Conv1D)) and name:
            names.append(name)
    return tuple(sorted(names))


@dataclass
class RouterSlot:
    """One MiLoRA adapter's router for one layer, on the device (fp32), and where its experts sit in the gates."""

    router: RouterWeights
    columns: Tensor  # (N_adapter,) long: the gate column of each row of ``router.weight``


class SlotRouter:
    """MiLoRA's router of one transformer layer for every slot, run by a forward pre-hook on that layer.

    Only at a prefill with MiLoRA rows does it do anything: for each MiLoRA adapter in the batch it pools that
    adapter's rows' prompt tokens and routes them with :func:`flora_hf.ops.milora.pool_prompt` and
    :func:`~flora_hf.ops.milora.route` (a loop over the adapters present, as PEFT's own router does), and leaves the
    gates in the step metadata. Decoding steps reuse the gates stored in the batch: the router never runs there.
    ``prompts_routed`` counts the prompts it routed (once per prompt), ``calls`` the forwards it routed in.
    """

    def __init__(self, layer: nn.Module, key: str, context: AdapterContext) -> None:
        self.key = key
        self.context = context
        self.experts = expert_columns(layer)
        self.columns = {name: column for column, name in enumerate(self.experts)}
        self.device = next((p.device for p in layer.parameters()), torch.device("cpu"))
        self.slots: dict[int, RouterSlot] = {}
        self.prompts_routed = 0
        self.calls = 0
        self._handle = layer.register_forward_pre_hook(self._before_layer, with_kwargs=True)

    @torch.no_grad()
    def write_slot(self, slot: int, router: Optional[RouterWeights]) -> None:
        """Put an adapter's router in ``slot`` (None: empty it); published by swapping the dict, as the banks are."""
        slots = dict(self.slots)
        if router is None:
            slots.pop(slot, None)
        else:
            to = {"device": self.device, "dtype": torch.float32}  # router and rational stay fp32
            on_device = replace(
                router,
                weight=router.weight.to(**to),
                num=router.num.to(**to),
                den=router.den.to(**to),
                query=None if router.query is None else router.query.to(**to),
            )
            columns = torch.tensor([self.columns[e] for e in router.experts], device=self.device)
            slots[slot] = RouterSlot(on_device, columns)
        self.slots = slots

    def clear_slot(self, slot: int) -> None:
        self.write_slot(slot, None)

    def _before_layer(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        meta = self.context.current
        if meta is None or meta.routing is None:
            return
        self.route(args[0] if args else kwargs["hidden_states"], meta)

    def route(self, hidden: Tensor, meta: StepMetadata) -> None:
        """Gates of this layer for every MiLoRA row of a prefill, from the layer's input ``hidden`` ``(B, T, d)``."""
        routing, slots = meta.routing, self.slots
        gates = None
        for slot, rows in routing.groups.items():
            entry = slots.get(slot)
            if entry is None:  # this adapter has no experts in this layer
                continue
            mask = routing.prompt_mask.index_select(0, rows)
            r = entry.router
            pooled = pool_prompt(hidden.index_select(0, rows), mask, r.pooler, r.query)
            _, routed = route(pooled, r.weight, r.num, r.den, r.top_k, r.rational_form)
            if gates is None:
                gates = torch.zeros(hidden.shape[0], len(self.experts), device=hidden.device)
            gates[rows[:, None], entry.columns[None, :]] = routed
            self.prompts_routed += rows.numel()
        if gates is not None:
            self.calls += 1
            routing.gates[self.key] = gates
            meta.expert_gates[self.key] = expert_gates(gates, routing.lora_rows)

    def remove(self) -> None:
        self._handle.remove()


def attach_router(model: nn.Module, layer_path: str, context: AdapterContext) -> SlotRouter:
    """The MiLoRA router of ``model.<layer_path>``, created (and hooked) on first use."""
    router = context.routers.get(layer_path)
    if router is None:
        router = SlotRouter(model.get_submodule(layer_path), layer_path, context)
        context.routers = {**context.routers, layer_path: router}
    return router
