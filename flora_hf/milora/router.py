"""MiLoRA's per-layer router and the once-per-prompt routing state it shares with its experts.

A :class:`MiLoRARouter` is attached to each transformer layer (``layer.prompt_router``) and runs from a forward
pre-hook on that layer: at prefill it pools the prompt, routes, and stores the gates; at decode it hands back the
stored gates. The gates of causal (decoder) layers are stored on the KV cache object, so they live exactly as
long as the cache and follow it through beam reordering; encoder layers re-route on every call (an encoder sees
its whole prompt every time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from ..checkpointing import Snapshot, attribute_snapshot, register_snapshotter
from ..ops.milora import (
    RoutedGates,
    RouterGroup,
    RouterParams,
    add_zero_use,
    gelu_rational_init,
    load_balance_loss,
    route_groups,
)
from ..per_example import PerExampleAdapterLayer, _in_backward

GatesByAdapter = dict[Optional[str], RoutedGates]
"""Per-example batches use the key None (each row routed by its own adapter); otherwise one entry per active adapter."""

_CACHE_ATTR = "_milora_gates"


@dataclass
class GateSlot:
    """Shared by a router and the expert layers of its transformer layer: the expert columns and current gates."""

    columns: dict[str, int] = field(default_factory=dict)
    current: Optional[GatesByAdapter] = None
    router: Optional[MiLoRARouter] = field(default=None, repr=False, compare=False)


@dataclass
class RoutingRuntime:
    """Model-wide routing context for the current forward, set by a pre-hook on the model's top-level forward."""

    in_model_call: bool = False
    reuse: bool = False
    prompt_mask: Optional[Tensor] = None
    encoder_mask: Optional[Tensor] = None
    cache: Any = None
    explicit_prompt_mask: Optional[Tensor] = None
    generate_prompt_length: Optional[int] = None  # set while ``generate`` runs: the prompt is its first columns
    balance_losses: list[Tensor] = field(default_factory=list)
    local_gates: dict[str, GatesByAdapter] = field(default_factory=dict)

    def stored(self) -> dict[str, GatesByAdapter]:
        if self.cache is None:
            return self.local_gates
        gates = getattr(self.cache, _CACHE_ATTR, None)
        if gates is None:
            gates = {}
            attach_gates_to_cache(self.cache, gates)
        return gates


_REPLAYED_FIELDS = ("in_model_call", "reuse", "prompt_mask", "encoder_mask", "cache", "explicit_prompt_mask")


@register_snapshotter
def _routing_context(module: nn.Module) -> Optional[Snapshot]:
    """The gates and routing context of the forward a checkpointed layer ran in, for its recompute.

    transformers checkpoints the layer's ``forward`` and keeps module hooks, the router's among them, outside it:
    the recompute does not route again, so its experts must read this forward's gates, not the latest call's.
    (Where a release checkpoints ``__call__``, the router re-runs inside and reads the restored context.)
    """
    routers = [m for m in module.modules() if isinstance(m, MiLoRARouter)]
    if not routers:
        return None
    targets = [(r.slot, ("current",)) for r in routers]
    targets += [(rt, _REPLAYED_FIELDS) for rt in {id(r.runtime): r.runtime for r in routers}.values()]
    return attribute_snapshot(targets)


def _select(gates: dict[str, GatesByAdapter], pick) -> None:
    for key, by_adapter in gates.items():
        gates[key] = {name: pick(rg) for name, rg in by_adapter.items()}


def attach_gates_to_cache(cache: Any, gates: dict[str, GatesByAdapter]) -> None:
    """Store ``gates`` on a transformers Cache and make its row-reordering methods reorder them too.

    Cache classes are transformers' (no hook for extra per-row state), so the instance's own methods are wrapped.
    """
    setattr(cache, _CACHE_ATTR, gates)
    if getattr(cache, "_milora_wrapped", False):
        return
    for method, pick in (
        ("reorder_cache", lambda idx: lambda rg: rg.index_select(idx)),
        ("batch_select_indices", lambda idx: lambda rg: rg.index_select(idx)),
        ("batch_repeat_interleave", lambda n: lambda rg: rg.repeat_interleave(n)),
    ):
        original = getattr(cache, method, None)
        if original is None:
            continue

        def wrapped(arg, _original=original, _pick=pick):
            result = _original(arg)
            _select(getattr(cache, _CACHE_ATTR), _pick(arg))
            return result

        setattr(cache, method, wrapped)
    cache._milora_wrapped = True


