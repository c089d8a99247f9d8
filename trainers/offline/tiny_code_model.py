"""A tiny StarCoder-shaped code model, pretrained in minutes on local source files and cached on disk.

Development machines have no hub access, so demos, tests and the server demo need a foundation model they can make
themselves: a byte-level BPE tokenizer and a small ``GPTBigCodeForCausalLM`` (multi-query attention, as StarCoder)
trained on every language of the corpus. The cache is keyed by the model spec and the corpus split, so a model is
never evaluated on text it was trained on, and a second call loads in seconds.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers import trainers as bpe_trainers
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM, PreTrainedTokenizerFast, set_seed

from trainers.data.code_corpus import LanguageCorpus, corpus_fingerprint, find_code_corpus, pack_blocks

from .model_cache import cache_root, read_build_info, save_build
from .step_loop import run_steps

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
CACHE_NAME = "tiny-code-model"


FIRST_BUILD_COST = "about 4 minutes on 2 CPU cores, longer on slower ones"
"""What the one-time build costs (measured: 211 s on this project's 2-core CI machine; build_info.json records
each build's own time)."""


@dataclass(frozen=True)
class TinyCodeModelSpec:
    """Everything that determines the cached model; changing any field rebuilds it."""

    vocab_size: int = 4096
    n_layer: int = 3
    n_embd: int = 128
    n_head: int = 4
    block_size: int = 256
    pretrain_steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0


@dataclass
class CorpusInfo:
    """What the cached model was built from; ``from_cache`` tells callers (and tests) whether it was retrained."""

    languages: list[str]
    fingerprint: str
    stats: dict[str, dict[str, int]]
    spec: dict[str, Any]
    pretrain_loss: list[float] = field(default_factory=list)
    build_seconds: float = 0.0
    from_cache: bool = False


def default_cache_dir() -> Path:
    """``$FLORA_HF_CACHE/tiny-code-model``, else ``<repo>/.cache/flora-hf/tiny-code-model`` (gitignored)."""
    return cache_root() / CACHE_NAME


# ---------------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int, block_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE as StarCoder's: any byte sequence round-trips, so no file is ever unknown."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = bpe_trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",  # generation appends on the right
        model_max_length=block_size,
    )


def language_blocks(
    corpus: Mapping[str, LanguageCorpus], tokenizer: PreTrainedTokenizerFast, block_size: int, split: str = "train"
) -> dict[str, torch.Tensor]:
    """Each language's ``split`` tokenized and packed into ``(n, block_size)`` rows, files separated by EOS."""
    blocks = {}
    for lang, lc in corpus.items():
        texts = lc.train_texts if split == "train" else lc.heldout_texts
        # the backend tokenizer skips transformers' per-call checks (and its max-length warning for whole files)
        ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
        blocks[lang] = pack_blocks(ids, block_size, tokenizer.eos_token_id)
    return blocks


# -------------------------------------------------------------------------------------------------------- model
def make_model(spec: TinyCodeModelSpec, tokenizer: PreTrainedTokenizerFast) -> GPTBigCodeForCausalLM:
    config = GPTBigCodeConfig(
        vocab_size=len(tokenizer),
        n_positions=spec.block_size,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_inner=4 * spec.n_embd,
        multi_query=True,
        # no dropout: a few hundred steps cannot overfit, and dropout would slow learning down
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPTBigCodeForCausalLM(config)


def mixed_batch(
    blocks: Mapping[str, torch.Tensor], batch_size: int, step: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[str]]:
    """``batch_size`` random blocks spread evenly over the languages (the remainder rotates with ``step``), and
    the language of each row, so every language gets the same share of training."""
    langs = list(blocks)
    rows, names = [], []
    for i in range(batch_size):
        lang = langs[(i + step) % len(langs)]
        k = int(torch.randint(len(blocks[lang]), (1,), generator=generator))
        rows.append(blocks[lang][k])
        names.append(lang)
    return torch.stack(rows), names


def pretrain(
    model: GPTBigCodeForCausalLM, blocks: Mapping[str, torch.Tensor], spec: TinyCodeModelSpec, progress: bool = True
) -> list[float]:
    """Plain AdamW loop on language-balanced batches; returns the loss every step."""
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95))

    def step_loss(step: int) -> torch.Tensor:
        input_ids, _ = mixed_batch(blocks, spec.batch_size, step, generator)
        return model(input_ids=input_ids, labels=input_ids).loss

    return run_steps(
        model, optimizer, step_loss, spec.pretrain_steps, spec.warmup_steps, "pretrain tiny code model", progress, 1.0
    )


