"""Cost model that picks one of the three exact FLoRA evaluations (docs/DESIGN.md §2) per call.

A roofline estimate, ``flops / peak_flops + bytes / bandwidth``, is enough here: the three paths differ by whole
multiples of a GEMM, so constants only need to be right within a factor of two or so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

FLoRAPath = Literal["rank1", "stacked", "merged"]

# The merged path materialises one (d_in, d_out) weight per row, in chunks of at most this many bytes.
DEFAULT_MAX_MERGE_BYTES = 1 << 30


@dataclass(frozen=True)
class DeviceRoofline:
    """Peak arithmetic throughput (flop/s) and memory bandwidth (byte/s) of a device class."""

    flops: float
    bandwidth: float


# Conservative sustained figures, not datasheet peaks.
_GPU = DeviceRoofline(flops=400e12, bandwidth=2.5e12)
_CPU = DeviceRoofline(flops=100e9, bandwidth=15e9)


def roofline_for(device: torch.device) -> DeviceRoofline:
    return _CPU if device.type == "cpu" else _GPU


@dataclass(frozen=True)
class FLoRAShape:
    """Everything the cost model needs to know about one adapted-layer call."""

    rows: int  # sequences in the batch
    tokens: int  # total tokens (rows * tokens per row)
    d_in: int
    d_out: int
    rank: int
    itemsize: int
    per_token: bool  # adapter indices vary along the sequence, not only per row
    shared: bool  # one adapter for the whole batch (no indices)


def stacked_cost(s: FLoRAShape, hw: DeviceRoofline) -> float:
    """One GEMM of ``tokens * rank`` rows against W0: reads W0 once, computes ``rank`` times the base FLOPs."""
    flops = 2.0 * s.tokens * s.rank * s.d_in * s.d_out
    bytes_ = s.itemsize * (s.d_in * s.d_out + 2 * s.tokens * s.rank * (s.d_in + s.d_out))
    return flops / hw.flops + bytes_ / hw.bandwidth


def merged_cost(s: FLoRAShape, hw: DeviceRoofline) -> float:
    """Build ``W0 ∘ ΔW`` per row (``rank`` FLOPs per weight element), then one batched GEMM at base cost."""
    weights = 1 if s.shared else s.rows
    flops = 2.0 * weights * s.rank * s.d_in * s.d_out + weights * s.d_in * s.d_out + 2.0 * s.tokens * s.d_in * s.d_out
    bytes_ = s.itemsize * ((1 + 3 * weights) * s.d_in * s.d_out + s.tokens * (s.d_in + s.d_out))
    return flops / hw.flops + bytes_ / hw.bandwidth


def choose_flora_path(
    s: FLoRAShape,
    device: torch.device,
    *,
    can_merge: bool = True,
    max_merge_bytes: int = DEFAULT_MAX_MERGE_BYTES,
) -> FLoRAPath:
    """Cheapest exact path for this call; ``can_merge`` is False when W0 is not materialisable (quantized base)."""
    if s.rank == 1:
        return "rank1"
    merge_ok = can_merge and not s.per_token and s.d_in * s.d_out * s.itemsize <= max_merge_bytes
    if not merge_ok:
        return "stacked"
    hw = roofline_for(device)
    return "merged" if merged_cost(s, hw) < stacked_cost(s, hw) else "stacked"
