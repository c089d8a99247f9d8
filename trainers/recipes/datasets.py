"""A recipe's datasets: train and per-language eval splits plus the collator, for code or speech.

Sources come from :meth:`Recipe.data_sources`: the hub default (The Stack; the recipe's Common Voice dataset), a
local folder or hub id, or the tiny recipes' offline data (``builtin``: the demo's source-file corpus, on which the
tiny code model was pretrained with the same train/held-out split; ``synthetic``: espeak-ng speech). Multi-language
runs tag every row with its adapter, and the collator lists them under ``adapter_names`` so each example is routed
to its own language's adapter; single-language runs leave the key out (the one adapter is active).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch.utils.data import ConcatDataset, Dataset, Subset

from trainers.data.cached import CachedItems
from trainers.data.code import CodeCollator, PackedCodeDataset, build_code_dataset, pack_texts
from trainers.data.code_corpus import BUILTIN_FINDERS, find_code_corpus
from trainers.data.speech import WhisperSeq2SeqCollator, build_speech_dataset, is_english_only
from trainers.offline.tiny_whisper_model import SyntheticSpeechSpec, synthetic_speech_folder

from .base_models import LoadedBase
from .recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)


@dataclass
class RecipeData:
    train: Dataset
    eval: dict[str, Dataset]
    collator: Callable[[Any], dict[str, Any]]
    summary: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=8)
def builtin_code_data(languages: tuple[str, ...], seed: int = 0) -> Any:
    """The built-in finders' files for ``languages``, which may include ``shell`` (scripts in /usr/bin), a language
    the tiny model never saw. Each language's train/held-out split depends only on the language and the seed, so
    python, perl and c split exactly as in the model's pretraining corpus (held-out never seen)."""

    unknown = [lang for lang in languages if lang not in BUILTIN_FINDERS]
    if unknown:
        raise RecipeError(
            f"the built-in corpus has no {unknown} (it knows {sorted(BUILTIN_FINDERS)}); pass DATA=folder for them"
        )
    return find_code_corpus(languages=list(languages), max_languages=None, seed=seed)


def _cap(dataset: Dataset, limit: Optional[int]) -> Dataset:
    if limit is None or len(dataset) <= limit:
        return dataset
    return Subset(dataset, range(limit))


# ------------------------------------------------------------------------------------------------------- code
def _builtin_code_splits(recipe: Recipe, tokenizer: Any) -> tuple[dict[str, Any], dict[str, Any], list[str]]:

    corpus = builtin_code_data(tuple(recipe.languages), recipe.seed)
    missing = [lang for lang in recipe.languages if lang not in corpus]
    if missing:
        raise RecipeError(
            f"this machine has too little {missing} source text for the built-in corpus; pass DATA=folder"
        )
    train, held, summary = {}, {}, []
    for lang in recipe.languages:
        name = recipe.adapter_name(lang)
        lc = corpus[lang]
        train[lang] = PackedCodeDataset.single(pack_texts(tokenizer, lc.train_texts, recipe.block_size), lang, name)
        held[lang] = PackedCodeDataset.single(pack_texts(tokenizer, lc.heldout_texts, recipe.block_size), lang, name)
        summary.append(
            f"{lang} (built-in corpus): train {len(lc.train)} files -> {len(train[lang])} blocks, held-out "
            f"{len(lc.heldout)} files -> {len(held[lang])} blocks"
        )
    return train, held, summary


def _code_splits(recipe: Recipe, tokenizer: Any) -> tuple[dict[str, Any], dict[str, Any], list[str]]:

    train, held, summary = {}, {}, []
    for lang, source in recipe.data_sources().items():
        splits = build_code_dataset(
            lang,
            tokenizer,
            source,
            block_size=recipe.block_size,
            eval_fraction=recipe.eval_fraction,
            seed=recipe.seed,
            max_bytes=recipe.max_train_bytes,
            adapter_name=recipe.adapter_name(lang),
        )
        train[lang], held[lang] = splits.train, splits.eval
        summary.append(splits.summary())
    return train, held, summary


