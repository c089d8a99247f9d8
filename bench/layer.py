"""Time ONE adapted linear layer at StarCoder 1B/3B/15B widths, every example with its own adapter (docs/DESIGN.md §2).

Side by side in one run, interleaved round-robin so that machine noise hits every method alike: the base layer,
FLoRA by each exact path (and by ``path="auto"``, recording the path the cost model picked), the torch.bmm LoRA of
the FLoRA paper's appendix B.1, PEFT's loop-over-adapters LoRA, and IA3. Every adapter formula comes from
:mod:`flora_hf.ops`; this file only builds inputs, times calls and reports.

    python bench/layer.py --quick                 # d=2048 only, about two minutes on a 2-core CPU
    python bench/layer.py                         # full grid; on CPU it fits --time-budget-s (8 minutes)
    python bench/layer.py --device cuda --dtype bfloat16

Timing: one first call per method (warm-up, agreement check, size estimate), then round-robin rounds with the start
rotated each round; each method reports the median of its samples. On CPU, calls slower than --max-call-s (or than
--max-call-ratio base calls) keep their single first call (marked ``*``), and calls the cost model predicts would
overrun the group's share of --time-budget-s are skipped with that reason; cells over --max-gib are skipped too.
Nothing is silently dropped, and the verdict flags results that look like noise (e.g. ``auto`` and the explicit path
it picked, the same computation, timing differently). On a busy 2-core machine, ``--threads 1`` is far steadier.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from flora_hf.ops import (
    FLoRAShape,
    build_flora_bank,
    build_ia3_bank,
    build_lora_bank,
    choose_flora_path,
    flora_linear,
    ia3_scale,
    lora_bmm_delta,
    lora_loop_delta,
)
from flora_hf.ops.cost import merged_cost, roofline_for, stacked_cost

METHODS = ("base", "ia3", "flora_auto", "flora_rank1", "flora_stacked", "flora_merged", "lora_bmm", "lora_loop")
RANKLESS = ("base", "ia3")  # timed once per (dim, shape) and reported at every rank
FLORA_PATHS = {"flora_auto": "auto", "flora_rank1": "rank1", "flora_stacked": "stacked", "flora_merged": "merged"}
FAMILY = {**dict.fromkeys(FLORA_PATHS, "flora"), "lora_bmm": "lora", "lora_loop": "lora"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AGREE_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
TARGET_RANK1 = 1.10  # FLoRA rank 1 at both shapes
TARGET_RANK8_DECODE = 1.5  # FLoRA rank 8, decode
GIB = 1 << 30

Call = Callable[[], Tensor]
Sync = Callable[[], None]


@dataclass
class Settings:
    """Resolved CLI: device-dependent defaults filled in so the rest of the file never looks at argparse."""

    device: torch.device
    dtype: torch.dtype
    dims: list[int]
    ranks: list[int]
    shapes: dict[str, tuple[int, int]]
    repeats: Optional[int]  # fixed samples per method; None = adaptive within budget_s
    budget_s: float  # measuring time per (dim, shape) group, shared by its methods
    time_budget_s: Optional[float]  # whole run; None = unlimited
    threads: Optional[int]
    min_repeats: int
    max_repeats: int
    warmup: int
    min_sample_s: float
    max_call_s: float
    max_call_ratio: float
    max_gib: float
    out: Path
    quick: bool


@dataclass
class Slot:
    """One timed method in one (dim, shape) group; rankless methods have ``rank=None``."""

    method: str
    rank: Optional[int]
    fn: Optional[Call]
    path: Optional[str]
    est_gib: float
    model_ratio: float  # the cost model's time for this call over one base GEMM (1 for non-FLoRA methods)
    skipped: Optional[str] = None
    first_s: float = math.inf
    best_s: float = math.inf
    inner: int = 1
    target: int = 0
    single_shot: Optional[str] = None  # why the one unwarmed first call is the only sample
    samples: list[float] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.fn, self.skipped = None, reason


def parse_int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_shapes(text: str) -> dict[str, tuple[int, int]]:
    """``decode=32x1,prefill=8x512`` -> {name: (sequences, tokens per sequence)}."""
    shapes = {}
    for item in text.split(","):
        name, _, size = item.partition("=")
        batch, _, tokens = size.partition("x")
        shapes[name.strip()] = (int(batch), int(tokens))
    return shapes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--dims", type=parse_int_list, default=None, help="square layer widths (default 2048,2816,6144)")
    p.add_argument("--ranks", type=parse_int_list, default=[1, 2, 4, 8, 16])
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes("decode=32x1,prefill=8x512"))
    p.add_argument("--repeats", type=int, default=None, help="samples per method; default adapts to --budget-s")
    p.add_argument("--budget-s", type=float, default=None, help="measuring time per (dim, shape) group")
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="whole-run budget (CPU default 480, quick 150; 0 = unlimited, the cuda default)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--min-repeats", type=int, default=None)
    p.add_argument("--max-repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (the first also checks agreement)")
    p.add_argument("--min-sample-s", type=float, default=None, help="repeat fast calls inside one sample")
    p.add_argument(
        "--max-call-s",
        type=float,
        default=None,
        help="a call slower than this is timed once, unwarmed, and not repeated (CPU only by default)",
    )
    p.add_argument(
        "--max-call-ratio",
        type=float,
        default=None,
        help="likewise for a call slower than this many base calls (CPU: merged at decode is ~100x)",
    )
    p.add_argument("--max-gib", type=float, default=8.0, help="skip a cell whose estimated peak memory exceeds this")
    p.add_argument("--quick", action="store_true", help="d=2048 only, short budget")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p


def resolve(args: argparse.Namespace) -> Settings:
    """Device-dependent defaults: the CPU grid must fit ~10 minutes on 2 cores, the GPU runs it properly."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    cpu = args.device == "cpu"
    defaults = {
        "budget_s": (10.0 if args.quick else 20.0) if cpu else (2.0 if args.quick else 5.0),
        "time_budget_s": (150.0 if args.quick else 480.0) if cpu else 0.0,
        "min_repeats": 3 if cpu else 10,
        "max_repeats": 25 if cpu else 200,
        "warmup": 1 if cpu else 3,
        "min_sample_s": 0.02 if cpu else 0.002,
        "max_call_s": 4.0 if cpu else math.inf,
        "max_call_ratio": 20.0 if cpu else math.inf,
    }
    picked = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults}
    picked["time_budget_s"] = picked["time_budget_s"] or None
    dims = args.dims or ([2048] if args.quick else [2048, 2816, 6144])
    return Settings(
        device=torch.device(args.device),
        dtype=DTYPES[args.dtype],
        dims=dims,
        ranks=sorted(set(args.ranks)),
        shapes=args.shapes,
        repeats=args.repeats,
        out=args.out,
        quick=args.quick,
        max_gib=args.max_gib,
        threads=args.threads,
        **picked,
    )


