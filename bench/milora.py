"""Decode speed of MiLoRA (routed once per prompt) vs per-token routing (MOELoRA-style) vs plain LoRA, in one run.

MiLoRA's claim (Zhang et al., 2024, Table 4): routing once per prompt and running k of the layer's LoRA experts makes
decoding about 20% faster (tokens/s) than MOE-style LoRA designs that route every token in every adapted module. This
script measures greedy ``generate`` decode tokens/s on a Llama-architecture model built from a config (random
weights, no hub), side by side in one run, for:

- ``base``: the model without adapters;
- ``lora``: PEFT's ``LoraConfig`` rank r on all 7 projections of every layer (q, k, v, o, gate, up, down);
- ``dora``: the same LoRA with PEFT's ``use_dora`` (weight-decomposed: a magnitude vector per module), which the
  MiLoRA paper's Table 4 compares against;
- ``moelora``: BASELINE written for this benchmark only (:class:`MoELoRALinear` below, not flora-hf's math): the
  paper's appendix D MOELoRA, each of the 7 modules' rank-r LoRA split into ``--moe-experts`` experts of rank
  r / experts with a per-module top-``--moe-top-k`` router run on every token at every decoding step; ``moelora``
  computes it in its cheapest form (one masked pair of GEMMs per module), ``moelora_loop`` loops over the experts
  like the reference MoE-LoRA implementations;
- ``milora``: flora-hf's ``MiLoRAConfig`` (7 experts of rank r per layer, ``--top-k`` of them per prompt, attention
  pooler), routed at prefill; decoding reuses the gates stored on the KV cache and skips unselected experts' GEMMs;
- ``milora_per_token``: the same MiLoRA model with its routers forced to re-route on every decoding step (on the
  current token), isolating what routing once per prompt saves.

Parameter budget: LoRA, MOELoRA and MiLoRA hold the same LoRA factors, rank r on each of the 7 modules of every layer
(r (d_in + d_out) each); MOELoRA adds a (experts x d_in) router per module, MiLoRA a (7 x d) router, a pooler query
and the rational activation's coefficients per layer; the table lists both counts.

    python bench/milora.py --threads 1                # CPU default size, a few minutes on a 2-core CPU
    python bench/milora.py --quick                    # fewer repeats and tokens
    python bench/milora.py --device cuda --preset llama-7b --batch-sizes 1,3,8 --new-tokens 128 --prompt-len 256

Timing: a streamer timestamps every generated token; decode tokens/s = batch x (new tokens - 1) / (time from the
first new token to the last), so prefill is excluded (reported separately). Variants are interleaved, the order rotated
every repeat, after ``--warmup`` untimed rounds; ratios are paired within a repeat and the table shows their medians
(and min-max). On CPU the same ratios are also computed from process CPU time, which other processes on a busy
machine disturb much less than wall time (use ``--threads 1`` there). Writes ``milora_<device>_<dtype>[_quick].json``
into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = ("base", "lora", "dora", "moelora", "moelora_loop", "milora", "milora_per_token")
LABELS = {
    "base": "base model",
    "lora": "LoRA (PEFT), 7 modules",
    "dora": "DoRA (PEFT use_dora), 7 modules",
    "moelora": "MOELoRA-style, per-token routers",
    "moelora_loop": "MOELoRA-style, expert loop",
    "milora": "MiLoRA, route once",
    "milora_per_token": "MiLoRA, re-route every token",
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = {  # hidden, intermediate, layers, heads, vocab
    "small": (512, 1376, 4, 8, 8192),
    "medium": (1024, 2752, 8, 16, 16384),
    "llama-7b": (4096, 11008, 32, 32, 32000),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAPER_SPEEDUP = {"MOELoRA beam 1": 43.7 / 35.9, "MOELoRA beam 3": 33.5 / 28.4, "DoRA beam 1": 43.7 / 36.5}
"""MiLoRA's tokens/s over the other design's, from the paper's Table 4 (LLaMA-2 7B on a GPU)."""


