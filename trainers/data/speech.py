"""Speech recognition data for Whisper fine-tuning: Common Voice release folders or hub datasets.

A Common Voice release is read as Mozilla ships it: ``{split}.tsv`` (tab separated, *no quoting*: sentences
contain quotes) with ``path`` and ``sentence`` columns, and the clips under ``clips/``. A hub dataset needs an audio
and a text column; its audio is decoded here too (``Audio(decode=False)``), so both sources share one decoder and
one rule: a clip that is missing, empty, unreadable or too long is skipped and counted in :class:`ClipStats`, never
a crash. Labels carry Whisper's prefix for the example's language and task, set on the tokenizer with
``set_prefix_tokens`` as transformers does it, so mixed-language batches each get their own ``<|xx|>`` token.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

from .audio import (
    AUDIO_EXTENSIONS,
    TARGET_SAMPLING_RATE,
    AudioSource,
    ClipError,
    ClipStats,
    load_clip,
    probe_audio,
)
from .hub import guarded_iter, import_datasets, is_local_folder, load_hub_dataset

CV_SPLIT_FILES = {
    "train": "train.tsv",
    "dev": "dev.tsv",
    "validation": "dev.tsv",
    "test": "test.tsv",
    "validated": "validated.tsv",
    "other": "other.tsv",
}
"""Split name to file in a release folder (``validation`` is the hub's name for ``dev``)."""

HUB_SPLIT_NAMES = {"dev": "validation"}
"""Common Voice's split names as hub datasets call them."""

TEXT_COLUMNS = ("sentence", "text", "transcription", "transcript", "normalized_text")
"""Text columns tried in order when a hub dataset's is not named."""

MAX_WHISPER_SECONDS = 30.0
"""Whisper sees 30 s windows: longer clips would be cut while their transcript is not."""

AudioRef = Union[AudioSource, Callable[[], AudioSource]]
"""A path, encoded bytes, or a function returning either (hub rows are read only when needed)."""

SpeechSource = Union[str, Path]
"""A Common Voice release folder (one language) or a hub dataset id."""


@dataclass(frozen=True)
class SpeechRow:
    audio: AudioRef
    text: str
    name: str


# -------------------------------------------------------------------------------------------- Common Voice folder
def read_tsv(path: Union[str, Path]) -> list[dict[str, str]]:
    """Rows of a Common Voice TSV as dicts. Quoting is off: a sentence like ``He said "no".`` stays intact."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [{k: v or "" for k, v in row.items() if k is not None} for row in reader]


def find_clip(folder: Path, name: str) -> Path:
    """The clip file for a TSV ``path`` value: under ``clips/`` (or the folder itself), with the given extension or,
    for clips converted after download or old releases' extensionless names, any of :data:`AUDIO_EXTENSIONS`.
    A clip found nowhere returns its expected path, which the loader then counts as missing."""
    expected = folder / "clips" / name
    for base in (folder / "clips", folder):
        candidate = base / name
        if candidate.is_file():
            return candidate
        for ext in AUDIO_EXTENSIONS:
            other = (
                candidate.with_suffix(ext)
                if candidate.suffix.lower() in AUDIO_EXTENSIONS
                else Path(f"{candidate}{ext}")
            )
            if other.is_file():
                return other
    return expected


def common_voice_rows(
    folder: Union[str, Path], split: str = "train", max_examples: Optional[int] = None
) -> list[SpeechRow]:
    """The rows of one split of a release folder (e.g. ``cv-corpus-17.0/mr``), in file order."""
    root = Path(folder).expanduser()
    tsv = root / CV_SPLIT_FILES.get(split, f"{split}.tsv")
    if not tsv.is_file():
        raise FileNotFoundError(
            f"{tsv} not found: a Common Voice folder holds train.tsv, dev.tsv, test.tsv and clips/ (one language "
            f"of a release, e.g. cv-corpus-17.0-2024-03-15/mr)"
        )
    table = read_tsv(tsv)
    if table and not {"path", "sentence"} <= set(table[0]):
        raise ValueError(f"{tsv} has no 'path' and 'sentence' columns (has {sorted(table[0])})")
    rows = [SpeechRow(find_clip(root, r["path"]), r["sentence"].strip(), r["path"]) for r in table if r.get("path")]
    return rows[:max_examples] if max_examples is not None else rows


def common_voice_locale(folder: Union[str, Path], split: str = "train") -> Optional[str]:
    """The ``locale`` column of a split (e.g. ``mr``), else the folder's name if it looks like a locale."""
    tsv = Path(folder).expanduser() / CV_SPLIT_FILES.get(split, f"{split}.tsv")
    if tsv.is_file():
        for row in read_tsv(tsv):
            if row.get("locale"):
                return row["locale"]
    name = Path(folder).name
    return name if re.fullmatch(r"[a-z]{2,3}(-[A-Za-z]{2,})?", name) else None


# ---------------------------------------------------------------------------------------------------- hub dataset
def _encoded(value: Any, name: str) -> AudioSource:
    """A hub cell's encoded audio (``Audio(decode=False)``): its bytes, or its file once extracted to disk."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and Path(value["path"]).is_file():
            return value["path"]
    raise ClipError("missing", f"{name} has no audio bytes or local file")


def _hub_audio(dataset: Any, column: str, index: int) -> AudioSource:
    return _encoded(dataset[index][column], f"row {index}")


def _pick_columns(dataset: Any, audio_column: Optional[str], text_column: Optional[str]) -> tuple[str, str]:
    features = getattr(dataset, "features", None) or {}
    names = list(getattr(dataset, "column_names", None) or features)
    if audio_column is None:
        typed = [n for n, f in features.items() if type(f).__name__ == "Audio"]
        audio_column = typed[0] if typed else "audio"
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMNS if c in names), "sentence")
    if names and (audio_column not in names or text_column not in names):
        raise ValueError(f"need audio column {audio_column!r} and text column {text_column!r}; dataset has {names}")
    return audio_column, text_column


def hub_speech_rows(
    dataset_id: str,
    split: str = "train",
    config: Optional[str] = None,
    audio_column: Optional[str] = None,
    text_column: Optional[str] = None,
    streaming: bool = False,
    max_examples: Optional[int] = None,
    **load_kwargs: Any,
) -> list[SpeechRow]:
    """Rows of a hub dataset with audio and text columns. Audio is kept encoded; a non-streamed dataset is read
    row by row when needed, a streamed one is held in memory up to ``max_examples`` rows."""
    hint = (
        "a Common Voice release folder with train.tsv, dev.tsv, test.tsv and clips/ (make's DATA=path/to/cv-corpus/mr)"
    )
    what = "speech"
    split = HUB_SPLIT_NAMES.get(split, split)
    ds = load_hub_dataset(dataset_id, what, hint, name=config, split=split, streaming=streaming, **load_kwargs)
    audio_column, text_column = _pick_columns(ds, audio_column, text_column)
    ds = ds.cast_column(audio_column, import_datasets().Audio(decode=False))
    if streaming:
        rows = []
        for k, row in enumerate(guarded_iter(iter(ds), dataset_id, what, hint)):
            if max_examples is not None and k >= max_examples:
                break
            audio = functools.partial(_encoded, row[audio_column], f"row {k}")
            rows.append(SpeechRow(audio, str(row[text_column] or "").strip(), f"row {k}"))
        return rows
    n = len(ds) if max_examples is None else min(max_examples, len(ds))
    texts = list(ds.select(range(n))[text_column]) if n else []
    return [
        SpeechRow(functools.partial(_hub_audio, ds, audio_column, k), str(t or "").strip(), f"row {k}")
        for k, t in enumerate(texts)
    ]


def speech_rows(
    source: SpeechSource, split: str = "train", max_examples: Optional[int] = None, **hub: Any
) -> list[SpeechRow]:
    """A release folder's or a hub dataset's (``owner/name``) rows; a missing folder raises FileNotFoundError."""
    if is_local_folder(source, "speech"):
        return common_voice_rows(source, split, max_examples)
    return hub_speech_rows(str(source), split, max_examples=max_examples, **hub)


# ------------------------------------------------------------------------------------------------------ dataset
def whisper_language(language: str) -> str:
    """A Whisper language code for a Common Voice locale or a language name: ``mr``, ``zh-CN`` -> ``zh``,
    ``marathi`` -> ``mr``. Raises ValueError for languages Whisper was not trained on."""

    key = language.strip().lower().replace("_", "-")
    for candidate in (key, key.split("-")[0]):
        if candidate in LANGUAGES:
            return candidate
        if candidate in TO_LANGUAGE_CODE:
            return TO_LANGUAGE_CODE[candidate]
    raise ValueError(f"Whisper has no language {language!r}; pass one of its codes (e.g. 'mr', 'hi', 'en')")


def is_english_only(model: Any) -> bool:
    """Whether ``model`` is one of Whisper's English-only checkpoints (``tiny.en``...), whose prompt has no language
    or task token (``<|startoftranscript|><|notimestamps|>``) and whose ``generate`` refuses ``language=``."""
    return getattr(getattr(model, "generation_config", None), "is_multilingual", None) is False


def _encode_labels(
    tokenizer: Any, texts: Sequence[str], language: Optional[str], task: Optional[str]
) -> list[list[int]]:
    """Token ids with Whisper's prefix (``<|startoftranscript|><|xx|><|task|><|notimestamps|>``) and EOS, set the
    transformers way; the tokenizer's previous prefix is restored, so datasets of several languages can share it."""
    if not hasattr(tokenizer, "set_prefix_tokens"):
        raise TypeError(f"need a Whisper tokenizer (with set_prefix_tokens), got {type(tokenizer).__name__}")
    before = (tokenizer.language, tokenizer.task)
    tokenizer.set_prefix_tokens(language=language, task=task)
    try:
        return [list(ids) for ids in tokenizer(list(texts)).input_ids] if texts else []
    finally:
        tokenizer.language, tokenizer.task = before
        tokenizer.set_prefix_tokens()


class WhisperSpeechDataset(Dataset):
    """Log-mel features and prefixed labels for one language, skipping unusable clips.

    Rows without text or with labels over ``max_label_tokens`` are dropped at once; clips are checked from their
    headers (``probe``) or fully decoded (``preload``, exact but holds all audio in memory). A clip that passes the
    check but fails to decode later is counted then, and the next usable row is returned in its place.
    Items: ``input_features`` (mel bins x 3000 frames), ``labels``, ``language`` and ``adapter_name``.
    """

    def __init__(
        self,
        rows: Sequence[SpeechRow],
        feature_extractor: Any,
        tokenizer: Any,
        language: str,
        task: str = "transcribe",
        adapter_name: Optional[str] = None,
        max_seconds: float = MAX_WHISPER_SECONDS,
        max_label_tokens: int = 448,
        preload: bool = False,
        probe: bool = True,
        stats: Optional[ClipStats] = None,
        language_tokens: bool = True,
    ) -> None:
        self.feature_extractor = feature_extractor
        self.language = whisper_language(language)
        self.adapter_name = adapter_name or language
        self.sampling_rate = int(getattr(feature_extractor, "sampling_rate", TARGET_SAMPLING_RATE))
        self.stats = stats if stats is not None else ClipStats(name=f"speech {language}")
        self.max_seconds = max_seconds
        with_text = []
        for row in rows:
            if row.text:
                with_text.append(row)
            else:
                self.stats.skip("no_text", row.name)
        prompt = (self.language, task) if language_tokens else (None, None)  # English-only models: neither
        labels = _encode_labels(tokenizer, [r.text for r in with_text], *prompt)
        self.rows: list[SpeechRow] = []
        self.labels: list[list[int]] = []
        self.audio: list[Optional[np.ndarray]] = []
        for row, ids in zip(with_text, labels):
            if len(ids) - 1 > max_label_tokens:  # the start token is not part of the decoder's labels
                self.stats.skip("text_too_long", row.name)
                continue
            try:
                audio = self._decode(row) if preload else None
                if not preload and probe:
                    self._check_duration(probe_audio(_resolve(row.audio)), row)
            except ClipError as err:
                self.stats.skip(err.reason, row.name)
                continue
            self.rows.append(row)
            self.labels.append(ids)
            self.audio.append(audio)
        self.stats.loaded += len(self.rows)
        self._bad: set[int] = set()
        if not self.rows:
            raise ValueError(f"no usable clip: {self.stats}")

    def _check_duration(self, seconds: float, row: SpeechRow) -> None:
        if seconds > self.max_seconds:
            raise ClipError("too_long", f"{row.name}: {seconds:.1f} s > {self.max_seconds:.0f} s")

    def _decode(self, row: SpeechRow) -> np.ndarray:
        audio = load_clip(_resolve(row.audio), self.sampling_rate)
        self._check_duration(len(audio) / self.sampling_rate, row)
        return audio

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.rows)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            audio = self.audio[i]
            if audio is None:
                try:
                    audio = self._decode(self.rows[i])
                except ClipError as err:  # passed the header check, failed to decode
                    self._bad.add(i)
                    self.stats.loaded -= 1
                    self.stats.skip(err.reason, self.rows[i].name)
                    continue
            features = self.feature_extractor(audio, sampling_rate=self.sampling_rate, return_tensors="np")
            return {
                "input_features": torch.from_numpy(np.asarray(features["input_features"][0], dtype=np.float32)),
                "labels": torch.tensor(self.labels[i], dtype=torch.long),
                "language": self.language,
                "adapter_name": self.adapter_name,
            }
        raise RuntimeError(f"no clip could be decoded: {self.stats}")