@dataclass
class Budget:
    """Wall-clock plan for the run: each group gets the share of what is left that its predicted work claims."""

    end: float  # perf_counter() deadline of the whole run; inf = unlimited
    claims: list[tuple[float, float]]  # per group in run order: (predicted first round s, measuring budget s)

    def first_round_deadline(self, i: int) -> float:
        return self._share(i, sum(self.claims[i]), sum(self.claims[i]))

    def measure_deadline(self, i: int, first_deadline: float) -> float:
        """At least the group's measuring share, even when its first round ran past the cost model's prediction."""
        return max(first_deadline, self._share(i, self.claims[i][1], self.claims[i][1]))

    def _share(self, i: int, mine: float, this_group_left: float) -> float:
        now = time.perf_counter()
        if math.isinf(self.end):
            return math.inf
        left = this_group_left + sum(a + b for a, b in self.claims[i + 1 :])
        return now + max(0.0, self.end - now) * (mine / left if left > 0 else 1.0)


def make_sync(device: torch.device) -> Sync:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def flora_shape(batch: int, tokens: int, dim: int, rank: int, itemsize: int) -> FLoRAShape:
    """The FLoRAShape ``flora_linear`` builds for this call (per-row indices), so we see what its cost model sees."""
    return FLoRAShape(
        rows=batch,
        tokens=batch * tokens,
        d_in=dim,
        d_out=dim,
        rank=rank,
        itemsize=itemsize,
        per_token=False,
        shared=False,
    )


