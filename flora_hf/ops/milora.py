"""MiLoRA's math (docs/DESIGN.md §3): prompt pooling, rational activation, top-k routing, load balance, gated experts.

MiLoRA (Zhang et al., 2024) treats each adapted module type of a transformer layer as one LoRA expert and routes
once per prompt. The PEFT layers in :mod:`flora_hf.milora` and the serving engine both call these functions.

Routing state is a dense ``gates`` tensor ``(B, N)``: the router probability of each selected expert, zero for the
experts not selected, so an expert's output is simply scaled by its column of ``gates``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Iterable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .lora import lora_delta

Pooler = Literal["last", "mean", "max", "attention"]
POOLERS: tuple[str, ...] = ("last", "mean", "max", "attention")
RationalForm = Literal["paper", "safe"]


# ------------------------------------------------------------------------------------------- rational activation
def rational(x: Tensor, numerator: Tensor, denominator: Tensor, form: RationalForm = "paper") -> Tensor:
    """Semantics: R(x) = Σ_{j=0..m} a_j xʲ / (1 + |Σ_{i=1..n} b_i xⁱ|) ("paper"), or / (1 + Σ |b_i| |x|ⁱ) ("safe").

    Evaluated in fp32 by Horner's rule whatever the input dtype: the polynomials of degree 6 lose too much in half
    precision, and the router is a tiny fraction of the layer's cost.
    """
    x32 = x.float()
    a, b = numerator.float(), denominator.float()
    num = torch.zeros_like(x32) + a[-1]
    for coeff in a.flip(0)[1:]:
        num = num * x32 + coeff
    if form == "safe":
        ax = x32.abs()
        den = torch.zeros_like(x32) + b[-1].abs()
        for coeff in b.flip(0)[1:]:
            den = den * ax + coeff.abs()
        den = 1.0 + den * ax
    elif form == "paper":
        den = torch.zeros_like(x32) + b[-1]
        for coeff in b.flip(0)[1:]:
            den = den * x32 + coeff
        den = 1.0 + (den * x32).abs()
    else:
        raise ValueError(f"rational form must be 'paper' or 'safe', got {form!r}")
    return num / den


@cache
def _gelu_fit(num_degree: int, den_degree: int, form: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = torch.linspace(-3.0, 3.0, 4001, dtype=torch.float64)
    y = F.gelu(x)
    powers = x.abs() if form == "safe" else x
    # Linearized least squares: P(x) - y·Q(x) = y. The GELU fit comes out with Q ≥ 0 on the interval (even powers
    # dominate), so |Q| = Q there and the linear solution is also the solution of the form with the absolute value.
    design = torch.cat(
        [
            torch.stack([x**j for j in range(num_degree + 1)], 1),
            torch.stack([-y * powers**i for i in range(1, den_degree + 1)], 1),
        ],
        dim=1,
    )
    solution = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    numerator, denominator = solution[: num_degree + 1], solution[num_degree + 1 :]
    if form == "safe":
        denominator = denominator.abs()
    return tuple(numerator.tolist()), tuple(denominator.tolist())


def gelu_rational_init(
    num_degree: int = 6, den_degree: int = 5, form: RationalForm = "paper"
) -> tuple[Tensor, Tensor]:
    """Coefficients ``(a, b)`` of a rational of degrees (m, n) fitted to GELU on [-3, 3] by least squares (fp32)."""
    if num_degree < 1 or den_degree < 1:
        raise ValueError(f"rational degrees must be positive, got ({num_degree}, {den_degree})")
    a, b = _gelu_fit(num_degree, den_degree, form)
    return torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------- pooling
def pool_prompt(hidden: Tensor, prompt_mask: Tensor, pooler: Pooler, query: Optional[Tensor] = None) -> Tensor:
    """Semantics: h[b] = Pooler({H[b, t] : prompt_mask[b, t]}), ``(B, T, d) -> (B, d)`` in fp32.

    Masked tokens (padding on either side, response tokens in training) never influence the result, so a prompt
    pools the same whatever the padding. "last" is the last prompt token; "attention" is the paper's appendix C
    pooler, softmax_t(H w_sa) weighted sum. A row without any prompt token pools to zeros.
    """
    h = hidden.float()
    mask = prompt_mask.to(device=h.device, dtype=torch.bool)
    has_any = mask.any(dim=1, keepdim=True)
    if pooler == "mean":
        weights = mask.float()
        return (h * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
    if pooler == "max":
        pooled = h.masked_fill(~mask[..., None], float("-inf")).amax(1)
        return torch.where(has_any, pooled, torch.zeros_like(pooled))
    if pooler == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).amax(1).clamp_min(0)
        pooled = h[torch.arange(h.shape[0], device=h.device), last]
        return torch.where(has_any, pooled, torch.zeros_like(pooled))
    if pooler == "attention":
        if query is None:
            raise ValueError("the attention pooler needs its query vector w_sa")
        scores = (h @ query.float()).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # all-masked rows: softmax of -inf is nan
        return torch.einsum("bt,btd->bd", weights, h)
    raise ValueError(f"unknown pooler {pooler!r}; choose one of {POOLERS}")


# ----------------------------------------------------------------------------------------------------- routing
def route(
    pooled: Tensor,
    router_weight: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    top_k: int,
    form: RationalForm = "paper",
) -> tuple[Tensor, Tensor]:
    """Semantics: p = softmax(R(norm(h)) W_rᵀ); gates = p on the top-k experts, 0 elsewhere. Returns (p, gates).

    ``router_weight`` is ``(N, d)`` (``nn.Linear`` layout). The normalization is a parameter-free layer norm: the
    rational extrapolates badly, so its input is kept near the [-3, 3] range its GELU init was fitted on.
    """
    h = F.layer_norm(pooled.float(), pooled.shape[-1:])
    logits = rational(h, numerator, denominator, form) @ router_weight.float().t()
    probs = torch.softmax(logits, dim=-1)
    k = min(top_k, probs.shape[-1])
    top = probs.topk(k, dim=-1).indices
    gates = torch.zeros_like(probs).scatter(-1, top, probs.gather(-1, top))
    return probs, gates


@dataclass(frozen=True)
class RouterParams:
    """One adapter's router of one transformer layer: what :func:`route_prompts` needs.

    ``weight`` is ``(N_adapter, d)``, ``numerator`` ``(m+1,)`` and ``denominator`` ``(n,)`` the rational's
    coefficients, ``query`` ``(d,)`` the attention pooler's (None for the other poolers).
    """

    weight: Tensor
    numerator: Tensor
    denominator: Tensor
    top_k: int
    pooler: Pooler
    form: RationalForm = "paper"
    query: Optional[Tensor] = None


def route_prompts(hidden: Tensor, prompt_mask: Tensor, router: RouterParams) -> tuple[Tensor, Tensor]:
    """Semantics: (p, gates) = route(pool_prompt(hidden, prompt_mask)) with one adapter's router, ``(B, N_adapter)``."""
    pooled = pool_prompt(hidden, prompt_mask, router.pooler, router.query)
    return route(pooled, router.weight, router.numerator, router.denominator, router.top_k, router.form)


