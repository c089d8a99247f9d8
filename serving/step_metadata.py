"""What every adapted layer of the model reads during one forward: a slot per batch row and the adapter kinds present.

vLLM's layout: one metadata object per forward (:class:`StepMetadata`), set on the model's shared
:class:`AdapterContext` by the runner around the call, so the slot layers and routers deep inside the model need no
extra arguments. A batch with MiLoRA rows also carries a :class:`MiLoRARouting` (its routing decisions, made once per
prompt), which the metadata of each of its steps points at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from flora_hf.ops import RoutedGates, expert_row_scales


@dataclass
class PrefillRouting:
    """What the routers need at a prefill holding MiLoRA rows: the prompt tokens and each MiLoRA slot's rows."""

    prompt_mask: Tensor  # (B, T) bool: the prompt tokens (left padding masked)
    groups: dict[int, Tensor]  # slot -> the rows (device, long) of the MiLoRA adapter in that slot


class MiLoRARouting:
    """A batch's MiLoRA routing, decided once per prompt: the prefill's routers write it, every step's experts read it.

    One object per :class:`~serving.batch.Batch`, carried row for row by ``filter`` / ``concatenate``; the step
    metadata points at the same object, so gates are never copied out of the model and pushed back in. ``gates``
    maps a transformer layer path to its router gates ``(B, N)`` (zero on rows without MiLoRA); ``lora_rows``
    ``(B,)`` marks the plain LoRA rows, which share the LoRA banks with the experts at scale 1.
    """

    def __init__(self, gates: Optional[dict[str, Tensor]] = None, lora_rows: Optional[Tensor] = None) -> None:
        self.gates: dict[str, Tensor] = dict(gates or {})
        self.lora_rows = lora_rows
        self._scales: dict[str, RoutedGates] = {}

    def record(self, layer: str, gates: Tensor) -> None:
        """A router's decision for ``layer`` at the prefill."""
        self.gates[layer] = gates
        self._scales.pop(layer, None)

    def expert_scales(self, layer: str) -> Optional[RoutedGates]:
        """Row scales of ``layer``'s LoRA banks (None: no MiLoRA row routes there), with their selected rows.

        Built once per batch composition: a new object comes out of every filter / concatenate.
        """
        scales = self._scales.get(layer)
        if scales is None and layer in self.gates:
            scales = self._scales[layer] = RoutedGates(expert_row_scales(self.gates[layer], self.lora_rows))
        return scales

    def copy(self) -> MiLoRARouting:
        """The same decisions in new containers (a step that fails part-way is undone to this)."""
        return MiLoRARouting(self.gates, self.lora_rows)

    def index_select(self, index: Tensor) -> MiLoRARouting:
        lora_rows = None if self.lora_rows is None else self.lora_rows.index_select(0, index)
        return MiLoRARouting({k: g.index_select(0, index) for k, g in self.gates.items()}, lora_rows)

    @classmethod
    def concatenate(
        cls, parts: Sequence[Optional[MiLoRARouting]], lengths: Sequence[int], lora_rows: Optional[Tensor]
    ) -> Optional[MiLoRARouting]:
        """Row-wise concatenation; parts without routing (None, or no gates for a layer) get zero gates."""
        if all(part is None for part in parts):
            return None
        gates: dict[str, Tensor] = {}
        for key in dict.fromkeys(k for part in parts if part is not None for k in part.gates):
            like = next(part.gates[key] for part in parts if part is not None and key in part.gates)
            gates[key] = torch.cat(
                [
                    part.gates[key] if part is not None and key in part.gates else like.new_zeros(n, like.shape[1])
                    for part, n in zip(parts, lengths)
                ]
            )
        return cls(gates, lora_rows)


@dataclass
class StepMetadata:
    """Per-forward adapter routing: a slot per batch row and which adapter kinds the batch uses.

    ``lora_rank`` covers LoRA and MiLoRA rows (both live in the LoRA banks). ``milora`` is the batch's routing
    state: at a prefill with MiLoRA rows (``prefill`` set) the routers write it, at every step the experts read it.
    """

    slots: Tensor  # (B,) long, on the model's device; 0 = base model
    flora_rank: int = 0  # largest FLoRA rank among the rows (0: no FLoRA row)
    lora_rank: int = 0
    ia3: bool = False
    prefill: Optional[PrefillRouting] = None
    milora: Optional[MiLoRARouting] = None

    @property
    def any_adapter(self) -> bool:
        return bool(self.flora_rank or self.lora_rank or self.ia3)


class AdapterContext:
    """Shared by every slot layer and router of a model: the runner sets ``current`` around each forward."""

    def __init__(self) -> None:
        self.current: Optional[StepMetadata] = None
