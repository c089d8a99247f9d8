"""A tiny causal LM with a locally trained tokenizer, and random PEFT adapters for it: what serving tests run on."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM, LlamaConfig, LlamaForCausalLM

from trainers.offline.tiny_code_model import train_tokenizer

_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "sub fib { my $n = shift; return $n < 2 ? $n : fib($n - 1) + fib($n - 2); }\n",
    "print('héllo wörld, 日本語')\n",
    "local function f(x) return x * 2 end\n",
] * 40


@lru_cache(maxsize=1)
def tiny_tokenizer():
    return train_tokenizer(_TEXTS, vocab_size=320, block_size=256)


def tiny_causal_lm(seed: int = 0) -> GPTBigCodeForCausalLM:
    tok = tiny_tokenizer()
    cfg = GPTBigCodeConfig(
        n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=256, multi_query=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPTBigCodeForCausalLM(cfg).eval()


def tiny_llama_lm(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama over the same tokenizer (MiLoRA's default experts: q, k, v, o, gate, up, down)."""
    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=256,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def save_milora_adapter(base, config, folder: Path, seed: int = 0, scale: float = 0.5, router_gain: float = 4.0):
    """A MiLoRA adapter whose experts are far from zero and whose router really picks different experts per prompt.

    Rational coefficients keep their GELU init (the bi-level training barely moves them).
    """
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("milora_A.default", "milora_B.default")):
                p.add_(torch.randn_like(p) * scale)
            elif name.endswith(("milora_weight.default", "milora_query.default")):
                p.mul_(router_gain)
    model.save_pretrained(folder)
    return folder


def save_random_adapter(base, config, folder: Path, seed: int = 0, scale: float = 0.3) -> Path:
    """A PEFT adapter whose weights are far from its identity init, so a wrong route cannot pass unnoticed."""
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "ia3_", "flora_")):
                p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(folder)
    return folder
