"""A tiny Whisper built offline: a real ``WhisperTokenizer`` with Whisper's special tokens, and a small config.

Development machines cannot download ``openai/whisper-*``, yet the speech data path, the recipes and a small-scale
reproduction all need a Whisper tokenizer, feature extractor and model. The tokenizer here is a byte-level BPE
trained on the synthetic-speech sentences, with Whisper's special tokens at the positions Whisper's code assumes
(``<|startoftranscript|>`` right before the language tokens, in ``LANGUAGES`` order, then the task tokens), so
``set_prefix_tokens(language=..., task=...)`` and ``generate(language=..., task=...)`` behave as with the real
model. The default feature extractor (80 mel bins, 30 s windows) works offline as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers import trainers as bpe_trainers
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from .synth_speech import SENTENCES

EOT = "<|endoftext|>"
SOT = "<|startoftranscript|>"
TASK_TOKENS = ("<|translate|>", "<|transcribe|>")
NO_TIMESTAMPS = "<|notimestamps|>"
START_OF_PREV = "<|startofprev|>"


def whisper_special_tokens() -> list[str]:
    """Whisper's special tokens in vocabulary order: language token ``i`` is ``SOT`` + 1 + i."""
    languages = [f"<|{code}|>" for code in LANGUAGES]
    return [EOT, SOT, *languages, *TASK_TOKENS, "<|startoflm|>", START_OF_PREV, "<|nospeech|>", NO_TIMESTAMPS]


def default_tokenizer_texts() -> list[str]:
    """Every synthetic-speech sentence, so the tiny tokenizer covers the demo languages' scripts."""
    return [s for sentences in SENTENCES.values() for s in sentences]


def build_tiny_whisper_tokenizer(
    texts: Optional[Iterable[str]] = None, vocab_size: int = 512, save_dir: Union[str, Path, None] = None
) -> WhisperTokenizer:
    """A byte-level BPE of ``vocab_size`` learned tokens plus Whisper's special tokens, as a ``WhisperTokenizer``.

    Any text round-trips (byte-level), so sentences outside ``texts`` still tokenize. Saved to ``save_dir`` when
    given, loadable with ``WhisperTokenizer.from_pretrained``.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = bpe_trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts) if texts is not None else default_tokenizer_texts(), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    specials = whisper_special_tokens()
    for token in specials:  # appended in order, so the ids are consecutive as in Whisper
        vocab[token] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, pad_token=EOT, extra_special_tokens=specials[1:])
    ids = tokenizer.convert_tokens_to_ids(specials)
    if ids != list(range(ids[0], ids[0] + len(specials))):
        raise RuntimeError("Whisper special tokens did not get consecutive ids")  # the prefix arithmetic needs it
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def tiny_whisper_config(
    tokenizer: WhisperTokenizer,
    d_model: int = 64,
    encoder_layers: int = 2,
    decoder_layers: int = 2,
    attention_heads: int = 4,
    ffn_dim: int = 256,
    num_mel_bins: int = 80,
    max_target_positions: int = 448,
) -> WhisperConfig:
    """A Whisper config for ``tokenizer``; 1,500 encoder positions and 80 mel bins match the default feature
    extractor's 30 s windows, so real features feed it unchanged."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    return WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=attention_heads,
        decoder_attention_heads=attention_heads,
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        max_source_positions=1500,
        max_target_positions=max_target_positions,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids(SOT),
        begin_suppress_tokens=None,  # generation settings live in the generation config (transformers 5)
        suppress_tokens=None,
    )


def tiny_whisper_generation_config(tokenizer: WhisperTokenizer, config: WhisperConfig) -> GenerationConfig:
    """What ``WhisperForConditionalGeneration.generate(language=..., task=...)`` looks up: the language and task
    token ids, ``<|notimestamps|>`` and the start token."""
    ids = tokenizer.convert_tokens_to_ids
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        begin_suppress_tokens=[config.eos_token_id],
        suppress_tokens=[],
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids(f"<|{code}|>") for code in LANGUAGES},
        task_to_id={"translate": ids(TASK_TOKENS[0]), "transcribe": ids(TASK_TOKENS[1])},
        no_timestamps_token_id=ids(NO_TIMESTAMPS),
        prev_sot_token_id=ids(START_OF_PREV),
        max_initial_timestamp_index=50,
    )


@dataclass
class TinyWhisper:
    model: WhisperForConditionalGeneration
    tokenizer: WhisperTokenizer
    feature_extractor: WhisperFeatureExtractor


def build_tiny_whisper(
    save_dir: Union[str, Path, None] = None,
    texts: Optional[Iterable[str]] = None,
    vocab_size: int = 512,
    seed: int = 0,
    **config_kwargs: int,
) -> TinyWhisper:
    """A randomly initialised tiny Whisper with its tokenizer and feature extractor; with ``save_dir``, saved as a
    model folder (``WhisperProcessor`` / ``from_pretrained`` load it like a hub checkpoint)."""
    tokenizer = build_tiny_whisper_tokenizer(texts, vocab_size)
    config = tiny_whisper_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = tiny_whisper_generation_config(tokenizer, config)
    features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    if save_dir is not None:
        model.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
        features.save_pretrained(save_dir)
    return TinyWhisper(model, tokenizer, features)
