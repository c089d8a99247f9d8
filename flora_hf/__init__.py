"""flora-hf: many adapters on one foundation model, a different one for every example in a batch.

Importing the package registers FLoRA and MiLoRA with PEFT, so ``get_peft_model``, ``PeftModel.from_pretrained`` and
transformers' ``model.add_adapter(FLoRAConfig(...))`` work as for built-in methods.
"""

import logging

# bitsandbytes (imported by PEFT when installed) warns at import on CPUs with AVX512-BF16 that an optional 4-bit
# kernel package is missing, and with HF_HUB_OFFLINE set the `kernels` package it asks for that kernel says it skipped
# a publisher check; flora-hf never uses 4-bit CPU kernels, so both are noise for our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)

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
