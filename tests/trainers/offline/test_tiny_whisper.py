"""The offline tiny Whisper: special tokens where Whisper's code expects them, a folder that loads like a hub
checkpoint, a loss on collated batches, and generation prompted with language and task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from trainers.data.speech import WhisperSeq2SeqCollator
from trainers.offline.tiny_whisper import SOT, build_tiny_whisper, whisper_special_tokens


def test_special_tokens_and_saved_folder(tmp_path: Path) -> None:
    tiny = build_tiny_whisper(tmp_path / "tiny-whisper")
    tok = tiny.tokenizer
    sot = tok.convert_tokens_to_ids(SOT)
    for i, code in enumerate(LANGUAGES):  # Whisper computes language ids as SOT + 1 + index
        assert tok.convert_tokens_to_ids(f"<|{code}|>") == sot + 1 + i
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and len(tok) == tiny.model.config.vocab_size
    assert all(len(tok(t, add_special_tokens=False).input_ids) == 1 for t in whisper_special_tokens())
    cfg = tiny.model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.num_mel_bins) == (64, 2, 2, 80)

    processor = WhisperProcessor.from_pretrained(tmp_path / "tiny-whisper")
    processor.tokenizer.set_prefix_tokens(language="marathi", task="transcribe")
    ids = processor.tokenizer("मी शाळेत जातो.").input_ids
    assert processor.tokenizer.convert_ids_to_tokens(ids[:4]) == [
        SOT,
        "<|mr|>",
        "<|transcribe|>",
        "<|notimestamps|>",
    ]
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == "मी शाळेत जातो."
    model = WhisperForConditionalGeneration.from_pretrained(tmp_path / "tiny-whisper")
    assert model.generation_config.lang_to_id["<|mr|>"] == sot + 1 + list(LANGUAGES).index("mr")


def test_loss_and_language_prompted_generation() -> None:
    tiny = build_tiny_whisper()
    tok, model = tiny.tokenizer, tiny.model
    audio = np.sin(2 * np.pi * 220 * np.arange(16_000) / 16_000).astype(np.float32)
    feats = torch.from_numpy(
        tiny.feature_extractor(audio, sampling_rate=16_000, return_tensors="np").input_features[0]
    )
    tok.set_prefix_tokens(language="mr", task="transcribe")
    items = [
        {"input_features": feats, "labels": torch.tensor(tok(text).input_ids), "adapter_name": "mr"}
        for text in ("आज सोमवार आहे.", "मला एक ग्लास पाणी द्या.")
    ]
    batch = WhisperSeq2SeqCollator(model.config.decoder_start_token_id, adapter_key=None)(items)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()

    seen: list[torch.Tensor] = []
    hook = model.model.decoder.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["input_ids"]), with_kwargs=True
    )
    with torch.no_grad():
        model.generate(feats[None], language="mr", task="transcribe", max_new_tokens=2)
    hook.remove()
    prompt = tok.convert_tokens_to_ids([SOT, "<|mr|>", "<|transcribe|>", "<|notimestamps|>"])
    assert seen[0][0].tolist() == prompt