RouterGroup = tuple[RouterParams, Optional[Tensor], Tensor]
"""An adapter's router, the batch rows it routes (None: all of them) and the gate column of each of its experts."""


def route_groups(
    hidden: Tensor, prompt_mask: Tensor, groups: Iterable[RouterGroup], num_columns: int
) -> tuple[Tensor, list[Tensor]]:
    """Semantics: gates ``(B, N)`` with gates[rows_k, columns_k] = route_prompts(hidden[rows_k]) per group, 0 elsewhere.

    How a layer shared by several MiLoRA adapters routes a batch: one routing per adapter over its own rows, each
    adapter's experts scattered into their columns of one gates tensor (differentiable, so training and serving
    share it). Also returns each group's router probabilities, for the load-balance loss.
    """
    gates = hidden.new_zeros(hidden.shape[0], num_columns, dtype=torch.float32)
    probs_per_group = []
    for router, rows, columns in groups:
        if rows is None:
            probs, routed = route_prompts(hidden, prompt_mask, router)
            gates = gates.index_copy(1, columns, routed)
        else:
            probs, routed = route_prompts(hidden.index_select(0, rows), prompt_mask.index_select(0, rows), router)
            gates = gates.index_put((rows[:, None], columns[None, :]), routed)
        probs_per_group.append(probs)
    return gates, probs_per_group


def expert_row_scales(gates: Tensor, lora_rows: Optional[Tensor]) -> Tensor:
    """Semantics: the row scale of a LoRA bank that MiLoRA experts share with plain LoRA adapters: the router gate on
    MiLoRA rows, 1 on plain LoRA rows (``lora_rows`` ``(B,)`` bool; None when there are none)."""
    if lora_rows is None:
        return gates
    return torch.where(lora_rows[:, None], torch.ones_like(gates), gates)


def load_balance_loss(probs: Tensor) -> Tensor:
    """Semantics: L_lb = N Σ_i f_i p̄_i (Switch Transformer form): f_i the share of prompts whose argmax is expert i,
    p̄_i the mean router probability of expert i, over the rows of ``probs`` ``(B, N)``.

    Equals 1 when routing is perfectly balanced and N when every prompt goes to one expert with certainty.
    """
    n = probs.shape[-1]
    fraction = F.one_hot(probs.argmax(-1), n).float().mean(0)
    return n * (fraction * probs.float().mean(0)).sum()


