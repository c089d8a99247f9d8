"""Per-example references for whole models: each example through its own explicitly merged copy."""

from __future__ import annotations

import copy

import torch
from peft import get_peft_model
from torch import nn

from flora_hf import FLoRAConfig, FLoRALayer
from flora_hf.ops.reference import merged_weight_reference
from flora_hf.per_example import BASE_ADAPTER_NAME


def adapted(base: nn.Module, names_ranks: dict[str, int], **config_kwargs):
    """A PeftModel with one random (non-identity) FLoRA adapter per name, plus an untouched copy of the base."""
    reference_base = copy.deepcopy(base)
    names = list(names_ranks)
    kwargs = {"init_weights": False} | config_kwargs
    model = get_peft_model(base, FLoRAConfig(r=names_ranks[names[0]], **kwargs), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, FLoRAConfig(r=names_ranks[name], **kwargs))
    return model, reference_base


def merged_copy(reference_base: nn.Module, peft_model: nn.Module, adapter: str) -> nn.Module:
    """``reference_base`` with every FLoRA layer's weight replaced by W0 ∘ ΔW, summed rank by rank."""
    ref = copy.deepcopy(reference_base)
    if adapter == BASE_ADAPTER_NAME:
        return ref
    for name, module in peft_model.named_modules():
        if not isinstance(module, FLoRALayer) or adapter not in module.flora_in:
            continue
        target = ref.get_submodule(name.removeprefix("base_model.model."))
        w_in_out = target.weight.data if module.fan_in_fan_out else target.weight.data.t()
        with torch.no_grad():
            merged = merged_weight_reference(w_in_out, module.flora_in[adapter], module.flora_out[adapter])
        target.weight.data = merged if module.fan_in_fan_out else merged.t().contiguous()
    return ref


def per_example_logits(reference_base, peft_model, inputs: dict[str, torch.Tensor], names: list[str]):
    """Logits of each example computed alone through its own merged model."""
    outs = []
    for i, name in enumerate(names):
        ref = merged_copy(reference_base, peft_model, name)
        single = {k: v[i : i + 1] for k, v in inputs.items()}
        with torch.no_grad():
            outs.append(ref(**single).logits)
    return torch.cat(outs)
