"""Bank rows (padding, neutral rows, one adapter's rows) against their references, through adapted_linear."""

from __future__ import annotations

import pytest
import torch

from flora_hf.ops import (
    LoRATerm,
    adapted_linear,
    adapter_rows,
    bank_row,
    build_flora_bank,
    build_ia3_bank,
    build_lora_bank,
    identity_row,
    lora_bank_row,
    neutral_bank,
    neutral_row,
    pad_rank,
    role_dim,
)
from flora_hf.ops.reference import adapted_linear_reference, merged_weight_reference, neutral_row_reference
from tests.ops.layers import D_IN, D_OUT, ROLES, make_layer


def one_adapter(flora_rank: int = 2, lora_rank: int = 2) -> dict[str, torch.Tensor]:
    """Every role of one adapter: FLoRA in PEFT's mean form, LoRA in bank form, IA3 vectors."""
    lora_a, lora_b = torch.randn(lora_rank, D_IN), torch.randn(D_OUT, lora_rank)
    a, b = lora_bank_row(lora_a, lora_b, 2.0 / lora_rank)
    return {
        "flora_in": 1 + 0.3 * torch.randn(flora_rank, D_IN),
        "flora_out": 1 + 0.3 * torch.randn(flora_rank, D_OUT),
        "lora_a": a,
        "lora_b": b,
        "ia3_in": 1 + 0.3 * torch.randn(D_IN),
        "ia3_out": 1 + 0.3 * torch.randn(D_OUT),
    }


def run_layer(x, layer, idx, banks: dict[str, torch.Tensor], fan_in_fan_out: bool = False):
    flora = (banks["flora_in"], banks["flora_out"]) if "flora_in" in banks else None
    lora = [LoRATerm(banks["lora_a"], banks["lora_b"], indices=idx)] if "lora_a" in banks else []
    return adapted_linear(
        x,
        layer,
        idx,
        flora=flora,
        lora=lora,
        ia3_in=banks.get("ia3_in"),
        ia3_out=banks.get("ia3_out"),
        fan_in_fan_out=fan_in_fan_out,
    )


# -------------------------------------------------------------------------------------------------- neutral rows
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("role", ROLES)
def test_neutral_row_matches_reference(role: str, rank: int) -> None:
    dim = role_dim(role, D_IN, D_OUT)
    assert dim == (D_IN if role in ("flora_in", "lora_a", "ia3_in") else D_OUT)
    row = neutral_row(role, rank, dim)
    assert torch.equal(row, neutral_row_reference(role, rank, dim))
    assert neutral_row(role, rank, dim, dtype=torch.float16).dtype == torch.float16


def test_neutral_rows_are_the_build_functions_row_zero() -> None:
    flora = build_flora_bank([(torch.randn(3, D_IN), torch.randn(3, D_OUT))], D_IN, D_OUT)
    lora = build_lora_bank([(torch.randn(2, D_IN), torch.randn(D_OUT, 2), 1.0)], D_IN, D_OUT)
    ia3 = build_ia3_bank([torch.randn(D_OUT)], D_OUT)
    assert torch.equal(flora[0][0], neutral_row_reference("flora_in", 3, D_IN))
    assert torch.equal(flora[1][0], neutral_row_reference("flora_out", 3, D_OUT))
    assert torch.equal(lora[0][0], neutral_row_reference("lora_a", 2, D_IN))
    assert torch.equal(lora[1][0], neutral_row_reference("lora_b", 2, D_OUT))
    assert torch.equal(ia3[0], neutral_row_reference("ia3_out", 0, D_OUT))
    identity = identity_row(3, D_IN, D_OUT)
    assert torch.equal(identity[0], neutral_row("flora_in", 3, D_IN))
    assert torch.equal(identity[1], neutral_row("flora_out", 3, D_OUT))


