"""FLoRA through PEFT's and transformers' APIs on tiny models built from configs."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import PeftType

import flora_hf
from flora_hf import FLoRAConfig, FLoRALayer
from tests.flora.helpers import adapted, merged_copy, per_example_logits
from tests.models import TINY_MODELS, model_inputs, tiny_gpt2, tiny_gpt_bigcode, tiny_llama

NAMES = ["perl", "ruby", "lua"]


def test_registered_with_peft() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.FLORA] is FLoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.FLORA] is flora_hf.FLoRAModel
    assert FLoRAConfig().peft_type == PeftType.FLORA


@pytest.mark.parametrize("model_type", ["gpt_bigcode", "llama", "whisper", "gpt2"])
@pytest.mark.parametrize("rank", [1, 4])
def test_identity_at_init(model_type: str, rank: int) -> None:
    base = TINY_MODELS[model_type]()
    inputs = model_inputs(base, 2)
    with torch.no_grad():
        expected = base(**inputs).logits
        model = get_peft_model(base, FLoRAConfig(r=rank), adapter_name="a")
        got = model(**inputs).logits
        mixed = model(**inputs, adapter_names=["a", "__base__"]).logits
    atol = 0 if rank == 1 else 1e-5
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    torch.testing.assert_close(mixed, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("model_type", ["gpt_bigcode", "llama", "whisper", "gpt2"])
@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_mixed_batch_equals_per_example_reference(model_type: str, rank: int) -> None:
    model, reference_base = adapted(TINY_MODELS[model_type](), {"perl": rank, "ruby": rank, "lua": 1})
    names = ["ruby", "__base__", "perl", "lua", "ruby"]
    inputs = model_inputs(model, len(names))
    with torch.no_grad():
        got = model(**inputs, adapter_names=names).logits
    expected = per_example_logits(reference_base, model, inputs, names)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_target_modules_default_per_model_type() -> None:
    model = get_peft_model(tiny_gpt_bigcode(), FLoRAConfig(), adapter_name="a")
    adapted_names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, FLoRALayer)}
    assert adapted_names == {"c_attn"}
    llama = get_peft_model(tiny_llama(), FLoRAConfig(), adapter_name="a")
    assert len([m for m in llama.modules() if isinstance(m, FLoRALayer)]) == 2 * 7


def test_conv1d_targets_switch_fan_in_fan_out() -> None:
    model = get_peft_model(tiny_gpt2(), FLoRAConfig(), adapter_name="a")
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, FLoRALayer) and layer.fan_in_fan_out


def test_gradient_isolation_between_examples() -> None:
    model, _ = adapted(tiny_gpt_bigcode(), {"perl": 2, "ruby": 2, "lua": 2})
    flora_hf.set_trainable_adapters(model)
    model.train()
    inputs = model_inputs(model, 3)
    logits = model(**inputs, adapter_names=["perl", "ruby", "__base__"]).logits
    logits[0].sum().backward()
    for layer in (m for m in model.modules() if isinstance(m, FLoRALayer)):
        assert layer.flora_in["perl"].grad.abs().sum() > 0
        for other in ("ruby", "lua"):
            grad = layer.flora_in[other].grad
            assert grad is None or grad.abs().sum() == 0


def _train(model, batches, steps: int, lr: float = 5e-2) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        for input_ids, names in batches:
            opt.zero_grad()
            logits = model(input_ids=input_ids, adapter_names=names).logits
            per_token = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
            )
            per_token.view(input_ids.shape[0], -1).mean(dim=1).sum().backward()  # sum over examples: no coupling
            opt.step()


def test_mixed_training_equals_separate_runs() -> None:
    data = {
        name: torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(i))
        for i, name in enumerate(NAMES[:2])
    }
    torch.manual_seed(1)
    together, _ = adapted(tiny_gpt_bigcode(), {"perl": 2, "ruby": 2})
    alone = copy.deepcopy(together)
    flora_hf.set_trainable_adapters(together)
    flora_hf.set_trainable_adapters(alone)
    together.train()
    alone.train()
    mixed_ids = torch.cat([data["perl"], data["ruby"]])
    _train(together, [(mixed_ids, ["perl", "perl", "ruby", "ruby"])], steps=3)
    # separate runs: one optimizer per adapter, each seeing only its own language
    for name in ("perl", "ruby"):
        flora_hf.set_trainable_adapters(alone, [name])
        for other in {"perl", "ruby"} - {name}:
            for layer in (m for m in alone.modules() if isinstance(m, FLoRALayer)):
                layer.set_requires_grad([other], requires_grad=False)
        _train(alone, [(data[name], [name, name])], steps=3)
    for (n1, p1), (n2, p2) in zip(together.named_parameters(), alone.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=1e-5, rtol=0, msg=n1)
    changed = together.base_model.model.transformer.h[0].attn.c_attn.flora_in["perl"]
    assert not torch.allclose(changed, alone.base_model.model.transformer.h[0].attn.c_attn.flora_in["ruby"])


@pytest.mark.parametrize("init", [True, "ones"])
def test_rank_symmetry_is_broken_only_by_the_default_init(init) -> None:
    model = get_peft_model(tiny_gpt_bigcode(), FLoRAConfig(r=4, init_weights=init), adapter_name="perl")
    model.train()
    layer = model.base_model.model.transformer.h[0].attn.c_attn

    def spread() -> float:
        return (layer.flora_out["perl"] - layer.flora_out["perl"].mean(dim=0)).abs().max().item()

    assert spread() == 0  # flora_out starts at ones either way
    ids = torch.randint(1, 97, (4, 8))
    _train(model, [(ids, ["perl"] * 4)], steps=5)
    if init == "ones":
        assert spread() == 0, "all-ones init is a symmetric point: components stay identical"
    else:
        assert spread() > 1e-3, "rank components should diverge once the symmetry is broken"


def test_gradient_checkpointing_keeps_per_example_indices() -> None:
    names = ["perl", "ruby", "__base__"]
    model, _ = adapted(tiny_llama(), {"perl": 2, "ruby": 1})
    flora_hf.set_trainable_adapters(model)
    ckpt = copy.deepcopy(model)
    ckpt.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = model_inputs(model, 3)
    grads = []
    for m in (model, ckpt):
        m.train()
        m(**inputs, labels=inputs["input_ids"], adapter_names=names).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("gen_kwargs", [{"num_beams": 2}, {"num_beams": 3, "num_return_sequences": 2}])
def test_generate_expands_names_for_beams(gen_kwargs) -> None:
    model, reference_base = adapted(tiny_gpt_bigcode(), {"perl": 2, "ruby": 1})
    names = ["ruby", "perl", "__base__"]
    ids = model_inputs(model, 3)["input_ids"]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0} | gen_kwargs
    out = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    per_seq = gen_kwargs.get("num_return_sequences", 1)
    for i, name in enumerate(names):
        alone = merged_copy(reference_base, model, name).generate(input_ids=ids[i : i + 1], **kwargs)
        torch.testing.assert_close(out[i * per_seq : (i + 1) * per_seq], alone)


def test_save_load_round_trip(tmp_path) -> None:
    model, reference_base = adapted(tiny_gpt_bigcode(), {"perl": 2, "ruby": 4})
    inputs = model_inputs(model, 2)
    names = ["perl", "ruby"]
    with torch.no_grad():
        expected = model(**inputs, adapter_names=names).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "ruby" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference_base), tmp_path / "perl", adapter_name="perl")
    loaded.load_adapter(tmp_path / "ruby", adapter_name="ruby")
    assert isinstance(loaded.peft_config["ruby"], FLoRAConfig) and loaded.peft_config["ruby"].r == 4
    with torch.no_grad():
        got = loaded(**inputs, adapter_names=names).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_transformers_native_adapter_path(tmp_path) -> None:
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    ids = model_inputs(model, 2)["input_ids"]
    with torch.no_grad():
        base_logits = model(ids).logits
    model.add_adapter(FLoRAConfig(r=2, init_weights=False), adapter_name="perl")
    model.add_adapter(FLoRAConfig(r=1, init_weights=False), adapter_name="ruby")
    model.set_adapter("ruby")
    with torch.no_grad():
        ruby = model(ids).logits
        with flora_hf.adapter_batch(model, ["ruby", "__base__"]):
            mixed = model(ids).logits
            generated = model.generate(ids, max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    torch.testing.assert_close(mixed[0], ruby[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], base_logits[1], atol=1e-5, rtol=0)
    assert generated.shape == (2, ids.shape[1] + 3)
    model.save_pretrained(tmp_path)  # saves the active adapter in PEFT format
    fresh = pristine
    fresh.load_adapter(str(tmp_path), adapter_name="ruby")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ruby, atol=1e-6, rtol=0)
    model.delete_adapter("ruby")
    with pytest.raises(ValueError, match="non-existing adapter"), flora_hf.adapter_batch(model, ["ruby", "perl"]):
        pass


def test_merge_equals_unmerged_and_unmerge_warns() -> None:
    model, _ = adapted(tiny_gpt_bigcode(), {"perl": 4})
    inputs = model_inputs(model, 2)
    with torch.no_grad():
        expected = model(**inputs).logits
        model.merge_adapter()
        merged = model(**inputs).logits
        with pytest.raises(ValueError, match="there are merged adapters, please call `unmerge_adapter` first"):
            model(**inputs, adapter_names=["perl", "__base__"])
        with pytest.warns(UserWarning, match="inexact"):
            model.unmerge_adapter()
        unmerged = model(**inputs).logits
        unloaded = model.merge_and_unload()(**inputs).logits
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(unmerged, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(unloaded, expected, atol=1e-5, rtol=0)


def test_disable_and_multiple_active_adapters_compose() -> None:
    model, reference_base = adapted(tiny_gpt_bigcode(), {"perl": 2, "ruby": 1})
    inputs = model_inputs(model, 2)
    with torch.no_grad():
        base = reference_base(**inputs).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, base)
        model.base_model.set_adapter(["perl", "ruby"])
        both = model(**inputs).logits
        twice = merged_copy(merged_copy(reference_base, model, "perl"), model, "ruby")(**inputs).logits
    torch.testing.assert_close(both, twice, atol=1e-5, rtol=0)


def test_inference_bank_is_rebuilt_when_weights_change() -> None:
    model, _ = adapted(tiny_gpt_bigcode(), {"perl": 2})
    inputs = model_inputs(model, 2)
    with torch.no_grad():
        before = model(**inputs, adapter_names=["perl", "perl"]).logits
        again = model(**inputs, adapter_names=["perl", "perl"]).logits
        for layer in (m for m in model.modules() if isinstance(m, FLoRALayer)):
            layer.flora_out["perl"].mul_(1.5)
        after = model(**inputs, adapter_names=["perl", "perl"]).logits
    torch.testing.assert_close(again, before, atol=0, rtol=0)
    assert (after - before).abs().max() > 1e-3


def test_bad_input_is_a_clear_error() -> None:
    model, _ = adapted(tiny_gpt_bigcode(), {"perl": 1, "ruby": 1})
    inputs = model_inputs(model, 3)
    # PEFT's wording where the condition is PEFT's (users grep for it), then ours
    unknown = r"Trying to infer with non-existing adapter\(s\): rubyy. Known adapters: \['perl', 'ruby'\]"
    with pytest.raises(ValueError, match=unknown):
        model(**inputs, adapter_names=["perl", "rubyy", "__base__"])
    length = r"Length of `adapter_names` should be the same as the number of inputs, but got 2 and 3 respectively"
    with pytest.raises(ValueError, match=length):
        model(**inputs, adapter_names=["perl", "ruby"])
    with pytest.raises(TypeError, match="list of str"):
        model(**inputs, adapter_names="perl")
    with pytest.raises(ValueError, match="positive integer"):
        FLoRAConfig(r=0)
    with pytest.raises(ValueError, match="Target modules .*not found|not found in the base model"):
        get_peft_model(tiny_gpt_bigcode(), FLoRAConfig(target_modules=["no_such_module"]))
    with (
        pytest.raises(ValueError, match=length),
        flora_hf.adapter_batch(model, ["perl", "ruby"]),
        torch.no_grad(),
    ):
        model(**inputs)
