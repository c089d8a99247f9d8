"""MiLoRA routing (docs/DESIGN.md §3): prompt tokens only, once per prompt, gates cached beside the KV cache."""

from __future__ import annotations

import inspect

import pytest
import torch

from flora_hf import routing_prompt_mask
from flora_hf.cache_compat import cache_argument, cache_kwargs, output_cache
from flora_hf.ops.milora import POOLERS
from tests.milora.helpers import gates_of, milora, recorded_routing, routers
from tests.models import TINY_MODELS, model_inputs, tiny_llama, tiny_whisper

CAUSAL = ["llama", "gpt_bigcode"]
GREEDY = {"do_sample": False, "pad_token_id": 0}


def left_padded(prompt: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompt`` (1, P) left-padded with zeros to ``other``'s length, stacked with ``other``; and the mask."""
    pads = other.shape[1] - prompt.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pads, dtype=torch.long), prompt], 1), other])
    mask = torch.ones_like(ids)
    mask[0, :pads] = 0
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


# --------------------------------------------------------------------------------------------- padding invariance
@pytest.mark.parametrize("pooler", POOLERS)
def test_router_ignores_padding_side_and_amount(pooler: str) -> None:
    model = milora(tiny_llama(), pooler=pooler)
    router = routers(model)[0]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(5, 32, generator=g)
    alone = router.route_prompt(prompt[None], torch.ones(1, 5, dtype=torch.bool))["math"].gates
    hidden, mask = [], []
    for left, right in ((3, 0), (0, 3), (1, 2), (2, 1)):
        junk = torch.randn(left + right, 32, generator=g) * 30  # anything: padding must not be read
        hidden.append(torch.cat([junk[:left], prompt, junk[left:]]))
        mask.append(torch.tensor([False] * left + [True] * 5 + [False] * right))
    with torch.no_grad():
        padded = router.route_prompt(torch.stack(hidden), torch.stack(mask))["math"].gates
    assert (alone != 0).sum() == 2
    torch.testing.assert_close(padded, alone.expand(4, -1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooler", POOLERS)
@pytest.mark.parametrize("model_type", CAUSAL)
def test_model_routing_ignores_padding_side_and_amount(model_type: str, pooler: str, monkeypatch) -> None:
    model = milora(TINY_MODELS[model_type](), pooler=pooler)
    prompt = model_inputs(model, 1, seq=5)["input_ids"]
    right = torch.cat([prompt, torch.zeros(1, 3, dtype=torch.long)], 1)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
    ids = torch.cat([left, right])
    mask = torch.stack([torch.arange(8) >= 3, torch.arange(8) < 5]).long()
    with torch.no_grad(), recorded_routing(monkeypatch) as calls:
        model(input_ids=prompt)
        alone = gates_of(calls)
        model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
        padded = gates_of(calls)
    assert alone.keys() == padded.keys() and len(alone) == 2
    for key, gates in alone.items():
        torch.testing.assert_close(padded[key], gates.expand(2, -1), atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("pooler", POOLERS)
@pytest.mark.parametrize("model_type", CAUSAL)
def test_greedy_generate_ignores_left_padding(model_type: str, pooler: str) -> None:
    model = milora(TINY_MODELS[model_type](), pooler=pooler)
    prompt = model_inputs(model, 1, seq=5)["input_ids"]
    ids, mask = left_padded(prompt, model_inputs(model, 1, seq=8, seed=1)["input_ids"])
    kwargs = GREEDY | {
        "max_new_tokens": 5,
        "min_new_tokens": 5,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    alone = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    padded = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert padded.sequences[0, 8:].tolist() == alone.sequences[0, 5:].tolist()
    torch.testing.assert_close(torch.stack(padded.logits, 1)[:1], torch.stack(alone.logits, 1), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- once per prompt
@pytest.mark.parametrize(
    "gen_kwargs",
    [GREEDY, {"do_sample": True, "top_k": 5}, {"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}],
    ids=["greedy", "sampling", "beams", "beams-return-2"],
)
@pytest.mark.parametrize("model_type", CAUSAL)
def test_router_runs_once_per_prompt_in_generate(model_type: str, gen_kwargs: dict, monkeypatch) -> None:
    model = milora(TINY_MODELS[model_type]())
    ids = model_inputs(model, 2, seq=5)["input_ids"]
    with recorded_routing(monkeypatch) as calls:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             **{"pad_token_id": 0} | gen_kwargs)  # fmt: skip
    assert out.shape[1] == 5 + 4
    beams = gen_kwargs.get("num_beams", 1)
    assert sorted(key for key, *_ in calls) == sorted(r.key for r in routers(model))  # one call per layer
    assert all(hidden.shape[:2] == (2 * beams, 5) for _, hidden, _, _ in calls)  # the prompt, at prefill


def test_whisper_routes_once_per_prompt_in_generate(monkeypatch) -> None:
    model = milora(tiny_whisper())
    inputs = model_inputs(model, 2, seq=4)
    with recorded_routing(monkeypatch) as calls:
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
    keys = [key for key, *_ in calls]
    assert sorted(keys) == ["model.decoder.layers.0", "model.encoder.layers.0"]
    decoder = next(mask for key, _, mask, _ in calls if "decoder" in key)
    assert decoder.shape == (2, 4) and decoder.all()  # the decoder prompt: the 4 forced tokens


# ------------------------------------------------------------------------------ cached gates == prompt routing
def full_forward_logits(model, sequences, prompt_length: int, attention_mask=None, **inputs):
    """One forward over prompt + generated tokens, routing on the prompt only (as generate did at prefill)."""
    prompt = torch.zeros_like(sequences, dtype=torch.bool)
    prompt[:, :prompt_length] = True
    if attention_mask is not None:
        extra = torch.ones(
            sequences.shape[0], sequences.shape[1] - attention_mask.shape[1], dtype=attention_mask.dtype
        )
        attention_mask = torch.cat([attention_mask, extra], 1)
        inputs |= {"attention_mask": attention_mask, "position_ids": positions(attention_mask)}
    key = "decoder_input_ids" if "input_features" in inputs else "input_ids"
    with torch.no_grad():
        with routing_prompt_mask(model, prompt):
            routed = model(**{key: sequences}, **inputs).logits[:, prompt_length - 1 : -1]
        everywhere = model(**{key: sequences}, **inputs).logits[:, prompt_length - 1 : -1]
    return routed, everywhere


@pytest.mark.parametrize("model_type", CAUSAL)
def test_cached_decoding_equals_full_forward_with_prompt_routing(model_type: str) -> None:
    model = milora(TINY_MODELS[model_type]())
    ids, mask = left_padded(
        model_inputs(model, 1, seq=4)["input_ids"], model_inputs(model, 1, seq=6, seed=1)["input_ids"]
    )
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                         output_logits=True, return_dict_in_generate=True, **GREEDY)  # fmt: skip
    steps = torch.stack(out.logits, 1)
    routed, everywhere = full_forward_logits(model, out.sequences, 6, attention_mask=mask)
    torch.testing.assert_close(steps, routed, atol=1e-5, rtol=0)
    assert (everywhere - steps).abs().max() > 1e-3  # routing on generated tokens would have been visible


def test_whisper_cached_decoding_equals_full_forward_with_forced_prompt_routing() -> None:
    model = milora(tiny_whisper())
    inputs = model_inputs(model, 2, seq=4)  # decoder prompt: 4 forced tokens
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    steps = torch.stack(out.logits, 1)
    assert out.sequences.shape[1] == 4 + steps.shape[1]
    features = inputs["input_features"]
    routed, everywhere = full_forward_logits(model, out.sequences, 4, input_features=features)
    torch.testing.assert_close(steps, routed, atol=1e-5, rtol=0)
    assert (everywhere - steps).abs().max() > 1e-3


CACHE_SPELLINGS = ["past_key_values", "cache"]  # transformers 5.24 renamed the first to the second


def cache_spelling(model, spelling: str) -> str:
    if spelling == "cache" and cache_argument(model.base_model.model) != "cache":
        pytest.skip("this transformers release predates the cache= spelling (5.24)")
    return spelling


@pytest.mark.parametrize("spelling", CACHE_SPELLINGS)
@pytest.mark.parametrize("model_type", ["llama", "whisper"])
def test_hand_written_decoding_loop_reuses_prefill_gates(model_type: str, spelling: str, monkeypatch) -> None:
    # model(prompt, use_cache=True) creates its cache inside the model: the gates must go with it.
    model = milora(TINY_MODELS[model_type]())
    spelling = cache_spelling(model, spelling)
    inputs = model_inputs(model, 2, seq=4)
    key = "decoder_input_ids" if model_type == "whisper" else "input_ids"
    tokens = inputs.pop(key)
    logits = []
    with torch.no_grad(), recorded_routing(monkeypatch) as calls:
        out = model(**inputs, **{key: tokens}, use_cache=True)
        for _ in range(4):
            logits.append(out.logits[:, -1])
            tokens = torch.cat([tokens, out.logits[:, -1:].argmax(-1)], 1)
            out = model(**inputs, **{key: tokens[:, -1:], spelling: output_cache(out)}, use_cache=True)
    decoder_routers = [r.key for r in routers(model) if not r.is_encoder]
    assert sorted(key for key, *_ in calls if key in decoder_routers) == sorted(decoder_routers)  # at prefill only
    routed, _ = full_forward_logits(model, tokens, 4, **inputs)
    torch.testing.assert_close(torch.stack(logits, 1), routed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spelling", CACHE_SPELLINGS)
def test_cache_filled_without_routing_is_a_clear_error(spelling: str) -> None:
    model = milora(tiny_llama())
    spelling = cache_spelling(model, spelling)
    ids = model_inputs(model, 2, seq=4)["input_ids"]
    with torch.no_grad():
        with model.disable_adapter():
            cache = output_cache(model(input_ids=ids, use_cache=True))
        with pytest.raises(RuntimeError, match="KV cache without routing decisions"):
            model(input_ids=ids[:, :1], **{spelling: cache})


def test_a_cache_the_hooks_cannot_see_is_an_error_not_a_re_route(monkeypatch) -> None:
    # A cache passed positionally reaches the model without passing the hook's keyword lookup: decoding would
    # route on the new token as if it were a prompt. It must raise instead.
    model = milora(tiny_llama())
    inner = model.base_model.model
    ids = model_inputs(model, 2, seq=4)["input_ids"]
    with torch.no_grad():
        cache = output_cache(inner(input_ids=ids, use_cache=True))
        names = list(inspect.signature(type(inner).forward).parameters)
        position = names.index(cache_argument(inner)) - 1  # without self
        args = [None] * (position + 1)
        args[0], args[position] = ids[:, :1], cache
        with recorded_routing(monkeypatch) as calls, pytest.raises(RuntimeError, match="could not find"):
            inner(*args, use_cache=True)
    assert calls  # it did route: the error is what stops a silently re-routed decoding step


# ------------------------------------------------------------------------------------------- beams and reordering
@pytest.mark.parametrize("gen_kwargs", [{"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}])
def test_beam_search_batch_equals_each_prompt_alone(gen_kwargs: dict) -> None:
    model = milora(tiny_llama())
    ids = model_inputs(model, 2, seq=5)["input_ids"]
    kwargs = GREEDY | gen_kwargs | {"max_new_tokens": 5, "min_new_tokens": 5}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    per_prompt = gen_kwargs.get("num_return_sequences", 1)
    for i in range(2):
        alone = model.generate(input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), **kwargs)
        torch.testing.assert_close(out[i * per_prompt : (i + 1) * per_prompt], alone)


@pytest.mark.parametrize(
    ("method", "arg", "rows"),
    [
        ("reorder_cache", torch.tensor([2, 0, 0]), [2, 0, 0]),
        ("batch_select_indices", torch.tensor([1, 2]), [1, 2]),
        ("batch_repeat_interleave", 2, [0, 0, 1, 1, 2, 2]),
    ],
)
def test_gates_follow_cache_row_operations(method: str, arg, rows: list[int]) -> None:
    model = milora(tiny_llama())
    ids = model_inputs(model, 3, seq=5)["input_ids"]
    step = model_inputs(model, len(rows), seq=1, seed=3)["input_ids"]
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
        getattr(cache, method)(arg)
        got = model(input_ids=step, **cache_kwargs(model.base_model.model, cache)).logits
        expected_cache = output_cache(model(input_ids=ids[rows], use_cache=True))
        expected = model(input_ids=step, **cache_kwargs(model.base_model.model, expected_cache)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ prompts in training
def test_labels_mark_the_prompt_in_training(monkeypatch) -> None:
    model = milora(tiny_llama(), routing_prefix=3)
    ids = model_inputs(model, 2, seq=8)["input_ids"]
    labels = ids.clone()
    labels[0, :4] = -100  # row 0: 4 prompt tokens; row 1: every token a target -> routes on its first 3
    changed = ids.clone()
    changed[0, 4:] = torch.randint(1, 97, (4,), generator=torch.Generator().manual_seed(9))
    changed_labels = labels.clone()
    changed_labels[0, 4:] = changed[0, 4:]
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[0, :4], prompt[1, :3] = True, True
    model.train()
    with recorded_routing(monkeypatch) as calls:
        model(input_ids=ids, labels=labels)
        with_labels = gates_of(calls)
        model(input_ids=changed, labels=changed_labels)
        response_changed = gates_of(calls)
        with routing_prompt_mask(model, prompt):
            model(input_ids=ids)
        explicit = gates_of(calls)
        model(input_ids=ids)
        everything = gates_of(calls)
    for key, gates in with_labels.items():
        torch.testing.assert_close(response_changed[key], gates, msg=key)
        torch.testing.assert_close(explicit[key], gates, msg=key)
    assert any((everything[k] - g).abs().max() > 1e-4 for k, g in with_labels.items())


def test_padding_is_never_prompt_in_training(monkeypatch) -> None:
    model = milora(tiny_llama())
    ids = model_inputs(model, 1, seq=6)["input_ids"]
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).long()
    labels = padded.clone()
    labels[:, :2] = -100
    labels[:, 6:] = -100  # padding is labelled -100 too, yet it is not prompt
    model.train()
    with recorded_routing(monkeypatch) as calls:
        model(input_ids=ids, labels=labels[:, :6])
        alone = gates_of(calls)
        model(input_ids=padded, attention_mask=mask, labels=labels)
        with_padding = gates_of(calls)
    for key, gates in alone.items():
        torch.testing.assert_close(with_padding[key], gates, atol=1e-6, rtol=1e-5, msg=key)


def test_routing_prompt_mask_is_restored_and_warns_without_milora() -> None:
    model = milora(tiny_llama())
    runtime = model.base_model.model._milora_runtime
    mask = torch.ones(1, 3, dtype=torch.bool)
    with routing_prompt_mask(model, mask):
        assert runtime.explicit_prompt_mask is mask
        with routing_prompt_mask(model, ~mask):
            assert runtime.explicit_prompt_mask is not mask
        assert runtime.explicit_prompt_mask is mask
    assert runtime.explicit_prompt_mask is None
    with pytest.warns(UserWarning, match="no MiLoRA adapter"), routing_prompt_mask(tiny_llama(), mask):
        pass


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
def test_generate_without_a_cache_routes_on_the_prompt_too(model_type: str) -> None:
    # use_cache=False re-runs prompt + generated tokens at every step: routing must still read the prompt alone
    model = milora(TINY_MODELS[model_type]()).eval()
    ids = torch.randint(1, 90, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 8, "do_sample": False}
    cached = model.generate(**kwargs)
    assert torch.equal(model.generate(**kwargs, use_cache=False), cached)
