"""Every fast FLoRA path against the plain per-example reference (docs/DESIGN.md §2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flora_hf.ops import (
    FLoRAShape,
    bank_row,
    build_flora_bank,
    choose_flora_path,
    compose_flora,
    flora_delta_weight,
    flora_linear,
)
from flora_hf.ops.reference import flora_linear_reference, merged_weight_reference

D_IN, D_OUT = 24, 40


def random_adapters(n: int, ranks: list[int] | int, d_in: int = D_IN, d_out: int = D_OUT):
    ranks = [ranks] * n if isinstance(ranks, int) else ranks
    return [(1 + 0.3 * torch.randn(r, d_in), 1 + 0.3 * torch.randn(r, d_out)) for r in ranks]


def setup_layer(fan_in_fan_out: bool):
    w_in_out = torch.randn(D_IN, D_OUT) / D_IN**0.5  # realistic scale: outputs O(1), fp32 error ≪ 1e-5
    weight = w_in_out if fan_in_fan_out else w_in_out.t().contiguous()
    return w_in_out, weight, torch.randn(D_OUT)


def paths_for(rank: int) -> list[str]:
    return ["auto", "stacked", "merged"] + (["rank1"] if rank == 1 else [])


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_every_path_matches_reference_per_row(rank: int, fan_in_fan_out: bool) -> None:
    w_in_out, weight, bias = setup_layer(fan_in_fan_out)
    bank_in, bank_out = build_flora_bank(random_adapters(3, rank), D_IN, D_OUT)
    x = torch.randn(5, 7, D_IN)
    idx = torch.tensor([1, 0, 3, 2, 1])
    ref = flora_linear_reference(x, w_in_out, bias, bank_in, bank_out, idx)
    for path in paths_for(rank):
        y = flora_linear(x, bank_in, bank_out, idx, weight=weight, bias=bias, fan_in_fan_out=fan_in_fan_out, path=path)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=0, msg=f"path {path}")


def test_merged_path_in_chunks_under_a_memory_cap() -> None:
    w_in_out, weight, bias = setup_layer(False)
    bank_in, bank_out = build_flora_bank(random_adapters(3, 2), D_IN, D_OUT)
    x = torch.randn(5, 6, D_IN)
    idx = torch.tensor([1, 2, 3, 0, 2])
    ref = flora_linear_reference(x, w_in_out, bias, bank_in, bank_out, idx)
    one_row = D_IN * D_OUT * 4
    for cap in (one_row, 2 * one_row + 1, 100 * one_row):
        y = flora_linear(x, bank_in, bank_out, idx, weight=weight, bias=bias, path="merged", max_merge_bytes=cap)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [1, 4])
def test_per_token_indices_match_reference(rank: int) -> None:
    w_in_out, weight, bias = setup_layer(False)
    bank_in, bank_out = build_flora_bank(random_adapters(3, rank), D_IN, D_OUT)
    x = torch.randn(2, 5, D_IN)
    idx = torch.randint(0, 4, (2, 5))
    ref = flora_linear_reference(x, w_in_out, bias, bank_in, bank_out, idx)
    for path in ["auto", "stacked"]:
        y = flora_linear(x, bank_in, bank_out, idx, weight=weight, bias=bias, path=path)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="merged path"):
        flora_linear(x, bank_in, bank_out, idx, weight=weight, path="merged")


def test_two_dimensional_input_and_shared_adapter() -> None:
    w_in_out, weight, bias = setup_layer(False)
    f_in, f_out = random_adapters(1, 3)[0]
    x = torch.randn(4, D_IN)
    expected = x @ merged_weight_reference(w_in_out, f_in, f_out) + bias
    b_in, b_out = bank_row(f_in, f_out)
    for path in ["auto", "stacked", "merged"]:
        y = flora_linear(x, b_in[None], b_out[None], None, weight=weight, bias=bias, path=path)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)


def test_mixed_ranks_share_one_bank_exactly() -> None:
    w_in_out, weight, bias = setup_layer(False)
    adapters = random_adapters(3, [1, 4, 2])
    bank_in, bank_out = build_flora_bank(adapters, D_IN, D_OUT)
    assert bank_in.shape == (4, 4, D_IN)
    x = torch.randn(3, 2, D_IN)
    y = flora_linear(x, bank_in, bank_out, torch.tensor([1, 2, 3]), weight=weight, bias=bias)
    for row, (f_in, f_out) in enumerate(adapters):
        expected = x[row] @ merged_weight_reference(w_in_out, f_in, f_out) + bias
        torch.testing.assert_close(y[row], expected, atol=1e-5, rtol=0)


def test_bank_rows_hold_the_same_delta_at_any_padded_rank() -> None:
    """Sum form: a bank sliced to any rank ≥ the adapter's own computes the same ΔW."""
    f_in, f_out = random_adapters(1, 2)[0]
    expected = flora_delta_weight(f_in, f_out)
    for rank in (2, 3, 5):
        p_in, p_out = bank_row(f_in, f_out, rank)
        torch.testing.assert_close(p_in.t() @ p_out, expected)
        torch.testing.assert_close(p_in[:2].t() @ p_out[:2], expected)
    with pytest.raises(ValueError):
        bank_row(p_in, p_out, 2)


