from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..base_layers import LLAMA_FAMILY, LLAMA_PROJECTIONS, WHISPER_LINEARS
from ..peft_registry import add_peft_type
from ..tuner_config import LayerTunerConfig

# Defaults per transformers `model_type`: the paper's choices where it made one (StarCoder: c_attn; Whisper: every
# fully-connected layer), attention + MLP projections for the Llama family.
TRANSFORMERS_MODELS_TO_FLORA_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "gpt_bigcode": ["c_attn"],
    "gpt2": ["c_attn"],
    "whisper": WHISPER_LINEARS,
    **dict.fromkeys(LLAMA_FAMILY, LLAMA_PROJECTIONS),
}


@dataclass
class FLoRAConfig(LayerTunerConfig):
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

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = add_peft_type("FLORA")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"FLoRA rank `r` must be a positive integer, got {self.r!r}")
        if self.init_weights not in (True, False, "ones"):
            raise ValueError(f"init_weights must be True, False or 'ones', got {self.init_weights!r}")
