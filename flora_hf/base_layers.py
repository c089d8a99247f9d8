"""What the adapter methods need to know about the base layers they wrap, and their per-model defaults."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

LLAMA_FAMILY = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2")
"""transformers ``model_type`` values whose decoder layers use Llama's projection names."""
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WHISPER_LINEARS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
"""Every fully-connected layer of Whisper's encoder and decoder layers (the FLoRA paper's choice)."""


def linear_features(base: nn.Module, method: str = "adapters") -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a transformers ``Conv1D`` (stored (in, out))."""
    if isinstance(base, Conv1D):
        weight = base.weight
        d_in, d_out = weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape  # ZeRO-3 shards: ds_shape
        return int(d_in), int(d_out)
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    raise TypeError(f"{method} wrap nn.Linear or transformers Conv1D layers, got {type(base).__name__}")