def cached_gates(cache: Any) -> Optional[dict[str, GatesByAdapter]]:
    return getattr(cache, _CACHE_ATTR, None)


class MiLoRARouter(nn.Module, BaseTunerLayer, PerExampleAdapterLayer):
    """Pooler, normalization, rational activation, linear, softmax and top-k for one transformer layer.

    Parameters per adapter: ``milora_weight`` (N_adapter, d) router weight, ``milora_query`` (d,) the attention
    pooler's query, ``milora_num`` / ``milora_den`` the rational coefficients (the bi-level "architecture"
    parameters), all fp32. Expert columns are the union over this layer's adapters, so adapters that adapt
    different module sets still share one gates tensor.
    """

    adapter_layer_names = ("milora_weight", "milora_query", "milora_num", "milora_den")
    other_param_names = ("top_k", "pooler", "rational_form", "experts")

    def __init__(self, key: str, hidden_size: int, runtime: RoutingRuntime, is_encoder: bool) -> None:
        super().__init__()
        self.key = key
        self.hidden_size = hidden_size
        self.runtime = runtime
        self.is_encoder = is_encoder
        self.slot = GateSlot()
        self.milora_weight = nn.ParameterDict({})
        self.milora_query = nn.ParameterDict({})
        self.milora_num = nn.ParameterDict({})
        self.milora_den = nn.ParameterDict({})
        self.top_k: dict[str, int] = {}
        self.pooler: dict[str, str] = {}
        self.rational_form: dict[str, str] = {}
        self.experts: dict[str, tuple[str, ...]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = "default"
        self.kwargs: dict[str, Any] = {}

    def update_layer(
        self,
        adapter_name: str,
        experts: tuple[str, ...],
        top_k: int,
        pooler: str,
        rational_degrees: tuple[int, int],
        rational_form: str,
        device: torch.device,
        inference_mode: bool = False,
    ) -> None:
        self.experts[adapter_name] = tuple(experts)
        for name in experts:
            self.slot.columns.setdefault(name, len(self.slot.columns))
        self.top_k[adapter_name] = top_k
        self.pooler[adapter_name] = pooler
        self.rational_form[adapter_name] = rational_form
        weight = torch.empty(len(experts), self.hidden_size, device=device)
        nn.init.normal_(weight, std=self.hidden_size**-0.5)
        self.milora_weight[adapter_name] = nn.Parameter(weight)
        if pooler == "attention":
            self.milora_query[adapter_name] = nn.Parameter(
                torch.randn(self.hidden_size, device=device) * self.hidden_size**-0.5
            )
        a, b = gelu_rational_init(*rational_degrees, form=rational_form)
        self.milora_num[adapter_name] = nn.Parameter(a.to(device))
        self.milora_den[adapter_name] = nn.Parameter(b.to(device))
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def adapter_names_in_layer(self) -> set[str]:
        return set(self.milora_weight.keys())

    # A router sits beside a transformer layer rather than around a module, so it has no base layer. PEFT's
    # base-layer lookups (weight, bias, the device and dtype to move an adapter to) must not look for one: the
    # default would find the router itself and recurse forever.
    @property
    def weight(self) -> Tensor:
        raise AttributeError("a MiLoRARouter has no base layer, so no weight (its parameters: milora_weight, ...)")

    @property
    def bias(self) -> Tensor:
        raise AttributeError("a MiLoRARouter has no base layer, so no bias")

    @property
    def in_features(self) -> int:
        return self.hidden_size

    @property
    def out_features(self) -> int:
        return len(self.slot.columns)

    def get_base_layer(self) -> nn.Module:
        return self

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Router parameters are made on their layer's device and stay fp32: only an explicit device moves them."""
        if device is None:
            return
        for name in self.adapter_layer_names:
            params = getattr(self, name)
            if adapter_name in params and params[adapter_name].device.type != "meta":
                params[adapter_name] = nn.Parameter(
                    params[adapter_name].to(device), requires_grad=params[adapter_name].requires_grad
                )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.experts.pop(adapter_name, None)

    # ------------------------------------------------------------------------------------------------- routing
    def _router_group(self, name: str, rows: Optional[Tensor], device: torch.device) -> RouterGroup:
        """Adapter ``name``'s router as the math core takes it, for ``rows`` (None: every row)."""
        params = RouterParams(
            weight=self.milora_weight[name],
            numerator=self.milora_num[name],
            denominator=self.milora_den[name],
            top_k=self.top_k[name],
            pooler=self.pooler[name],
            form=self.rational_form[name],
            query=self.milora_query.get(name, None),
        )
        columns = torch.tensor([self.slot.columns[e] for e in self.experts[name]], device=device)
        return params, rows, columns

    def _router_parameters(self, name: str) -> list[Tensor]:
        return [
            d[name] for d in (self.milora_weight, self.milora_query, self.milora_num, self.milora_den) if name in d
        ]

    def _record_balance(self, probs: Tensor) -> None:
        if self.training and torch.is_grad_enabled() and not _in_backward() and probs.shape[-1] > 1:
            self.runtime.balance_losses.append(load_balance_loss(probs))

    def route_prompt(self, hidden: Tensor, prompt_mask: Tensor) -> GatesByAdapter:
        """Gates for every row of ``hidden`` ``(B, T, d)`` from its prompt tokens ``prompt_mask`` ``(B, T)``."""
        columns = len(self.slot.columns)
        batch = self.current_adapter_batch()
        if batch is not None:
            order = tuple(self.milora_weight.keys())
            indices = batch.indices(order, hidden.shape[0], hidden.device)
            groups, absent = [], []
            for k, name in enumerate(order, start=1):
                rows = (indices == k).nonzero(as_tuple=True)[0]
                if rows.numel():
                    groups.append(self._router_group(name, rows, hidden.device))
                else:
                    absent.append(name)
            gates, probs = route_groups(hidden, prompt_mask, groups, columns)
            for p in probs:
                self._record_balance(p)
            for name in absent:  # an adapter absent from this batch: its router stays in the graph (DDP)
                gates = add_zero_use(gates, self._router_parameters(name), self.training)
            return {None: RoutedGates(gates)}
        result: GatesByAdapter = {}
        for name in self.active_adapters:
            if name in self.milora_weight:
                group = self._router_group(name, None, hidden.device)
                gates, (probs,) = route_groups(hidden, prompt_mask, [group], columns)
                self._record_balance(probs)
                result[name] = RoutedGates(gates)
        return result

    def forward(self, hidden: Tensor) -> GatesByAdapter:
        """Route ``hidden`` as the current model call says (prefill: route and store; decode: reuse) and publish."""
        runtime = self.runtime
        ones = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if self.disable_adapters or not self.milora_weight:
            gates: GatesByAdapter = {}
        elif self.is_encoder:
            mask = runtime.encoder_mask if runtime.in_model_call else None  # generate runs encoders on their own
            gates = self.route_prompt(hidden, mask if mask is not None and mask.shape == ones.shape else ones)
        elif runtime.in_model_call and runtime.reuse and not _in_backward():
            stored = runtime.stored()
            if self.key not in stored:
                raise RuntimeError(
                    "MiLoRA found a KV cache without routing decisions for layer "
                    f"{self.key!r}: routing happens at prefill, so a cache must come from a forward of this model "
                    "with MiLoRA adapters loaded"
                )
            gates = stored[self.key]
        else:
            mask = runtime.prompt_mask if runtime.in_model_call or _in_backward() else None
            gates = self.route_prompt(hidden, mask if mask is not None and mask.shape == ones.shape else ones)
            if runtime.in_model_call and not _in_backward():
                runtime.stored()[self.key] = gates
        self.slot.current = gates
        return gates


def route_before_layer(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of a transformer layer: run its router on the layer's input hidden states."""
    hidden = args[0] if args else kwargs["hidden_states"]
    layer.prompt_router(hidden)
