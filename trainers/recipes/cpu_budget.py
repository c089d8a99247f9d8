"""Whether a full-scale recipe can run on this machine's CPU, and what it would cost, read from the model's config.

A GPU is what the paper's recipes are sized for, but a small model (a local StarCoder-shaped model of a few million
parameters, a whisper-tiny) trains on a CPU in minutes: such a run goes ahead with a warning that states its cost.
Only a model whose weights do not fit in this machine's memory is refused, and ``--allow-cpu`` overrides that too.
The parameter count comes from the config alone (the model is built on the meta device), so nothing is loaded.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSpeechSeq2Seq

from .recipe import Recipe

logger = logging.getLogger(__name__)

BYTES_PER_PARAMETER = 4
"""fp32: a CPU run trains in full precision (no 8-bit base without CUDA)."""
MEMORY_HEADROOM = 1.5
"""Weights times this: activations, the adapters' optimizer state and the data pipeline's buffers on top."""
TRAIN_FLOPS_PER_PARAMETER_TOKEN = 6
"""Forward 2, backward 4 per parameter and token: a frozen base still back-propagates through its activations."""


@dataclass(frozen=True)
class CpuCost:
    parameters: int
    tokens: int  # tokens (code) or encoder frames plus decoder tokens (speech) over the whole run
    memory_bytes: int
    available_bytes: Optional[int]
    flops_per_second: float

    @property
    def flops(self) -> float:
        return TRAIN_FLOPS_PER_PARAMETER_TOKEN * self.parameters * self.tokens

    @property
    def hours(self) -> float:
        return self.flops / self.flops_per_second / 3600

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.memory_bytes <= self.available_bytes

    def describe(self) -> str:
        memory = f"{_gib(self.memory_bytes)} of memory"
        if self.available_bytes is not None:
            memory += f" ({_gib(self.available_bytes)} available)"
        return (
            f"{_count(self.parameters)} parameters, {self.tokens:,} tokens in all: about {self.flops:.1e} FLOP, "
            f"{_duration(self.hours)} at the {self.flops_per_second / 1e9:.0f} GFLOP/s this CPU's matrix multiply "
            f"reaches (a lower bound), and {memory}"
        )


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:,}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return "under a minute"
    if hours < 1:
        return f"about {hours * 60:.0f} minutes"
    if hours < 48:
        return f"about {hours:.1f} hours"
    return f"about {hours / 24:.0f} days"


def available_memory_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (what a new process can use without swapping); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def matmul_flops_per_second(size: int = 512, repeats: int = 5) -> float:
    """This CPU's fp32 matrix-multiply rate, measured in a few milliseconds (the best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9)


def count_parameters(config: Any, task: str) -> int:
    """Parameters of the model ``config`` describes, built on the meta device (no memory, no weights read)."""

    auto = AutoModelForSpeechSeq2Seq if task == "speech" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


def tokens_per_example(recipe: Recipe, config: Any) -> int:
    if recipe.task == "speech":
        # the encoder always sees a full 30-second window; the decoder a sentence, a small share of its positions
        return int(getattr(config, "max_source_positions", 1500)) + int(getattr(config, "max_target_positions", 448))
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return min(recipe.block_size, int(positions)) if positions else recipe.block_size


def estimate_cpu_cost(recipe: Recipe, config: Any) -> CpuCost:
    parameters = count_parameters(config, recipe.task)
    examples = recipe.max_steps * recipe.batch_size * recipe.gradient_accumulation_steps
    return CpuCost(
        parameters=parameters,
        tokens=examples * tokens_per_example(recipe, config),
        memory_bytes=int(parameters * BYTES_PER_PARAMETER * MEMORY_HEADROOM),
        available_bytes=available_memory_bytes(),
        flops_per_second=matmul_flops_per_second(),
    )


def cpu_run_problem(recipe: Recipe, allow_cpu: bool) -> Optional[str]:
    """For a full-scale recipe on a machine without CUDA: why it cannot run here (None if it can; then the cost
    is logged as a warning). ``allow_cpu`` runs it whatever the estimate says."""
    try:
        config = AutoConfig.from_pretrained(recipe.model)
        cost = estimate_cpu_cost(recipe, config)
    except Exception as err:  # a config this check cannot read: the model load reports it properly later
        logger.warning("no CUDA GPU: training %s on the CPU; its cost is unknown (%s)", recipe.model, err)
        return None
    if cost.fits or allow_cpu:
        logger.warning("no CUDA GPU: training %s on the CPU: %s", recipe.model, cost.describe())
        return None
    tiny = "tiny-code" if recipe.task == "code" else "tiny-whisper"
    return (
        f"the {recipe.name} recipe's model {recipe.model} is too large for this machine without a CUDA GPU: "
        f"{cost.describe()}. Run it on a GPU, pass a smaller MODEL=, run the offline recipe (flora-train --recipe "
        f"{tiny}, or make reproduce-small), or pass --allow-cpu (make ALLOW_CPU=1) to try anyway"
    )