def _resolve(ref: AudioRef) -> AudioSource:
    return ref() if callable(ref) else ref


@dataclass
class WhisperSeq2SeqCollator:
    """Batches for ``Seq2SeqTrainer``: features stacked (padded through ``feature_extractor`` if lengths differ),
    labels padded with -100, and the start token dropped when every row has it, because the model prepends
    ``decoder_start_token_id`` itself when it shifts labels into decoder inputs. Each row's adapter is listed under
    ``adapter_key`` (None drops it); with HF Trainer set ``remove_unused_columns=False``."""

    decoder_start_token_id: Optional[int] = None
    feature_extractor: Any = None
    adapter_key: Optional[str] = "adapter_names"
    label_pad_id: int = -100

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        inputs = [torch.as_tensor(f["input_features"]) for f in features]
        if len({tuple(x.shape) for x in inputs}) == 1:
            input_features = torch.stack(inputs)
        elif self.feature_extractor is not None:
            padded = self.feature_extractor.pad({"input_features": [x.numpy() for x in inputs]}, return_tensors="pt")
            input_features = padded["input_features"]
        else:
            raise ValueError("input features differ in length; pass feature_extractor to pad them")
        labels = [torch.as_tensor(f["labels"], dtype=torch.long) for f in features]
        width = max(len(x) for x in labels)
        batch_labels = torch.full((len(labels), width), self.label_pad_id, dtype=torch.long)
        for row, ids in zip(batch_labels, labels):
            row[: len(ids)] = ids
        start = self.decoder_start_token_id
        if start is not None and width > 0 and bool((batch_labels[:, 0] == start).all()):
            batch_labels = batch_labels[:, 1:]
        batch: dict[str, Any] = {"input_features": input_features, "labels": batch_labels}
        if self.adapter_key:
            batch[self.adapter_key] = [f["adapter_name"] for f in features]
        return batch


