"""adapted_linear (IA3-in, FLoRA or the base call, LoRA terms, IA3-out) against its per-row reference (DESIGN.md §2, §3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flora_hf.ops import (
    LoRATerm,
    adapted_linear,
    adapter_rows,
    bank_row,
    build_flora_bank,
    build_ia3_bank,
    build_lora_bank,
    lora_bank_row,
    neutral_row,
    role_dim,
)
from flora_hf.ops.reference import (
    adapted_linear_reference,
    gated_lora_reference,
    lora_linear_reference,
    merged_weight_reference,
)
from tests.ops.layers import D_IN, D_OUT, ROLES, make_layer

KINDS = ["linear", "conv1d"]
SHAPES = [(5, D_IN), (5, 3, D_IN)]
SHAPE_IDS = ["decode", "prefill"]


def flora_adapters(ranks: list[int]):
    return [(1 + 0.3 * torch.randn(r, D_IN), 1 + 0.3 * torch.randn(r, D_OUT)) for r in ranks]


def lora_adapters(ranks: list[int]):
    return [(torch.randn(r, D_IN), torch.randn(D_OUT, r), 2.0 / r) for r in ranks]


def ia3_vectors(n: int, dim: int):
    return [1 + 0.3 * torch.randn(dim) for _ in range(n)]


IDX = torch.tensor([1, 0, 3, 2, 1])


# ---------------------------------------------------------------------------------------------------- one kind
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_flora_only_matches_reference(kind: str, shape) -> None:
    layer, w_in_out, bias = make_layer(kind)
    bank = build_flora_bank(flora_adapters([1, 3, 2]), D_IN, D_OUT)
    x = torch.randn(*shape)
    y = adapted_linear(x, layer, IDX, flora=bank, fan_in_fan_out=kind == "conv1d")
    torch.testing.assert_close(y, adapted_linear_reference(x, w_in_out, bias, IDX, flora=bank), atol=1e-5, rtol=0)
    # one adapter for the whole batch: a one-row bank and no indices
    single = tuple(t[None] for t in bank_row(*flora_adapters([2])[0]))
    y = adapted_linear(x, layer, None, flora=single, fan_in_fan_out=kind == "conv1d")
    torch.testing.assert_close(y, adapted_linear_reference(x, w_in_out, bias, None, flora=single), atol=1e-5, rtol=0)


def test_flora_quantized_base_goes_through_the_layer_call() -> None:
    layer, w_in_out, bias = make_layer("linear")
    bank = build_flora_bank(flora_adapters([2, 3]), D_IN, D_OUT)
    x, idx = torch.randn(4, 3, D_IN), torch.tensor([2, 1, 0, 2])
    y = adapted_linear(x, layer, idx, flora=bank, quantized=True)
    torch.testing.assert_close(y, adapted_linear_reference(x, w_in_out, bias, idx, flora=bank), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_lora_bank_with_indices_matches_reference(kind: str, shape) -> None:
    layer, w_in_out, bias = make_layer(kind)
    bank = build_lora_bank(lora_adapters([1, 4, 2]), D_IN, D_OUT)
    x = torch.randn(*shape)
    y = adapted_linear(x, layer, IDX, lora=[LoRATerm(*bank, indices=IDX)], fan_in_fan_out=kind == "conv1d")
    torch.testing.assert_close(y, adapted_linear_reference(x, w_in_out, bias, IDX, lora=bank), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_one_lora_adapter_without_indices(shape) -> None:
    layer, w_in_out, bias = make_layer("linear")
    lora_a, lora_b, scaling = lora_adapters([3])[0]
    a, b = lora_bank_row(lora_a, lora_b, scaling)
    x = torch.randn(*shape)
    y = adapted_linear(x, layer, lora=[LoRATerm(a, b)])
    torch.testing.assert_close(y, adapted_linear_reference(x, w_in_out, bias, None, lora=(a, b)), atol=1e-5, rtol=0)
    # PEFT's own form: base(x) + lora_B(lora_A(x)) * scaling
    torch.testing.assert_close(y, layer(x) + (x @ lora_a.t() @ lora_b.t()) * scaling, atol=1e-5, rtol=0)


@pytest.mark.parametrize("banked", [True, False], ids=["bank", "one-adapter"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gated_lora_computes_only_the_selected_rows(shape, banked: bool) -> None:
    layer, w_in_out, bias = make_layer("linear")
    bank = build_lora_bank(lora_adapters([2, 3, 1]), D_IN, D_OUT)
    factors, term_idx = (bank, IDX) if banked else ((bank[0][2], bank[1][2]), None)
    x = torch.randn(*shape)
    gate = torch.tensor([0.5, 0.0, 0.25, 0.9, 0.7])
    base = layer(x)

    def run(rows):
        return adapted_linear(x, layer, IDX, lora=[LoRATerm(*factors, indices=term_idx, gate=gate, rows=rows)])

    every = adapted_linear_reference(x, w_in_out, bias, IDX, lora=factors, gate=gate)
    torch.testing.assert_close(run(None), every, atol=1e-5, rtol=0)
    # rows is the contract: rows 3 and 4 have a gate but are not selected, so they stay the base output exactly
    rows = torch.tensor([0, 2])
    selected = F.one_hot(rows, 5).sum(0).to(gate.dtype)
    y = run(rows)
    expected = adapted_linear_reference(x, w_in_out, bias, IDX, lora=factors, gate=gate * selected)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    unselected = torch.tensor([1, 3, 4])
    assert torch.equal(y[unselected], base[unselected])
    assert not torch.allclose(y[rows], base[rows])
    assert torch.equal(run(torch.empty(0, dtype=torch.long)), base)


@pytest.mark.parametrize("which", ["in", "out", "both"])
@pytest.mark.parametrize("kind", KINDS)
def test_ia3_in_and_out_match_reference(kind: str, which: str) -> None:
    layer, w_in_out, bias = make_layer(kind)
    banks = {
        "ia3_in": build_ia3_bank(ia3_vectors(3, D_IN), D_IN) if which in ("in", "both") else None,
        "ia3_out": build_ia3_bank(ia3_vectors(3, D_OUT), D_OUT) if which in ("out", "both") else None,
    }
    x = torch.randn(5, 3, D_IN)
    y = adapted_linear(x, layer, IDX, fan_in_fan_out=kind == "conv1d", **banks)
    torch.testing.assert_close(y, adapted_linear_reference(x, w_in_out, bias, IDX, **banks), atol=1e-5, rtol=0)
    assert not torch.allclose(y, layer(x))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_factor_on_the_same_rows_composes_in_order(kind: str, shape) -> None:
    """IA3-in scales the input of FLoRA and LoRA alike, IA3-out scales their sum (the docstring's formula)."""
    layer, w_in_out, bias = make_layer(kind)
    flora = build_flora_bank(flora_adapters([2, 1, 3]), D_IN, D_OUT)
    lora = build_lora_bank(lora_adapters([1, 2, 2]), D_IN, D_OUT)
    ia3 = {
        "ia3_in": build_ia3_bank(ia3_vectors(3, D_IN), D_IN),
        "ia3_out": build_ia3_bank(ia3_vectors(3, D_OUT), D_OUT),
    }
    gate = torch.tensor([0.3, 0.8, 0.0, 0.6, 1.0])
    x = torch.randn(*shape)
    term = LoRATerm(*lora, indices=IDX, gate=gate, rows=torch.tensor([0, 1, 3, 4]))
    y = adapted_linear(x, layer, IDX, flora=flora, lora=[term], fan_in_fan_out=kind == "conv1d", **ia3)
    expected = adapted_linear_reference(x, w_in_out, bias, IDX, flora=flora, lora=lora, gate=gate, **ia3)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- mixed batch
def slot_banks(adapters: list[dict], rank: int) -> dict[str, torch.Tensor]:
    """One bank per role, a row per adapter (its rows where it has the role, the neutral row elsewhere)."""
    rows = [adapter_rows(tensors, rank) for tensors in adapters]
    return {
        role: torch.stack([r.get(role, neutral_row(role, rank, role_dim(role, D_IN, D_OUT))) for r in rows])
        for role in ROLES
    }


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_rows_of_different_kinds(kind: str, shape) -> None:
    layer, w_in_out, bias = make_layer(kind)
    (f_in, f_out), (g_in, g_out) = flora_adapters([2, 1])
    lora_a, lora_b, scaling = lora_adapters([3])[0]
    a, b = lora_bank_row(lora_a, lora_b, scaling)
    l_in, l_out = ia3_vectors(1, D_IN)[0], ia3_vectors(1, D_OUT)[0]
    adapters = [
        {},  # 0: no adapter
        {"flora_in": f_in, "flora_out": f_out},
        {"lora_a": a, "lora_b": b},
        {"ia3_in": l_in, "ia3_out": l_out},
        {"flora_in": g_in, "flora_out": g_out, "ia3_out": l_out},
    ]
    banks = slot_banks(adapters, 3)
    idx = torch.tensor([2, 0, 1, 3, 4])
    x = torch.randn(*shape)
    y = adapted_linear(
        x,
        layer,
        idx,
        flora=(banks["flora_in"], banks["flora_out"]),
        lora=[LoRATerm(banks["lora_a"], banks["lora_b"], indices=idx)],
        ia3_in=banks["ia3_in"],
        ia3_out=banks["ia3_out"],
        fan_in_fan_out=kind == "conv1d",
    )
    expected = adapted_linear_reference(
        x,
        w_in_out,
        bias,
        idx,
        flora=(banks["flora_in"], banks["flora_out"]),
        lora=(banks["lora_a"], banks["lora_b"]),
        ia3_in=banks["ia3_in"],
        ia3_out=banks["ia3_out"],
    )
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    # each row against its own adapter in PEFT's form
    torch.testing.assert_close(y[1], layer(x[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[0], layer(x[0]) + (x[0] @ lora_a.t() @ lora_b.t()) * scaling, atol=1e-5, rtol=0)
    torch.testing.assert_close(y[2], x[2] @ merged_weight_reference(w_in_out, f_in, f_out) + bias, atol=1e-5, rtol=0)
    torch.testing.assert_close(y[3], ((x[3] * l_in) @ w_in_out + bias) * l_out, atol=1e-5, rtol=0)
    expected_4 = (x[4] @ merged_weight_reference(w_in_out, g_in, g_out) + bias) * l_out
    torch.testing.assert_close(y[4], expected_4, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- lora terms
def test_term_input_replaces_the_layer_input_for_its_update() -> None:
    """Training passes dropout(x) as the term's own input; the base (and FLoRA) still see x."""
    layer, _, _ = make_layer("linear")
    lora_a, lora_b, scaling = lora_adapters([2])[0]
    a, b = lora_bank_row(lora_a, lora_b, scaling)
    x, x_dropped = torch.randn(3, 4, D_IN), torch.randn(3, 4, D_IN)
    y = adapted_linear(x, layer, lora=[LoRATerm(a, b, x=x_dropped)])
    torch.testing.assert_close(y, layer(x) + x_dropped @ a.t() @ b, atol=1e-5, rtol=0)


def test_lora_terms_add_up() -> None:
    """A plain LoRA bank and a gated MiLoRA expert on one layer: both updates, each on its own rows."""
    layer, _, _ = make_layer("linear")
    bank_a, bank_b = build_lora_bank(lora_adapters([2, 1]), D_IN, D_OUT)
    expert_a, expert_b = lora_bank_row(*lora_adapters([3])[0])
    x = torch.randn(4, 2, D_IN)
    idx = torch.tensor([1, 0, 2, 0])
    gate = torch.tensor([0.0, 0.4, 0.0, 0.7])
    terms = [
        LoRATerm(bank_a, bank_b, indices=idx),
        LoRATerm(expert_a, expert_b, gate=gate, rows=torch.tensor([1, 3])),
    ]
    y = adapted_linear(x, layer, idx, lora=terms)
    zeros = torch.zeros(4, dtype=torch.long)
    expected = (
        layer(x)
        + lora_linear_reference(x, bank_a, bank_b, idx)
        + gated_lora_reference(x, expert_a[None], expert_b[None], zeros, gate)
    )
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
