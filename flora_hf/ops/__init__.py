"""The one math core: adapter formulas for a batch with a different adapter per row (DESIGN §2).

The PEFT layers in :mod:`flora_hf.flora` and the serving engine both call these functions; nothing else in the
project writes the FLoRA, LoRA, IA3 or MiLoRA math.
"""

from .cost import FLoRAPath, FLoRAShape, choose_flora_path
from .flora import (
    MERGE_EPS,
    bank_row,
    base_call_kwargs,
    build_flora_bank,
    compose_flora,
    dense_matmul,
    flora_delta_weight,
    flora_linear,
    flora_merge_weight,
    flora_merged,
    flora_rank1,
    flora_stacked,
    flora_unmerge_weight,
    identity_row,
    scaled_base_matmul,
    weight_in_out,
)
from .lora import build_ia3_bank, build_lora_bank, ia3_scale, lora_bmm_delta, lora_loop_delta, lora_scaling
from .milora import (
    POOLERS,
    RoutedGates,
    add_gated_lora,
    add_zero_use,
    gated_lora_delta,
    gelu_rational_init,
    load_balance_loss,
    pool_prompt,
    rational,
    route,
)

__all__ = [
    "POOLERS",
    "RoutedGates",
    "add_gated_lora",
    "add_zero_use",
    "gated_lora_delta",
    "gelu_rational_init",
    "load_balance_loss",
    "pool_prompt",
    "rational",
    "route",
    "MERGE_EPS",
    "FLoRAPath",
    "FLoRAShape",
    "bank_row",
    "base_call_kwargs",
    "build_flora_bank",
    "build_ia3_bank",
    "build_lora_bank",
    "choose_flora_path",
    "compose_flora",
    "dense_matmul",
    "flora_delta_weight",
    "flora_linear",
    "flora_merge_weight",
    "flora_merged",
    "flora_rank1",
    "flora_stacked",
    "flora_unmerge_weight",
    "ia3_scale",
    "identity_row",
    "lora_bmm_delta",
    "lora_loop_delta",
    "lora_scaling",
    "scaled_base_matmul",
    "weight_in_out",
]
