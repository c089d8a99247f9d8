"""MiLoRA (Zhang et al., 2024) as a PEFT method: a prompt-aware mixture of LoRA experts, routed once per prompt."""

from ..peft_registry import register_method
from .config import TRANSFORMERS_MODELS_TO_MILORA_TARGET_MODULES_MAPPING, MiLoRAConfig
from .layer import Linear, MiLoRALayer
from .model import MiLoRAModel, routing_prompt_mask
from .router import MiLoRARouter

__all__ = [
    "TRANSFORMERS_MODELS_TO_MILORA_TARGET_MODULES_MAPPING",
    "Linear",
    "MiLoRAConfig",
    "MiLoRALayer",
    "MiLoRAModel",
    "MiLoRARouter",
    "routing_prompt_mask",
]

register_method("milora", config_cls=MiLoRAConfig, model_cls=MiLoRAModel)
