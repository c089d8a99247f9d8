"""The CTranslate2 -> transformers Whisper converter: the binary reader on hand-written files, the packaged tiny.en's
names and shapes, and the converted model transcribing espeak-ng English."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.offline.ctranslate2_whisper import (
    MULTILINGUAL_VOCAB,
    CT2FormatError,
    convert_ct2_whisper,
    load_or_convert_packaged_whisper,
    packaged_whisper_folder,
    read_ct2_model,
    whisper_state_dict,
)

DTYPE_IDS = {np.float32: 0, np.int8: 1, np.int16: 2, np.float16: 4}


def write_ct2(path: Path, variables: dict, aliases: dict | None = None, spec="WhisperSpec", version=6) -> Path:
    """A model.bin in CTranslate2's layout (binary version 6), written independently of the reader."""

    def text(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    out = struct.pack("<I", version) + text(spec) + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    for name, value in variables.items():
        if isinstance(value, tuple):  # ("bfloat16", float32 array): the upper 16 bits
            raw = (np.asarray(value[1], np.float32).view(np.uint32) >> 16).astype(np.uint16)
            shape, dtype_id, data = raw.shape, 5, raw.tobytes()
        else:
            shape, dtype_id, data = value.shape, DTYPE_IDS[value.dtype.type], value.tobytes()
        out += text(name) + struct.pack("<B", len(shape)) + b"".join(struct.pack("<I", d) for d in shape)
        out += struct.pack("<B", dtype_id) + struct.pack("<I", len(data)) + data
    aliases = aliases or {}
    out += struct.pack("<I", len(aliases)) + b"".join(text(a) + text(t) for a, t in aliases.items())
    path.write_bytes(out)
    return path


def test_the_reader_gives_back_what_was_written(tmp_path) -> None:
    weights = np.arange(6, dtype=np.float16).reshape(2, 3)
    path = write_ct2(
        tmp_path / "model.bin",
        {"a/weight": weights, "a/heads": np.array(6, np.int16), "b/bf16": ("bfloat16", np.array([1.5, -2.0]))},
        aliases={"c/weight": "a/weight"},
    )
    model = read_ct2_model(path)
    assert (model.spec, model.revision) == ("WhisperSpec", 3)
    assert np.array_equal(model.variables["a/weight"], weights) and model.variables["a/weight"].dtype == np.float16
    assert model.scalar("a/heads") == 6
    assert model.variables["b/bf16"].tolist() == [1.5, -2.0]  # exactly representable in bfloat16
    assert model.variables["c/weight"] is model.variables["a/weight"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: write_ct2(p, {}, version=5), "binary version 5"),
        (lambda p: write_ct2(p, {}, spec="TransformerSpec"), "holds a TransformerSpec"),
        (lambda p: p.write_bytes(write_ct2(p, {"a": np.ones(9, np.float32)}).read_bytes()[:-20]), "not a readable"),
    ],
)
def test_a_file_that_is_not_a_known_whisper_is_refused_with_the_reason(tmp_path, edit, message) -> None:
    path = tmp_path / "model.bin"
    edit(path)
    with pytest.raises(CT2FormatError, match=message):
        read_ct2_model(path)


@pytest.fixture(scope="module")
def packaged():
    return read_ct2_model(packaged_whisper_folder() / "model.bin")


def test_the_packaged_model_is_whisper_tiny_english_only(packaged) -> None:
    assert (packaged.spec, packaged.revision, len(set(map(id, packaged.variables.values())))) == (
        "WhisperSpec",
        3,
        148,
    )
    assert packaged.variables["decoder/embeddings/weight"].shape == (51864, 384)
    assert packaged.variables["encoder/position_encodings/encodings"].shape == (1500, 384)
    assert packaged.variables["decoder/embeddings/weight"].shape[0] == MULTILINGUAL_VOCAB - 1  # tiny.en, not tiny
    assert (packaged.count("encoder"), packaged.count("decoder"), packaged.scalar("encoder/num_heads")) == (4, 4, 6)


def test_fused_projections_split_back_in_order(packaged) -> None:
    state = whisper_state_dict(packaged)
    fused = torch.tensor(packaged.variables["decoder/layer_1/self_attention/linear_0/weight"], dtype=torch.float32)
    q, k, v = (state[f"model.decoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(torch.cat([q, k, v]), fused)
    bias = packaged.variables["encoder/layer_0/self_attention/linear_0/bias"]
    assert not np.any(bias[384:768]) and "model.encoder.layers.0.self_attn.k_proj.bias" not in state  # k: no bias
    kv = torch.tensor(packaged.variables["decoder/layer_0/attention/linear_1/weight"], dtype=torch.float32)
    assert torch.equal(torch.cat([state[f"model.decoder.layers.0.encoder_attn.{p}_proj.weight"] for p in "kv"]), kv)


def test_every_transformers_weight_comes_from_the_file(packaged) -> None:
    model, processor = convert_ct2_whisper(packaged_whisper_folder())
    state = whisper_state_dict(packaged)
    for name, tensor in model.state_dict().items():
        if name.endswith("k_proj.bias"):
            assert not tensor.any(), name  # Whisper's k_proj has no bias: transformers keeps it at zero
        else:
            assert torch.equal(tensor, state[name]), name
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()  # tied
    assert processor.tokenizer.convert_ids_to_tokens(model.generation_config.decoder_start_token_id) == (
        "<|startoftranscript|>"
    )
    assert not model.generation_config.is_multilingual


def test_the_converted_model_transcribes_english_speech(tmp_path) -> None:
    """espeak-ng English through the converted tiny.en: a real model's WER (a random Whisper's is >= 100%)."""
    import jiwer
    import soundfile as sf
    import soxr
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from trainers.evaluation.wer import whisper_normalizer
    from trainers.offline.synth_speech import EspeakNotFound, espeak_binary, synthesize

    try:
        espeak_binary()
    except EspeakNotFound:
        pytest.skip("espeak-ng is not installed (make setup installs it)")
    folder = load_or_convert_packaged_whisper(tmp_path / "whisper-tiny-en")
    assert load_or_convert_packaged_whisper(tmp_path / "whisper-tiny-en") == folder  # cached: not converted again
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)
    texts = ["Where do you live?", "Give me a glass of water, please.", "My brother works at the hospital."]
    normalize, refs, hyps = whisper_normalizer("en"), [], []
    for i, text in enumerate(texts):
        audio, rate = sf.read(synthesize(text, tmp_path / f"{i}.wav", "en"))
        features = processor(soxr.resample(audio, rate, 16000), sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(features.input_features, max_new_tokens=40)
        refs.append(normalize(text))
        hyps.append(normalize(processor.batch_decode(ids, skip_special_tokens=True)[0]))
    assert jiwer.wer(refs, hyps) < 0.5, list(zip(refs, hyps))
