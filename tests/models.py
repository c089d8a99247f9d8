"""Tiny models built from configs (no hub access), shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

import flora_hf  # noqa: F401  (registers FLoRA with PEFT)

VOCAB = 97


def tiny_gpt_bigcode() -> GPTBigCodeForCausalLM:
    cfg = GPTBigCodeConfig(
        n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, multi_query=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return GPTBigCodeForCausalLM(cfg).eval()


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def tiny_whisper() -> WhisperForConditionalGeneration:
    cfg = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, encoder_layers=1, decoder_layers=1, d_model=32, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=16,
        max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    return WhisperForConditionalGeneration(cfg).eval()


def model_inputs(model, batch: int, seq: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for any of the tiny models above."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(model.config, WhisperConfig):
        return {
            "input_features": torch.randn(batch, model.config.num_mel_bins, 32, generator=g),
            "decoder_input_ids": torch.randint(3, VOCAB, (batch, seq), generator=g),
        }
    return {"input_ids": torch.randint(1, VOCAB, (batch, seq), generator=g)}


TINY_MODELS = {"gpt_bigcode": tiny_gpt_bigcode, "llama": tiny_llama, "whisper": tiny_whisper, "gpt2": tiny_gpt2}
