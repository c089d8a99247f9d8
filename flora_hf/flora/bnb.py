"""FLoRA on bitsandbytes 8-bit linear layers.

An int8 base cannot expose W0 cheaply; FLoRA runs as a scaled call (docs/DESIGN.md §2): the base layer is called on the
inputs scaled by each rank component and its outputs are scaled, as PEFT's IA3 does; the merged path is never used.
Importing this module does not need bitsandbytes or CUDA; the layer class exists only when bitsandbytes imports.
"""

from __future__ import annotations

from typing import Any

from peft.import_utils import is_bnb_available

from .layer import FLoRALayer

if is_bnb_available():
    import bitsandbytes as bnb
    import torch

    class Linear8bitLt(torch.nn.Module, FLoRALayer):
        quantized_base = True  # int8 W0: FLoRA runs as a scaled call of the layer

        def __init__(
            self,
            base_layer: torch.nn.Module,
            adapter_name: str,
            r: int = 1,
            init_weights: bool | str = True,
            init_noise_std: float = 1e-2,
            **kwargs: Any,
        ) -> None:
            super().__init__()
            FLoRALayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, init_weights=init_weights, init_noise_std=init_noise_std, **kwargs)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self.flora_forward(x, *args, **kwargs)

        def merge(self, *args: Any, **kwargs: Any) -> None:
            raise ValueError("Merging FLoRA into an 8-bit base layer is not supported; load the base in 16/32 bit")

    def is_8bit_linear(module: torch.nn.Module) -> bool:
        return isinstance(module, bnb.nn.Linear8bitLt)

else:  # pragma: no cover - exercised only without bitsandbytes

    def is_8bit_linear(module) -> bool:  # type: ignore[no-redef]
        return False