def test_sliced_bank_serves_lower_ranks_exactly() -> None:
    w_in_out, weight, bias = setup_layer(False)
    adapters = random_adapters(3, [1, 2, 1])
    bank_in, bank_out = build_flora_bank(adapters + random_adapters(1, 8), D_IN, D_OUT)
    x = torch.randn(3, 2, D_IN)
    idx = torch.tensor([1, 2, 0])
    full = flora_linear(x, bank_in, bank_out, idx, weight=weight, bias=bias)
    sliced = flora_linear(x, bank_in[:, :2], bank_out[:, :2], idx, weight=weight, bias=bias)
    torch.testing.assert_close(sliced, full, atol=1e-5, rtol=0)


def test_identity_row_is_the_base_layer() -> None:
    _, weight, bias = setup_layer(False)
    bank_in, bank_out = build_flora_bank(random_adapters(2, 4), D_IN, D_OUT)
    x = torch.randn(3, 4, D_IN)
    zeros = torch.zeros(3, dtype=torch.long)
    for path in ["stacked", "merged"]:
        y = flora_linear(x, bank_in, bank_out, zeros, weight=weight, bias=bias, path=path)
        torch.testing.assert_close(y, nn.functional.linear(x, weight, bias), atol=1e-5, rtol=0)


def test_scaled_call_path_for_quantized_base() -> None:
    """A base that only exposes its call (bitsandbytes 8-bit) goes through base_mm; bias must not be scaled."""
    base = nn.Linear(D_IN, D_OUT)
    w_in_out = base.weight.detach().t()
    bank_in, bank_out = build_flora_bank(random_adapters(2, 3), D_IN, D_OUT)
    x = torch.randn(2, 3, D_IN)
    idx = torch.tensor([2, 1])

    def base_mm(t: torch.Tensor) -> torch.Tensor:
        return base(t) - base.bias

    with torch.no_grad():
        y = flora_linear(x, bank_in, bank_out, idx, base_mm=base_mm, bias=base.bias)
        ref = flora_linear_reference(x, w_in_out, base.bias, bank_in, bank_out, idx)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="merged path"):
        flora_linear(x, bank_in, bank_out, idx, base_mm=base_mm, path="merged")


def test_compose_is_elementwise_product_of_deltas() -> None:
    a, b = random_adapters(2, [2, 3])
    c_in, c_out = compose_flora(a, b)
    assert c_in.shape[0] == 6
    torch.testing.assert_close(flora_delta_weight(c_in, c_out), flora_delta_weight(*a) * flora_delta_weight(*b))


