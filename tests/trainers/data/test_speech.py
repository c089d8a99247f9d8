"""The Common Voice reader on espeak-ng speech: bad clips skipped and counted, 16 kHz mono float32 audio, Whisper
features and prefixed labels, and a Seq2Seq collator that pads labels with -100."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.data import speech
from trainers.data.audio import ClipError
from trainers.data.speech import (
    WhisperSeq2SeqCollator,
    build_mixed_speech_dataset,
    build_speech_dataset,
    common_voice_locale,
    common_voice_rows,
    read_tsv,
    whisper_language,
)
from trainers.offline.synth_speech import (
    CV_COLUMNS,
    EspeakNotFound,
    espeak_binary,
    make_common_voice_folder,
    mp3_encoder,
)
from trainers.offline.tiny_whisper import SOT, build_tiny_whisper_tokenizer

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")
try:
    espeak_binary()
except EspeakNotFound as err:  # pragma: no cover - depends on the machine
    pytest.skip(str(err), allow_module_level=True)

QUOTED = 'She said "yes" without a pause.'
EN_SENTENCES = [QUOTED, "The train arrived on time.", "Where do you live?", "Today is Monday.", "This tree is old."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cv")
    mr = make_common_voice_folder(root / "mr", "mr", max_sentences=12, dev_size=2, test_size=2, corrupt_clips=1)
    assert mr.rows == {"train": 8, "dev": 2, "test": 2} and len(mr.corrupt) == 1
    en = make_common_voice_folder(root / "en", "en", sentences=EN_SENTENCES, dev_size=1, test_size=1)
    return {"mr": mr.folder, "en": en.folder}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_whisper_tokenizer()


@pytest.fixture(scope="module")
def features():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor()


def test_reader_skips_corrupt_clip_and_loads_the_rest(folders: dict[str, Path], tokenizer, features) -> None:
    ds = build_speech_dataset(folders["mr"], features, tokenizer, "train", preload=True)
    assert ds.language == "mr" and common_voice_locale(folders["mr"]) == "mr"
    assert ds.stats.loaded == len(ds) == 7
    assert ds.stats.skipped == {"unreadable": 1} and "1 unreadable" in str(ds.stats)
    for row, audio in zip(ds.rows, ds.audio):
        assert audio is not None and audio.dtype == np.float32 and audio.ndim == 1
        info = sf.info(str(row.audio))
        assert info.samplerate == 22_050  # espeak's rate, so resampling really happened
        assert abs(len(audio) - info.frames * 16_000 / 22_050) <= 2
        assert 0.01 < np.abs(audio).max() <= 1.0
    lazy = build_speech_dataset(folders["mr"], features, tokenizer, "train")  # header probe finds it as well
    assert lazy.stats.skipped == {"unreadable": 1} and len(lazy) == 7


def test_tsv_as_mozilla_ships_it(folders: dict[str, Path]) -> None:
    table = read_tsv(folders["en"] / "train.tsv")
    assert list(table[0]) == list(CV_COLUMNS)
    sentences = {r["sentence"] for split in ("train", "dev", "test") for r in read_tsv(folders["en"] / f"{split}.tsv")}
    assert sentences == set(EN_SENTENCES)  # quotes intact: quoting is off
    rows = common_voice_rows(folders["en"], "train")
    assert all(r.audio.parent.name == "clips" and r.audio.is_file() for r in rows)
    assert len(common_voice_rows(folders["en"], "validation")) == 1  # the hub's name for dev
    with pytest.raises(FileNotFoundError, match="train.tsv, dev.tsv"):
        common_voice_rows(folders["en"], "nosuchsplit")


def test_missing_empty_and_converted_clips(folders: dict[str, Path], tokenizer, features, tmp_path: Path) -> None:
    folder = shutil.copytree(folders["mr"], tmp_path / "mr")
    rows = read_tsv(folder / "train.tsv")
    (folder / "clips" / rows[1]["path"]).unlink()
    (folder / "clips" / rows[2]["path"]).write_bytes(b"")
    wav = folder / "clips" / rows[3]["path"]  # a clip converted to FLAC after download, TSV unchanged
    data, rate = sf.read(wav)
    sf.write(wav.with_suffix(".flac"), data, rate)
    wav.unlink()
    (folder / "train.tsv").write_text((folder / "train.tsv").read_text().replace(rows[4]["sentence"], ""))
    ds = build_speech_dataset(folder, features, tokenizer, "train")
    assert ds.stats.skipped == {"no_text": 1, "unreadable": 1, "missing": 1, "empty": 1}
    assert len(ds) == 4 and any(str(r.audio).endswith(".flac") for r in ds.rows)


def test_decode_failure_after_probe_is_skipped(folders, tokenizer, features, monkeypatch) -> None:
    ds = build_speech_dataset(folders["mr"], features, tokenizer, "train")
    bad = ds.rows[0].name
    real = speech.load_clip

    def flaky(source, rate=16_000):
        if Path(source).name == bad:
            raise ClipError("unreadable", "truncated frame")
        return real(source, rate)

    monkeypatch.setattr(speech, "load_clip", flaky)
    item = ds[0]  # falls through to row 1
    assert torch.equal(item["labels"], torch.tensor(ds.labels[1]))
    assert ds.stats.skipped["unreadable"] == 2 and ds.stats.loaded == len(ds) - 1
    ds[0]
    assert ds.stats.skipped["unreadable"] == 2  # counted once


def test_features_labels_and_collator(folders: dict[str, Path], tokenizer, features) -> None:
    ds = build_speech_dataset(folders["mr"], features, tokenizer, "train")
    assert tokenizer.language is None  # the shared tokenizer's prefix is restored
    items = [ds[0], ds[1], ds[2]]
    assert items[0]["input_features"].shape == (80, 3000) and items[0]["input_features"].dtype == torch.float32
    sot = tokenizer.convert_tokens_to_ids(SOT)
    prefix = tokenizer.convert_tokens_to_ids([SOT, "<|mr|>", "<|transcribe|>", "<|notimestamps|>"])
    for item, row in zip(items, ds.rows):
        ids = item["labels"].tolist()
        assert ids[:4] == prefix and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == row.text
    batch = WhisperSeq2SeqCollator(decoder_start_token_id=sot)(items)
    lengths = [len(i["labels"]) - 1 for i in items]
    assert batch["input_features"].shape == (3, 80, 3000)
    assert batch["labels"].shape == (3, max(lengths)) and batch["adapter_names"] == ["mr"] * 3
    for row, n in zip(batch["labels"], lengths):
        assert row[0].item() == prefix[1] and (row[n:] == -100).all() and (row[:n] != -100).all()
    assert "adapter_names" not in WhisperSeq2SeqCollator(sot, adapter_key=None)(items)


def test_mixed_languages_keep_their_own_prefix(folders: dict[str, Path], tokenizer, features) -> None:
    mixed = build_mixed_speech_dataset(folders, features, tokenizer, "dev", adapter_name=None)
    assert len(mixed) == 3 and set(mixed.stats) == {"mr", "en"} and "speech en/dev" in mixed.summary()
    items = [mixed[i] for i in range(len(mixed))]
    assert [i["language"] for i in items] == ["mr", "mr", "en"]
    lang_ids = [i["labels"][1].item() for i in items]
    assert lang_ids == tokenizer.convert_tokens_to_ids(["<|mr|>", "<|mr|>", "<|en|>"])
    batch = WhisperSeq2SeqCollator(tokenizer.convert_tokens_to_ids(SOT))([items[0], items[2]])
    assert batch["adapter_names"] == ["mr", "en"]


def test_mp3_clips(tmp_path: Path, tokenizer, features) -> None:
    if mp3_encoder() is None:
        pytest.skip("no MP3 encoder to make test clips: apt-get install -y lame")
    made = make_common_voice_folder(
        tmp_path / "de", "de", max_sentences=4, dev_size=1, test_size=1, audio_format="mp3"
    )
    rows = common_voice_rows(made.folder, "train")
    assert all(r.audio.suffix == ".mp3" for r in rows)
    ds = build_speech_dataset(made.folder, features, tokenizer, "train", preload=True)
    assert len(ds) == 2 and ds.stats.total_skipped == 0
    assert all(a.dtype == np.float32 and len(a) > 8_000 for a in ds.audio)


def test_whisper_language_names() -> None:
    assert whisper_language("mr") == whisper_language("Marathi") == "mr"
    assert whisper_language("zh-CN") == "zh" and whisper_language("sv-SE") == "sv"
    with pytest.raises(ValueError, match="no language"):
        whisper_language("xx")


def test_too_long_clips_and_labels_are_counted(folders: dict[str, Path], tokenizer, features) -> None:
    with pytest.raises(ValueError, match="2 too_long"):  # nothing usable left is the one error raised
        build_speech_dataset(folders["mr"], features, tokenizer, "dev", max_seconds=0.1)
    full = build_speech_dataset(folders["mr"], features, tokenizer, "train")
    cap = max(len(ids) for ids in full.labels) - 2  # the longest transcript no longer fits
    ds = build_speech_dataset(folders["mr"], features, tokenizer, "train", max_label_tokens=cap)
    assert ds.stats.skipped["text_too_long"] >= 1 and all(len(ids) - 1 <= cap for ids in ds.labels)
    assert len(ds) + ds.stats.skipped["text_too_long"] == len(full)
