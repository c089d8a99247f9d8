from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from ..base_layers import linear_features
from ..ops import LoRATerm, adapted_linear, add_zero_use, build_lora_bank, lora_bank_row
from ..per_example import PerExampleAdapterLayer
from .router import GateSlot


class MiLoRALayer(BaseTunerLayer, PerExampleAdapterLayer):
    """One LoRA expert per adapter: ``milora_A`` (r, in) and ``milora_B`` (out, r), PEFT's LoRA factor layout.

    The expert's update is scaled per row by its router gate (zero when the prompt did not select it), read from
    the :class:`~flora_hf.milora.router.GateSlot` its transformer layer's router fills before the layer runs.
    """

    adapter_layer_names = ("milora_A", "milora_B")
    other_param_names = ("r", "scaling", "dropout_p")

    def __init__(self, base_layer: nn.Module, expert_name: str, slot: GateSlot, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.expert_name = expert_name
        self.slot = slot
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.milora_A = nn.ParameterDict({})
        self.milora_B = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features, self.out_features = linear_features(self.get_base_layer(), "MiLoRA experts")

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init_weights: bool = True,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        self.r[adapter_name] = r
        self.scaling[adapter_name] = scaling
        self.dropout_p[adapter_name] = dropout
        a = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's LoRA init for A
        b = torch.zeros(self.out_features, r) if init_weights else torch.randn(self.out_features, r) * 0.1
        self.milora_A[adapter_name] = nn.Parameter(a)
        self.milora_B[adapter_name] = nn.Parameter(b)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def adapter_names_in_layer(self) -> set[str]:
        return set(self.milora_A.keys())

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        # transformers' delete_adapter skips modules whose name holds the method prefix, so it never reaches
        # ``layer.prompt_router`` itself: the experts take their router along.
        router = self.slot.router
        if router is not None and adapter_name in router.milora_weight:
            router.delete_adapter(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError("MiLoRA cannot be merged: which experts apply depends on each prompt's routing")

    def unmerge(self) -> None:
        return None

    # ------------------------------------------------------------------------------------------------ forward
    def _bank(self, names: tuple[str, ...], like: Tensor) -> tuple[Tensor, Tensor]:
        params = [(self.milora_A[n], self.milora_B[n]) for n in names]

        def build() -> tuple[Tensor, Tensor]:
            return build_lora_bank(
                [(a, b, self.scaling[n]) for n, (a, b) in zip(names, params)],
                self.in_features,
                self.out_features,
                dtype=like.dtype,
                device=like.device,
            )

        return self._cached_bank((names, like.dtype, like.device), params, build)

    def _dropout(self, x: Tensor, names: tuple[str, ...]) -> Tensor:
        # One rate per call: per-example batches mixing adapters with different dropout rates use the largest.
        p = max(self.dropout_p[n] for n in names)
        return F.dropout(x, p, training=True) if self.training and p > 0 else x

    def _expert_terms(self, x: Tensor) -> tuple[list[LoRATerm], tuple[str, ...]]:
        """This expert's LoRA update for the rows its router selected, and the adapters it left unused here."""
        gates = self.slot.current
        if gates is None:
            raise RuntimeError(
                f"MiLoRA expert {self.expert_name!r} ran before its layer's router: call the model (or its "
                "transformer layer), not the adapted module alone"
            )
        column = self.slot.columns[self.expert_name]
        batch = self.current_adapter_batch()
        if batch is not None:
            names = tuple(self.milora_A.keys())
            routed = gates.get(None)
            if routed is None or routed.selects_no_row(column):
                return [], names
            bank_a, bank_b = self._bank(names, x)  # stacks every adapter's factors: all of them are in the graph
            indices = batch.indices(names, x.shape[0], x.device)
            term = LoRATerm(
                bank_a, bank_b, indices, routed.column(column), routed.rows(column), self._dropout(x, names)
            )
            return [term], ()
        terms, unused = [], []
        for name in self.active_adapters:
            if name not in self.milora_A:
                continue
            routed = gates.get(name)
            if routed is None or routed.selects_no_row(column):
                unused.append(name)
                continue
            # one adapter for every row: its own factors, two GEMMs
            a, b = lora_bank_row(self.milora_A[name], self.milora_B[name], self.scaling[name])
            terms.append(LoRATerm(a, b, None, routed.column(column), routed.rows(column), self._dropout(x, (name,))))
        return terms, tuple(unused)

    def _in_graph_unused(self, y: Tensor, names: tuple[str, ...]) -> Tensor:
        """``y`` unchanged, with the trainable factors of ``names`` in its graph (a zero gradient) in training.

        Top-k routing leaves some experts unselected in most batches, and DistributedDataParallel without
        ``find_unused_parameters`` needs a gradient for every trainable parameter at every step.
        """
        return add_zero_use(y, [p for n in names for p in (self.milora_A[n], self.milora_B[n])], self.training)

    def milora_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disable_adapters or not self.milora_A:
            return self.base_layer(x, *args, **kwargs)
        terms, unused = self._expert_terms(x)
        y = adapted_linear(x, self.base_layer, lora=terms, base_args=args, base_kwargs=kwargs)
        return self._in_graph_unused(y, unused) if unused else y


class Linear(nn.Module, MiLoRALayer):
    """A MiLoRA expert on ``nn.Linear`` or GPT-2's ``Conv1D`` (the delta is layout-independent: x Aᵀ Bᵀ)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        expert_name: str,
        slot: GateSlot,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init_weights: bool = True,
        fan_in_fan_out: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        MiLoRALayer.__init__(self, base_layer, expert_name, slot, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, scaling, dropout=dropout, init_weights=init_weights)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.milora_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "milora." + super().__repr__()
