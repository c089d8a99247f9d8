"""MiLoRA through PEFT's and transformers' APIs on tiny models built from configs."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import PeftType

import flora_hf
from flora_hf import MiLoRAConfig, MiLoRALayer, MiLoRAModel, MiLoRARouter
from tests.milora.helpers import add_milora, boost, milora, routers
from tests.models import TINY_MODELS, model_inputs, tiny_gpt2, tiny_gpt_bigcode, tiny_llama, tiny_whisper

MODEL_TYPES = ["gpt_bigcode", "llama", "whisper", "gpt2"]


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def test_registered_with_peft() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MILORA] is MiLoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MILORA] is MiLoRAModel
    config = MiLoRAConfig()
    assert config.peft_type == PeftType.MILORA
    assert (config.r, config.top_k, config.pooler, config.rational_degrees) == (32, 3, "attention", (6, 5))
    assert (config.rational_form, config.load_balance_coef, config.rational_lr) == ("paper", 1e-2, 1e-6)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_identity_at_init(model_type: str) -> None:
    base = TINY_MODELS[model_type]()
    inputs = model_inputs(base, 2)
    expected = logits(base, inputs)
    model = get_peft_model(base, MiLoRAConfig(r=4), adapter_name="math")
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, inputs, adapter_names=["math", "__base__"]), expected, atol=1e-6, rtol=0)


def test_default_experts_and_routers_per_model_type() -> None:
    llama = get_peft_model(tiny_llama(), MiLoRAConfig(r=2), adapter_name="math")
    assert [r.key for r in routers(llama)] == ["model.layers.0", "model.layers.1"]
    expected = ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                "self_attn.q_proj", "self_attn.v_proj")  # fmt: skip
    for router in routers(llama):
        assert router.experts["math"] == expected and router.milora_weight["math"].shape == (7, 32)
        assert router.milora_num["math"].dtype == torch.float32 and router.milora_num["math"].shape == (7,)
        assert router.milora_den["math"].shape == (5,) and router.milora_query["math"].shape == (32,)
    bigcode = get_peft_model(tiny_gpt_bigcode(), MiLoRAConfig(r=2, pooler="mean"), adapter_name="code")
    for router in routers(bigcode):
        assert router.experts["code"] == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        assert "code" not in router.milora_query  # only the attention pooler has a query
    gpt2 = get_peft_model(tiny_gpt2(), MiLoRAConfig(r=2), adapter_name="code")
    assert all(m.fan_in_fan_out for m in gpt2.modules() if isinstance(m, MiLoRALayer))
    whisper = get_peft_model(tiny_whisper(), MiLoRAConfig(r=2), adapter_name="asr")
    assert {r.key: r.is_encoder for r in routers(whisper)} == {"model.encoder.layers.0": True,
                                                              "model.decoder.layers.0": False}  # fmt: skip
    decoder = next(r for r in routers(whisper) if not r.is_encoder)
    assert {"self_attn.q_proj", "encoder_attn.q_proj", "fc1", "fc2"} <= set(decoder.experts["asr"])


def test_adapters_switch_with_set_adapter() -> None:
    model = milora(tiny_llama())
    add_milora(model, "code", top_k=3, pooler="mean")
    inputs = model_inputs(model, 2)
    with model.disable_adapter():
        base = logits(model, inputs)
    math = logits(model, inputs)
    assert all(r.active_adapters == ["math"] for r in routers(model))
    model.set_adapter("code")
    assert all(r.active_adapters == ["code"] for r in routers(model))
    code = logits(model, inputs)
    assert (math - base).abs().max() > 1e-2 and (code - base).abs().max() > 1e-2 and (code - math).abs().max() > 1e-2
    # the per-example path routes by name whatever is active: it must agree with the active-adapter path
    torch.testing.assert_close(logits(model, inputs, adapter_names=["math", "math"]), math, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, inputs, adapter_names=["code", "code"]), code, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode", "whisper"])
def test_mixed_batch_equals_each_row_alone(model_type: str) -> None:
    model = milora(TINY_MODELS[model_type]())
    add_milora(model, "code", top_k=1, pooler="last", r=2)
    names = ["code", "__base__", "math", "code", "math"]
    inputs = model_inputs(model, len(names))
    mixed = logits(model, inputs, adapter_names=names)
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model, row)
        else:
            model.set_adapter(name)
            alone = logits(model, row)
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0, msg=f"row {i} ({name})")


def test_mixed_batch_generate_equals_each_prompt_alone() -> None:
    model = milora(tiny_llama())
    add_milora(model, "code", top_k=3)
    names = ["math", "__base__", "code"]
    ids = model_inputs(model, 3, seq=5)["input_ids"]
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "num_beams": 2}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        row = ids[i : i + 1]
        alone = model.generate(input_ids=row, attention_mask=torch.ones_like(row), adapter_names=[name], **kwargs)
        torch.testing.assert_close(out[i : i + 1], alone, msg=name)


def test_save_load_round_trip(tmp_path) -> None:
    base = tiny_gpt_bigcode()
    pristine = copy.deepcopy(base)
    model = milora(base, pooler="attention", rational_form="safe")
    add_milora(model, "code", pooler="max", top_k=1, r=2, rational_degrees=(4, 3))
    with torch.no_grad():  # move the router off its init, so a router that is not loaded shows
        for router in routers(model):
            for params in (router.milora_num, router.milora_den, router.milora_weight, router.milora_query):
                for p in params.values():
                    p.add_(0.05 * torch.randn_like(p))
    inputs = model_inputs(model, 2)
    names = ["math", "code"]
    expected = logits(model, inputs, adapter_names=names)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "code" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(pristine, tmp_path / "math", adapter_name="math")
    loaded.load_adapter(tmp_path / "code", adapter_name="code")
    config = loaded.peft_config["code"]
    assert isinstance(config, MiLoRAConfig)
    assert (config.pooler, config.top_k, config.r, config.rational_degrees) == ("max", 1, 2, (4, 3))
    assert loaded.peft_config["math"].rational_form == "safe"
    torch.testing.assert_close(logits(loaded, inputs, adapter_names=names), expected, atol=0, rtol=0)
    loaded.set_adapter("code")
    model.set_adapter("code")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=0, rtol=0)


def test_transformers_native_adapter_path(tmp_path) -> None:
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    inputs = model_inputs(model, 2)
    base = logits(model, inputs)
    model.add_adapter(MiLoRAConfig(r=4, top_k=2, init_weights=False), adapter_name="math")
    boost(model, "math")
    assert all(r.active_adapters == ["math"] for r in routers(model))
    math = logits(model, inputs)
    assert (math - base).abs().max() > 1e-2
    with flora_hf.adapter_batch(model, ["math", "__base__"]):
        mixed = logits(model, inputs)
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    torch.testing.assert_close(mixed[0], math[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-5, rtol=0)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)
    model.add_adapter(MiLoRAConfig(r=2, top_k=1, init_weights=False), adapter_name="code")
    boost(model, "code")
    model.set_adapter("math")
    torch.testing.assert_close(logits(model, inputs), math, atol=0, rtol=0)
    model.save_pretrained(tmp_path)  # the active adapter, in PEFT's format
    loaded = PeftModel.from_pretrained(pristine, tmp_path, adapter_name="math")
    torch.testing.assert_close(logits(loaded, inputs), math, atol=1e-6, rtol=0)


def test_delete_adapter_and_unload() -> None:
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    model = milora(base)
    add_milora(model, "code")
    inputs = model_inputs(model, 2)
    math = logits(model, inputs)
    model.delete_adapter("code")
    assert all(set(r.milora_weight) == {"math"} and "code" not in r.experts for r in routers(model))
    assert all("code" not in m.milora_A for m in model.modules() if isinstance(m, MiLoRALayer))
    torch.testing.assert_close(logits(model, inputs), math, atol=0, rtol=0)
    unloaded = model.unload()
    assert not any(isinstance(m, (MiLoRALayer, MiLoRARouter)) for m in unloaded.modules())
    assert not any(hasattr(m, "prompt_router") for m in unloaded.modules())
    assert not hasattr(unloaded, "_milora_runtime")
    assert not unloaded._forward_hooks and not unloaded._forward_pre_hooks
    assert not any(layer._forward_pre_hooks for layer in unloaded.model.layers)
    torch.testing.assert_close(logits(unloaded, inputs), logits(pristine, inputs), atol=0, rtol=0)
    out = unloaded.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_disable_adapter_gives_the_base_model() -> None:
    base = tiny_gpt_bigcode()
    inputs = model_inputs(base, 2)
    expected = logits(base, inputs)
    model = milora(base)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)
    assert (logits(model, inputs) - expected).abs().max() > 1e-2


def test_merge_is_a_clear_error() -> None:
    model = milora(tiny_llama())
    with pytest.raises(ValueError, match="MiLoRA cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="MiLoRA cannot be merged"):
        model.merge_and_unload()
    layer = next(m for m in model.modules() if isinstance(m, MiLoRALayer))
    with pytest.raises(ValueError, match="MiLoRA cannot be merged"):
        layer.merge()
    assert isinstance(layer, MiLoRALayer) and routers(model)  # nothing was unloaded by the failed merge


def test_expert_called_without_its_router_is_a_clear_error() -> None:
    model = milora(tiny_llama())
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="ran before its layer's router"):
        q_proj(torch.randn(1, 3, 32))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pooler": "first"}, "pooler must be one of"),
        ({"top_k": 0}, "`top_k` must be a positive integer"),
        ({"top_k": True}, "`top_k` must be a positive integer"),
        ({"r": 0}, "`r` must be a positive integer"),
        ({"rational_form": "pade"}, "rational_form must be 'paper' or 'safe'"),
        ({"rational_degrees": (6,)}, "rational_degrees must be two positive integers"),
        ({"rational_degrees": (6, 0)}, "rational_degrees must be two positive integers"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in"),
        ({"load_balance_coef": -0.1}, "load_balance_coef must be"),
        ({"routing_prefix": 0}, "routing_prefix must be a positive integer"),
        ({"layers_pattern": "layers"}, "only makes sense together with `layers_to_transform`"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MiLoRAConfig(**kwargs)


def test_targets_outside_transformer_layers_are_rejected() -> None:
    with pytest.raises(ValueError, match="numbered transformer layer"):
        get_peft_model(tiny_llama(), MiLoRAConfig(r=2, target_modules=["lm_head"]), adapter_name="math")
    with pytest.raises(ValueError, match="nn.Linear or transformers Conv1D"):
        get_peft_model(tiny_llama(), MiLoRAConfig(r=2, target_modules=["input_layernorm"]), adapter_name="math")


def test_deep_copy_routes_like_the_original() -> None:
    model = milora(tiny_llama())
    twin = copy.deepcopy(model)
    ids = model_inputs(model, 2, seq=6)["input_ids"]
    ids[0, :2] = 0
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}  # padding must not be routed on
    expected = logits(model, inputs)
    torch.testing.assert_close(logits(twin, inputs), expected, atol=0, rtol=0)
    twin.train()
    assert "load_balance_loss" in twin(**inputs)
    unloaded = twin.unload()
    assert not unloaded._forward_hooks and not unloaded._forward_pre_hooks
    assert not any(layer._forward_pre_hooks for layer in unloaded.model.layers)
    torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)  # the original keeps its hooks
    assert all(layer._forward_pre_hooks for layer in model.base_model.model.model.layers)


def test_flora_and_milora_adapters_in_one_batch_through_transformers() -> None:
    # PeftModel holds one method only ("Cannot combine adapters with different peft types"); transformers'
    # add_adapter stacks them: a MiLoRA expert wraps the FLoRA layer, each row goes through its own adapter.
    from flora_hf import FLoRAConfig

    model = tiny_llama()
    inputs = model_inputs(model, 3, seq=5)
    base = logits(model, inputs)
    model.add_adapter(FLoRAConfig(r=2, init_weights=False), adapter_name="perl")
    model.add_adapter(MiLoRAConfig(r=4, top_k=2, init_weights=False), adapter_name="math")
    boost(model, "math")
    names = ["perl", "math", "__base__"]
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with flora_hf.adapter_batch(model, names):
        mixed = logits(model, inputs)
        generated = model.generate(**inputs, **kwargs)
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        with flora_hf.adapter_batch(model, [name]):
            alone = logits(model, row)
            torch.testing.assert_close(generated[i : i + 1], model.generate(**row, **kwargs), msg=name)
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0, msg=name)
        if name != "__base__":
            assert (alone - base[i : i + 1]).abs().max() > 1e-2, name
    torch.testing.assert_close(mixed[2], base[2], atol=0, rtol=0)


def test_transformers_delete_adapter_removes_it_from_the_routers() -> None:
    # the routers (``layer.prompt_router``) must lose the adapter too, whichever path deletes it
    model = tiny_llama()
    inputs = model_inputs(model, 2)
    model.add_adapter(MiLoRAConfig(r=4, top_k=2, init_weights=False), adapter_name="math")
    boost(model, "math")
    math = logits(model, inputs)
    model.add_adapter(MiLoRAConfig(r=2, top_k=1, init_weights=False), adapter_name="code")
    model.set_adapter(["math", "code"])
    model.delete_adapter("code")
    assert all(set(r.milora_weight) == {"math"} and r.active_adapters == ["math"] for r in routers(model))
    torch.testing.assert_close(logits(model, inputs), math, atol=0, rtol=0)


def test_transformers_load_adapter_loads_the_routers(tmp_path) -> None:
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    inputs = model_inputs(model, 2)
    model.add_adapter(MiLoRAConfig(r=4, top_k=2, init_weights=False), adapter_name="math")
    boost(model, "math")
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    pristine.load_adapter(str(tmp_path), adapter_name="math")
    torch.testing.assert_close(logits(pristine, inputs), expected, atol=1e-6, rtol=0)