@pytest.mark.parametrize("which", ["flora", "lora", "ia3_in", "ia3_out", "all"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_bank_of_neutral_rows_leaves_the_base_layer(kind: str, which: str) -> None:
    layer, _, _ = make_layer(kind)
    roles = {
        "flora": ("flora_in", "flora_out"),
        "lora": ("lora_a", "lora_b"),
        "ia3_in": ("ia3_in",),
        "ia3_out": ("ia3_out",),
        "all": ROLES,
    }[which]
    rank = 3
    banks = {role: torch.stack([neutral_row(role, rank, role_dim(role, D_IN, D_OUT))] * 3) for role in roles}
    x = torch.randn(4, 3, D_IN)
    y = run_layer(x, layer, torch.tensor([2, 0, 1, 2]), banks, fan_in_fan_out=kind == "conv1d")
    torch.testing.assert_close(y, layer(x), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- one adapter's rows
def test_adapter_rows_pad_lora_and_fold_the_flora_mean() -> None:
    tensors = one_adapter(flora_rank=2, lora_rank=3)
    rows = adapter_rows(tensors, 5)
    assert set(rows) == set(ROLES)
    # FLoRA: PEFT's mean form -> sum form (1/r folded into the output factor), zero-padded
    expected_in, expected_out = bank_row(tensors["flora_in"], tensors["flora_out"], 5)
    assert torch.equal(rows["flora_in"], expected_in) and torch.equal(rows["flora_out"], expected_out)
    torch.testing.assert_close(rows["flora_in"][:2], tensors["flora_in"])
    torch.testing.assert_close(rows["flora_out"][:2], tensors["flora_out"] / 2)
    assert rows["flora_in"][2:].abs().max() == 0 and rows["flora_out"][2:].abs().max() == 0
    delta = merged_weight_reference(torch.ones(D_IN, D_OUT), tensors["flora_in"], tensors["flora_out"])
    torch.testing.assert_close(rows["flora_in"].t() @ rows["flora_out"], delta)
    # LoRA: already in bank form, only zero-padded
    for role in ("lora_a", "lora_b"):
        assert rows[role].shape == (5, role_dim(role, D_IN, D_OUT))
        assert torch.equal(rows[role][:3], tensors[role]) and rows[role][3:].abs().max() == 0
    # IA3: the vector is its own row
    assert torch.equal(rows["ia3_in"], tensors["ia3_in"]) and torch.equal(rows["ia3_out"], tensors["ia3_out"])
    # only the roles given
    assert set(adapter_rows({"lora_a": tensors["lora_a"], "lora_b": tensors["lora_b"]}, 4)) == {"lora_a", "lora_b"}


def test_pad_rank_appends_zero_rows_and_refuses_to_truncate() -> None:
    factor = torch.randn(2, D_IN)
    padded = pad_rank(factor, 4)
    assert padded.shape == (4, D_IN) and torch.equal(padded[:2], factor) and padded[2:].abs().max() == 0
    assert torch.equal(pad_rank(factor, 2), factor)
    with pytest.raises(ValueError, match="cannot pad a rank-2 adapter down to rank 1"):
        pad_rank(factor, 1)


def test_lora_bank_row_is_a_and_scaled_b_transposed() -> None:
    lora_a, lora_b = torch.randn(3, D_IN), torch.randn(D_OUT, 3)
    a, b = lora_bank_row(lora_a, lora_b, 0.5)
    assert torch.equal(a, lora_a) and torch.equal(b, lora_b.t() * 0.5)
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(x @ a.t() @ b, (x @ lora_a.t() @ lora_b.t()) * 0.5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_an_adapter_padded_to_a_larger_rank_computes_the_same_output(kind: str) -> None:
    layer, w_in_out, bias = make_layer(kind)
    tensors = one_adapter(flora_rank=2, lora_rank=2)
    x, idx = torch.randn(3, 4, D_IN), torch.tensor([1, 0, 1])
    outputs = []
    for rank in (2, 5):
        rows = adapter_rows(tensors, rank)
        banks = {
            role: torch.stack([neutral_row(role, rank, role_dim(role, D_IN, D_OUT)), rows[role]]) for role in ROLES
        }
        outputs.append(run_layer(x, layer, idx, banks, fan_in_fan_out=kind == "conv1d"))
        reference = adapted_linear_reference(
            x,
            w_in_out,
            bias,
            idx,
            flora=(banks["flora_in"], banks["flora_out"]),
            lora=(banks["lora_a"], banks["lora_b"]),
            ia3_in=banks["ia3_in"],
            ia3_out=banks["ia3_out"],
        )
        torch.testing.assert_close(outputs[-1], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)
    # row 1 of the banks is the adapter written in PEFT's form (mean-form FLoRA, LoRA with its scaling)
    x_in = x[0] * tensors["ia3_in"]
    merged = merged_weight_reference(w_in_out, tensors["flora_in"], tensors["flora_out"])
    lora = x_in @ tensors["lora_a"].t() @ tensors["lora_b"]
    expected = (x_in @ merged + bias + lora) * tensors["ia3_out"]
    torch.testing.assert_close(outputs[0][0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs[0][1], layer(x[1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("role", ROLES)
def test_a_neutral_bank_is_slots_plus_one_neutral_rows(role):
    bank = neutral_bank(role, 3, 4, D_IN)
    assert bank.shape[0] == 4
    for row in bank:
        torch.testing.assert_close(row, neutral_row_reference(role, 4, D_IN), atol=0, rtol=0)
