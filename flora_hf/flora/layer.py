from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn

from ..base_layers import linear_features
from ..ops import (
    adapted_linear,
    bank_row,
    build_flora_bank,
    compose_flora,
    flora_delta_weight,
    flora_merge_weight,
    flora_unmerge_weight,
)
from ..per_example import AdapterBatch, PerExampleAdapterLayer


class FLoRALayer(BaseTunerLayer, PerExampleAdapterLayer):
    """Holds ``flora_in[name]`` (r, in_features) and ``flora_out[name]`` (r, out_features) per adapter.

    The forward stacks the adapters into a bank (row 0 = no adapter) and calls the math core with one index per
    example. In inference the bank is built once and reused until a parameter changes (tracked by tensor version
    counters); with gradients on it is rebuilt from the parameters each call so gradients reach them.
    """

    adapter_layer_names = ("flora_in", "flora_out")
    other_param_names = ("r",)
    quantized_base = False  # an int8 W0 (the bitsandbytes layer): the math core reaches it by a scaled call

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.flora_in = nn.ParameterDict({})
        self.flora_out = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

        self.in_features, self.out_features = linear_features(self.get_base_layer(), "FLoRA layers")

    # ----------------------------------------------------------------------------------------------- adapters
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        init_weights: bool | str = True,
        init_noise_std: float = 1e-2,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        if r < 1:
            raise ValueError(f"FLoRA rank must be a positive integer, got {r}")
        self.r[adapter_name] = r
        self.flora_in[adapter_name] = nn.Parameter(torch.ones(r, self.in_features))
        self.flora_out[adapter_name] = nn.Parameter(torch.ones(r, self.out_features))
        self.reset_flora_parameters(adapter_name, init_weights, init_noise_std)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_flora_parameters(self, adapter_name: str, init_weights: bool | str, init_noise_std: float) -> None:
        f_in, f_out = self.flora_in[adapter_name], self.flora_out[adapter_name]
        f_in.fill_(1.0)
        f_out.fill_(1.0)
        if init_weights is False:
            f_in.add_(torch.randn_like(f_in), alpha=0.1)
            f_out.add_(torch.randn_like(f_out), alpha=0.1)
        elif init_weights is True and f_in.shape[0] > 1:
            # Zero-mean over rank: ΔW = mean_j (1 + ε_j)ᵀ ⊗ 1 = 1 exactly in real arithmetic, yet the components
            # differ, so they receive different gradients.
            eps = torch.randn_like(f_in) * init_noise_std
            f_in.add_(eps - eps.mean(dim=0, keepdim=True))

    def adapter_names_in_layer(self) -> set[str]:
        return set(self.flora_in.keys())

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """ΔW in the base layer's storage layout."""
        return flora_delta_weight(
            self.flora_in[adapter_name], self.flora_out[adapter_name], fan_in_fan_out=self.fan_in_fan_out
        )

    # ----------------------------------------------------------------------------------------- merge / unmerge
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.flora_in:
                continue
            weight = base.weight
            merged = flora_merge_weight(weight.data, self.get_delta_weight(name))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs in the merged weights; adapter {name!r} seems to be broken")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        warnings.warn("Unmerging FLoRA divides by ΔW and is inexact where ΔW is near zero.", stacklevel=2)
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.flora_in:
                base.weight.data = flora_unmerge_weight(base.weight.data, self.get_delta_weight(name))

    # ------------------------------------------------------------------------------------------------- banks
    def _bank_params(self, names: tuple[str, ...]) -> list[tuple[Tensor, Tensor]]:
        return [(self.flora_in[n], self.flora_out[n]) for n in names]

    def _batch_bank(self, like: Tensor) -> tuple[tuple[str, ...], Tensor, Tensor]:
        """Every adapter of this layer, row 0 = identity, for per-example batches."""
        names = tuple(self.flora_in.keys())
        params = self._bank_params(names)
        bank_in, bank_out = self._cached_bank(
            ("batch", names, like.dtype, like.device),
            params,
            lambda: build_flora_bank(
                params, self.in_features, self.out_features, dtype=like.dtype, device=like.device
            ),
        )
        return names, bank_in, bank_out

    def _active_bank(self, like: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """The active adapters composed into one (ΔW multiply), as a one-row bank; None if none is here."""
        names = tuple(n for n in self.active_adapters if n in self.flora_in)
        if not names:
            return None
        params = self._bank_params(names)

        def build() -> tuple[Tensor, Tensor]:
            pair = (params[0][0].to(like.dtype), params[0][1].to(like.dtype))
            for nxt in params[1:]:
                pair = compose_flora(pair, (nxt[0].to(like.dtype), nxt[1].to(like.dtype)))
            row = bank_row(*pair)
            return row[0][None], row[1][None]

        return self._cached_bank(("active", names, like.dtype, like.device), params, build)

    # ------------------------------------------------------------------------------------------------ forward
    def _adapted_forward(self, x: Tensor, batch: Optional[AdapterBatch]) -> Optional[Tensor]:
        if batch is not None:
            order, bank_in, bank_out = self._batch_bank(x)
            rows = x.shape[0] if x.dim() > 1 else 1
            indices = batch.indices(order, rows, x.device)
        else:
            bank = self._active_bank(x)
            if bank is None:
                return None
            (bank_in, bank_out), indices = bank, None
        return adapted_linear(
            x,
            self.get_base_layer(),
            indices,
            flora=(bank_in, bank_out),
            quantized=self.quantized_base,
            fan_in_fan_out=self.fan_in_fan_out,
        )

    def flora_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The forward of every concrete FLoRA layer (``nn.Module.forward`` precedes this mixin in their MRO)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        batch = self.current_adapter_batch()
        if self.merged:
            if batch is not None:
                raise ValueError(
                    "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
                )
            return self.base_layer(x, *args, **kwargs)
        y = self._adapted_forward(x, batch)
        return self.base_layer(x, *args, **kwargs) if y is None else y


class Linear(nn.Module, FLoRALayer):
    """FLoRA on ``nn.Linear`` (W0 stored (out, in)) and GPT-2's ``Conv1D`` (stored (in, out), ``fan_in_fan_out``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 1,
        fan_in_fan_out: bool = False,
        init_weights: bool | str = True,
        init_noise_std: float = 1e-2,
        is_target_conv_1d_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        FLoRALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, init_weights=init_weights, init_noise_std=init_noise_std, **kwargs)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.flora_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "flora." + super().__repr__()
