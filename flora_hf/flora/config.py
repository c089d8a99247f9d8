from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..base_layers import LLAMA_FAMILY, LLAMA_PROJECTIONS, WHISPER_LINEARS
from ..peft_registry import add_peft_type

# Defaults per transformers `model_type`: the paper's choices where it made one (StarCoder: c_attn; Whisper: every
# fully-connected layer), attention + MLP projections for the Llama family.
TRANSFORMERS_MODELS_TO_FLORA_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "gpt_bigcode": ["c_attn"],
    "gpt2": ["c_attn"],
    "whisper": WHISPER_LINEARS,
    **dict.fromkeys(LLAMA_FAMILY, LLAMA_PROJECTIONS),
}


@dataclass
class FLoRAConfig(PeftConfig):
    """Configuration of a FLoRA adapter: ``W = W0 ∘ ΔW`` with ``ΔW = flora_inᵀ · flora_out / r``.

    FLoRA's point is that a batch may carry a different adapter per example at the base model's cost; pass
    ``adapter_names=[...]`` to a ``PeftModel`` forward/generate, or use :func:`flora_hf.adapter_batch`.
    """

    r: int = field(default=1, metadata={"help": "Rank of the multiplicative update (the paper uses 1, or 4)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix match) or a regex to adapt. Defaults per model type: gpt_bigcode "
            "`c_attn` (as the paper), whisper every fully-connected layer, llama/mistral/qwen attention and MLP "
            "projections. 'all-linear' adapts every linear layer but the output head."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave untouched even if targeted."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "True when the layer stores its weight as (fan_in, fan_out), like GPT-2's Conv1D. Set "
            "automatically from the layer type."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the FLoRA layers to train and save, e.g. a new classification head."},
    )
    init_weights: Union[bool, Literal["ones"]] = field(
        default=True,
        metadata={
            "help": "True: identity (ΔW ≡ 1) with the rank symmetry broken, flora_out = 1 and flora_in = 1 + ε with "
            "ε summing to zero over rank, so the adapted model equals the base model yet rank components can diverge. "
            "'ones': all-ones (symmetric: every rank component gets the same gradient forever). False: random, "
            "not identity (for tests)."
        },
    )
    init_noise_std: float = field(
        default=1e-2, metadata={"help": "Scale of the zero-mean symmetry-breaking perturbation ε."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the layer list used with `layers_to_transform`, e.g. 'layers' or 'h'."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = add_peft_type("FLORA")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"FLoRA rank `r` must be a positive integer, got {self.r!r}")
        if self.init_weights not in (True, False, "ones"):
            raise ValueError(f"init_weights must be True, False or 'ones', got {self.init_weights!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` only makes sense together with `layers_to_transform`")
