"""The plugin's FLoRA folder loader, without vLLM: packing onto vLLM's layers and every refusal with its reason.

vLLM is not needed here (the loader takes the layer table as plain data), so these run in every environment.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from flora_hf.vllm_plugin.loader import (
    FLoRAAdapterError,
    LayerSpec,
    is_flora_folder,
    load_flora_adapter,
    module_targets,
)

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
LAYERS = {
    "model.layers.0.self_attn.qkv_proj": LayerSpec(d_in=8, slice_widths=(8, 4, 4)),
    "model.layers.0.self_attn.o_proj": LayerSpec(d_in=8, slice_widths=(8,)),
    "model.layers.0.mlp.gate_up_proj": LayerSpec(d_in=8, slice_widths=(16, 16)),
}
PREFIX = "base_model.model.model.layers.0."


def write_folder(path, tensors: dict, peft_type: str = "FLORA"):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 2}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    return path


def factors(rank: int, d_in: int, d_out: int, module: str) -> dict:
    return {
        f"{PREFIX}{module}.flora_in": torch.rand(rank, d_in),
        f"{PREFIX}{module}.flora_out": torch.rand(rank, d_out),
    }


def load(folder, max_rank: int = 4, **kwargs):
    return load_flora_adapter("ad", folder, LAYERS, PACKED, max_rank, **kwargs)


def test_module_targets_follow_vllms_packing() -> None:
    targets = module_targets(list(LAYERS), PACKED)
    assert targets["model.layers.0.self_attn.k_proj"] == ("model.layers.0.self_attn.qkv_proj", 1)
    assert targets["model.layers.0.mlp.up_proj"] == ("model.layers.0.mlp.gate_up_proj", 1)
    assert targets["model.layers.0.self_attn.o_proj"] == ("model.layers.0.self_attn.o_proj", 0)
    assert module_targets(["h.0.attn.c_attn"], {"c_attn": ["c_attn"]}) == {"h.0.attn.c_attn": ("h.0.attn.c_attn", 0)}


def test_slices_land_where_vllm_packs_them(tmp_path) -> None:
    tensors = {
        **factors(2, 8, 4, "self_attn.k_proj"),
        **factors(1, 8, 16, "mlp.up_proj"),
        **factors(2, 8, 8, "self_attn.o_proj"),
    }
    weights = load(write_folder(tmp_path / "a", tensors))
    assert weights.rank == 2
    qkv = weights.modules["model.layers.0.self_attn.qkv_proj"]
    assert qkv[0] is None and qkv[2] is None  # q and v not adapted: identity
    assert torch.equal(qkv[1][0], tensors[f"{PREFIX}self_attn.k_proj.flora_in"])
    gate_up = weights.modules["model.layers.0.mlp.gate_up_proj"]
    assert gate_up[0] is None and torch.equal(gate_up[1][1], tensors[f"{PREFIX}mlp.up_proj.flora_out"])
    assert set(weights.modules) == {*LAYERS}


def test_only_flora_folders_are_taken(tmp_path) -> None:
    assert is_flora_folder(write_folder(tmp_path / "f", factors(1, 8, 8, "self_attn.o_proj")))
    assert not is_flora_folder(write_folder(tmp_path / "l", factors(1, 8, 8, "self_attn.o_proj"), peft_type="LORA"))
    assert not is_flora_folder(tmp_path / "missing")


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        (
            factors(5, 8, 8, "self_attn.o_proj"),
            r"'ad' has rank 5 in model\.layers\.0\.self_attn\.o_proj, greater than max_lora_rank 4",
        ),
        (factors(1, 8, 5, "self_attn.v_proj"), r"v_proj\.flora_out has shape \(1, 5\), the layer needs \(r, 4\)"),
        (
            factors(1, 8, 8, "self_attn.rotary"),
            r"targets 'model\.layers\.0\.self_attn\.rotary', which is not a LoRA-capable",
        ),
        ({f"{PREFIX}self_attn.o_proj.flora_in": torch.rand(1, 8)}, r"o_proj lacks flora_out"),
        ({f"{PREFIX}self_attn.o_proj.lora_A.weight": torch.rand(1, 8)}, r"unexpected tensor .*lora_A\.weight"),
        (
            {
                f"{PREFIX}self_attn.o_proj.flora_in": torch.rand(2, 8),
                f"{PREFIX}self_attn.o_proj.flora_out": torch.rand(1, 8),
            },
            r"factors of ranks 2 and 1",
        ),
    ],
)
def test_refusals_name_the_adapter_module_and_reason(tmp_path, tensors, reason) -> None:
    with pytest.raises(FLoRAAdapterError, match=reason):
        load(write_folder(tmp_path / "bad", tensors))


def test_non_finite_values_are_refused(tmp_path) -> None:
    tensors = factors(1, 8, 16, "mlp.gate_proj")
    tensors[f"{PREFIX}mlp.gate_proj.flora_in"][0, 2] = float("inf")
    with pytest.raises(
        FLoRAAdapterError, match=r"NaN or infinite values in model\.layers\.0\.mlp\.gate_proj\.flora_in"
    ):
        load(write_folder(tmp_path / "inf", tensors))


def test_a_layer_vllm_cannot_adapt_with_flora_is_refused_with_why(tmp_path) -> None:
    folder = write_folder(
        tmp_path / "head",
        {
            "base_model.model.lm_head.flora_in": torch.rand(1, 8),
            "base_model.model.lm_head.flora_out": torch.rand(1, 8),
        },
    )
    with pytest.raises(FLoRAAdapterError, match=r"targets 'lm_head': vLLM wraps it as LogitsProcessorWithLoRA"):
        load(folder, refused={"lm_head": "vLLM wraps it as LogitsProcessorWithLoRA, which has no FLoRA path"})


def test_missing_weights_and_bad_config(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"peft_type": "FLORA"}))
    with pytest.raises(FLoRAAdapterError, match="adapter_model.safetensors is missing"):
        load(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "adapter_config.json").write_text("{not json")
    with pytest.raises(FLoRAAdapterError, match="is not valid JSON"):
        load(tmp_path / "junk")