# -------------------------------------------------------------------------------- BASELINE (benchmark only)
class MoELoRALinear(nn.Module):
    """BASELINE for this benchmark, not part of flora-hf: a linear layer with a MOELoRA-style per-token LoRA mixture.

    MiLoRA paper, appendix D: the module's rank-r LoRA is ``experts`` experts of rank r / experts; a router
    (``experts x d_in``, no bias) scores every token, softmax, and the top-k experts are kept with their
    probabilities as weights, at every decoding step. ``loop=False`` computes it in its cheapest form, all experts in
    one masked GEMM pair (dense over ranks, unselected experts' ranks multiplied by a zero gate); ``loop=True``
    runs the experts one by one as the reference MoE-LoRA implementations do.
    """

    def __init__(self, base: nn.Linear, rank: int, experts: int, top_k: int, scaling: float, loop: bool) -> None:
        super().__init__()
        if rank % experts:
            raise ValueError(f"MOELoRA splits rank {rank} into {experts} experts: rank must be a multiple")
        self.base = base
        self.experts, self.top_k, self.scaling, self.loop = experts, min(top_k, experts), scaling, loop
        self.expert_rank = rank // experts
        w = base.weight
        self.moe_router = nn.Parameter(torch.randn(experts, base.in_features, dtype=w.dtype, device=w.device) * 0.02)
        self.moe_A = nn.Parameter(torch.randn(rank, base.in_features, dtype=w.dtype, device=w.device) * 0.02)
        self.moe_B = nn.Parameter(torch.randn(base.out_features, rank, dtype=w.dtype, device=w.device) * 0.01)

    def gates(self, x: Tensor) -> Tensor:
        """(..., experts): each token's router probability on its top-k experts, zero elsewhere."""
        probs = torch.softmax(F.linear(x, self.moe_router).float(), dim=-1)
        top = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, top.indices, top.values).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        gates = self.gates(x)
        if not self.loop:
            h = F.linear(x, self.moe_A) * gates.repeat_interleave(self.expert_rank, dim=-1)
            return y + F.linear(h, self.moe_B) * self.scaling
        r = self.expert_rank
        for e in range(self.experts):
            a, b = self.moe_A[e * r : (e + 1) * r], self.moe_B[:, e * r : (e + 1) * r]
            y = y + F.linear(F.linear(x, a), b) * (gates[..., e : e + 1] * self.scaling)
        return y


