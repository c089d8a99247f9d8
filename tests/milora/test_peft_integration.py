"""MiLoRA inside PEFT's machinery: low-memory loading, routers as tuner layers without a base layer, outputs that
survive DistributedDataParallel, and refusals that leave the model untouched."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from torch.distributed.utils import _apply_to_tensors
from transformers import PretrainedConfig

from flora_hf import MiLoRAConfig, MiLoRALayer
from tests.milora.helpers import milora, routers
from tests.models import model_inputs, tiny_llama


def test_routers_have_no_base_layer_weight_and_say_their_sizes() -> None:
    router = routers(milora(tiny_llama()))[0]
    for attr in ("weight", "bias"):
        with pytest.raises(AttributeError):
            getattr(router, attr)
        assert getattr(router, attr, None) is None  # PEFT's device lookups ask exactly this way
    assert (router.in_features, router.out_features) == (32, 7)  # hidden size, Llama's 7 expert modules
    assert router.get_base_layer() is router


def seeded_llama() -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama()


def test_low_cpu_mem_usage_loads_the_same_model(tmp_path) -> None:
    model = milora(seeded_llama()).eval()
    model.save_pretrained(tmp_path)
    ids = model_inputs(model, 2)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        for low in (False, True):
            loaded = PeftModel.from_pretrained(seeded_llama(), tmp_path / "math", low_cpu_mem_usage=low).eval()
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, msg=f"low_cpu_mem_usage={low}")
            assert all(r.milora_weight["default"].dtype == torch.float32 for r in routers(loaded))


class NoConfigNet(nn.Module):
    def __init__(self, config=None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"lin0": nn.Linear(8, 8)})])
        if config is not None:
            self.config = config


@pytest.mark.parametrize("config", [None, PretrainedConfig()], ids=["no-config", "no-hidden-size"])
def test_a_model_without_hidden_size_is_refused_before_any_module_is_wrapped(config) -> None:
    net = NoConfigNet(config)
    with pytest.raises(ValueError, match="hidden_size"):
        get_peft_model(net, MiLoRAConfig(r=2, target_modules=["lin0"]))
    assert isinstance(net.layers[0]["lin0"], nn.Linear) and not isinstance(net.layers[0]["lin0"], MiLoRALayer)


def test_the_load_balance_loss_is_a_field_ddp_keeps() -> None:
    model = milora(tiny_llama()).train()
    ids = model_inputs(model, 2)["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert out.load_balance_loss is not None and out.load_balance_loss.requires_grad
    rebuilt = _apply_to_tensors(lambda t: t, out)  # what DistributedDataParallel does to a forward's output
    assert type(rebuilt) is type(out) and rebuilt.load_balance_loss is out.load_balance_loss
    assert list(rebuilt.keys()) == list(out.keys()) and torch.equal(rebuilt.logits, out.logits)
