from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..base_layers import LLAMA_FAMILY, LLAMA_PROJECTIONS, WHISPER_LINEARS
from ..ops.lora import lora_scaling
from ..ops.milora import POOLERS
from ..peft_registry import add_peft_type
from ..tuner_config import LayerTunerConfig

# One expert per adapted module type of a transformer layer (docs/DESIGN.md §3). Names are suffixes of the module path
# inside a layer, so GPTBigCode's two `c_proj` layers (attention output, MLP output) stay separate experts.
TRANSFORMERS_MODELS_TO_MILORA_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "gpt_bigcode": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
    "whisper": WHISPER_LINEARS,
    **dict.fromkeys(LLAMA_FAMILY, LLAMA_PROJECTIONS),
}

DEFAULT_ROUTING_PREFIX = 32
ROUTING_PREFIX_BY_MODEL_TYPE = {"whisper": 4}
"""Whisper's decoder prompt at generation is its 4 forced tokens (start, language, task, no-timestamps)."""


@dataclass
class MiLoRAConfig(LayerTunerConfig):
    """Configuration of a MiLoRA adapter: a prompt-aware router per transformer layer picks ``top_k`` LoRA experts.

    Each adapted module type of a layer (q, k, v, o, gate, up, down for Llama) is one LoRA expert. The router pools
    the prompt's hidden states once, at prefill; every decoding step reuses its choice, so decoding pays for k
    experts per layer and no router (Zhang et al., 2024, "MiLoRA: Efficient Mixture of Low-Rank Adaptation").
    """

    r: int = field(default=32, metadata={"help": "Rank of each LoRA expert (the paper uses 32)."})
    lora_alpha: Optional[int] = field(
        default=None,
        metadata={"help": "LoRA scaling numerator: an expert's update is scaled by lora_alpha / r. Default r."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input in training."})
    top_k: int = field(
        default=3,
        metadata={"help": "Experts switched on per layer and prompt, each weighted by its router probability."},
    )
    pooler: Literal["last", "mean", "max", "attention"] = field(
        default="attention",
        metadata={
            "help": "How the router summarizes the prompt: 'last' token, 'mean', 'max', or 'attention' (a learned "
            "query, softmax over tokens; the paper's default)."
        },
    )
    rational_degrees: tuple[int, int] = field(
        default=(6, 5), metadata={"help": "Degrees (m, n) of the router's rational activation P_m / (1 + |Q_n|)."}
    )
    rational_form: Literal["paper", "safe"] = field(
        default="paper",
        metadata={
            "help": "'paper': 1 + |Σ b_i xⁱ| in the denominator; 'safe': 1 + Σ |b_i| |x|ⁱ (never near zero, "
            "Molina et al.'s safe Padé)."
        },
    )
    load_balance_coef: float = field(
        default=1e-2,
        metadata={"help": "λ_lb: weight of the Switch-style load-balancing loss the trainer adds to the task loss."},
    )
    rational_lr: float = field(
        default=1e-6,
        metadata={"help": "Learning rate of the rational coefficients, trained on the validation split (bi-level)."},
    )
    routing_prefix: Optional[int] = field(
        default=None,
        metadata={
            "help": "Training rows without a prompt/response split (every label a target, as packed code) route on "
            "their first N tokens. Default 4 for Whisper's decoder (its forced prompt), 32 otherwise."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex: the experts. Defaults per model type: Llama family "
            "q/k/v/o/gate/up/down projections; GPTBigCode c_attn, attn.c_proj, c_fc, mlp.c_proj; Whisper q/k/v/out, "
            "fc1, fc2. Every targeted module must sit inside a numbered transformer layer."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: experts start at zero (lora_B = 0), so the adapted model equals the base model."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = add_peft_type("MILORA")
        for name in ("r", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MiLoRA `{name}` must be a positive integer, got {value!r}")
        if self.pooler not in POOLERS:
            raise ValueError(f"unknown pooler {self.pooler!r}: pooler must be one of {POOLERS}")
        if self.rational_form not in ("paper", "safe"):
            raise ValueError(f"rational_form must be 'paper' or 'safe', got {self.rational_form!r}")
        degrees = tuple(self.rational_degrees)
        if len(degrees) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in degrees):
            raise ValueError(f"rational_degrees must be two positive integers (m, n), got {self.rational_degrees!r}")
        self.rational_degrees = degrees
        alpha = self.lora_alpha
        if alpha is not None and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool)):
            raise ValueError(f"lora_alpha must be a number or None, got {alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.load_balance_coef < 0:
            raise ValueError(f"load_balance_coef must be ≥ 0, got {self.load_balance_coef}")
        if self.routing_prefix is not None and self.routing_prefix < 1:
            raise ValueError(f"routing_prefix must be a positive integer, got {self.routing_prefix}")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_alpha if self.lora_alpha is not None else self.r, self.r)
