"""flora_hf.loading: the base-model and named-adapter loader that flora-serve, flora-train and flora-eval share."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from flora_hf import FLoRAConfig
from flora_hf.loading import ModelLoadError, load_causal_lm, load_named_adapters
from tests.serving.tiny_serving import save_random_adapter, tiny_causal_lm, tiny_tokenizer


@pytest.fixture()
def model_dir(tmp_path):
    folder = tmp_path / "model"
    tiny_causal_lm().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_a_folder_loads_with_its_tokenizer_and_the_dtype_asked(model_dir) -> None:
    model, tokenizer = load_causal_lm(str(model_dir), dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16
    assert tokenizer("def f():")["input_ids"] == tiny_tokenizer()("def f():")["input_ids"]


def test_an_unreadable_model_names_it_and_ends_with_the_callers_hint(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=r"(?s)could not load model .*nowhere.*pass a local folder$"):
        load_causal_lm(str(tmp_path / "nowhere"), hint="pass a local folder")


def test_adapters_load_under_their_names_and_each_one_changes_the_output(model_dir, tmp_path) -> None:
    base, _ = load_causal_lm(str(model_dir))
    folders = {
        "perl": save_random_adapter(base, FLoRAConfig(r=2, target_modules=["c_attn"]), tmp_path / "perl", seed=1),
        "ruby": save_random_adapter(base, FLoRAConfig(r=4, target_modules=["c_attn"]), tmp_path / "ruby", seed=2),
    }
    assert load_named_adapters(base, {}) is base
    ids = torch.tensor([tiny_tokenizer()("sub fib {")["input_ids"]])
    with torch.no_grad():
        plain = base(ids).logits
        model = load_named_adapters(load_causal_lm(str(model_dir))[0], folders)
        assert isinstance(model, PeftModel) and set(model.peft_config) == {"perl", "ruby"}
        assert not model.training
        outputs = {}
        for name in folders:
            model.set_adapter(name)
            outputs[name] = model(ids).logits
    assert not torch.allclose(outputs["perl"], plain) and not torch.allclose(outputs["ruby"], plain)
    assert not torch.allclose(outputs["perl"], outputs["ruby"])