def build_code_data(recipe: Recipe, base: LoadedBase) -> RecipeData:

    sources = recipe.data_sources()
    if all(s == "builtin" for s in sources.values()):
        train, held, summary = _builtin_code_splits(recipe, base.tokenizer)
    else:
        train, held, summary = _code_splits(recipe, base.tokenizer)
    if recipe.balance_languages and len(train) > 1:
        n = min(len(d) for d in train.values())
        train = {
            lang: PackedCodeDataset(d.blocks[:n], d.languages[:n], d.adapter_names[:n]) for lang, d in train.items()
        }
        summary.append(f"balanced: {n} train blocks per language")
    empty = [lang for lang, d in held.items() if len(d) == 0]
    if empty:
        summary.append(f"no held-out blocks for {empty}: too little text (eval skipped for them)")
    merged = PackedCodeDataset.concat(list(train.values()), recipe.block_size)
    evals = {lang: _cap(d, recipe.max_eval_examples) for lang, d in held.items() if len(d)}
    collator = CodeCollator(adapter_key="adapter_names" if recipe.multi_adapter else None)
    return RecipeData(merged, evals, collator, summary)


# ----------------------------------------------------------------------------------------------------- speech
def speech_source(recipe: Recipe, language: str, source: Optional[str]) -> tuple[Any, dict[str, Any]]:
    """(source, hub options) for a language: the recipe's hub dataset, synthetic speech, a folder or a hub id."""
    if source == "synthetic":
        return synthetic_speech_folder(language, SyntheticSpeechSpec(seed=recipe.seed)), {}
    if source is None:
        if not recipe.hub_dataset:
            raise RecipeError("no speech data: pass DATA=path/to/cv-corpus/<locale> (a Common Voice folder)")
        config = recipe.hub_config.format(language=language) if recipe.hub_config else None
        return recipe.hub_dataset, {"config": config}
    return source, {}


def speech_split(
    recipe: Recipe, base: LoadedBase, language: str, source: Optional[str], split: str, limit: Optional[int] = None
) -> Any:
    """One language's split as a :class:`WhisperSpeechDataset` (unusable clips skipped and counted)."""

    where, hub = speech_source(recipe, language, source)
    seconds = float(getattr(base.feature_extractor, "chunk_length", 30))
    dataset = build_speech_dataset(
        where,
        base.feature_extractor,
        base.tokenizer,
        split,
        language=language,
        task=recipe.whisper_task,
        max_examples=limit,
        adapter_name=recipe.adapter_name(language),
        preload=recipe.scale == "tiny",
        max_seconds=seconds,
        max_label_tokens=recipe.max_label_tokens,
        language_tokens=not is_english_only(base.model),
        **hub,
    )
    return CachedItems(dataset) if recipe.scale == "tiny" else dataset


def build_speech_data(recipe: Recipe, base: LoadedBase) -> RecipeData:

    train, held, summary = {}, {}, []
    for lang, source in recipe.data_sources().items():
        train[lang] = speech_split(recipe, base, lang, source, recipe.train_split, recipe.max_train_examples)
        held[lang] = speech_split(recipe, base, lang, source, recipe.eval_split, recipe.max_eval_examples)
        summary += [str(train[lang].stats), str(held[lang].stats)]
    merged = ConcatDataset(list(train.values())) if len(train) > 1 else next(iter(train.values()))
    collator = WhisperSeq2SeqCollator(
        decoder_start_token_id=base.model.config.decoder_start_token_id,
        feature_extractor=base.feature_extractor,
        adapter_key="adapter_names" if recipe.multi_adapter else None,
    )
    return RecipeData(merged, held, collator, summary)


def fit_block_size(recipe: Recipe, model_config: Any) -> Recipe:
    """``recipe`` with its code blocks no longer than the model's positions (a smaller model than the recipe's)."""
    positions = getattr(model_config, "n_positions", None) or getattr(model_config, "max_position_embeddings", None)
    if recipe.task != "code" or not positions or recipe.block_size <= positions:
        return recipe
    logger.warning(
        "block_size %d is longer than the model's %d positions: packing %d-token blocks instead",
        recipe.block_size,
        positions,
        positions,
    )
    return dataclasses.replace(recipe, block_size=int(positions))


def build_data(recipe: Recipe, base: LoadedBase) -> RecipeData:
    """Train data (all languages), per-language eval data and the collator for ``recipe``."""
    return build_code_data(recipe, base) if recipe.task == "code" else build_speech_data(recipe, base)
