"""Per-programming-language code datasets for causal-LM fine-tuning, packed into fixed-length blocks.

The paper fine-tunes StarCoder on one language of The Stack at a time, or on several at once with one adapter per
language. Text comes either from The Stack's per-language folder, streamed through ``datasets`` (no multi-terabyte
download), or from a local folder of source files (offline machines, tests, the demo). Documents are split into
train and eval by a seeded hash of their content, so a document lands on the same side whatever the caps or the
streaming order, and no block mixes a train and an eval document. Every example carries its language, so a
collator can route it to that language's adapter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from .code_corpus import folder_files, pack_blocks, read_source
from .hub import guarded_iter, is_local_folder, load_hub_dataset

DEFAULT_STACK = "bigcode/the-stack-dedup"
"""The paper's corpus; ``bigcode/the-stack`` (not deduplicated) has the same layout."""

DEFAULT_MAX_FILE_BYTES = 100_000
"""Longer files are cut at a line end: a few huge generated files would otherwise crowd out the rest."""

DEFAULT_STREAM_MAX_BYTES = 256 * 2**20
"""Read at most this much per language from a hub stream when no cap is given (one language is up to ~100 GB)."""

STACK_ALIASES = {
    "py": "python",
    "pl": "perl",
    "rb": "ruby",
    "rkt": "racket",
    "jl": "julia",
    "sh": "shell",
    "bash": "shell",
    "cpp": "c++",
    "cxx": "c++",
    "cs": "c-sharp",
    "csharp": "c-sharp",
    "js": "javascript",
    "ts": "typescript",
    "rs": "rust",
    "golang": "go",
    "ml": "ocaml",
}
"""MultiPL-E's short names (and common ones) to The Stack's folder names under ``data/``."""

CodeSource = Union[str, Path, None]
"""A local folder, a hub dataset id, or None for :data:`DEFAULT_STACK`."""


@dataclass
class CodeSourceStats:
    """What one language's source yielded; the trainer prints it so a tiny or empty split is never a surprise."""

    language: str
    source: str
    docs: int = 0
    bytes: int = 0
    skipped: int = 0  # binary, non-UTF-8 or empty files
    train_docs: int = 0
    eval_docs: int = 0
    train_blocks: int = 0
    eval_blocks: int = 0

    def __str__(self) -> str:
        return (
            f"{self.language} ({self.source}): {self.docs} documents, {self.bytes:,} bytes, {self.skipped} skipped; "
            f"train {self.train_docs} docs -> {self.train_blocks} blocks, eval {self.eval_docs} docs -> "
            f"{self.eval_blocks} blocks"
        )


# ------------------------------------------------------------------------------------------------------ sources
def stack_data_dir(language: str) -> str:
    """The Stack's ``data_dir`` for a language: ``perl`` and MultiPL-E's ``pl`` both give ``data/perl``."""
    name = language.strip().lower()
    return f"data/{STACK_ALIASES.get(name, name)}"


