"""flora-hf: many adapters on one foundation model, a different one for every example in a batch.

Importing the package registers FLoRA with PEFT, so ``get_peft_model``, ``PeftModel.from_pretrained`` and
transformers' ``model.add_adapter(FLoRAConfig(...))`` work as for built-in methods.
"""

from .flora import FLoRAConfig, FLoRALayer, FLoRAModel
from .per_example import BASE_ADAPTER_NAME, AdapterBatch, adapter_batch, set_trainable_adapters

__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER_NAME",
    "AdapterBatch",
    "FLoRAConfig",
    "FLoRALayer",
    "FLoRAModel",
    "adapter_batch",
    "set_trainable_adapters",
]
