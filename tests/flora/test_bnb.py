"""FLoRA on a bitsandbytes 8-bit base layer: the scaled-call path (bitsandbytes runs int8 linears on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flora_hf import FLoRAConfig, adapter_batch
from flora_hf.flora.model import FLoRAModel

bnb = pytest.importorskip("bitsandbytes")


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x))


def quantize(linear: nn.Linear) -> nn.Module:
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False, threshold=0.0)
    q.load_state_dict(linear.state_dict())
    return q


def test_8bit_layer_matches_per_row_scaled_calls() -> None:
    model = TwoLayer()
    model.proj = quantize(model.proj)
    q = model.proj
    FLoRAModel(model, {"a": FLoRAConfig(r=2, target_modules=["proj"], init_weights=False)}, "a")
    layer = model.proj
    assert type(layer).__name__ == "Linear8bitLt"
    layer.update_layer("b", 1, init_weights=False)
    x = torch.randn(3, 5, 16)
    with torch.no_grad(), adapter_batch(model, ["a", "__base__", "b"]):
        got = layer(x)
    with torch.no_grad():
        for row, name in enumerate(["a", "__base__", "b"]):
            if name == "__base__":
                expected = q(x[row])
            else:
                f_in, f_out = layer.flora_in[name], layer.flora_out[name]
                parts = [f_out[j] * (q(x[row] * f_in[j]) - q.bias) for j in range(f_in.shape[0])]
                expected = torch.stack(parts).mean(dim=0) + q.bias
            torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="8-bit"):
        layer.merge()
