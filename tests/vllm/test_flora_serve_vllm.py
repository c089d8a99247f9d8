"""``flora-serve --engine vllm``: TGI's routes over vLLM's async engine, adapters as vLLM LoRA requests.

Runs inside .venv-vllm (``make test-vllm``); elsewhere it skips. One engine for the module: vLLM's start-up costs
most of a minute on a CPU.
"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here: make setup-vllm creates .venv-vllm, make test-vllm runs this"
)

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from flora_hf import FLoRAConfig  # noqa: E402
from serving.api import create_app  # noqa: E402
from serving.settings import ServerSettings  # noqa: E402
from serving.vllm_engine import build_vllm_engine  # noqa: E402
from tests.serving.tiny_serving import save_random_adapter, tiny_tokenizer  # noqa: E402
from tests.vllm.helpers import tiny_llama  # noqa: E402

PROMPTS = ["def add(a, b):", "sub fib {", "local function f(x)"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-serve")
    base = tiny_llama(root / "model")
    save_random_adapter(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), root / "lora", seed=1)
    save_random_adapter(base, FLoRAConfig(r=2, target_modules=TARGETS), root / "flora", seed=2)
    save_random_adapter(base, FLoRAConfig(r=1, target_modules=TARGETS), root / "hot", seed=3)
    save_random_adapter(base, FLoRAConfig(r=32, target_modules=TARGETS), root / "too-wide", seed=4)
    settings = ServerSettings(
        model_id=str(root / "model"), engine="vllm", lora_adapters={"lora": str(root / "lora"), "flora": str(root / "flora")},
        adapter_roots=[str(root)], dtype="float32", max_total_tokens=256, max_input_tokens=128,
        max_loaded_adapters=4, max_adapter_rank=16, kv_cache_memory_bytes=256 << 20, admin_token="s3cret",
    )  # fmt: skip
    engine = build_vllm_engine(settings)
    with TestClient(create_app(engine, settings)) as client:  # runs the app's lifespan: start-up adapters load
        yield client, base, root


def peft_greedy(model_dir, folder, prompt: str, n: int) -> list[int]:
    """PEFT's greedy tokens, stopping at EOS as the server does."""
    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, folder).eval() if folder else model
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1] :].tolist()


def generated_ids(client, prompt: str, adapter=None, n: int = 8) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}}
    if adapter:
        body["parameters"]["adapter_id"] = adapter
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_generate_matches_peft_for_base_lora_and_flora_rows(served):
    client, base, root = served
    for prompt in PROMPTS:
        assert generated_ids(client, prompt) == peft_greedy(root / "model", None, prompt, 8)
    for name in ("lora", "flora"):
        for prompt in PROMPTS:
            assert generated_ids(client, prompt, name) == peft_greedy(root / "model", root / name, prompt, 8), name


def test_concurrent_requests_with_different_adapters_each_get_their_own_tokens(served):
    """One vLLM batch mixing base, LoRA and FLoRA rows (the TestClient sends them from threads at once)."""
    from concurrent.futures import ThreadPoolExecutor

    client, *_ = served
    cases = [(p, a) for p in PROMPTS for a in (None, "lora", "flora")]
    alone = [generated_ids(client, p, a) for p, a in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda case: generated_ids(client, *case), cases))
    assert together == alone


def test_an_unknown_adapter_is_a_422_naming_it(served):
    client, *_ = served
    response = client.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "perl"}})
    assert response.status_code == 422 and "perl" in response.json()["error"]


def test_stream_info_health_metrics_tokenize(served):
    client, *_ = served
    with client.stream(
        "POST", "/generate_stream", json={"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4}}
    ) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 4 and '"generated_text"' in events[-1]
    assert client.get("/health").status_code == 200
    assert client.get("/info").json()["model_id"].endswith("model")
    assert "tgi_request_count" in client.get("/metrics").text
    assert client.post("/tokenize", json={"inputs": PROMPTS[0]}).status_code == 200


def test_admin_hot_load_and_unload_reach_vllm(served):
    client, _, root = served
    admin = {"Authorization": "Bearer s3cret"}
    loaded = client.post("/admin/adapters", json={"name": "hot", "path": str(root / "hot")}, headers=admin)
    assert loaded.status_code == 201, loaded.text
    assert generated_ids(client, PROMPTS[0], "hot") == peft_greedy(root / "model", root / "hot", PROMPTS[0], 8)
    refused = client.post("/admin/adapters", json={"name": "wide", "path": str(root / "too-wide")}, headers=admin)
    assert refused.status_code == 422 and "rank" in refused.json()["error"]  # the reason, from the plugin
    assert client.delete("/admin/adapters/hot", headers=admin).status_code == 200
    gone = client.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "hot"}})
    assert gone.status_code == 422
    assert generated_ids(client, PROMPTS[0], "flora")  # and the server keeps serving