# ------------------------------------------------------------------------------------------------------ builders
def build_speech_dataset(
    source: SpeechSource,
    feature_extractor: Any,
    tokenizer: Any,
    split: str = "train",
    language: Optional[str] = None,
    task: str = "transcribe",
    max_examples: Optional[int] = None,
    adapter_name: Optional[str] = None,
    preload: bool = False,
    **options: Any,
) -> WhisperSpeechDataset:
    """One language's split from a Common Voice folder (language from its ``locale`` column unless given) or a
    hub dataset (``options``: config, audio_column, text_column, streaming; other options go to the dataset)."""
    hub_keys = {"config", "audio_column", "text_column", "streaming"}
    hub = {k: options.pop(k) for k in list(options) if k in hub_keys}
    rows = speech_rows(source, split, max_examples, **hub)
    if language is None:
        language = common_voice_locale(source, split) if is_local_folder(source, "speech") else None
        if language is None:
            raise ValueError(f"cannot tell the language of {source}; pass language=")
    stats = ClipStats(name=f"speech {language}/{split}")
    return WhisperSpeechDataset(
        rows, feature_extractor, tokenizer, language, task, adapter_name, preload=preload, stats=stats, **options
    )


class MixedSpeechDataset(ConcatDataset):
    """Several languages' datasets as one, each example keeping its own language prefix and adapter name."""

    def __init__(self, parts: Mapping[str, WhisperSpeechDataset]) -> None:
        super().__init__(list(parts.values()))
        self.parts = dict(parts)

    @property
    def stats(self) -> dict[str, ClipStats]:
        return {lang: part.stats for lang, part in self.parts.items()}

    def summary(self) -> str:
        return "\n".join(str(s) for s in self.stats.values())


def build_mixed_speech_dataset(
    sources: Mapping[str, SpeechSource],
    feature_extractor: Any,
    tokenizer: Any,
    split: str = "train",
    **kwargs: Any,
) -> MixedSpeechDataset:
    """``{language: folder or hub id}`` to one dataset for a run with one adapter per spoken language."""
    if not sources:
        raise ValueError("no language given")
    return MixedSpeechDataset(
        {
            lang: build_speech_dataset(src, feature_extractor, tokenizer, split, language=lang, **kwargs)
            for lang, src in sources.items()
        }
    )