def add_moelora(model: nn.Module, rank: int, experts: int, top_k: int, loop: bool) -> nn.Module:
    """Replace the 7 projections of every decoder layer with :class:`MoELoRALinear` (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS and ".layers." in f".{name}":
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, MoELoRALinear(module, rank, experts, top_k, 1.0, loop))
    return model


# ------------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    device: str
    dtype: str
    preset: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    rank: int
    top_k: int
    pooler: str
    moe_experts: int
    moe_top_k: int
    batch_sizes: list[int]
    beams: list[int]
    prompt_len: int
    new_tokens: int
    repeats: int
    warmup: int
    threads: Optional[int]
    variants: list[str]
    seed: int
    quick: bool
    out: str


def parse_int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}; choose from {VARIANTS}")
    if "base" not in names:
        names.insert(0, "base")  # every ratio is paired with the base model
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", choices=tuple(DTYPES), default=None, help="default float32 on cpu, bfloat16 on cuda")
    add("--preset", choices=tuple(PRESETS), default="small", help="model size; the flags below override it")
    add("--hidden", type=int, default=None)
    add("--intermediate", type=int, default=None)
    add("--layers", type=int, default=None)
    add("--heads", type=int, default=None)
    add("--vocab", type=int, default=None)
    add("--rank", type=int, default=32, help="LoRA rank per module (the paper's 32); MOELoRA splits it into experts")
    add("--top-k", type=int, default=3, help="MiLoRA experts per layer and prompt (the paper's 3 of 7)")
    add("--pooler", default="attention", choices=("last", "mean", "max", "attention"))
    add("--moe-experts", type=int, default=8, help="MOELoRA experts per module (paper: 8 of rank 4 for r=32)")
    add("--moe-top-k", type=int, default=4, help="MOELoRA experts per token and module (paper: top-4)")
    add("--batch-sizes", type=parse_int_list, default=[1, 8])
    add(
        "--beams",
        type=parse_int_list,
        default=[1],
        help="beam sizes (the paper's Table 4: 1 and 3); beam search is timed as whole generates (no streamer)",
    )
    add("--prompt-len", type=int, default=64)
    add("--new-tokens", type=int, default=None, help="tokens generated per row (default 64, quick 32)")
    add("--repeats", type=int, default=None, help="timed rounds (default 10, quick 3)")
    add("--warmup", type=int, default=1, help="untimed rounds first (the first also counts routing calls)")
    add("--threads", type=int, default=None, help="torch.set_num_threads (1 is far steadier on a busy CPU)")
    add(
        "--variants",
        type=parse_variants,
        default=list(VARIANTS),
        help=f"comma list of {', '.join(VARIANTS)} (default all)",
    )
    add("--seed", type=int, default=0)
    add("--quick", action="store_true", help="3 repeats of 32 new tokens")
    add("--out", type=Path, default=Path("bench/results"))
    return p


def resolve(args: argparse.Namespace) -> Settings:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    hidden, intermediate, layers, heads, vocab = PRESETS[args.preset]
    s = Settings(
        device=args.device,
        dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
        preset=args.preset,
        hidden=args.hidden or hidden,
        intermediate=args.intermediate or intermediate,
        layers=args.layers or layers,
        heads=args.heads or heads,
        vocab=args.vocab or vocab,
        rank=args.rank,
        top_k=args.top_k,
        pooler=args.pooler,
        moe_experts=args.moe_experts,
        moe_top_k=args.moe_top_k,
        batch_sizes=args.batch_sizes,
        beams=args.beams,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens or (32 if args.quick else 64),
        repeats=args.repeats or (3 if args.quick else 10),
        warmup=args.warmup,
        threads=args.threads,
        variants=args.variants,
        seed=args.seed,
        quick=args.quick,
        out=str(args.out),
    )
    if s.hidden % s.heads:
        raise SystemExit(f"--hidden {s.hidden} must be a multiple of --heads {s.heads}")
    if s.rank % s.moe_experts:
        raise SystemExit(f"--rank {s.rank} must be a multiple of --moe-experts {s.moe_experts} (MOELoRA's split)")
    if s.warmup < 1:
        raise SystemExit("--warmup must be at least 1 (the first, untimed round counts the routing calls)")
    if s.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (decode speed is measured after the first new token)")
    return s


# ------------------------------------------------------------------------------------------------- models
def build_base(s: Settings) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        vocab_size=s.vocab,
        max_position_embeddings=max(2048, s.prompt_len + s.new_tokens),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(s.seed)
    with torch.device(s.device):  # built where it runs: a 7B model is never materialised on the host
        model = LlamaForCausalLM._from_config(cfg, dtype=DTYPES[s.dtype])
    return model.eval().requires_grad_(False)


def shared_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose weight tensors ARE the base's: variants cost adapter memory only, read the same
    weights, and PEFT's in-place injection leaves the base model itself untouched."""
    memo = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    return copy.deepcopy(base, memo)


def adapter_factors(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Every variant's (A factors, B factors), found by layer type: PEFT LoRA, MiLoRA experts, the MOELoRA baseline."""
    from peft.tuners.lora import LoraLayer

    from flora_hf import MiLoRALayer

    a_list: list[Tensor] = []
    b_list: list[Tensor] = []
    for m in model.modules():
        if isinstance(m, LoraLayer):
            a_list += list(m.lora_A.parameters())
            b_list += list(m.lora_B.parameters())
        elif isinstance(m, MiLoRALayer):
            a_list += list(m.milora_A.parameters())
            b_list += list(m.milora_B.parameters())
        elif isinstance(m, MoELoRALinear):
            a_list.append(m.moe_A)
            b_list.append(m.moe_B)
    return a_list, b_list


def randomize_b(model: nn.Module) -> None:
    """Non-zero B factors (PEFT starts them at zero): every variant really adds its updates to the outputs."""
    g = torch.Generator().manual_seed(1)
    for p in adapter_factors(model)[1]:
        p.data.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))