def model_ratio(path: Optional[str], shape: FLoRAShape, device: torch.device) -> float:
    """The cost model's time for a FLoRA path over one base GEMM; orders calls cheap-first and predicts them."""
    if path is None:
        return 1.0
    hw = roofline_for(device)
    base = stacked_cost(replace(shape, rank=1), hw)  # one GEMM against W0: the base layer's cost
    if path == "merged":
        return merged_cost(shape, hw) / base
    return stacked_cost(shape if path == "stacked" else replace(shape, rank=1), hw) / base


def estimate_gib(
    method: str, path: Optional[str], batch: int, tokens: int, dim: int, rank: int, itemsize: int
) -> float:
    """Coarse peak memory of one call (inputs, weight, temporaries), to skip cells that would not fit."""
    act = batch * tokens * dim  # elements in one activation-sized tensor
    resident = dim * dim + 2 * act + 2 * (batch + 1) * rank * dim
    if path == "stacked":
        temp = 3 * act * rank + act  # stacked inputs, stacked outputs, scaled outputs
    elif path == "merged":
        temp = 2 * batch * dim * dim + act  # ΔW per row and W0 ∘ ΔW per row
    elif method == "lora_bmm":
        temp = 3 * act + batch * tokens * rank
    else:
        temp = 3 * act
    return (resident + temp) * itemsize / GIB


def adapters_flora(n: int, rank: int, dim: int, cfg: Settings) -> tuple[Tensor, Tensor]:
    """n distinct rank-r FLoRA adapters near identity, so outputs stay comparable across paths."""
    pairs = [(1 + 0.1 * torch.randn(rank, dim), 1 + 0.1 * torch.randn(rank, dim)) for _ in range(n)]
    return build_flora_bank(pairs, dim, dim, dtype=cfg.dtype, device=cfg.device)


def adapters_lora(n: int, rank: int, dim: int, cfg: Settings) -> tuple[Tensor, Tensor]:
    triples = [(torch.randn(rank, dim) / dim**0.5, 0.01 * torch.randn(dim, rank), 2.0) for _ in range(n)]
    return build_lora_bank(triples, dim, dim, dtype=cfg.dtype, device=cfg.device)


def build_slots(cfg: Settings, x: Tensor, weight: Tensor, bias: Tensor) -> list[Slot]:
    """Every method of one (dim, shape) group as a zero-argument call, in report order (base, ia3, then by rank)."""
    batch, tokens, dim = x.shape
    itemsize = x.element_size()
    idx = torch.arange(1, batch + 1, device=cfg.device)

    def slot(method: str, rank: Optional[int], fn: Call, path: Optional[str] = None) -> Slot:
        est = estimate_gib(method, path, batch, tokens, dim, rank or 1, itemsize)
        ratio = model_ratio(path, flora_shape(batch, tokens, dim, rank or 1, itemsize), cfg.device)
        s = Slot(method, rank, fn, path, est, ratio)
        if est > cfg.max_gib:
            s.skip(f"memory: estimated peak {est:.1f} GiB > --max-gib {cfg.max_gib:g}")
        return s

    ia3_bank = build_ia3_bank(
        [1 + 0.1 * torch.randn(dim) for _ in range(batch)], dim, dtype=cfg.dtype, device=cfg.device
    )
    slots = [
        slot("base", None, lambda: F.linear(x, weight, bias)),
        slot("ia3", None, lambda: ia3_scale(F.linear(x, weight, bias), ia3_bank, idx)),
    ]
    for rank in cfg.ranks:
        f_in, f_out = adapters_flora(batch, rank, dim, cfg)
        l_a, l_b = adapters_lora(batch, rank, dim, cfg)
        for method, path in FLORA_PATHS.items():
            if method == "flora_rank1" and rank != 1:
                continue
            shape = flora_shape(batch, tokens, dim, rank, itemsize)
            chosen = choose_flora_path(shape, cfg.device) if path == "auto" else path
            call = _flora_call(x, f_in, f_out, idx, weight, bias, path)
            slots.append(slot(method, rank, call, chosen))
        slots.append(slot("lora_bmm", rank, _lora_call(lora_bmm_delta, x, l_a, l_b, idx, weight, bias)))
        slots.append(slot("lora_loop", rank, _lora_call(lora_loop_delta, x, l_a, l_b, idx, weight, bias)))
    return slots


