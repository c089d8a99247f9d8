"""MiLoRA's routers in the server: one per transformer layer, for every slot, run at a prefill only.

MiLoRA adapters use the LoRA banks for their experts (:mod:`serving.slot_layers`) and add a :class:`SlotRouter` per
transformer layer. At a prefill the router pools each MiLoRA row's prompt and routes it (``flora_hf.ops.milora``),
once per prompt; the resulting gates ``(B, N)`` (one column per linear module of the layer) travel with the
:class:`~serving.batch.Batch` and come back in the metadata of every decoding step, where each expert's LoRA update
is scaled by its column.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from flora_hf.ops import RouterGroup, RouterParams, route_groups

from .adapters.loader import RouterWeights
from .slot_layers import SlotLinear
from .step_metadata import AdapterContext, StepMetadata


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


class SlotRouter:
    """MiLoRA's router of one transformer layer for every slot, run by a forward pre-hook on that layer.

    Only at a prefill with MiLoRA rows does it do anything: it routes each MiLoRA adapter's rows of the batch by
    their prompt with :func:`flora_hf.ops.route_groups` (the function PEFT's own router calls) and records the gates
    in the batch's :class:`~serving.step_metadata.MiLoRARouting`. Decoding steps read the gates recorded there: the
    router never runs. ``prompts_routed`` counts the prompts it routed (once per prompt), ``calls`` the forwards it
    routed in.
    """

    def __init__(self, layer: nn.Module, key: str, context: AdapterContext) -> None:
        self.key = key
        self.context = context
        self.experts = expert_columns(layer)
        self.columns = {name: column for column, name in enumerate(self.experts)}
        self.device = next((p.device for p in layer.parameters()), torch.device("cpu"))
        self.slots: dict[int, tuple[RouterParams, Tensor]] = {}  # slot -> its router, the gate column of each expert
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
            columns = torch.tensor([self.columns[e] for e in router.experts], device=self.device)
            slots[slot] = (router.params(self.device), columns)
        self.slots = slots

    def clear_slot(self, slot: int) -> None:
        self.write_slot(slot, None)

    def _before_layer(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        meta = self.context.current
        if meta is None or meta.prefill is None or meta.milora is None:
            return
        self.route(args[0] if args else kwargs["hidden_states"], meta)

    def route(self, hidden: Tensor, meta: StepMetadata) -> None:
        """Gates of this layer for every MiLoRA row of a prefill, from the layer's input ``hidden`` ``(B, T, d)``."""
        slots = self.slots
        groups: list[RouterGroup] = []
        for slot, rows in meta.prefill.groups.items():
            entry = slots.get(slot)
            if entry is not None:  # else this adapter has no experts in this layer
                groups.append((entry[0], rows, entry[1]))
        if not groups:
            return
        gates, _ = route_groups(hidden, meta.prefill.prompt_mask, groups, len(self.experts))
        self.prompts_routed += sum(rows.numel() for _, rows, _ in groups)
        self.calls += 1
        meta.milora.record(self.key, gates)

    def remove(self) -> None:
        self._handle.remove()


def attach_router(
    model: nn.Module, layer_path: str, context: AdapterContext, routers: dict[str, SlotRouter]
) -> SlotRouter:
    """The MiLoRA router of ``model.<layer_path>`` in ``routers`` (layer path -> router), created and hooked on first
    use (by the adapter store, which owns the routers as it owns the slot layers)."""
    router = routers.get(layer_path)
    if router is None:
        router = routers[layer_path] = SlotRouter(model.get_submodule(layer_path), layer_path, context)
    return router