def test_gradient_reaches_only_the_rows_used() -> None:
    _, weight, _ = setup_layer(False)
    adapters = [(i.requires_grad_(), o.requires_grad_()) for i, o in random_adapters(3, 2)]
    bank_in, bank_out = build_flora_bank(adapters, D_IN, D_OUT)
    x = torch.randn(3, 4, D_IN)
    for path in ["stacked", "merged"]:
        for p in [t for pair in adapters for t in pair]:
            p.grad = None
        y = flora_linear(x, bank_in, bank_out, torch.tensor([1, 2, 3]), weight=weight, path=path)
        y[0].sum().backward(retain_graph=True)
        assert adapters[0][0].grad.abs().sum() > 0
        assert adapters[1][0].grad is None or adapters[1][0].grad.abs().sum() == 0
        assert adapters[2][1].grad is None or adapters[2][1].grad.abs().sum() == 0


def test_invalid_arguments_are_clear_errors() -> None:
    _, weight, _ = setup_layer(False)
    bank_in, bank_out = build_flora_bank(random_adapters(1, 2), D_IN, D_OUT)
    x = torch.randn(2, 3, D_IN)
    with pytest.raises(ValueError, match="unknown FLoRA path"):
        flora_linear(x, bank_in, bank_out, torch.tensor([0, 1]), weight=weight, path="fast")
    with pytest.raises(ValueError, match="rank1 path"):
        flora_linear(x, bank_in, bank_out, torch.tensor([0, 1]), weight=weight, path="rank1")
    with pytest.raises(ValueError, match="cover 3 rows"):
        flora_linear(x, bank_in, bank_out, torch.tensor([0, 1, 1]), weight=weight)
    with pytest.raises(ValueError, match="base weight"):
        flora_linear(x, bank_in, bank_out, torch.tensor([0, 1]))


def _shape(rows: int, tokens_per_row: int, d: int, rank: int, **kw) -> FLoRAShape:
    defaults = {"itemsize": 2, "per_token": False, "shared": False}
    return FLoRAShape(rows=rows, tokens=rows * tokens_per_row, d_in=d, d_out=d, rank=rank, **(defaults | kw))


def test_cost_model_choices() -> None:
    gpu = torch.device("cuda")
    assert choose_flora_path(_shape(32, 1, 2048, 1), gpu) == "rank1"
    assert choose_flora_path(_shape(32, 1, 2048, 8), gpu) == "stacked"  # decode: read W0 once
    assert choose_flora_path(_shape(8, 512, 2048, 8), gpu) == "merged"  # prefill: L ≫ r
    assert choose_flora_path(_shape(8, 512, 2048, 8), gpu, can_merge=False) == "stacked"
    assert choose_flora_path(_shape(8, 512, 2048, 8, per_token=True), gpu) == "stacked"
    assert choose_flora_path(_shape(8, 512, 6144, 8), gpu, max_merge_bytes=1 << 20) == "stacked"  # not one row fits
    assert choose_flora_path(_shape(8, 512, 6144, 8, itemsize=4), gpu) == "merged"  # 15B fp32: merged in chunks


def test_merge_and_unmerge_are_the_elementwise_product_and_its_inverse() -> None:
    from flora_hf.ops import MERGE_EPS, flora_merge_weight, flora_unmerge_weight

    g = torch.Generator().manual_seed(0)
    weight, delta = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    delta[0, 0] = 0.0  # where ΔW vanishes the division is replaced, not a NaN
    merged = flora_merge_weight(weight, delta)
    torch.testing.assert_close(merged, weight * delta)
    restored = flora_unmerge_weight(merged, delta)
    assert torch.isfinite(restored).all() and restored[0, 0] == 0.0 / MERGE_EPS
    mask = torch.ones_like(delta, dtype=torch.bool)
    mask[0, 0] = False
    torch.testing.assert_close(restored[mask], weight[mask])


def test_the_base_call_is_the_dense_weight_or_a_scaled_call_of_the_layer() -> None:
    from flora_hf.ops import base_call_kwargs

    layer = torch.nn.Linear(4, 3)
    dense = base_call_kwargs(layer, quantized=False, fan_in_fan_out=False)
    assert dense["weight"] is layer.weight and dense["bias"] is layer.bias and "base_mm" not in dense
    scaled = base_call_kwargs(layer, quantized=True, fan_in_fan_out=False)
    x = torch.randn(2, 4)
    assert scaled["weight"] is None
    torch.testing.assert_close(scaled["base_mm"](x), x @ layer.weight.t())  # the layer's call, bias taken off
