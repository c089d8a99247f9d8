"""A tiny Whisper pretrained in a few minutes on espeak-ng speech, and that speech as Common Voice folders.

Adapters are meant for a *pretrained* model: on a random Whisper they have nothing to adapt. Development machines
cannot download ``openai/whisper-*``, so the offline speech recipe and ``make reproduce-small`` pretrain a small one
on synthetic speech in several languages (as Whisper was pretrained multilingually), then fine-tune adapters per
language on other synthetic speech, and test on real sentences neither stage heard. With only a few dozen real
sentences per language, both training stages read random word sequences over those sentences' words, so what is
tested is recognising known words in new sentences. A 6-second window (instead of Whisper's 30) keeps the encoder cheap on a CPU; the feature extractor is
saved with it, so every later pipeline cuts features to the same length. Both model and data are cached on disk,
keyed by everything that determines them.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch.utils.data import DataLoader
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer, set_seed

from trainers.data.cached import CachedItems
from trainers.data.speech import WhisperSeq2SeqCollator, build_mixed_speech_dataset

from .model_cache import cache_root, fingerprint, read_build_info, save_build, staged_folder
from .step_loop import epochs, run_steps
from .synth_speech import SENTENCES, make_common_voice_folder, sentence_language
from .tiny_whisper import build_tiny_whisper_tokenizer, tiny_whisper_config, tiny_whisper_generation_config

SYNTH_VERSION = 2
"""Bump when the synthetic folders' layout changes, so caches are rebuilt."""


@dataclass(frozen=True)
class SyntheticSpeechSpec:
    """What determines a synthetic Common Voice folder (besides the language).

    dev and test hold real sentences (:data:`SENTENCES`); train holds the remaining real sentences and
    ``train_sentences`` new ones drawn from the same words, so a model can learn words it is later tested on in
    sentences it never heard."""

    dev_size: int = 4
    test_size: int = 8
    train_sentences: int = 100
    train_repeats: int = 1
    seed: int = 0


@dataclass(frozen=True)
class TinyWhisperSpec:
    """Everything that determines the cached model; changing any field rebuilds it."""

    languages: tuple[str, ...] = ("en", "de", "hi", "mr")
    d_model: int = 96
    encoder_layers: int = 2
    decoder_layers: int = 2
    attention_heads: int = 4
    ffn_dim: int = 384
    vocab_size: int = 512
    chunk_seconds: int = 6
    pretrain_sentences: int = 120
    pretrain_steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 30
    max_label_tokens: int = 64
    seed: int = 0


@dataclass
class TinyWhisperBuild:
    model: WhisperForConditionalGeneration
    tokenizer: WhisperTokenizer
    feature_extractor: WhisperFeatureExtractor
    folder: Path
    info: dict
    from_cache: bool = False


# ----------------------------------------------------------------------------------------------------- data
_PUNCTUATION = ".,?!\"'।:;"


def pseudo_sentences(language: str, count: int, seed: int, min_words: int = 3, max_words: int = 6) -> list[str]:
    """``count`` distinct sentences of random words from ``language``'s real sentences (seeded). Meaningless, but
    they teach a tiny model the words (sounds and spellings) without the exact sentences it is tested on."""
    source = SENTENCES.get(sentence_language(language), ())
    words = sorted({w.strip(_PUNCTUATION) for s in source for w in s.split()} - {""})
    if not words:
        raise ValueError(f"no sentences for language {language!r}")
    rng = random.Random(f"pseudo:{language}:{seed}")
    real = set(source)
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(count * 20):
        if len(out) >= count:
            break
        text = " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))) + "."
        if text not in seen and text not in real:
            seen.add(text)
            out.append(text)
    return out


def _append_train_rows(folder: Path, extra: Path, prefix: str) -> int:
    """Move ``extra``'s train clips into ``folder`` (renamed with ``prefix``) and append their rows to its
    train.tsv; returns the number of rows added."""
    header, *rows = (extra / "train.tsv").read_text(encoding="utf-8").splitlines()
    columns = header.split("\t")
    path_col = columns.index("path")
    lines = []
    for row in rows:
        cells = row.split("\t")
        name = f"{prefix}{cells[path_col]}"
        os.replace(extra / "clips" / cells[path_col], folder / "clips" / name)
        cells[path_col] = name
        lines.append("\t".join(cells))
    with open(folder / "train.tsv", "a", encoding="utf-8") as fh:
        fh.write("".join(f"{line}\n" for line in lines))
    return len(lines)


def synthetic_speech_folder(
    language: str, spec: Optional[SyntheticSpeechSpec] = None, root: Union[str, Path, None] = None
) -> Path:
    """A Common Voice-shaped folder of espeak-ng speech in ``language`` (train/dev/test.tsv, clips/), cached."""
    spec = spec or SyntheticSpeechSpec()
    base = Path(root) if root is not None else cache_root() / "synth-speech"
    folder = base / f"{language}-{fingerprint(SYNTH_VERSION, asdict(spec))}"
    if (folder / "test.tsv").is_file():
        return folder
    with staged_folder(folder) as staging:
        make_common_voice_folder(
            staging,
            language,
            dev_size=spec.dev_size,
            test_size=spec.test_size,
            train_repeats=spec.train_repeats,
            seed=spec.seed,
        )
        if spec.train_sentences:
            extra = folder.with_name(f".{folder.name}.extra-{os.getpid()}")
            shutil.rmtree(extra, ignore_errors=True)
            sentences = pseudo_sentences(language, spec.train_sentences, spec.seed + 1)
            make_common_voice_folder(extra, language, sentences, dev_size=0, test_size=0, seed=spec.seed + 1)
            _append_train_rows(staging, extra, "x")
            shutil.rmtree(extra, ignore_errors=True)
    return folder


