"""Finding a model call's KV cache under every name transformers has given it (5.24 renamed it to ``cache``)."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from flora_hf.cache_compat import cache_argument, cache_kwargs, cache_length, find_cache, output_cache
from tests.models import tiny_llama


def test_find_cache_under_each_name_and_by_type() -> None:
    cache = DynamicCache()
    for name in ("cache", "past_key_values", "cache_params", "some_future_name"):
        assert find_cache({"input_ids": torch.zeros(1, 1), name: cache}) is cache
    assert find_cache({"input_ids": torch.zeros(1, 1), "use_cache": True}) is None


def test_output_cache_reads_the_field_the_release_declares() -> None:
    cache = DynamicCache()
    out = CausalLMOutputWithPast(logits=torch.zeros(1, 1, 2), **{cache_argument(tiny_llama()): cache})
    assert output_cache(out) is cache
    assert output_cache({"logits": 1}) is None and output_cache((1, 2)) is None


def test_cache_kwargs_match_the_models_forward_and_it_decodes() -> None:
    model = tiny_llama().eval()
    ids = torch.randint(1, 90, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids[:, :4], use_cache=True)
        cache = output_cache(out)
        assert cache_length(cache) == 4 and cache_length(None) == 0
        step = model(input_ids=ids[:, 4:], **cache_kwargs(model, cache), use_cache=True)
        full = model(input_ids=ids).logits[:, -1]
    assert cache_length(output_cache(step)) == 5
    torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=0)
