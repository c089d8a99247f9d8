"""Per-example batches reach every adapted module, PEFT's ``modules_to_save`` wrappers included, with PEFT's wording
for the errors PEFT users grep for."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from peft.utils import ModulesToSaveWrapper

from flora_hf import FLoRAConfig, MiLoRAConfig, set_trainable_adapters
from tests.models import tiny_llama

CONFIGS = {
    "flora": lambda **kw: FLoRAConfig(r=2, init_weights=False, **kw),
    "milora": lambda **kw: MiLoRAConfig(r=2, top_k=2, init_weights=False, **kw),
}


def two_adapters(method: str, **config):
    model = get_peft_model(tiny_llama(), CONFIGS[method](**config), adapter_name="a")
    model.add_adapter("b", CONFIGS[method](**config))
    return model.eval()


def perturb_saved_copies(model) -> None:
    """Give each adapter's copy of every modules_to_save module its own weights, as per-adapter training would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for wrapper in (m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)):
            for name, copy in wrapper.modules_to_save.items():
                for p in copy.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * (0.5 if name == "a" else -0.5))


def alone(model, ids: torch.Tensor, name: str) -> torch.Tensor:
    if name == "__base__":
        with model.disable_adapter():
            return model(input_ids=ids).logits
    model.set_adapter(name)
    return model(input_ids=ids).logits


@pytest.mark.parametrize("method", CONFIGS)
def test_a_mixed_batch_routes_modules_to_save_per_row(method: str) -> None:
    model = two_adapters(method, modules_to_save=["lm_head"])
    perturb_saved_copies(model)
    ids = torch.randint(1, 90, (3, 6), generator=torch.Generator().manual_seed(0))
    names = ["__base__", "a", "b"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        expected = [alone(model, ids[i : i + 1], n) for i, n in enumerate(names)]
    for row, (name, want) in enumerate(zip(names, expected)):
        torch.testing.assert_close(mixed[row : row + 1], want, atol=1e-5, rtol=0, msg=f"row {row} ({name})")
    assert (expected[1] - expected[2]).abs().max() > 1e-2  # the copies differ: a wrong route would show


@pytest.mark.parametrize("method", CONFIGS)
def test_modules_to_save_mixed_batch_in_generate_with_beams(method: str) -> None:
    model = two_adapters(method, modules_to_save=["lm_head"])
    perturb_saved_copies(model)
    ids = torch.randint(1, 90, (2, 5), generator=torch.Generator().manual_seed(2))
    kwargs = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    mixed = model.generate(input_ids=ids, adapter_names=["b", "__base__"], **kwargs)
    model.set_adapter("b")
    first = model.generate(input_ids=ids[:1], **kwargs)
    with model.disable_adapter():
        second = model.generate(input_ids=ids[1:], **kwargs)
    torch.testing.assert_close(mixed, torch.cat([first, second]))


@pytest.mark.parametrize("method", CONFIGS)
def test_modules_to_save_mixed_batch_trains_each_copy_from_its_rows(method: str) -> None:
    model = two_adapters(method, modules_to_save=["lm_head"]).train()
    ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(3))
    model.set_adapter("a")  # active "a", every row "b": only b's copy may learn
    set_trainable_adapters(model, ["b"])
    model(input_ids=ids, labels=ids, adapter_names=["b", "b"]).loss.backward()
    head = model.base_model.model.lm_head
    assert head.modules_to_save["b"].weight.grad.abs().sum() > 0
    assert head.modules_to_save["a"].weight.grad is None


def test_an_unsupported_module_kind_in_a_mixed_batch_raises_as_in_peft() -> None:
    model = two_adapters("flora", modules_to_save=["model.norm"])
    ids = torch.randint(1, 90, (2, 4))
    with pytest.raises(TypeError, match="Mixed batching is only supported for the following modules"):
        model(input_ids=ids, adapter_names=["a", "b"])


def test_errors_use_peft_wording() -> None:
    model = two_adapters("flora")
    ids = torch.randint(1, 90, (2, 4))
    with pytest.raises(ValueError, match=r"Trying to infer with non-existing adapter\(s\): c\b"):
        model(input_ids=ids, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        model(input_ids=ids, adapter_names=["a"])
    model.base_model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        model(input_ids=ids, adapter_names=["a", "b"])


def test_mixed_batch_banks_follow_a_fused_optimizer_step() -> None:
    # fused AdamW (HF Trainer's default optimizer) writes parameters without bumping their `_version`
    model = two_adapters("flora")
    ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    names = ["a", "b"]
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=names).logits  # builds and caches the banks
    set_trainable_adapters(model, names)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    model.train()
    model(input_ids=ids, adapter_names=names).logits.square().mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids, adapter_names=names).logits
        for module in model.modules():
            module.__dict__.pop("_bank_cache", None)
        rebuilt = model(input_ids=ids, adapter_names=names).logits
    assert not torch.allclose(before, rebuilt)  # the step changed the adapters
    torch.testing.assert_close(after, rebuilt)  # and the cached banks followed it
