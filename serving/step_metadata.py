"""What every adapted layer of the model reads during one forward: a slot per batch row and the adapter kinds present.

vLLM's layout: one metadata object per forward (:class:`StepMetadata`), set on the model's shared
:class:`AdapterContext` by the runner around the call, so the slot layers and routers deep inside the model need no
extra arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from flora_hf.ops.milora import RoutedGates

if TYPE_CHECKING:  # the routers read this module's metadata
    from .routers import SlotRouter


@dataclass
class PromptRouting:
    """What the routers need at a prefill holding MiLoRA rows, and where they leave their gates."""

    prompt_mask: Tensor  # (B, T) bool: the prompt tokens (left padding masked)
    groups: dict[int, Tensor]  # slot -> the rows (device, long) of the MiLoRA adapter in that slot
    lora_rows: Optional[Tensor] = None  # (B,) bool: plain LoRA rows, whose LoRA update keeps scale 1
    gates: dict[str, Tensor] = field(default_factory=dict)  # layer path -> (B, N) router gates, 0 for other rows


@dataclass
class StepMetadata:
    """Per-forward adapter routing: a slot per batch row and which adapter kinds the batch uses.

    ``lora_rank`` covers LoRA and MiLoRA rows (both live in the LoRA banks). ``expert_gates`` scales the LoRA update
    of a MiLoRA expert row by row (its gate for MiLoRA rows, 1 for LoRA rows, 0 for rows without either): filled by
    the routers at a prefill (``routing``), handed over from the batch at a decoding step.
    """

    slots: Tensor  # (B,) long, on the model's device; 0 = base model
    flora_rank: int = 0  # largest FLoRA rank among the rows (0: no FLoRA row)
    lora_rank: int = 0
    ia3: bool = False
    routing: Optional[PromptRouting] = None
    expert_gates: dict[str, RoutedGates] = field(default_factory=dict)

    @property
    def any_adapter(self) -> bool:
        return bool(self.flora_rank or self.lora_rank or self.ia3)


def expert_gates(gates: Tensor, lora_rows: Optional[Tensor]) -> RoutedGates:
    """Row scales of one layer's LoRA bank: router gates on MiLoRA rows, 1 on plain LoRA rows (``lora_rows``)."""
    scale = gates if lora_rows is None else torch.where(lora_rows[:, None], torch.ones_like(gates), gates)
    return RoutedGates(scale)


class AdapterContext:
    """Shared by every slot layer and router of a model: the engine sets ``current`` around each forward."""

    def __init__(self) -> None:
        self.current: Optional[StepMetadata] = None
        self.routers: dict[str, SlotRouter] = {}  # transformer layer path -> its MiLoRA router