def _flora_call(x: Tensor, f_in: Tensor, f_out: Tensor, idx: Tensor, weight: Tensor, bias: Tensor, path: str) -> Call:
    return lambda: flora_linear(x, f_in, f_out, idx, weight=weight, bias=bias, path=path)


def _lora_call(
    delta: Callable[..., Tensor], x: Tensor, a: Tensor, b: Tensor, idx: Tensor, weight: Tensor, bias: Tensor
) -> Call:
    """Base layer plus the additive LoRA update, as a LoRA-adapted layer serves it."""
    return lambda: F.linear(x, weight, bias) + delta(x, a, b, idx)


def time_once(fn: Call, sync: Sync) -> tuple[float, Tensor]:
    sync()
    start = time.perf_counter()
    y = fn()
    sync()
    return time.perf_counter() - start, y


def time_sample(fn: Call, inner: int, sync: Sync) -> float:
    """Seconds per call over ``inner`` back-to-back calls (amortises timer and sync overhead on fast calls)."""
    sync()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return (time.perf_counter() - start) / inner


def rel_err(y: Tensor, ref: Tensor) -> float:
    y, ref = y.float(), ref.float()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def first_round(slots: list[Slot], cfg: Settings, sync: Sync, deadline: float) -> dict[str, float]:
    """Call each method once, cheapest first: warms it up, sizes its samples, checks methods of one family agree.

    A call slower than ``max_call_s`` keeps this single unwarmed time as its only sample (on a 2-core CPU the big
    stacked cells take tens of seconds each). A call the cost model predicts would end past ``deadline`` is skipped.
    """
    refs: dict[tuple[str, Optional[int]], Tensor] = {}
    errors: dict[str, float] = {}
    base_s: Optional[float] = None
    for s in sorted((s for s in slots if s.fn is not None), key=lambda s: s.model_ratio):  # stable: base first
        predicted = None if base_s is None else base_s * s.model_ratio
        if predicted is not None and time.perf_counter() + predicted > deadline:
            s.skip(f"time: one call predicted {predicted:.1f} s, past this group's share of --time-budget-s")
            continue
        s.first_s, y = time_once(s.fn, sync)
        s.best_s = s.first_s
        base_s = s.first_s if s.method == "base" else base_s
        family = FAMILY.get(s.method)
        if family is not None:
            ref = refs.setdefault((family, s.rank), y)
            if ref is not y:
                errors[f"{s.method}@r{s.rank}"] = rel_err(y, ref)
        del y
        if s.first_s > cfg.max_call_s:
            s.single_shot = f"one unwarmed call: {s.first_s:.1f} s > --max-call-s {cfg.max_call_s:g}"
        elif base_s and s.first_s > cfg.max_call_ratio * base_s:
            s.single_shot = (
                f"one unwarmed call: {s.first_s / base_s:.0f}x base > --max-call-ratio {cfg.max_call_ratio:g}"
            )
        if s.single_shot:
            s.samples.append(s.first_s)
    return errors