def pretraining_speech_folder(language: str, sentences: int, seed: int, root: Union[str, Path, None] = None) -> Path:
    """Speech the tiny Whisper is pretrained on: only pseudo-sentences (another seed than the fine-tuning ones), so
    neither the fine-tuning data nor the real dev/test sentences are seen in pretraining."""
    base = Path(root) if root is not None else cache_root() / "synth-speech"
    folder = base / f"pretrain-{language}-{fingerprint(SYNTH_VERSION, sentences, seed)}"
    if (folder / "train.tsv").is_file():
        return folder
    with staged_folder(folder) as staging:
        texts = pseudo_sentences(language, sentences, seed + 2)
        make_common_voice_folder(staging, language, texts, dev_size=0, test_size=0, seed=seed + 2)
    return folder


# ---------------------------------------------------------------------------------------------------- model
def make_tiny_whisper(
    spec: TinyWhisperSpec,
) -> tuple[WhisperForConditionalGeneration, WhisperTokenizer, WhisperFeatureExtractor]:
    """A random tiny Whisper whose encoder takes ``chunk_seconds`` windows (100 frames per second, stride 2)."""
    tokenizer = build_tiny_whisper_tokenizer(vocab_size=spec.vocab_size)
    config = tiny_whisper_config(
        tokenizer,
        d_model=spec.d_model,
        encoder_layers=spec.encoder_layers,
        decoder_layers=spec.decoder_layers,
        attention_heads=spec.attention_heads,
        ffn_dim=spec.ffn_dim,
    )
    config.max_source_positions = spec.chunk_seconds * 50
    config.dropout = 0.0
    torch.manual_seed(spec.seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = tiny_whisper_generation_config(tokenizer, config)
    model.generation_config.max_length = spec.max_label_tokens + 8
    features = WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=spec.chunk_seconds)
    return model, tokenizer, features


def pretrain_tiny_whisper(
    model: WhisperForConditionalGeneration,
    tokenizer: WhisperTokenizer,
    features: WhisperFeatureExtractor,
    folders: dict[str, Path],
    spec: TinyWhisperSpec,
    progress: bool = True,
) -> list[float]:
    """Full-model AdamW on every language's train split, batches shuffled across languages."""
    data = build_mixed_speech_dataset(
        folders,
        features,
        tokenizer,
        "train",
        preload=True,
        max_seconds=float(spec.chunk_seconds),
        max_label_tokens=spec.max_label_tokens,
    )
    data = CachedItems(data)  # features computed once, not once per epoch
    collate = WhisperSeq2SeqCollator(model.config.decoder_start_token_id, features, adapter_key=None)
    generator = torch.Generator().manual_seed(spec.seed)
    loader = DataLoader(data, batch_size=spec.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    batches = epochs(loader)

    def step_loss(step: int) -> torch.Tensor:
        batch = next(batches)
        return model(input_features=batch["input_features"], labels=batch["labels"]).loss

    return run_steps(
        model, optimizer, step_loss, spec.pretrain_steps, spec.warmup_steps, "pretrain tiny Whisper", progress, 1.0
    )


def default_model_dir(spec: TinyWhisperSpec) -> Path:
    return cache_root() / f"tiny-whisper-{fingerprint(asdict(spec), SYNTH_VERSION)}"


def load_or_build_tiny_whisper(
    cache_dir: Union[str, Path, None] = None,
    spec: Optional[TinyWhisperSpec] = None,
    rebuild: bool = False,
    progress: bool = True,
) -> TinyWhisperBuild:
    """The cached tiny Whisper for this spec, else one built (synthetic speech, pretraining) and cached. The model
    folder loads like a hub checkpoint (``WhisperForConditionalGeneration.from_pretrained``)."""
    spec = spec or TinyWhisperSpec()
    folder = Path(cache_dir) if cache_dir is not None else default_model_dir(spec)
    cached = None if rebuild else read_build_info(folder)
    if cached is not None:
        model = WhisperForConditionalGeneration.from_pretrained(folder)
        tokenizer = WhisperTokenizer.from_pretrained(folder)
        features = WhisperFeatureExtractor.from_pretrained(folder)
        model.eval()
        return TinyWhisperBuild(model, tokenizer, features, folder, cached, True)
    if progress:
        print(
            f"building the tiny Whisper once, into {folder}: synthetic speech, then {spec.pretrain_steps} pretraining "
            "steps (minutes on a CPU); later runs load it in seconds",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    set_seed(spec.seed)
    random.seed(spec.seed)
    folders = {lang: pretraining_speech_folder(lang, spec.pretrain_sentences, spec.seed) for lang in spec.languages}
    model, tokenizer, features = make_tiny_whisper(spec)
    losses = pretrain_tiny_whisper(model, tokenizer, features, folders, spec, progress)
    info = {
        "spec": asdict(spec),
        "data": {lang: str(path) for lang, path in folders.items()},
        "pretrain_loss": [round(x, 4) for x in losses],
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    save_build(folder, [model, tokenizer, features], info)  # the parts now name the folder as their source
    return TinyWhisperBuild(model, tokenizer, features, folder, info, False)
