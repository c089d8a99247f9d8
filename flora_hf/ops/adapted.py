"""One linear layer with its adapters applied: how IA3, FLoRA and (gated) LoRA compose (docs/DESIGN.md §2, §3).

Every adapted layer of the project calls :func:`adapted_linear`: the PEFT FLoRA layer with a FLoRA bank, the PEFT
MiLoRA expert with gated LoRA terms, the serving slot layer with whichever banks its slots hold. The layer classes
only hold tensors and pick bank rows; the order in which the methods apply is written here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import Tensor, nn

from .flora import base_call_kwargs, flora_linear
from .lora import ia3_scale, lora_delta
from .milora import add_gated_lora


@dataclass
class LoRATerm:
    """One additive LoRA update of a layer, in bank layout (:mod:`flora_hf.ops.banks`).

    With ``indices`` each row takes its own bank row of ``a`` ``(n, R, d_in)`` / ``b`` ``(n, R, d_out)``; without,
    ``a`` ``(R, d_in)`` and ``b`` ``(R, d_out)`` are one adapter's factors for every row. ``gate`` ``(B,)`` scales the
    update per row (MiLoRA's router gate) and ``rows`` lists the rows where it is non-zero, the only rows computed.
    ``x`` is the term's own input where it differs from the layer's (dropout in training).
    """

    a: Tensor
    b: Tensor
    indices: Optional[Tensor] = None
    gate: Optional[Tensor] = None
    rows: Optional[Tensor] = None
    x: Optional[Tensor] = None


def _add_lora(y: Tensor, x: Tensor, term: LoRATerm) -> Tensor:
    if term.gate is not None:
        return add_gated_lora(y, x, term.a, term.b, term.indices, term.gate, term.rows)
    delta = lora_delta(x, term.a, term.b, term.indices)
    return y + (delta if term.indices is not None else delta.to(y.dtype))


def adapted_linear(
    x: Tensor,
    base_layer: nn.Module,
    indices: Optional[Tensor] = None,
    *,
    flora: Optional[tuple[Tensor, Tensor]] = None,
    lora: Sequence[LoRATerm] = (),
    ia3_in: Optional[Tensor] = None,
    ia3_out: Optional[Tensor] = None,
    quantized: bool = False,
    fan_in_fan_out: bool = False,
    base_args: tuple = (),
    base_kwargs: Optional[dict[str, Any]] = None,
) -> Tensor:
    """Semantics: y = ((x ∘ l_in) (W0 ∘ ΔW_F) + bias + Σ_terms g ∘ x_t Aᵀ B) ∘ l_out, x_t = term.x or x ∘ l_in.

    Each factor applies only when given: ``flora`` (a bank pair, rows by ``indices``; without it the base layer
    runs as it is, with ``base_args`` / ``base_kwargs``), ``lora`` terms, IA3's ``ia3_in`` (a feed-forward layer's
    input scale) and ``ia3_out`` banks (rows by ``indices``). ``quantized`` bases reach W0 through a scaled call of
    the layer (:func:`~flora_hf.ops.flora.base_call_kwargs`); ``fan_in_fan_out`` is PEFT's flag for GPT-2's
    ``Conv1D`` storage.
    """
    if ia3_in is not None:
        x = ia3_scale(x, ia3_in, indices)
    if flora is not None:
        base = base_call_kwargs(base_layer, quantized=quantized, fan_in_fan_out=fan_in_fan_out)
        y = flora_linear(x, flora[0], flora[1], indices, **base)
    else:
        y = base_layer(x, *base_args, **(base_kwargs or {}))
    for term in lora:
        y = _add_lora(y, x if term.x is None else term.x, term)
    if ia3_out is not None:
        y = ia3_scale(y, ia3_out, indices)
    return y
