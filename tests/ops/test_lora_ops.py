"""Per-row LoRA and IA3 forms of the math core against their references."""

from __future__ import annotations

import torch

from flora_hf.ops import build_ia3_bank, build_lora_bank, ia3_scale, lora_bmm_delta, lora_delta, lora_loop_delta
from flora_hf.ops.reference import ia3_reference, lora_linear_reference


def test_gather_bmm_lora_matches_reference_and_loop() -> None:
    d_in, d_out = 16, 12
    adapters = [(torch.randn(r, d_in), torch.randn(d_out, r), 2.0 / r) for r in (1, 4, 2)]
    bank_a, bank_b = build_lora_bank(adapters, d_in, d_out)
    x = torch.randn(5, 3, d_in)
    idx = torch.tensor([0, 1, 2, 3, 1])
    bmm = lora_bmm_delta(x, bank_a, bank_b, idx)
    torch.testing.assert_close(bmm, lora_linear_reference(x, bank_a, bank_b, idx), atol=1e-5, rtol=0)
    torch.testing.assert_close(lora_loop_delta(x, bank_a, bank_b, idx), bmm, atol=1e-5, rtol=0)
    # row 2 used adapter 2, written the way PEFT computes it: lora_B(lora_A(x)) * scaling
    a, b, scaling = adapters[1]
    torch.testing.assert_close(bmm[2], (x[2] @ a.t() @ b.t()) * scaling, atol=1e-5, rtol=0)
    assert bmm[0].abs().max() == 0


def test_ia3_scaling_per_row() -> None:
    bank = build_ia3_bank([torch.randn(8, 1), torch.randn(1, 8)], 8)
    y = torch.randn(3, 4, 8)
    idx = torch.tensor([2, 0, 1])
    torch.testing.assert_close(ia3_scale(y, bank, idx), ia3_reference(y, bank, idx))
    torch.testing.assert_close(ia3_scale(y, bank, None), y)


def test_lora_delta_takes_bank_rows_per_row_or_one_adapter_for_every_row():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 6)
    adapters = [(torch.randn(2, 6), torch.randn(5, 2), 0.5), (torch.randn(1, 6), torch.randn(5, 1), 2.0)]
    bank_a, bank_b = build_lora_bank(adapters, 6, 5)
    indices = torch.tensor([2, 0, 1])
    torch.testing.assert_close(lora_delta(x, bank_a, bank_b, indices), lora_bmm_delta(x, bank_a, bank_b, indices))
    a, b = bank_a[1], bank_b[1]
    expected = torch.stack([(row @ a.t()) @ b for row in x])
    torch.testing.assert_close(lora_delta(x, a, b, None), expected)
