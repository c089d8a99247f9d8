"""``make demo``: one FLoRA adapter per programming language on a tiny code model, all trained in one run.

Every batch mixes languages and routes each row to its own language's adapter (``adapter_names``), so one
optimizer step trains every adapter; evaluation and generation are mixed batches too. Runs offline in minutes on two
CPU cores: the base model is pretrained on local source files (and cached) by :mod:`trainers.offline.tiny_code_model`.

    python -m trainers.demo [--steps 150] [--lr 5e-2] [--languages python,perl,c] [--source rust=~/src/rust ...]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from transformers import PreTrainedModel, PreTrainedTokenizerFast, set_seed
from transformers.utils import logging as hf_logging

import flora_hf
from flora_hf import BASE_ADAPTER_NAME, FLoRAConfig
from trainers import REPO_ROOT
from trainers.data.code_corpus import DEFAULT_LANGUAGE_ORDER, LanguageCorpus, find_code_corpus
from trainers.library_noise import quiet_library_noise
from trainers.offline.step_loop import run_steps
from trainers.offline.tiny_code_model import (
    TinyCodeModelSpec,
    language_blocks,
    load_or_build_tiny_code_model,
    mixed_batch,
)

PROMPTS = {
    "python": "class Config:\n    def __init__(self, path):\n        self.",
    "perl": "sub new {\n    my ($class, %args) = @_;\n    my $self = ",
    "c": "#ifndef _FOO_H\n#define _FOO_H\n\n#include <",
    "shell": '#!/bin/sh\nset -e\n\nif [ -z "$1" ]; then\n    echo "usage: ',
}
"""A recognisable opening per built-in language, cut mid-line (after a newline a model this small mostly emits more
newlines); other languages start from their first held-out file."""


@dataclass(frozen=True)
class AdapterRecipe:
    """FLoRA per language, r=1 on every linear layer of the blocks. The paper's rate for StarCoder is 8e-3; this
    tiny model gains most at 3e-2 to 6e-2 (150 steps; higher rank did not help here)."""

    rank: int = 1
    init_noise_std: float = 1e-2
    target_modules: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
    steps: int = 150
    rows_per_language: int = 8
    lr: float = 5e-2
    warmup_steps: int = 10
    seed: int = 0


# --------------------------------------------------------------------------------------------------- adapters
def add_language_adapters(model: PreTrainedModel, languages: Sequence[str], recipe: AdapterRecipe) -> PeftModel:
    """One FLoRA adapter per language, named after it, all trainable at once."""

    def config() -> FLoRAConfig:  # a fresh config per adapter: PEFT mutates the one it is given
        return FLoRAConfig(
            r=recipe.rank, target_modules=list(recipe.target_modules), init_noise_std=recipe.init_noise_std
        )

    first, *rest = languages
    peft_model = get_peft_model(model, config(), adapter_name=first)
    for lang in rest:
        peft_model.add_adapter(lang, config())
    flora_hf.set_trainable_adapters(peft_model)
    return peft_model


def train_adapters_mixed(
    peft_model: PeftModel, blocks: Mapping[str, torch.Tensor], recipe: AdapterRecipe, progress: bool = True
) -> list[float]:
    """Every step's batch holds ``rows_per_language`` blocks of each language, each routed to its own adapter."""
    generator = torch.Generator().manual_seed(recipe.seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    batch_size = recipe.rows_per_language * len(blocks)

    def step_loss(step: int) -> torch.Tensor:
        input_ids, names = mixed_batch(blocks, batch_size, step, generator)
        return peft_model(input_ids=input_ids, labels=input_ids, adapter_names=names).loss

    desc = "train adapters (mixed batches)"
    return run_steps(peft_model, optimizer, step_loss, recipe.steps, recipe.warmup_steps, desc, progress)


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def heldout_perplexity(
    peft_model: PeftModel,
    blocks: Mapping[str, torch.Tensor],
    variants: Sequence[str],
    max_blocks: int = 48,
    chunk: int = 8,
) -> dict[str, dict[str, float]]:
    """Perplexity of each language's held-out blocks under each variant (an adapter name or the base model).

    Each forward repeats a chunk of blocks once per variant with the matching ``adapter_names``, so all variants
    are scored in the same mixed batch.
    """
    peft_model.eval()
    result: dict[str, dict[str, float]] = {}
    for lang, rows in blocks.items():
        rows = rows[:max_blocks]
        nll = torch.zeros(len(variants), dtype=torch.float64)
        for start in range(0, len(rows), chunk):
            x = rows[start : start + chunk]
            input_ids = x.repeat(len(variants), 1)
            names = [v for v in variants for _ in range(len(x))]
            logits = peft_model(input_ids=input_ids, adapter_names=names).logits[:, :-1]
            token_nll = F.cross_entropy(logits.flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
            nll += token_nll.view(len(variants), -1).sum(dim=1).double()
        tokens = len(rows) * (rows.shape[1] - 1)
        result[lang] = {v: math.exp(nll[i].item() / tokens) for i, v in enumerate(variants)}
    return result


@torch.no_grad()
def generate_mixed(
    peft_model: PeftModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    adapter_names: Sequence[str],
    max_new_tokens: int = 40,
    repetition_penalty: float = 1.2,
    no_repeat_ngram_size: int = 4,
) -> list[str]:
    """Greedy completions of all prompts in a single ``generate`` call, prompt ``i`` through ``adapter_names[i]``.

    Still deterministic argmax decoding, but with repeats discouraged: plain greedy on a model this small loops on
    one token within a few steps.
    """
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)  # left padding (set by the tokenizer)
    out = peft_model.generate(
        **enc,
        adapter_names=list(adapter_names),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def prompt_for(lang: str, corpus: LanguageCorpus) -> str:
    if lang in PROMPTS:
        return PROMPTS[lang]
    return corpus.heldout[0].text[:100]


# ----------------------------------------------------------------------------------------------------- output
def perplexity_table(ppl: Mapping[str, Mapping[str, float]], languages: Sequence[str]) -> Table:
    table = Table(title="held-out perplexity (lower is better); rows: text, columns: adapter")
    table.add_column("held-out text")
    table.add_column("base", justify="right")
    for lang in languages:
        table.add_column(f"adapter {lang}", justify="right")
    table.add_column("own vs base", justify="right")
    for text_lang, row in ppl.items():
        cells = [f"{row[BASE_ADAPTER_NAME]:.2f}"]
        for lang in languages:
            cell = f"{row[lang]:.2f}"
            cells.append(f"[bold green]{cell}[/]" if lang == text_lang else cell)
        gain = 100 * (row[text_lang] / row[BASE_ADAPTER_NAME] - 1)
        table.add_row(text_lang, *cells, f"{gain:+.1f}%")
    return table


def completion_panel(prompt: str, completion: str, adapter: str, max_lines: int = 12) -> Panel:
    """The prompt dimmed, then the completion; whitespace-only completions are said so rather than shown blank."""
    lines = completion.rstrip().splitlines()
    shown = "\n".join(lines[:max_lines]) + ("\n..." if len(lines) > max_lines else "")
    body = Text(prompt, style="dim")
    body.append(shown if shown.strip() else f"<{len(completion)} whitespace characters>")
    title = "base model" if adapter == BASE_ADAPTER_NAME else f"adapter {adapter}"
    return Panel(body, title=title, title_align="left", expand=False)


@contextmanager
def phase(name: str, times: dict[str, float], console: Console) -> Iterator[None]:
    start = time.perf_counter()
    yield
    times[name] = time.perf_counter() - start
    console.log(f"{name}: {times[name]:.1f} s")


def parse_sources(items: Sequence[str]) -> dict[str, Path]:
    sources = {}
    for item in items:
        lang, sep, folder = item.partition("=")
        if not sep or not lang or not folder:
            raise argparse.ArgumentTypeError(f"--source expects LANG=FOLDER, got {item!r}")
        sources[lang] = Path(folder).expanduser()
    return sources


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    recipe = AdapterRecipe()
    p = argparse.ArgumentParser(prog="python -m trainers.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--languages", help="comma-separated, e.g. python,perl,c (default: what the machine has)")
    p.add_argument("--source", action="append", default=[], metavar="LANG=FOLDER", help="your own files")
    p.add_argument("--max-languages", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, help="tiny model cache (default $FLORA_HF_CACHE or .cache/flora-hf)")
    p.add_argument("--rebuild", action="store_true", help="retrain the tiny model even if cached")
    p.add_argument("--output-dir", type=Path, default=REPO_ROOT / "out" / "demo-adapters")
    p.add_argument("--rank", type=int, default=recipe.rank)
    p.add_argument("--steps", type=int, default=recipe.steps)
    p.add_argument("--rows-per-language", type=int, default=recipe.rows_per_language)
    p.add_argument("--lr", type=float, default=recipe.lr)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    console = Console()
    hf_logging.disable_progress_bar()
    quiet_library_noise(uses_deepspeed=False)
    set_seed(args.seed)
    times: dict[str, float] = {}
    total_start = time.perf_counter()

    sources = parse_sources(args.source)
    if args.languages:
        languages = args.languages.split(",")
    else:  # the user's folders first, then what the machine has
        languages = [*sources, *(lang for lang in DEFAULT_LANGUAGE_ORDER if lang not in sources)]
    with phase("find source files", times, console):
        corpus = find_code_corpus(languages, sources, max_languages=args.max_languages, seed=args.seed)
    if len(corpus) < 2:
        raise SystemExit(f"need at least two languages with enough source text, found {list(corpus)}")
    languages = list(corpus)
    for lang, lc in corpus.items():
        console.log(
            f"{lang}: {len(lc.train)} train files ({lc.train_bytes / 1e3:.0f} kB), "
            f"{len(lc.heldout)} held-out files ({lc.heldout_bytes / 1e3:.0f} kB)"
        )

    spec = TinyCodeModelSpec(seed=args.seed)
    with phase("tiny code model", times, console):
        model, tokenizer, info = load_or_build_tiny_code_model(args.cache_dir, spec, corpus, rebuild=args.rebuild)
    source = "loaded from cache" if info.from_cache else f"built in {info.build_seconds:.0f} s and cached"
    n_params = sum(p.numel() for p in model.parameters())
    console.log(f"tiny GPTBigCode ({n_params / 1e6:.2f} M parameters, vocab {len(tokenizer)}): {source}")

    recipe = AdapterRecipe(
        rank=args.rank, steps=args.steps, rows_per_language=args.rows_per_language, lr=args.lr, seed=args.seed
    )
    train_blocks = language_blocks(corpus, tokenizer, spec.block_size, "train")
    heldout_blocks = language_blocks(corpus, tokenizer, spec.block_size, "heldout")
    peft_model = add_language_adapters(model, languages, recipe)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    console.log(
        f"FLoRA r={recipe.rank} on {', '.join(recipe.target_modules)}: {len(languages)} adapters, "
        f"{n_train:,} trainable parameters in all"
    )
    with phase("train adapters", times, console):
        train_adapters_mixed(peft_model, train_blocks, recipe)

    with phase("held-out evaluation", times, console):
        ppl = heldout_perplexity(peft_model, heldout_blocks, [BASE_ADAPTER_NAME, *languages])
    console.print(perplexity_table(ppl, languages))
    best_own = sum(min(row, key=row.get) == lang for lang, row in ppl.items())
    console.log(f"a language's own adapter gives the lowest perplexity on {best_own} of {len(ppl)} languages")

    with phase("mixed-batch generation", times, console):
        prompts = [prompt_for(lang, corpus[lang]) for lang in languages]
        names = [*languages, *([BASE_ADAPTER_NAME] * len(languages))]
        completions = generate_mixed(peft_model, tokenizer, prompts * 2, names, args.max_new_tokens)
    console.rule(f"one generate call, {len(names)} rows (greedy): each prompt with its adapter, then with none")
    for prompt, name, text in zip(prompts * 2, names, completions):
        console.print(completion_panel(prompt, text, name))

    with phase("save adapters", times, console):
        peft_model.save_pretrained(args.output_dir)
    console.log(f"adapters saved (PEFT format) under {args.output_dir}/<language>")

    times["total"] = time.perf_counter() - total_start
    wall = Table(title="wall time")
    wall.add_column("phase")
    wall.add_column("seconds", justify="right")
    for name, seconds in times.items():
        wall.add_row(name, f"{seconds:.1f}")
    console.print(wall)


if __name__ == "__main__":
    main()
