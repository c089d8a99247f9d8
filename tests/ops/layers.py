"""One small adapted layer for the ops tests: ``nn.Linear`` or GPT-2's ``Conv1D``, with W0 and bias known."""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from flora_hf.ops import BankRole

D_IN, D_OUT = 12, 10
ROLES: tuple[str, ...] = get_args(BankRole)


def make_layer(kind: str):
    """An ``nn.Linear`` or GPT-2 ``Conv1D`` with outputs O(1); also W0 as ``(d_in, d_out)`` and the bias."""
    w_in_out, bias = torch.randn(D_IN, D_OUT) / D_IN**0.5, torch.randn(D_OUT)
    layer = nn.Linear(D_IN, D_OUT) if kind == "linear" else Conv1D(D_OUT, D_IN)
    with torch.no_grad():
        layer.weight.copy_(w_in_out.t() if kind == "linear" else w_in_out)
        layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer, w_in_out, bias
