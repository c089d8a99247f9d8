"""MiLoRA served through the math core: equal to PEFT's own model, routed once per prompt, mixed with every method.

The routers run at prefill only; the gates live in the Batch beside the KV cache and follow rows through ``filter``
and ``concatenate``. A MiLoRA request gets the same greedy output alone or in a batch with FLoRA, LoRA, IA3, other
MiLoRA and base rows, arriving and finishing at different times.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

from flora_hf import FLoRAConfig, MiLoRAConfig
from flora_hf.cache_compat import cache_kwargs, output_cache
from serving.adapters.loader import load_adapter_folder
from serving.adapters.store import AdapterStore
from serving.batch import Batch, RowAdapter
from serving.engine import build_engine, build_engine_from_parts
from serving.metrics import ServerMetrics
from serving.model_runner import CausalLMRunner
from serving.settings import parse_args
from serving.slot_layers import SlotLinear
from serving.step_metadata import AdapterContext
from serving.types import AdapterError
from tests.serving.test_engine import collect, request, run
from tests.serving.tiny_serving import (
    save_milora_adapter,
    save_random_adapter,
    tiny_causal_lm,
    tiny_llama_lm,
    tiny_tokenizer,
)

PROMPTS = ["def add(", "sub fib { my $n", "print('h", "local function f(x)", "return a +"]
MODELS = {"gpt_bigcode": tiny_causal_lm, "llama": tiny_llama_lm}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """MiLoRA (attention and mean poolers, different module sets and ranks), FLoRA, LoRA and IA3 for the tiny LM."""
    root = tmp_path_factory.mktemp("milora-adapters")
    base = tiny_causal_lm()
    save_milora_adapter(base, MiLoRAConfig(r=4, lora_alpha=8, top_k=2), root / "math", seed=1)
    save_milora_adapter(
        base, MiLoRAConfig(r=2, top_k=1, pooler="mean", target_modules=["c_attn", "mlp.c_proj"]), root / "mean", seed=2
    )
    save_random_adapter(base, FLoRAConfig(r=2), root / "flora", seed=3, scale=0.5)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], init_lora_weights=False)
    save_random_adapter(base, lora, root / "lora", seed=4, scale=0.5)
    ia3 = IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])
    save_random_adapter(base, ia3, root / "ia3", seed=5, scale=0.5)
    save_milora_adapter(tiny_llama_lm(), MiLoRAConfig(r=4, top_k=3, pooler="max"), root / "llama-math", seed=6)
    return root


ALL = ["math", "mean", "flora", "lora", "ia3"]


def make_engine(adapter_dir: Path, names=ALL, model: str = "gpt_bigcode", num_slots: int = 8):
    return build_engine_from_parts(
        MODELS[model](),
        tiny_tokenizer(),
        model_id="tiny",
        adapters={n.removeprefix("llama-") if model == "llama" else n: str(adapter_dir / n) for n in names},
        adapter_roots=[str(adapter_dir)],
        num_slots=num_slots,
    )


def peft_greedy(model: str, folder: Path, prompt: str, max_new_tokens: int) -> list[int]:
    tok = tiny_tokenizer()
    peft_model = PeftModel.from_pretrained(MODELS[model](), folder).eval()
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


def tokens(outs) -> list[int]:
    return [o.token.id for o in outs]


# ----------------------------------------------------------------------------------------------------- loading
def test_loader_reads_experts_into_lora_roles_and_routers(adapter_dir) -> None:
    weights = load_adapter_folder("mean", adapter_dir / "mean", tiny_causal_lm(), max_rank=8)
    assert (weights.method, weights.rank) == ("milora", 2)
    assert sorted(weights.routers) == ["transformer.h.0", "transformer.h.1"]
    router = weights.routers["transformer.h.1"]
    assert router.experts == ("attn.c_attn", "mlp.c_proj")  # the PEFT router's row order: sorted expert names
    assert tuple(router.weight.shape) == (2, 32) and router.query is None
    assert (router.pooler, router.top_k, router.rational_form) == ("mean", 1, "paper")
    assert tuple(router.num.shape) == (7,) and tuple(router.den.shape) == (5,)
    saved = load_file(adapter_dir / "mean" / "adapter_model.safetensors")
    roles = weights.modules["transformer.h.1.attn.c_attn"]
    torch.testing.assert_close(roles["lora_a"], saved["base_model.model.transformer.h.1.attn.c_attn.milora_A"])
    torch.testing.assert_close(roles["lora_b"], saved["base_model.model.transformer.h.1.attn.c_attn.milora_B"].t())
    scaled = load_adapter_folder("math", adapter_dir / "math", tiny_causal_lm(), max_rank=8)
    key = "base_model.model.transformer.h.0.mlp.c_fc.milora_B"
    b = load_file(adapter_dir / "math" / "adapter_model.safetensors")[key]
    torch.testing.assert_close(scaled.modules["transformer.h.0.mlp.c_fc"]["lora_b"], b.t() * 2.0)  # alpha 8 / r 4
    assert scaled.routers["transformer.h.0"].query is not None and scaled.nbytes() > 0


# ------------------------------------------------------------------------------------------- equality to PEFT
@pytest.mark.parametrize("model", ["llama", "gpt_bigcode"])
def test_served_milora_gives_peft_greedy_output(adapter_dir, model) -> None:
    folder = adapter_dir / ("llama-math" if model == "llama" else "math")
    engine = make_engine(adapter_dir, [folder.name], model=model)
    expected = [peft_greedy(model, folder, p, 10) for p in PROMPTS[:3]]

    async def main():
        got = [tokens(await collect(engine, request(p, "math", max_new_tokens=10))) for p in PROMPTS[:3]]
        base = tokens(await collect(engine, request(PROMPTS[0], max_new_tokens=10)))
        await engine.shutdown()
        return got, base

    got, base = run(main())
    assert got == expected
    assert got[0] != base  # the adapter matters


def _prefill_batch(store: AdapterStore, prompts: list[str], names: list) -> Batch:
    tok = tiny_tokenizer()
    adapters = []
    for name in names:
        if name is None:
            adapters.append(RowAdapter())
            continue
        weights, slot = store.get(name), store.resident()[name]
        adapters.append(RowAdapter(name=name, slot=slot, method=weights.method, rank=weights.rank))
    reqs = [request(p) for p in prompts]
    return Batch.from_requests(reqs, adapters, tok, {tok.eos_token_id}, torch.device("cpu"), tok.pad_token_id)


def _advance(batch: Batch, out, next_ids: torch.Tensor) -> None:
    """What generate_token does to a batch after a forward, with the tokens chosen by the test."""
    batch.cache = output_cache(out)
    batch.input_ids = next_ids[:, None]
    batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(len(batch), 1)], dim=1)
    batch.position_ids = batch.position_ids[:, -1:] + 1


def test_prefill_and_decode_logits_match_peft_in_a_padded_batch(adapter_dir) -> None:
    """Left-padded rows of different lengths, a base row between them: every step's logits equal PEFT's."""
    base = tiny_llama_lm()
    store = AdapterStore(base, AdapterContext(), num_slots=2, max_rank=8)
    store.register("math", adapter_dir / "llama-math", check_root=False)
    store.warm(["math"])
    runner = CausalLMRunner(base, tiny_tokenizer(), store.context)
    prompts, names = [PROMPTS[1], PROMPTS[0], PROMPTS[3]], ["math", None, "math"]
    batch = _prefill_batch(store, prompts, names)
    peft_model = PeftModel.from_pretrained(tiny_llama_lm(), adapter_dir / "llama-math").eval()
    plain = tiny_llama_lm()
    references = []  # per row: (model, ids, cache) decoding incrementally with its own cache (PEFT reuses gates)
    for prompt, name in zip(prompts, names):
        references.append([peft_model if name else plain, torch.tensor([tiny_tokenizer()(prompt)["input_ids"]]), None])
    with torch.no_grad():
        for step in range(3):
            out = runner.forward(batch)
            next_ids = out.logits[:, -1].argmax(-1)
            for row, ref in enumerate(references):
                model, ids, cache = ref
                expected = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
                width = ids.shape[1]
                got = out.logits[row, -width:] if step == 0 else out.logits[row, -1:]
                torch.testing.assert_close(got, expected.logits[0], atol=1e-5, rtol=0, msg=f"step {step} row {row}")
                ref[1], ref[2] = next_ids[row : row + 1, None], output_cache(expected)
            _advance(batch, out, next_ids)
    assert store.router_counts() == {"model.layers.0": 2, "model.layers.1": 2}  # two MiLoRA prompts, routed once
    store.close()


# ------------------------------------------------------------------------------------------ gates in the Batch
def test_gates_follow_rows_through_filter_and_concatenate(adapter_dir) -> None:
    base = tiny_causal_lm()
    store = AdapterStore(base, AdapterContext(), num_slots=8, max_rank=8)
    for name in ALL:
        store.register(name, adapter_dir / name, check_root=False)
    store.warm(ALL)
    runner = CausalLMRunner(base, tiny_tokenizer(), store.context)

    def prefilled(prompts, names):
        batch = _prefill_batch(store, prompts, names)
        out = runner.forward(batch)
        _advance(batch, out, out.logits[:, -1].argmax(-1))
        return batch

    a = prefilled([PROMPTS[0], PROMPTS[1], PROMPTS[2]], ["math", "lora", "mean"])
    b = prefilled([PROMPTS[3], PROMPTS[4]], ["flora", "ia3"])  # no MiLoRA row: no gates at all
    c = prefilled([PROMPTS[4], PROMPTS[1]], [None, "math"])
    assert b.milora is None and set(a.milora.gates) == set(c.milora.gates) == {
        "transformer.h.0",
        "transformer.h.1",
    }
    assert a.milora.expert_scales("transformer.h.0").gates[1].eq(1).all()  # the LoRA row keeps scale 1 on every expert
    merged = Batch.concatenate([a, b, c])
    for key, gates in merged.milora.gates.items():
        expected = torch.cat([a.milora.gates[key], torch.zeros(2, gates.shape[1]), c.milora.gates[key]])
        torch.testing.assert_close(gates, expected, atol=0, rtol=0)
        assert (gates[0] != 0).sum() == 2 and (gates[2] != 0).sum() == 1  # top_k of math, of mean
    kept = merged.filter([merged.requests[i].id for i in (0, 3, 6)])  # math, flora, math
    for key, gates in kept.milora.gates.items():
        torch.testing.assert_close(gates, merged.milora.gates[key][[0, 3, 6]], atol=0, rtol=0)
    counts = store.router_counts()
    got = runner.forward(kept).logits[:, -1]  # decoding the filtered, concatenated batch...
    assert store.router_counts() == counts  # ...never routes
    for row, (prompt, name) in enumerate([(PROMPTS[0], "math"), (PROMPTS[3], "flora"), (PROMPTS[1], "math")]):
        alone = prefilled([prompt], [name])  # ...and equals decoding the row in its own batch
        torch.testing.assert_close(got[row], runner.forward(alone).logits[0, -1], atol=1e-5, rtol=0, msg=name)
    store.close()


# -------------------------------------------------------------------------------------------- mixed serving
def test_mixed_batch_gives_each_row_its_alone_output(adapter_dir, monkeypatch) -> None:
    """MiLoRA, FLoRA, LoRA, IA3 and base rows together, finishing at different times, joining mid-decode."""
    engine = make_engine(adapter_dir)
    cases = [(p, a, 4 + 3 * (i % 4)) for i, (p, a) in enumerate((p, a) for p in PROMPTS[:4] for a in [None, *ALL])]
    cases.insert(0, (PROMPTS[4], "math", 40))  # still decoding when the second half arrives
    seen = {"concatenate": 0, "filter": 0}
    concatenate, filter_rows = Batch.concatenate.__func__, Batch.filter

    def spy_concatenate(cls, batches):
        seen["concatenate"] += any(b.milora is not None and b.milora.gates for b in batches)
        return concatenate(cls, batches)

    def spy_filter(self, keep_ids):
        seen["filter"] += self.milora is not None and bool(self.milora.gates) and len(keep_ids) < len(self)
        return filter_rows(self, keep_ids)

    monkeypatch.setattr(Batch, "concatenate", classmethod(spy_concatenate))
    monkeypatch.setattr(Batch, "filter", spy_filter)

    async def main():
        alone = [tokens(await collect(engine, request(p, a, n))) for p, a, n in cases]
        half = len(cases) // 2
        first = [asyncio.create_task(collect(engine, request(p, a, n))) for p, a, n in cases[:half]]
        start = engine.steps
        while engine.steps < start + 2:  # the first half is decoding
            await asyncio.sleep(0.002)
        second = [asyncio.create_task(collect(engine, request(p, a, n))) for p, a, n in cases[half:]]
        together = await asyncio.gather(*first, *second)
        await engine.shutdown()
        return alone, [tokens(outs) for outs in together]

    alone, together = run(main())
    assert len(alone[0]) == 40 and together == alone
    assert seen["concatenate"] > 0 and seen["filter"] > 0  # gates really went through both
    by_adapter = {a: alone[i] for i, (p, a, _) in enumerate(cases) if p == PROMPTS[0]}
    assert by_adapter["math"] != by_adapter[None][: len(by_adapter["math"])]


def test_router_runs_once_per_prompt(adapter_dir) -> None:
    engine = make_engine(adapter_dir, ["math", "flora"])
    routers = engine.store.routers
    assert sorted(routers) == ["transformer.h.0", "transformer.h.1"]

    async def main():
        outs = await asyncio.gather(
            *[collect(engine, request(p, "math", max_new_tokens=8)) for p in PROMPTS[:3]],
            collect(engine, request(PROMPTS[3], "flora", max_new_tokens=8)),
            collect(engine, request(PROMPTS[4], max_new_tokens=8)),
        )
        again = await collect(engine, request(PROMPTS[4], "math", max_new_tokens=8))
        await engine.shutdown()
        return outs, again

    outs, again = run(main())
    assert all(len(o) == 8 for o in outs) and len(again) == 8
    assert engine.steps >= 14  # two rounds of 7 decoding steps at least
    assert engine.store.router_counts() == {"transformer.h.0": 4, "transformer.h.1": 4}  # 4 MiLoRA prompts
    assert all(r.calls <= 4 for r in routers.values())  # one routing per prefill holding MiLoRA rows
    assert engine.stats()["milora_prompts_routed"] == 4
    metrics = ServerMetrics(64, 128, engine.stats).render().decode()
    assert "flora_milora_prompts_routed 4.0" in metrics


# ---------------------------------------------------------------------------------------------- bad adapters
def _corrupt(src: Path, dst: Path, tensors=None, config=None) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if tensors is not None:
        data = load_file(dst / "adapter_model.safetensors")
        tensors(data)
        save_file(data, dst / "adapter_model.safetensors")
    if config is not None:
        values = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(values | config))
    return dst


def test_corrupt_milora_adapters_are_refused_while_serving_continues(adapter_dir, tmp_path) -> None:
    router = "base_model.model.transformer.h.1.prompt_router"
    src = adapter_dir / "math"

    def drop_router(t):
        for key in [k for k in t if k.startswith(router)]:
            del t[key]

    bad = {
        "shape": (lambda t: t.update({f"{router}.milora_weight": t[f"{router}.milora_weight"][:-1]}), None),
        "nan": (lambda t: t[f"{router}.milora_num"].__setitem__(2, float("nan")), None),
        "inf": (lambda t: t[f"{router}.milora_query"].__setitem__(0, float("inf")), None),
        "no-router": (drop_router, None),
        "pooler": (None, {"pooler": "median"}),
        "query": (None, {"pooler": "mean"}),
        "degrees": (None, {"rational_degrees": [4, 4]}),
    }
    messages = {
        "shape": r"milora_weight has shape \(3, 32\), expected \(4, 32\) \(4 experts",
        "nan": "NaN or infinite values in transformer.h.1.prompt_router.num",
        "inf": "NaN or infinite values in transformer.h.1.prompt_router.query",
        "no-router": r"needs exactly one router; layers without a router: \['transformer.h.1'\]",
        "pooler": "unknown pooler 'median'",
        "query": "milora_query must be present exactly when the pooler is 'attention'",
        "degrees": r"milora_num has shape \(7,\), expected \(5,\)",
    }
    folders = {name: _corrupt(src, tmp_path / name, *edit) for name, edit in bad.items()}
    engine = build_engine_from_parts(
        tiny_causal_lm(), tiny_tokenizer(), model_id="tiny", adapters={"math": str(src)}, adapter_roots=[str(tmp_path)]
    )

    async def main():
        before = tokens(await collect(engine, request(PROMPTS[0], "math")))
        running = asyncio.create_task(collect(engine, request(PROMPTS[1], "math", max_new_tokens=30)))
        errors = {}
        for name, folder in folders.items():
            with pytest.raises(AdapterError) as err:
                await engine.load_adapter(name, str(folder))
            errors[name] = str(err.value)
        finished = await running
        after = tokens(await collect(engine, request(PROMPTS[0], "math")))
        await engine.shutdown()
        return before, errors, finished, after

    before, errors, finished, after = run(main())
    for name, pattern in messages.items():
        assert re.search(pattern, errors[name]), (name, errors[name])
    assert finished[-1].finish_reason == "length" and after == before
    assert engine.adapter_names() == ["math"]


# ------------------------------------------------------------------------------------------------ flora-serve
def test_flora_serve_settings_load_milora_and_flora_together(adapter_dir, tmp_path) -> None:
    """``flora-serve --lora-adapters math=<milora>,perl=<flora>``: the CLI's path, both kinds in one batch."""
    model_dir = tmp_path / "model"
    tiny_causal_lm().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    spec = f"math={adapter_dir / 'math'},perl={adapter_dir / 'flora'}"
    settings = parse_args(["--model-id", str(model_dir), "--lora-adapters", spec, "--device", "cpu"], env={})
    engine = build_engine(settings)
    assert {n: engine.store.get(n).method for n in engine.adapter_names()} == {"math": "milora", "perl": "flora"}
    assert set(engine.store.resident()) == {"math", "perl"}  # warmed at start-up

    async def main():
        outs = await asyncio.gather(
            collect(engine, request(PROMPTS[0], "math", max_new_tokens=8)),
            collect(engine, request(PROMPTS[0], "perl", max_new_tokens=8)),
        )
        await engine.shutdown()
        return [tokens(o) for o in outs]

    math, perl = run(main())
    assert math == peft_greedy("gpt_bigcode", adapter_dir / "math", PROMPTS[0], 8)
    assert perl == peft_greedy("gpt_bigcode", adapter_dir / "flora", PROMPTS[0], 8)


def test_slot_layers_only_scale_milora_experts(adapter_dir) -> None:
    """Gate sites are set on MiLoRA experts only: a LoRA-only module keeps the plain LoRA path."""
    base = tiny_causal_lm()
    store = AdapterStore(base, AdapterContext(), num_slots=4, max_rank=8)
    store.register("mean", adapter_dir / "mean", check_root=False)
    store.register("lora", adapter_dir / "lora", check_root=False)
    sites = {name: m.gate_site for name, m in base.named_modules() if isinstance(m, SlotLinear)}
    assert sites["transformer.h.0.attn.c_attn"] == ("transformer.h.0", 0)
    assert sites["transformer.h.0.mlp.c_proj"] == ("transformer.h.0", 3)  # columns: every linear of the layer
    assert sites["transformer.h.0.attn.c_proj"] is None  # LoRA only
    assert store.routers["transformer.h.0"].experts == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    store.close()
