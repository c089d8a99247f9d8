"""MiLoRA models for the tests: random (non-identity) experts strong enough for routing to matter."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from peft import get_peft_model
from torch import nn

from flora_hf import MiLoRAConfig, MiLoRALayer, MiLoRARouter


def boost(model: nn.Module, adapter: str, factor: float = 10.0) -> None:
    """Scale the experts' B factors: with PEFT's small random init, routing mistakes would hide below 1e-3."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, MiLoRALayer) and adapter in layer.milora_B:
                layer.milora_B[adapter].mul_(factor)


def milora(base: nn.Module, name: str = "math", **config):
    """A PeftModel with one random MiLoRA adapter (2 of the layer's experts on per prompt by default)."""
    kwargs = {"r": 4, "top_k": 2, "init_weights": False} | config
    model = get_peft_model(base, MiLoRAConfig(**kwargs), adapter_name=name)
    boost(model, name)
    return model


def add_milora(model, name: str, **config) -> None:
    kwargs = {"r": 4, "top_k": 2, "init_weights": False} | config
    model.add_adapter(name, MiLoRAConfig(**kwargs))
    boost(model, name)


def routers(model: nn.Module) -> list[MiLoRARouter]:
    return [m for m in model.modules() if isinstance(m, MiLoRARouter)]


@contextmanager
def recorded_routing(monkeypatch) -> Iterator[list[tuple[str, torch.Tensor, torch.Tensor, dict]]]:
    """Every ``MiLoRARouter.route_prompt`` call: (layer key, hidden, prompt mask, gates by adapter)."""
    calls: list = []
    original = MiLoRARouter.route_prompt

    def recording(self, hidden, prompt_mask):
        gates = original(self, hidden, prompt_mask)
        calls.append((self.key, hidden, prompt_mask, gates))
        return gates

    with monkeypatch.context() as patch:
        patch.setattr(MiLoRARouter, "route_prompt", recording)
        yield calls


def gates_of(calls, adapter: str = "math") -> dict[str, torch.Tensor]:
    """Layer key -> gates ``(B, N)`` of the last routing of each layer."""
    return {key: gates[adapter].gates.detach() for key, _, _, gates in calls}
