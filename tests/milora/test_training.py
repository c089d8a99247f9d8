"""MiLoRA in training: the load-balancing loss, which parameters learn, gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

import flora_hf.milora.router as router_module
from flora_hf import MiLoRALayer, set_trainable_adapters
from tests.milora.helpers import add_milora, gates_of, milora, recorded_routing, routers
from tests.models import model_inputs, tiny_gpt_bigcode, tiny_llama


def prompt_labels(ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :prompt_length] = -100
    return labels


def test_load_balance_loss_in_training_only(monkeypatch) -> None:
    model = milora(tiny_llama())
    ids = model_inputs(model, 3, seq=6)["input_ids"]
    per_layer = []
    original = router_module.load_balance_loss

    def recording(probs):
        per_layer.append(original(probs))
        return per_layer[-1]

    monkeypatch.setattr(router_module, "load_balance_loss", recording)
    model.train()
    out = model(input_ids=ids, labels=prompt_labels(ids, 3))
    assert "load_balance_loss" in out and out.load_balance_loss.shape == ()
    assert len(per_layer) == 2  # one per router, averaged
    torch.testing.assert_close(out.load_balance_loss, torch.stack(per_layer).mean())
    out.load_balance_loss.backward()
    for router in routers(model):
        assert router.milora_weight["math"].grad.abs().sum() > 0
    # The balance loss reads router probabilities only: the last layer's experts are after every router input.
    last = model.base_model.model.get_submodule(routers(model)[-1].key)
    for layer in (m for m in last.modules() if isinstance(m, MiLoRALayer)):
        assert layer.milora_A["math"].grad is None
    model.eval()
    per_layer.clear()
    assert "load_balance_loss" not in model(input_ids=ids, labels=ids) and not per_layer
    model.train()
    with torch.no_grad():
        assert "load_balance_loss" not in model(input_ids=ids)
    assert not model.base_model.model._milora_runtime.balance_losses  # nothing leaks into the next call


@pytest.mark.parametrize("model_factory", [tiny_llama, tiny_gpt_bigcode])
def test_only_selected_experts_get_gradients(model_factory, monkeypatch) -> None:
    model = milora(model_factory(), top_k=2)
    ids = model_inputs(model, 1, seq=6)["input_ids"]
    model.train()
    with recorded_routing(monkeypatch) as calls:
        out = model(input_ids=ids, labels=prompt_labels(ids, 3))
    (out.loss + 0.01 * out.load_balance_loss).backward()
    gates = gates_of(calls)
    selected = unselected = 0
    for router in routers(model):
        on = gates[router.key][0] != 0
        assert int(on.sum()) == 2
        assert router.milora_weight["math"].grad.abs().sum() > 0
        assert router.milora_num["math"].grad.abs().sum() > 0 and router.milora_den["math"].grad.abs().sum() > 0
        layer = model.base_model.model.get_submodule(router.key)
        for expert, column in router.slot.columns.items():
            module = layer.get_submodule(expert)
            grads = (module.milora_A["math"].grad, module.milora_B["math"].grad)
            if on[column]:
                selected += 1
                assert all(g is not None and g.abs().sum() > 0 for g in grads), (router.key, expert)
            else:
                unselected += 1
                assert all(g is None or g.abs().sum() == 0 for g in grads), (router.key, expert)
    assert selected == 4 and unselected > 0


def test_per_prompt_expert_selection_in_a_batch(monkeypatch) -> None:
    # Each row's loss trains exactly the experts its own prompt selected.
    model = milora(tiny_llama(), top_k=2)
    ids = model_inputs(model, 4, seq=6, seed=5)["input_ids"]
    model.train()
    with recorded_routing(monkeypatch) as calls:
        logits = model(input_ids=ids).logits
    gates = gates_of(calls)
    logits[2].sum().backward()
    router = routers(model)[1]  # the last layer: only row 2's own experts can reach row 2's logits
    layer = model.base_model.model.get_submodule(router.key)
    for expert, column in router.slot.columns.items():
        grad = layer.get_submodule(expert).milora_A["math"].grad
        trained = grad is not None and grad.abs().sum() > 0
        assert trained == bool(gates[router.key][2, column] != 0), expert


@pytest.mark.parametrize("adapter_names", [None, ["math", "code", "__base__"]], ids=["active", "per-example"])
def test_gradient_checkpointing_gives_the_same_gradients(adapter_names) -> None:
    model = milora(tiny_llama())
    add_milora(model, "code", pooler="mean")
    set_trainable_adapters(model)
    ckpt = copy.deepcopy(model)
    ckpt.base_model.model.gradient_checkpointing_enable()
    ids = model_inputs(model, 3, seq=7)["input_ids"]
    labels = prompt_labels(ids, 3)
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    grads, balance = [], []
    for m in (model, ckpt):
        m.train()
        out = m(input_ids=ids, labels=labels, **extra)
        (out.loss + 0.01 * out.load_balance_loss).backward()
        balance.append(out.load_balance_loss.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert ckpt.base_model.model.is_gradient_checkpointing
    torch.testing.assert_close(balance[1], balance[0])
    assert grads[0].keys() == grads[1].keys()
    assert any("prompt_router" in n for n in grads[0]) and any("milora_A" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_few_steps_lower_the_loss() -> None:
    model = milora(tiny_gpt_bigcode(), r=4, top_k=2)
    ids = model_inputs(model, 4, seq=8)["input_ids"]
    labels = prompt_labels(ids, 4)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("milora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(input_ids=ids, labels=labels)
        losses.append(out.loss.item())
        (out.loss + 0.01 * out.load_balance_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.1