# -------------------------------------------------------------------------------------------------------- cache
def _corpus_stats(corpus: Mapping[str, LanguageCorpus]) -> dict[str, dict[str, int]]:
    return {
        lang: {
            "train_files": len(lc.train),
            "heldout_files": len(lc.heldout),
            "train_bytes": lc.train_bytes,
            "heldout_bytes": lc.heldout_bytes,
        }
        for lang, lc in corpus.items()
    }


def _read_info(cache_dir: Path) -> Optional[CorpusInfo]:
    info = read_build_info(cache_dir)
    try:
        return CorpusInfo(**info) if info is not None else None
    except TypeError:  # a record with other fields (an older build): rebuild
        return None


def build_tiny_code_model(
    corpus: Mapping[str, LanguageCorpus], spec: TinyCodeModelSpec, cache_dir: Path, progress: bool = True
) -> tuple[GPTBigCodeForCausalLM, PreTrainedTokenizerFast, CorpusInfo]:
    """Train tokenizer and model, then move the finished folder into place, so a crash never leaves a cache that
    looks complete."""
    start = time.perf_counter()
    set_seed(spec.seed)
    texts = [t for lc in corpus.values() for t in lc.train_texts]
    tokenizer = train_tokenizer(texts, spec.vocab_size, spec.block_size)
    blocks = language_blocks(corpus, tokenizer, spec.block_size)
    empty = [lang for lang, b in blocks.items() if len(b) == 0]
    if empty:
        raise ValueError(f"too little training text for one block of {spec.block_size} tokens: {empty}")
    model = make_model(spec, tokenizer)
    losses = pretrain(model, blocks, spec, progress)
    info = CorpusInfo(
        languages=list(corpus),
        fingerprint=corpus_fingerprint(corpus),
        stats=_corpus_stats(corpus),
        spec=asdict(spec),
        pretrain_loss=[round(x, 4) for x in losses],
        build_seconds=round(time.perf_counter() - start, 2),
    )
    save_build(cache_dir, [model, tokenizer], asdict(info))
    return model, tokenizer, info


def load_or_build_tiny_code_model(
    cache_dir: Union[str, Path, None] = None,
    spec: Optional[TinyCodeModelSpec] = None,
    corpus: Optional[Mapping[str, LanguageCorpus]] = None,
    rebuild: bool = False,
    progress: bool = True,
) -> tuple[GPTBigCodeForCausalLM, PreTrainedTokenizerFast, CorpusInfo]:
    """The cached model if it was built from this spec and this corpus split, else a freshly built one.

    ``corpus`` defaults to :func:`find_code_corpus` with its defaults; pass the one you evaluate on so that its
    held-out files are guaranteed to be outside pretraining. The returned ``CorpusInfo.from_cache`` says which
    happened. The model is returned in eval mode.
    """
    spec = spec or TinyCodeModelSpec()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if corpus is None:
        corpus = find_code_corpus(seed=spec.seed)
    if not corpus:
        raise ValueError("the corpus has no language with enough source text")
    info = None if rebuild else _read_info(cache_dir)
    if info is not None and info.spec == asdict(spec) and info.fingerprint == corpus_fingerprint(corpus):
        model = GPTBigCodeForCausalLM.from_pretrained(cache_dir)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(cache_dir)
        model.eval()
        info.from_cache = True
        return model, tokenizer, info
    if progress:
        print(
            f"building the tiny code model once, into {cache_dir}: a tokenizer, then {spec.pretrain_steps} "
            f"pretraining steps ({FIRST_BUILD_COST}); later runs load it in seconds",
            file=sys.stderr,
            flush=True,
        )
    return build_tiny_code_model(corpus, spec, cache_dir, progress)