def _clip(text: str, max_bytes: int) -> str:
    """``text`` cut at a line end within ``max_bytes`` (as :func:`code_corpus.read_source` does for files)."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    cut = raw.rfind(b"\n", 0, max_bytes)
    return raw[: cut + 1 if cut > 0 else max_bytes].decode("utf-8", errors="ignore")


def _capped(
    texts: Iterable[Optional[str]], stats: CodeSourceStats, max_examples: Optional[int], max_bytes: Optional[int]
) -> Iterator[str]:
    """Non-empty texts until either cap is reached; None and empty texts are counted as skipped."""
    for text in texts:
        if max_examples is not None and stats.docs >= max_examples:
            return
        if max_bytes is not None and stats.bytes >= max_bytes:
            return
        if not text or not text.strip():
            stats.skipped += 1
            continue
        stats.docs += 1
        stats.bytes += len(text.encode("utf-8"))
        yield text


def folder_texts(
    folder: Union[str, Path],
    stats: CodeSourceStats,
    extensions: Optional[Sequence[str]] = None,
    max_examples: Optional[int] = None,
    max_bytes: Optional[int] = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Iterator[str]:
    """The text files under ``folder`` in sorted order (hidden folders and binaries dropped, as in the demo)."""
    paths = folder_files(Path(folder))
    if extensions is not None:
        wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        paths = [p for p in paths if p.suffix.lower() in wanted]
    yield from _capped((read_source(p, max_file_bytes) for p in paths), stats, max_examples, max_bytes)


def stack_texts(
    language: str,
    stats: CodeSourceStats,
    dataset: str = DEFAULT_STACK,
    split: str = "train",
    text_column: str = "content",
    max_examples: Optional[int] = None,
    max_bytes: Optional[int] = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    **load_kwargs: Any,
) -> Iterator[str]:
    """One language of The Stack (or a dataset with its layout), streamed; without caps, the first
    :data:`DEFAULT_STREAM_MAX_BYTES` bytes."""
    if max_examples is None and max_bytes is None:
        max_bytes = DEFAULT_STREAM_MAX_BYTES
    hint = f"a folder of {language} source files (make's DATA=path/to/{language}-sources)"
    what = f"{language} code"
    load_kwargs.setdefault("data_dir", stack_data_dir(language))
    rows = load_hub_dataset(dataset, what, hint, split=split, streaming=True, **load_kwargs)
    texts = (
        _clip(row[text_column], max_file_bytes) if row.get(text_column) else None
        for row in guarded_iter(iter(rows), dataset, what, hint)
    )
    yield from _capped(texts, stats, max_examples, max_bytes)


def is_local_source(source: CodeSource) -> bool:
    """None and ``owner/name`` are hub datasets, an existing folder is local, anything else a mistyped folder."""
    return source is not None and is_local_folder(source, "source")


def code_texts(
    language: str,
    source: CodeSource,
    stats: CodeSourceStats,
    extensions: Optional[Sequence[str]] = None,
    max_examples: Optional[int] = None,
    max_bytes: Optional[int] = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Iterator[str]:
    """Documents of ``language`` from a local folder or a hub dataset id (None: The Stack)."""
    if is_local_source(source):
        return folder_texts(Path(source), stats, extensions, max_examples, max_bytes, max_file_bytes)  # type: ignore[arg-type]
    dataset = str(source or DEFAULT_STACK)
    return stack_texts(
        language, stats, dataset, max_examples=max_examples, max_bytes=max_bytes, max_file_bytes=max_file_bytes
    )


# -------------------------------------------------------------------------------------------------------- split
def _doc_rank(text: str, seed: int) -> float:
    """A number in [0, 1) fixed by the content and the seed: the document's side never depends on read order."""
    digest = hashlib.sha256(f"{seed}\0".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(texts: Sequence[str], eval_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, eval) by content hash, in read order. With few documents the hash may put none on one side; then
    the lowest-ranked document goes to eval (or the highest to train), so both sides are non-empty."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    ranks = [_doc_rank(t, seed) for t in texts]
    is_eval = [r < eval_fraction for r in ranks]
    if eval_fraction > 0 and len(texts) >= 2:
        if not any(is_eval):
            is_eval[min(range(len(texts)), key=ranks.__getitem__)] = True
        elif all(is_eval):
            is_eval[max(range(len(texts)), key=ranks.__getitem__)] = False
    train = [t for t, e in zip(texts, is_eval) if not e]
    held = [t for t, e in zip(texts, is_eval) if e]
    return train, held


# ----------------------------------------------------------------------------------------------------- packing
def token_ids(tokenizer: Any, texts: Sequence[str], chunk: int = 256) -> Iterator[list[int]]:
    """Token ids per text without special tokens; through the fast backend when there is one, which skips
    transformers' per-call checks (and its max-length warning for whole files)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    for start in range(0, len(texts), chunk):
        part = list(texts[start : start + chunk])
        if backend is not None:
            yield from (e.ids for e in backend.encode_batch(part, add_special_tokens=False))
        else:
            yield from tokenizer(part, add_special_tokens=False)["input_ids"]


def pack_texts(tokenizer: Any, texts: Sequence[str], block_size: int) -> torch.Tensor:
    """``(n, block_size)`` rows of the concatenated texts, each followed by EOS (:func:`code_corpus.pack_blocks`)."""
    return pack_blocks(token_ids(tokenizer, texts), block_size, getattr(tokenizer, "eos_token_id", None))


class PackedCodeDataset(Dataset):
    """Fixed-length blocks for HF Trainer: every position is a real token (mask all ones, labels = inputs, the
    model shifts them), and each row names its language and the adapter it trains."""

    def __init__(
        self, blocks: torch.Tensor, languages: Sequence[str], adapter_names: Optional[Sequence[str]] = None
    ) -> None:
        if blocks.dim() != 2 or len(languages) != len(blocks):
            raise ValueError(
                f"need a 2-d block tensor and one language per row, got {tuple(blocks.shape)} and {len(languages)}"
            )
        self.blocks = blocks
        self.languages = list(languages)
        self.adapter_names = list(adapter_names) if adapter_names is not None else list(self.languages)

    @classmethod
    def single(cls, blocks: torch.Tensor, language: str, adapter_name: Optional[str] = None) -> PackedCodeDataset:
        return cls(blocks, [language] * len(blocks), [adapter_name or language] * len(blocks))

    @classmethod
    def concat(cls, parts: Sequence[PackedCodeDataset], block_size: int) -> PackedCodeDataset:
        blocks = [p.blocks for p in parts if len(p)]
        return cls(
            torch.cat(blocks) if blocks else torch.empty(0, block_size, dtype=torch.long),
            [lang for p in parts for lang in p.languages],
            [name for p in parts for name in p.adapter_names],
        )

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = self.blocks[i]
        return {
            "input_ids": ids,
            "labels": ids.clone(),
            "attention_mask": torch.ones_like(ids),
            "language": self.languages[i],
            "adapter_name": self.adapter_names[i],
        }

    def language_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for lang in self.languages:
            counts[lang] = counts.get(lang, 0) + 1
        return counts


@dataclass
class CodeSplits:
    """Train and eval datasets with per-language statistics."""

    train: PackedCodeDataset
    eval: PackedCodeDataset
    stats: dict[str, CodeSourceStats] = field(default_factory=dict)

    def summary(self) -> str:
        return "\n".join(str(s) for s in self.stats.values())


def build_code_dataset(
    language: str,
    tokenizer: Any,
    source: CodeSource = None,
    block_size: int = 1024,
    eval_fraction: float = 0.05,
    seed: int = 0,
    max_examples: Optional[int] = None,
    max_bytes: Optional[int] = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    extensions: Optional[Sequence[str]] = None,
    adapter_name: Optional[str] = None,
) -> CodeSplits:
    """One language's documents (caps count documents and bytes read, before the split), split by document, then
    tokenized and packed. Raises ValueError when there is not even one training block."""
    stats = CodeSourceStats(language, str(source) if source is not None else DEFAULT_STACK)
    texts = list(code_texts(language, source, stats, extensions, max_examples, max_bytes, max_file_bytes))
    train_texts, eval_texts = split_documents(texts, eval_fraction, seed)
    train = PackedCodeDataset.single(pack_texts(tokenizer, train_texts, block_size), language, adapter_name)
    held = PackedCodeDataset.single(pack_texts(tokenizer, eval_texts, block_size), language, adapter_name)
    stats.train_docs, stats.eval_docs = len(train_texts), len(eval_texts)
    stats.train_blocks, stats.eval_blocks = len(train), len(held)
    if not len(train):
        raise ValueError(f"too little {language} text for one block of {block_size} tokens: {stats}")
    return CodeSplits(train, held, {language: stats})


def build_mixed_code_dataset(
    sources: Mapping[str, CodeSource],
    tokenizer: Any,
    block_size: int = 1024,
    eval_fraction: float = 0.05,
    seed: int = 0,
    balance: bool = False,
    adapter_names: Optional[Mapping[str, str]] = None,
    **caps: Any,
) -> CodeSplits:
    """Several languages in one dataset (``{language: folder, hub id or None}``), every row tagged with its
    language, so one run trains one adapter per language on mixed batches. ``balance`` cuts every language's train
    blocks to the smallest count, so each adapter sees as many examples; ``caps`` go to :func:`build_code_dataset`.
    """
    if not sources:
        raise ValueError("no language given")
    names = adapter_names or {}
    parts = {
        lang: build_code_dataset(
            lang, tokenizer, src, block_size, eval_fraction, seed, adapter_name=names.get(lang), **caps
        )
        for lang, src in sources.items()
    }
    if balance:
        n = min(len(p.train) for p in parts.values())
        for lang, p in parts.items():
            p.train = PackedCodeDataset(p.train.blocks[:n], p.train.languages[:n], p.train.adapter_names[:n])
            p.stats[lang].train_blocks = n
    return CodeSplits(
        PackedCodeDataset.concat([p.train for p in parts.values()], block_size),
        PackedCodeDataset.concat([p.eval for p in parts.values()], block_size),
        {lang: s for p in parts.values() for lang, s in p.stats.items()},
    )


@dataclass
class CodeCollator:
    """Stacks blocks and lists each row's adapter under ``adapter_key`` (the core's per-example routing keyword);
    ``adapter_key=None`` drops it for single-adapter runs. With HF Trainer set ``remove_unused_columns=False``, or
    the Trainer strips ``adapter_name`` before this collator sees it."""

    adapter_key: Optional[str] = "adapter_names"

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            key: torch.stack([f[key] for f in features]) for key in ("input_ids", "labels", "attention_mask")
        }
        if self.adapter_key:
            batch[self.adapter_key] = [f["adapter_name"] for f in features]
        return batch
