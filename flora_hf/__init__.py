"""flora-hf: many adapters on one foundation model, a different one for every example in a batch.

Importing the package registers FLoRA and MiLoRA with PEFT, so ``get_peft_model``, ``PeftModel.from_pretrained`` and
transformers' ``model.add_adapter(FLoRAConfig(...))`` work as for built-in methods.
"""

import logging

# bitsandbytes (imported by PEFT when installed) warns at import on CPUs with AVX512-BF16 that an optional 4-bit
# kernel package is missing; flora-hf never uses 4-bit CPU kernels, so that warning is noise for our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .flora import FLoRAConfig, FLoRALayer, FLoRAModel  # noqa: E402
from .milora import MiLoRAConfig, MiLoRALayer, MiLoRAModel, MiLoRARouter, routing_prompt_mask  # noqa: E402
from .per_example import BASE_ADAPTER_NAME, AdapterBatch, adapter_batch, set_trainable_adapters  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER_NAME",
    "AdapterBatch",
    "FLoRAConfig",
    "FLoRALayer",
    "FLoRAModel",
    "MiLoRAConfig",
    "MiLoRALayer",
    "MiLoRAModel",
    "MiLoRARouter",
    "adapter_batch",
    "routing_prompt_mask",
    "set_trainable_adapters",
]
