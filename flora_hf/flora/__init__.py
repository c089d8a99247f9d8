"""FLoRA (Wen & Chaudhuri, ICLR 2024) as a PEFT method: multiplicative low-rank adapters, one per example."""

from ..peft_registry import register_method
from .config import TRANSFORMERS_MODELS_TO_FLORA_TARGET_MODULES_MAPPING, FLoRAConfig
from .layer import FLoRALayer, Linear
from .model import FLoRAModel

__all__ = ["TRANSFORMERS_MODELS_TO_FLORA_TARGET_MODULES_MAPPING", "FLoRAConfig", "FLoRALayer", "FLoRAModel", "Linear"]

register_method("flora", config_cls=FLoRAConfig, model_cls=FLoRAModel)
