"""Gradient checkpointing recomputes each layer with the adapters and routing of its own forward."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from flora_hf import FLoRAConfig, MiLoRAConfig, set_trainable_adapters
from tests.models import tiny_llama

CONFIGS = {
    "flora": lambda: FLoRAConfig(r=2, init_weights=False),
    "milora": lambda: MiLoRAConfig(r=2, top_k=2, init_weights=False),
}


def trained_pair(method: str, checkpointing: dict | None):
    torch.manual_seed(0)
    base = tiny_llama()
    if checkpointing is not None:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model = get_peft_model(base, CONFIGS[method](), adapter_name="perl")
    model.add_adapter("ruby", CONFIGS[method]())
    set_trainable_adapters(model)
    return model.train()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def two_forwards_then_backward(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two forwards with different adapters before one backward: each recompute needs its own forward's rows."""
    first = model(input_ids=ids, labels=ids, adapter_names=["perl", "perl"]).loss
    second = model(input_ids=ids.flip(0), labels=ids.flip(0), adapter_names=["ruby", "perl"]).loss
    (first + 2 * second).backward()
    return grads(model)


@pytest.mark.parametrize(
    ("method", "checkpointing"),
    [("flora", {"use_reentrant": False}), ("flora", {"use_reentrant": True}), ("milora", {"use_reentrant": False})],
)
def test_checkpointed_gradients_equal_plain_ones(method: str, checkpointing: dict) -> None:
    ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(1))
    plain = two_forwards_then_backward(trained_pair(method, None), ids)
    checkpointed = two_forwards_then_backward(trained_pair(method, checkpointing), ids)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    assert any(".ruby" in n and g.abs().sum() > 0 for n, g in plain.items())


def test_every_row_ruby_trains_only_ruby_under_reentrant_checkpointing() -> None:
    model = trained_pair("flora", {"use_reentrant": True})
    ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids, adapter_names=["perl", "perl"])  # an earlier forward, never backpropagated
    model(input_ids=ids, labels=ids, adapter_names=["ruby", "ruby"]).loss.backward()
    got = grads(model)
    assert all(g.abs().sum() == 0 for n, g in got.items() if ".perl" in n)
    assert sum(g.abs().sum() for n, g in got.items() if ".ruby" in n) > 0


def test_milora_refuses_reentrant_checkpointing_with_the_fix() -> None:
    model = trained_pair("milora", {"use_reentrant": True})
    ids = torch.randint(1, 90, (2, 6))
    with pytest.raises(ValueError, match="reentrant gradient checkpointing.*use_reentrant': False"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():  # inference is unaffected: nothing is checkpointed there
        model.eval()(input_ids=ids)