# ------------------------------------------------------------------------------------------------------ experts
def gated_lora_delta(
    x: Tensor,
    bank_a: Tensor,
    bank_b: Tensor,
    indices: Optional[Tensor],
    gate: Tensor,
    rows: Optional[Tensor] = None,
) -> Tensor:
    """Semantics: Δy[b] = gate[b] · (x[b] A_{indices[b]}ᵀ) B_{indices[b]}, computed only for ``rows`` (default all).

    Banks are in :func:`~flora_hf.ops.lora.build_lora_bank`'s layout; with ``indices`` None, ``bank_a`` ``(R, d_in)``
    and ``bank_b`` ``(R, d_out)`` are one adapter's factors used by every row (two plain GEMMs, no per-row gather).
    ``rows`` lists the rows whose gate is non-zero (known once per prompt, see :class:`RoutedGates`), so experts a
    prompt did not select cost nothing at decode.
    """
    return add_gated_lora(x.new_zeros(*x.shape[:-1], bank_b.shape[-1]), x, bank_a, bank_b, indices, gate, rows)


def add_gated_lora(
    y: Tensor,
    x: Tensor,
    bank_a: Tensor,
    bank_b: Tensor,
    indices: Optional[Tensor],
    gate: Tensor,
    rows: Optional[Tensor] = None,
) -> Tensor:
    """Semantics: y + :func:`gated_lora_delta` (same arguments), writing only the selected rows of ``y``.

    The fast path for layers: no zero tensor for the unselected rows, and nothing at all when no row selected the
    expert. ``y`` is updated in place unless autograd needs it.
    """
    if rows is None:
        return y + _rows_delta(x, bank_a, bank_b, indices, gate).to(y.dtype)
    if rows.numel() == 0:
        return y
    sub = _rows_delta(x.index_select(0, rows), bank_a, bank_b, _select(indices, rows), gate.index_select(0, rows))
    sub = sub.to(y.dtype)
    if y.requires_grad or sub.requires_grad:
        return y.index_add(0, rows, sub)
    return y.index_add_(0, rows, sub)


def add_zero_use(y: Tensor, params: Sequence[Tensor], training: bool) -> Tensor:
    """Semantics: y (the same values), with ``params`` in its autograd graph when training with grad enabled.

    Their gradient is zero: it marks parameters that routing left unused in this batch as used, which
    DistributedDataParallel without ``find_unused_parameters`` requires of every trainable parameter at every step.
    """
    trainable = [p for p in params if p.requires_grad]
    if not training or not trainable or not torch.is_grad_enabled():
        return y
    return y + torch.stack([p.sum() for p in trainable]).sum().to(y.dtype) * 0


def _select(indices: Optional[Tensor], rows: Tensor) -> Optional[Tensor]:
    return None if indices is None else indices.index_select(0, rows)


def _rows_delta(x: Tensor, bank_a: Tensor, bank_b: Tensor, indices: Optional[Tensor], gate: Tensor) -> Tensor:
    delta = lora_delta(x, bank_a, bank_b, indices)
    return delta * gate.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class RoutedGates:
    """One router's decision for a batch: ``gates`` ``(B, N)``, plus which rows each expert must run on.

    The row sets are computed once (one host sync per expert) and then reused at every decoding step, which is the
    point of routing once per prompt. Reordering (beam search) and selecting rows (server ``filter``) give a new
    object; the row sets are recomputed lazily for it.
    """

    def __init__(self, gates: Tensor) -> None:
        self.gates = gates
        self._rows: dict[int, Optional[Tensor]] = {}

    def column(self, expert: int) -> Tensor:
        return self.gates[:, expert]

    def rows(self, expert: int) -> Optional[Tensor]:
        """Rows where ``expert`` is on; None when it is on for all of them."""
        if expert not in self._rows:
            on = self.gates[:, expert] != 0
            self._rows[expert] = None if bool(on.all()) else on.nonzero(as_tuple=True)[0]
        return self._rows[expert]

    def selects_no_row(self, expert: int) -> bool:
        rows = self.rows(expert)
        return rows is not None and rows.numel() == 0

    def index_select(self, index: Tensor) -> RoutedGates:
        return RoutedGates(self.gates.index_select(0, index.to(self.gates.device)))

    def repeat_interleave(self, repeats: int) -> RoutedGates:
        return RoutedGates(self.gates.repeat_interleave(repeats, dim=0))
