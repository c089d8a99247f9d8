"""vLLM serves FLoRA on GPTBigCode (StarCoder's architecture, the FLoRA paper's model) through the flora plugin.

vLLM 0.32 runs GPTBigCode on its Transformers backend, which fuses ``c_attn`` into a ``QKVParallelLinear`` with no
``packed_modules_mapping`` entry; vLLM's own LoRA classes then leave ``c_attn`` unwrapped (a warning, and LoRA on
``c_attn`` silently does nothing). The plugin's single-slice QKV class takes it, as PEFT sees it: one linear layer.
"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed: make setup-vllm creates .venv-vllm; make test-vllm runs these"
)

from peft import LoraConfig  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402

from flora_hf import FLoRAConfig  # noqa: E402
from tests.vllm.helpers import (  # noqa: E402
    MIXED_ROWS,
    NEW_TOKENS,
    PROMPTS,
    peft_greedy,
    prompt_ids,
    running_llm,
    save_adapters,
    tiny_bigcode,
    worker_lora_layers,
)

ADAPTERS = {"flora-r1": 1, "flora-r4": 2, "lora-r8": 3}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-bigcode")
    base = tiny_bigcode(root / "model")
    found = save_adapters(
        base,
        root,
        {
            "flora-r1": FLoRAConfig(r=1, target_modules=["c_attn", "c_fc", "c_proj"]),
            "flora-r4": FLoRAConfig(r=4, target_modules=["c_attn"]),  # the paper's choice for StarCoder
            "lora-r8": LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"]),
        },
    )
    found["model"] = root / "model"
    return found


@pytest.fixture(scope="module")
def llm(folders):
    with running_llm(folders["model"]) as engine:
        yield engine


def test_c_attn_is_a_flora_layer(llm) -> None:
    [layers] = llm.collective_rpc(worker_lora_layers)
    kinds = {name.rpartition(".")[2]: cls for name, (cls, _, _) in layers.items()}
    assert kinds["c_attn"] == "FLoRAQKVParallelLinearWithLoRA"
    assert {kinds["c_fc"], kinds["c_proj"]} <= {
        "FLoRAColumnParallelLinearWithLoRA",
        "FLoRARowParallelLinearWithLoRA",
        "FLoRAReplicatedLinearWithLoRA",
    }


def test_mixed_batch_matches_peft_row_by_row(llm, folders) -> None:
    rows = [*MIXED_ROWS, (PROMPTS[4], "flora-r4")]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    requests = [None if a is None else LoRARequest(a, ADAPTERS[a], str(folders[a])) for _, a in rows]
    outs = llm.generate(
        [{"prompt_token_ids": prompt_ids(p)} for p, _ in rows], params, lora_request=requests, use_tqdm=False
    )
    want = [peft_greedy(folders["model"], None if a is None else folders[a], p) for p, a in rows]
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    base = [peft_greedy(folders["model"], None, p) for p, _ in rows]
    assert all(w != b for w, b, (_, a) in zip(want, base, rows) if a is not None)  # every adapter changes the output