def build_variant(name: str, base: nn.Module, s: Settings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from flora_hf import MiLoRAConfig

    model = shared_copy(base)
    if name == "base":
        return model
    if name in ("lora", "dora"):
        config = LoraConfig(r=s.rank, lora_alpha=s.rank, target_modules=list(TARGETS), use_dora=name == "dora")
        model = get_peft_model(model, config, autocast_adapter_dtype=False)
        randomize_b(model)
    elif name in ("moelora", "moelora_loop"):
        model = add_moelora(model, s.rank, s.moe_experts, s.moe_top_k, loop=name == "moelora_loop")
    elif name in ("milora", "milora_per_token"):
        config = MiLoRAConfig(r=s.rank, top_k=s.top_k, pooler=s.pooler, target_modules=list(TARGETS))
        model = get_peft_model(model, config, autocast_adapter_dtype=False)
        randomize_b(model)
        if name == "milora_per_token":
            force_per_token_routing(model)
    else:
        raise ValueError(name)
    return model.eval().requires_grad_(False)


def force_per_token_routing(peft_model: nn.Module) -> None:
    """Make MiLoRA's routers re-route on every forward, decoding steps included (on the step's own tokens).

    MiLoRA's model-level pre-hook decides "reuse the gates on the KV cache" for a call with a filled cache; a later
    pre-hook on the same module overrides that decision, so every router pools, routes and stores anew.
    """
    from flora_hf.milora.model import RUNTIME_ATTR

    inner = peft_model.base_model.model
    runtime = getattr(inner, RUNTIME_ATTR)

    def route_again(module: nn.Module, args: tuple, kwargs: dict) -> None:
        runtime.reuse = False

    inner.register_forward_pre_hook(route_again, with_kwargs=True)


def param_counts(model: nn.Module) -> dict[str, int]:
    """Adapter parameters: LoRA factors (the matched budget), routers and DoRA's magnitudes (extras) separately, and
    all adapter weights in bytes (what a variant adds to the shared base in memory)."""
    from flora_hf import MiLoRARouter

    factors = sum(p.numel() for p in [*adapter_factors(model)[0], *adapter_factors(model)[1]])
    routers = magnitudes = 0
    for m in model.modules():
        if isinstance(m, MiLoRARouter):
            routers += sum(p.numel() for p in m.parameters())
        elif isinstance(m, MoELoRALinear):
            routers += m.moe_router.numel()
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            magnitudes += p.numel()
    element = next(model.parameters()).element_size()
    return {
        "lora_factors": factors,
        "router": routers,
        "magnitude": magnitudes,
        "adapter_bytes": (factors + routers + magnitudes) * element,
    }


def count_router_calls(model: nn.Module) -> tuple[Callable[[], int], Callable[[], None]]:
    """Count routing computations (MiLoRA ``route_prompt``, MOELoRA ``gates``) until the returned ``stop`` is called."""
    from flora_hf import MiLoRARouter

    calls = [0]
    patched = []
    for m in model.modules():
        attr = "route_prompt" if isinstance(m, MiLoRARouter) else "gates" if isinstance(m, MoELoRALinear) else None
        if attr is None:
            continue
        original = getattr(m, attr)

        def counted(*a: Any, _original: Callable = original, **k: Any) -> Any:
            calls[0] += 1
            return _original(*a, **k)

        setattr(m, attr, counted)
        patched.append((m, attr))

    def stop() -> None:
        for m, attr in patched:
            delattr(m, attr)  # back to the class method

    return lambda: calls[0], stop


# ------------------------------------------------------------------------------------------------- timing
class StepClock:
    """Streamer for ``generate``: wall and process-CPU time of every ``put`` (the prompt, then each new token)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def put(self, value: Tensor) -> None:  # tokens arrive on the host already (.cpu() in generate): synchronized
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def end(self) -> None:
        pass


def make_sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def generate_once(
    model: nn.Module, ids: Tensor, s: Settings, sync: Callable[[], None], beams: int = 1
) -> dict[str, Any]:
    """One generate of exactly ``new_tokens`` per row (greedy, or beam search with ``beams``); with one beam, decode
    and prefill timings from the streamer (transformers streams only one beam), else whole-generate timings. On a GPU
    also the peak memory allocated during the call."""
    clock = StepClock() if beams == 1 else None
    cuda = s.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=s.new_tokens,
        min_new_tokens=s.new_tokens,
        do_sample=False,
        num_beams=beams,
        pad_token_id=0,
        streamer=clock,
    )
    sync()
    end_wall, end_cpu = time.perf_counter(), time.process_time()
    batch = ids.shape[0]
    if out.shape != (batch, ids.shape[1] + s.new_tokens):
        raise RuntimeError(f"generate made {tuple(out.shape)}, expected {(batch, ids.shape[1] + s.new_tokens)}")
    result = {
        "total_s": end_wall - start_wall,
        "e2e_tok_s": batch * s.new_tokens / (end_wall - start_wall),
        "e2e_tok_cpu_s": batch * s.new_tokens / max(end_cpu - start_cpu, 1e-9),
        "total_cpu_s": end_cpu - start_cpu,
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "first_token": out[:, ids.shape[1]].tolist(),
    }
    if clock is not None:
        steps = len(clock.wall) - 1
        if steps != s.new_tokens:
            raise RuntimeError(f"generate streamed {steps} steps, expected {s.new_tokens}")
        decoded = batch * (s.new_tokens - 1)
        result.update(
            decode_tok_s=decoded / (clock.wall[-1] - clock.wall[1]),
            decode_tok_cpu_s=decoded / max(clock.cpu[-1] - clock.cpu[1], 1e-9),
            prefill_s=clock.wall[1] - start_wall,
        )
    return result


def run(s: Settings, models: dict[str, nn.Module], log: Callable[[str], None]) -> dict[str, Any]:
    """Warm-up rounds (untimed; the first counts router calls), then interleaved, rotated timed rounds."""
    sync = make_sync(s.device)
    g = torch.Generator().manual_seed(s.seed)
    prompts = {
        b: torch.randint(3, s.vocab, (b, s.prompt_len), generator=g).to(s.device) for b in s.batch_sizes
    }  # the same prompts for every variant
    router_calls: dict[str, dict[int, int]] = {v: {} for v in s.variants}
    first_tokens: dict[str, dict[int, list[int]]] = {v: {} for v in s.variants}
    samples: list[dict[str, Any]] = []
    names = list(s.variants)
    for rnd in range(s.warmup + s.repeats):
        timed = rnd >= s.warmup
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for b in s.batch_sizes:
            for beams in s.beams:
                for v in order:
                    stop = None
                    if rnd == 0 and beams == 1:
                        get_calls, stop = count_router_calls(models[v])
                    result = generate_once(models[v], prompts[b], s, sync, beams)
                    if stop is not None:
                        stop()
                        router_calls[v][b] = get_calls()
                        first_tokens[v][b] = result["first_token"]
                    if timed:
                        samples.append({"round": rnd - s.warmup, "batch": b, "beams": beams, "variant": v, **result})
        kind = f"timed round {rnd - s.warmup + 1}/{s.repeats}" if timed else f"warm-up round {rnd + 1}/{s.warmup}"
        log(f"{kind} done")
    return {"samples": samples, "router_calls": router_calls, "first_tokens": first_tokens}


# ------------------------------------------------------------------------------------------------- analysis
def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired(
    samples: list[dict], batch: int, num: str, den: str, key: str, beams: int = 1
) -> Optional[dict[str, float]]:
    """Per-round ratio ``key(num) / key(den)`` within one round (the same machine conditions), summarized."""
    by = {
        (x["round"], x["variant"]): x[key]
        for x in samples
        if x["batch"] == batch and x.get("beams", 1) == beams and x.get(key) is not None
    }
    rounds = sorted({r for r, _ in by})
    ratios = [by[(r, num)] / by[(r, den)] for r in rounds if (r, num) in by and (r, den) in by]
    return _stats(ratios) if ratios else None


def analyse(s: Settings, raw: dict[str, Any], params: dict[str, dict[str, int]]) -> dict[str, Any]:
    samples = raw["samples"]
    cpu = s.device == "cpu"
    rows = []
    for b in s.batch_sizes:
        for v in s.variants:
            mine = [x for x in samples if x["batch"] == b and x["beams"] == 1 and x["variant"] == v]
            calls = raw["router_calls"][v].get(b, 0)
            rows.append(
                {
                    "batch": b,
                    "variant": v,
                    "decode_tok_s": _stats([x["decode_tok_s"] for x in mine]),
                    "prefill_ms": statistics.median(x["prefill_s"] for x in mine) * 1e3,
                    "vs_base": paired(samples, b, v, "base", "decode_tok_s"),
                    "vs_base_cpu": paired(samples, b, v, "base", "decode_tok_cpu_s") if cpu else None,
                    "router_calls_per_generate": calls,
                    "router_calls_per_decode_step": (calls - _prefill_calls(v, s)) / (s.new_tokens - 1),
                    "peak_mem_mb": _median_or_none([x["peak_mem_mb"] for x in mine]),
                    **params[v],
                }
            )
    beam_rows = []
    for b in s.batch_sizes:
        for beams in (n for n in s.beams if n > 1):
            for v in s.variants:
                mine = [x for x in samples if x["batch"] == b and x["beams"] == beams and x["variant"] == v]
                beam_rows.append(
                    {
                        "batch": b,
                        "beams": beams,
                        "variant": v,
                        "e2e_tok_s": _stats([x["e2e_tok_s"] for x in mine]),
                        "vs_base": paired(samples, b, v, "base", "e2e_tok_s", beams),
                        "vs_base_cpu": paired(samples, b, v, "base", "e2e_tok_cpu_s", beams) if cpu else None,
                        "milora_over": paired(samples, b, "milora", v, "e2e_tok_s", beams)
                        if "milora" in s.variants
                        else None,
                    }
                )
    speedups = []
    if "milora" in s.variants:
        for b in s.batch_sizes:
            for other in s.variants:
                if other in ("milora", "base"):
                    continue
                speedups.append(
                    {
                        "batch": b,
                        "other": other,
                        "wall": paired(samples, b, "milora", other, "decode_tok_s"),
                        "cpu": paired(samples, b, "milora", other, "decode_tok_cpu_s") if cpu else None,
                        "e2e": paired(samples, b, "milora", other, "e2e_tok_s"),
                    }
                )
    return {"rows": rows, "speedups": speedups, "beam_rows": beam_rows}


def _median_or_none(values: list[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _prefill_calls(variant: str, s: Settings) -> int:
    """Routing computations the prefill forward makes: one per layer (MiLoRA), one per module (MOELoRA)."""
    if variant.startswith("milora"):
        return s.layers
    if variant.startswith("moelora"):
        return s.layers * len(TARGETS)
    return 0


def fmt_ratio(st: Optional[dict[str, float]]) -> str:
    if st is None:
        return "-"
    return f"{st['median']:.3f} ({st['min']:.2f}-{st['max']:.2f})"


def render(s: Settings, result: dict[str, Any]) -> str:
    """Markdown tables: per variant, then MiLoRA's speed-up over each other design."""
    cpu = s.device == "cpu"
    head = ["batch", "variant", "LoRA params", "router params", "adapter MB", "routings/step", "decode tok/s"]
    head += ["prefill ms"] + (["peak MB"] if not cpu else [])
    head += ["x base (wall)"] + (["x base (CPU time)"] if cpu else [])
    lines = [
        f"Decode speed, Llama d={s.hidden} ffn={s.intermediate} L={s.layers} vocab={s.vocab}, {s.device} {s.dtype}, "
        f"prompt {s.prompt_len} + {s.new_tokens} new tokens, r={s.rank}, MiLoRA top-{s.top_k}/7 "
        f"({s.pooler} pooler), MOELoRA {s.moe_experts}x rank-{s.rank // s.moe_experts} experts top-{s.moe_top_k}; "
        f"median of {s.repeats} interleaved rounds (min-max of paired ratios)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" if i != 1 else ":---" for i in range(len(head))) + "|",
    ]
    for r in result["rows"]:
        cells = [
            str(r["batch"]),
            LABELS[r["variant"]],
            f"{r['lora_factors'] / 1e6:.2f}M" if r["lora_factors"] else "0",
            f"{r['router'] / 1e3:.1f}K" if r["router"] else "0",
            f"{r['adapter_bytes'] / 2**20:.2f}",
            f"{r['router_calls_per_decode_step']:g}",
            f"{r['decode_tok_s']['median']:.1f}",
            f"{r['prefill_ms']:.0f}",
        ]
        cells += ([] if cpu else [f"{r['peak_mem_mb']:.0f}"]) + [fmt_ratio(r["vs_base"])]
        cells += [fmt_ratio(r["vs_base_cpu"])] if cpu else []
        lines.append("| " + " | ".join(cells) + " |")
    if result["speedups"]:
        head2 = ["batch", "MiLoRA tok/s over", "decode (wall)"] + (["decode (CPU time)"] if cpu else [])
        head2 += ["incl. prefill (wall)"]
        lines += ["", "| " + " | ".join(head2) + " |", "|---:|:---|" + "---:|" * (len(head2) - 2)]
        for sp in result["speedups"]:
            cells = [str(sp["batch"]), LABELS[sp["other"]], fmt_ratio(sp["wall"])]
            cells += ([fmt_ratio(sp["cpu"])] if cpu else []) + [fmt_ratio(sp["e2e"])]
            lines.append("| " + " | ".join(cells) + " |")
        if result.get("beam_rows"):
            head3 = ["batch", "beams", "variant", "tok/s (whole generate)", "x base", "MiLoRA over it"]
            lines += ["", "| " + " | ".join(head3) + " |", "|---:|---:|:---|---:|---:|---:|"]
            for r in result["beam_rows"]:
                over = "-" if r["variant"] in ("milora", "base") else fmt_ratio(r["milora_over"])
                lines.append(
                    f"| {r['batch']} | {r['beams']} | {LABELS[r['variant']]} | {r['e2e_tok_s']['median']:.1f} | "
                    f"{fmt_ratio(r['vs_base'])} | {over} |"
                )
        if cpu:
            lines += ["", "Peak memory is measured on a GPU only (torch.cuda.max_memory_allocated per generate); on a "
                      "CPU the table gives each variant's adapter weights."]  # fmt: skip
        paper = ", ".join(f"{k} {v:.3f}" for k, v in PAPER_SPEEDUP.items())
        lines += ["", f"Paper, Table 4 (LLaMA-2 7B on a GPU, tokens/s of whole generations), MiLoRA over: {paper}."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main
def _loadavg() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(s: Settings) -> dict[str, Any]:
    import peft
    import transformers

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": _loadavg(),
    }
    if s.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Build the variants, time them, print the tables, write JSON into --out; returns the JSON document."""
    argv = sys.argv[1:] if argv is None else argv
    s = resolve(build_parser().parse_args(argv))
    if s.threads:
        torch.set_num_threads(s.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    env = environment(s)
    if s.device == "cpu" and env["loadavg_at_start"] and env["loadavg_at_start"][0] > 0.5:
        log(f"note: load average {env['loadavg_at_start']}: compare the CPU-time ratios, and prefer --threads 1")
    started = time.perf_counter()
    base = build_base(s)
    models = {v: build_variant(v, base, s) for v in s.variants}
    params = {v: param_counts(m) for v, m in models.items()}
    log(f"built {len(models)} variants sharing one base model; timing {s.repeats} rounds after {s.warmup} warm-up")
    with torch.no_grad():
        raw = run(s, models, log)
    result = analyse(s, raw, params)
    table = render(s, result)
    print(table)
    env["loadavg_at_end"] = _loadavg()
    doc = {
        "command": shlex.join(["python", "bench/milora.py", *argv]),
        "settings": asdict(s),
        "environment": env,
        "elapsed_s": time.perf_counter() - started,
        "params": params,
        "router_calls_per_generate": raw["router_calls"],
        "first_tokens": raw["first_tokens"],
        "paper_speedup": PAPER_SPEEDUP,
        **result,
        "table": table,
        "samples": raw["samples"],
    }
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"milora_{s.device}_{s.dtype}{'_quick' if s.quick else ''}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {path} ({doc['elapsed_s']:.0f} s)")
    return doc


if __name__ == "__main__":
    main()