def plan_samples(live: list[Slot], cfg: Settings) -> None:
    """Inner calls per sample (fast calls batched past timer noise) and a sample target within the group budget."""
    for s in live:
        s.inner = max(1, min(10_000, math.ceil(cfg.min_sample_s / max(s.best_s, 1e-9))))
    per_slot_s = cfg.budget_s / len(live)
    for s in live:
        fit = int(per_slot_s // (s.best_s * s.inner))
        s.target = cfg.repeats or max(cfg.min_repeats, min(cfg.max_repeats, fit))


def due(s: Slot, r: int, rounds: int) -> bool:
    """Whether ``s`` samples in round ``r``: its target spread evenly over the rounds, every method in round 0.

    Cheap methods (many samples) and slow ones (few) then progress together, so a deadline that cuts the rounds
    short leaves each with its share, and every round still interleaves all methods that are due.
    """
    return -(-(r + 1) * s.target // rounds) > -(-r * s.target // rounds)


def measure(slots: list[Slot], cfg: Settings, sync: Sync, deadline: float) -> int:
    """Extra warm-up, then round-robin rounds (start rotated each round) until every method has its samples."""
    live = [s for s in slots if s.fn is not None and not s.single_shot]
    if not live:
        return 0
    for _ in range(cfg.warmup - 1):
        for s in live:
            s.best_s = min(s.best_s, time_once(s.fn, sync)[0])
    plan_samples(live, cfg)
    rounds = max(s.target for s in live)
    done = 0
    for r in range(rounds):
        todo = [s for s in live if due(s, r, rounds)]
        shift = r % len(todo)
        sampled = 0
        for s in todo[shift:] + todo[:shift]:
            if time.perf_counter() + s.best_s * s.inner <= deadline:
                s.samples.append(time_sample(s.fn, s.inner, sync))
                sampled += 1
        if not sampled:
            break
        done += 1
    for s in live:
        if not s.samples:  # the budget ran out before its first measured sample: fall back to the first call
            s.single_shot = "one unwarmed call: --time-budget-s ran out before a measured sample"
            s.samples.append(s.first_s)
    return done


def cell_records(slots: list[Slot], cfg: Settings, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (rank, method); rankless methods repeated at every rank so each rank row is complete."""
    by_key = {(s.method, s.rank): s for s in slots}
    base = by_key[("base", None)]
    base_s = statistics.median(base.samples) if base.samples else None
    base_min = min(base.samples) if base.samples else None
    records = []
    for rank in cfg.ranks:
        for method in METHODS:
            s = by_key.get((method, None if method in RANKLESS else rank))
            if s is None:
                continue
            median = statistics.median(s.samples) if s.samples else None
            records.append(
                {
                    **meta,
                    "rank": rank,
                    "method": method,
                    "path": s.path,
                    "status": "skipped" if s.skipped else "ok",
                    "reason": s.skipped or s.single_shot,
                    "median_s": median,
                    "min_s": min(s.samples) if s.samples else None,
                    "samples_s": s.samples,
                    "inner_calls": s.inner,
                    "single_shot": bool(s.single_shot),
                    "ratio_to_base": median / base_s if median and base_s else None,
                    "min_ratio_to_base": min(s.samples) / base_min if s.samples and base_min else None,
                    "model_ratio": round(s.model_ratio, 3) if s.method in FLORA_PATHS else None,
                    "est_peak_gib": round(s.est_gib, 3),
                    "shared_across_ranks": method in RANKLESS,
                }
            )
    return records


def run_group(cfg: Settings, dim: int, shape: str, budget: Budget, i: int) -> tuple[list, dict]:
    """Time every method for one layer width and one batch shape (a square d x d nn.Linear with bias)."""
    torch.manual_seed(dim)
    batch, tokens = cfg.shapes[shape]
    weight = torch.randn(dim, dim, dtype=cfg.dtype, device=cfg.device) / dim**0.5  # nn.Linear: (d_out, d_in)
    bias = torch.randn(dim, dtype=cfg.dtype, device=cfg.device)
    x = torch.randn(batch, tokens, dim, dtype=cfg.dtype, device=cfg.device)
    slots = build_slots(cfg, x, weight, bias)
    sync = make_sync(cfg.device)
    start = time.perf_counter()
    with torch.inference_mode():
        first_deadline = budget.first_round_deadline(i)
        errors = first_round(slots, cfg, sync, first_deadline)
        warm_s = time.perf_counter() - start
        rounds = measure(slots, cfg, sync, budget.measure_deadline(i, first_deadline))
    total_s = time.perf_counter() - start
    log(f"d={dim} {shape} ({batch}x{tokens}): first round {warm_s:.1f}s, {rounds} measured round(s), {total_s:.1f}s")
    meta = {"dim": dim, "shape": shape, "batch": batch, "tokens_per_seq": tokens}
    agreement = {**meta, "max_rel_err": errors, "tol": AGREE_TOL[cfg.dtype], "rounds": rounds, "seconds": total_s}
    bad = {k: v for k, v in errors.items() if v > AGREE_TOL[cfg.dtype]}
    if bad:
        log(f"  WARNING: methods disagree beyond {AGREE_TOL[cfg.dtype]:g}: {bad}")
    return cell_records(slots, cfg, meta), agreement


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": _loadavg(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / GIB, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return info


def _loadavg() -> Optional[list[float]]:
    """Other processes on the machine skew CPU timings; the JSON records how busy it was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def find(cells: list[dict], dim: int, shape: str, rank: int, method: str) -> Optional[dict]:
    for c in cells:
        if (c["dim"], c["shape"], c["rank"], c["method"]) == (dim, shape, rank, method):
            return c
    return None


def verdict(cells: list[dict], cfg: Settings) -> list[dict[str, Any]]:
    """The targets, judged on what users get (``path="auto"``): PASS only on a measured ratio within target."""
    checks = [("rank 1 decode", "decode", 1, TARGET_RANK1), ("rank 1 prefill", "prefill", 1, TARGET_RANK1)]
    checks.append(("rank 8 decode", "decode", 8, TARGET_RANK8_DECODE))
    out = []
    for dim in cfg.dims:
        for name, shape, rank, target in checks:
            c = find(cells, dim, shape, rank, "flora_auto")
            ratio = c["ratio_to_base"] if c else None
            min_ratio = c["min_ratio_to_base"] if c else None
            status = "NOT MEASURED" if ratio is None else ("PASS" if ratio <= target else "FAIL")
            best = _best_flora(cells, dim, shape, rank)
            twin = find(cells, dim, shape, rank, f"flora_{c['path']}") if c else None
            out.append(
                {
                    "dim": dim,
                    "target": name,
                    "limit": target,
                    "ratio": ratio,
                    "min_ratio": min_ratio,
                    "path": c["path"] if c else None,
                    "best_explicit_path": best,
                    "status": status,
                    "unreliable": _unreliable(c, twin, find(cells, dim, shape, rank, "base")),
                }
            )
    return out


def _unreliable(auto: Optional[dict], twin: Optional[dict], base: Optional[dict], tolerance: float = 0.2) -> list[str]:
    """Signs that a verdict measured noise rather than the code; the PASS/FAIL stands but is flagged.

    ``auto`` and the explicit path it picked run the same code, so their times should match; an adapted layer does
    strictly more work than the base, so it cannot be much faster; one unwarmed call is a weak measurement.
    """
    if not (auto and auto["ratio_to_base"]):
        return []
    reasons = []
    ratio = auto["ratio_to_base"]
    if (
        twin
        and twin["ratio_to_base"]
        and abs(ratio - twin["ratio_to_base"]) > tolerance * min(ratio, twin["ratio_to_base"])
    ):
        reasons.append(f"auto {ratio:.2f}x vs {twin['method']} {twin['ratio_to_base']:.2f}x for the same computation")
    if ratio < 1 - tolerance / 2:
        reasons.append(f"{ratio:.2f}x is faster than the base layer it contains")
    if auto["single_shot"] or (base and base["single_shot"]):
        reasons.append("one unwarmed call")
    return reasons


def _best_flora(cells: list[dict], dim: int, shape: str, rank: int) -> Optional[tuple[str, float]]:
    found = [find(cells, dim, shape, rank, m) for m in ("flora_rank1", "flora_stacked", "flora_merged")]
    ratios = [(c["path"], c["ratio_to_base"]) for c in found if c and c["ratio_to_base"]]
    return min(ratios, key=lambda pr: pr[1]) if ratios else None


def fmt_ratio(c: Optional[dict]) -> str:
    if c is None:
        return "-"
    if c["status"] == "skipped":
        return "skip:" + c["reason"].split(":", 1)[0]
    if c["ratio_to_base"] is None:
        return "?"
    return f"{c['ratio_to_base']:.2f}" + ("*" if c["single_shot"] else "")


def table_rows(cells: list[dict], cfg: Settings) -> list[list[str]]:
    rows = []
    for dim in cfg.dims:
        for shape in cfg.shapes:
            for rank in cfg.ranks:
                base = find(cells, dim, shape, rank, "base")
                auto = find(cells, dim, shape, rank, "flora_auto")
                base_ms = f"{base['median_s'] * 1e3:.3f}" if base and base["median_s"] else "-"
                ratios = [fmt_ratio(find(cells, dim, shape, rank, m)) for m in METHODS[1:]]
                rows.append([str(dim), shape, str(rank), base_ms, auto["path"] if auto else "-", *ratios])
    return rows


def print_table(cells: list[dict], cfg: Settings) -> None:
    """Ratio to the base layer per cell (rich when installed); '*' = one unwarmed call, 'skip' = over --max-gib."""
    header = ["dim", "shape", "rank", "base ms", "auto path", *METHODS[1:]]
    rows = table_rows(cells, cfg)
    title = f"Ratio to base layer, {cfg.device.type} {str(cfg.dtype).removeprefix('torch.')}"
    note = "* one unwarmed call; skip:memory over --max-gib; skip:time over --time-budget-s; ia3 is rank-independent"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        print(title)
        for r in [header, *rows]:
            print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
        print(note)
        return
    table = Table(title=title, caption=note)
    for h in header:
        table.add_column(h, justify="right")
    for i, r in enumerate(rows):
        table.add_row(*r, end_section=(i + 1) % len(cfg.ranks) == 0)
    Console(width=max(Console().width, 160)).print(table)


def print_verdict(checks: list[dict]) -> None:
    print("\nVerdict (FLoRA path='auto', median time over the base layer's median):")
    for v in checks:
        ratio = "n/a" if v["ratio"] is None else f"{v['ratio']:.2f}x"
        extra = f"  UNRELIABLE: {'; '.join(v['unreliable'])}" if v["unreliable"] else ""
        best = v["best_explicit_path"]
        best_txt = f"; best explicit path {best[0]} {best[1]:.2f}x" if best else ""
        min_txt = "" if v["min_ratio"] is None else f"; min/min {v['min_ratio']:.2f}x"
        line = f"  d={v['dim']:>5} {v['target']:<15} {ratio:>7} <= {v['limit']:.2f}x ? {v['status']:<4}"
        print(f"{line}  [path {v['path']}{min_txt}{best_txt}]{extra}")


def plot(cells: list[dict], cfg: Settings, path: Path) -> None:
    """Ratio-to-base vs rank: one row of panels per dim, one panel per shape, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(cfg.shapes)
    fig, axes = plt.subplots(len(cfg.dims), len(shapes), figsize=(6 * len(shapes), 4 * len(cfg.dims)), squeeze=False)
    for i, dim in enumerate(cfg.dims):
        for j, shape in enumerate(shapes):
            _plot_panel(axes[i][j], cells, cfg, dim, shape)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5) or 1)
    fig.suptitle(
        f"One adapted linear layer, every example its own adapter ({cfg.device.type}, {cfg.dtype}); "
        "time over the base layer's; open markers: one unwarmed call"
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_panel(ax: Any, cells: list[dict], cfg: Settings, dim: int, shape: str) -> None:
    """One shape at one width; open markers are single unwarmed calls."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plotted = False
    for method in METHODS[1:]:
        found = [c for r in cfg.ranks if (c := find(cells, dim, shape, r, method)) and c["ratio_to_base"]]
        (line,) = ax.plot([c["rank"] for c in found], [c["ratio_to_base"] for c in found], marker="o", label=method)
        weak = [c for c in found if c["single_shot"]]
        ax.scatter([c["rank"] for c in weak], [c["ratio_to_base"] for c in weak], color="white", zorder=3, s=14)
        plotted = plotted or bool(found)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(TARGET_RANK1, color="green", ls=":", lw=1)
    if shape == "decode":
        ax.axhline(TARGET_RANK8_DECODE, color="orange", ls=":", lw=1)
    base = find(cells, dim, shape, cfg.ranks[0], "base")
    base_ms = f", base {base['median_s'] * 1e3:.3g} ms" if base and base["median_s"] else ""
    batch, tokens = cfg.shapes[shape]
    ax.set_title(f"d={dim} {shape} ({batch}x{tokens}){base_ms}")
    if plotted:  # log scales fail on an empty panel (every cell skipped)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.text(0.5, 0.5, "no measured cells", transform=ax.transAxes, ha="center")
    ax.set_xticks(cfg.ranks, [str(r) for r in cfg.ranks])
    ax.set_xlabel("rank")
    ax.set_ylabel("time / base time")
    ax.grid(True, which="both", alpha=0.3)


def group_order(cfg: Settings) -> list[tuple[int, str]]:
    """Cheapest (dim, shape) groups first, so a CPU time budget is spent on the cells it can afford."""
    groups = [(dim, shape) for dim in cfg.dims for shape in cfg.shapes]
    return sorted(groups, key=lambda g: g[0] ** 2 * math.prod(cfg.shapes[g[1]]))


def predicted_first_round_s(cfg: Settings, dim: int, shape: str) -> float:
    """Cost-model seconds for one call of every method in a group: with its measuring budget, its claim on time."""
    batch, tokens = cfg.shapes[shape]
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    one = flora_shape(batch, tokens, dim, 1, itemsize)
    base_s = stacked_cost(one, roofline_for(cfg.device))
    ratios = [1.0, 1.0]  # base, ia3
    for rank in cfg.ranks:
        shape_r = replace(one, rank=rank)
        paths = [choose_flora_path(shape_r, cfg.device), "stacked", "merged"] + (["rank1"] if rank == 1 else [])
        ratios += [model_ratio(p, shape_r, cfg.device) for p in paths] + [1.0, 1.0]  # + two LoRA forms
    return base_s * sum(ratios)


def run_all(cfg: Settings) -> tuple[list[dict], list[dict]]:
    """Every group, cheapest first, each given the share of the remaining time budget its predicted work claims.

    Unused time carries forward to the later (bigger) groups.
    """
    end = time.perf_counter() + cfg.time_budget_s if cfg.time_budget_s else math.inf
    cells: list[dict] = []
    agreement: list[dict] = []
    order = group_order(cfg)
    budget = Budget(end, [(predicted_first_round_s(cfg, dim, shape), cfg.budget_s) for dim, shape in order])
    for i, (dim, shape) in enumerate(order):
        group_cells, group_agree = run_group(cfg, dim, shape, budget, i)
        cells += group_cells
        agreement.append(group_agree)
    return cells, agreement


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the grid, print table and verdict, write JSON and PNG into --out; returns the JSON document."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve(build_parser().parse_args(argv))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = device_info(cfg.device)
    if cfg.device.type == "cpu" and info["loadavg_at_start"] and info["loadavg_at_start"][0] > 0.5:
        log(
            f"note: load average {info['loadavg_at_start']}: other processes will skew CPU timings (--threads 1 helps)"
        )
    started = time.perf_counter()
    cells, agreement = run_all(cfg)
    checks = verdict(cells, cfg)
    print_table(cells, cfg)
    print_verdict(checks)
    info["loadavg_at_end"] = _loadavg()
    doc = {
        "command": shlex.join(["python", "bench/layer.py", *argv]),
        "argv": argv,
        "device": info,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "settings": _settings_json(cfg),
        "elapsed_s": time.perf_counter() - started,
        "cells": cells,
        "agreement": agreement,
        "verdict": checks,
    }
    write_outputs(doc, cells, cfg)
    return doc


def _settings_json(cfg: Settings) -> dict[str, Any]:
    raw = {k: getattr(cfg, k) for k in Settings.__dataclass_fields__}
    raw.update(device=str(cfg.device), dtype=str(cfg.dtype), out=str(cfg.out))
    for key in ("max_call_s", "max_call_ratio"):
        raw[key] = None if math.isinf(raw[key]) else raw[key]
    return raw


def write_outputs(doc: dict[str, Any], cells: list[dict], cfg: Settings) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    stem = f"layer_{cfg.device.type}_{doc['dtype']}" + ("_quick" if cfg.quick else "")
    json_path, png_path = cfg.out / f"{stem}.json", cfg.out / f"{stem}.png"
    json_path.write_text(json.dumps(doc, indent=1))
    plot(cells, cfg, png_path)
    print(f"\nwrote {json_path} and {png_path} ({doc['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
