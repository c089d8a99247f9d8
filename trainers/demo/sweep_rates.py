"""Learning-rate sweep per method at a fixed budget, selected on the recipe's eval split, the same grid for each.

The paper tuned each method's rate; a comparison is only fair when every method gets the same search. Here each
method starts from its recipe rate and walks the 1-3-10 ladder (…, 1e-3, 3e-3, 1e-2, …): the start and one step either
side, then one more step outward while the best rate sits on an edge (at most ``max_extend`` times), so no method
is judged at a rate the grid cut off. Selection uses the recipe's eval split (code: held-out files; speech: dev),
so sweep on a language the reported table does not score, or on a split it does not use. The chosen rates are
printed as the recipe's ``learning_rates`` line; copying them into the recipe is a deliberate step.

    python -m trainers.demo.sweep_rates --recipe whisper-tiny-en --lang en-gb-scotland --steps 40
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from trainers.demo.reproduce_small import PAPER_METHODS, log_progress_only
from trainers.recipes.base_models import load_base
from trainers.recipes.datasets import build_data
from trainers.recipes.recipe import apply_overrides, load_recipe, parse_set_items
from trainers.recipes.training import train

logger = logging.getLogger(__name__)

LADDER = (1.0, 3.0)
"""Mantissas of the rate ladder: two points per decade, the spacing rate sweeps conventionally use."""


def ladder_index(rate: float) -> int:
    """The nearest ladder rung to ``rate`` (rung 2k is 10^k, rung 2k+1 is 3·10^k)."""
    if rate <= 0 or not math.isfinite(rate):
        raise ValueError(f"a learning rate must be positive and finite, got {rate!r}")
    rungs = {2 * k + i: LADDER[i] * 10.0**k for k in range(-8, 3) for i in range(2)}
    return min(rungs, key=lambda n: abs(math.log(rungs[n]) - math.log(rate)))


def ladder_rate(index: int) -> float:
    k, i = divmod(index, 2)
    return float(f"{LADDER[i] * 10.0**k:.0e}")


@dataclass
class MethodSweep:
    """One method's tried rates (in order tried) and eval losses; ``best`` is the lowest loss's rate."""

    method: str
    tried: dict[float, float] = field(default_factory=dict)
    extended: int = 0

    @property
    def best(self) -> float:
        """A diverged run's NaN or inf loss ranks last rather than breaking the comparison."""
        return min(self.tried, key=lambda r: self.tried[r] if math.isfinite(self.tried[r]) else math.inf)

    @property
    def at_edge(self) -> bool:
        rates = sorted(self.tried)
        return self.best in (rates[0], rates[-1])


def sweep_method(method: str, start: float, score: Callable[[float], float], max_extend: int = 2) -> MethodSweep:
    """Three rungs around ``start``, then outward one rung at a time while the best is on an edge."""
    result = MethodSweep(method)
    centre = ladder_index(start)
    for index in (centre - 1, centre, centre + 1):
        result.tried[ladder_rate(index)] = score(ladder_rate(index))
    while result.at_edge and result.extended < max_extend:
        step = 1 if result.best == max(result.tried) else -1
        nxt = ladder_rate(ladder_index(result.best) + step)
        result.tried[nxt] = score(nxt)
        result.extended += 1
    return result


def markdown(sweeps: Sequence[MethodSweep], command: str, budget: str) -> str:
    lines = [f"`{command}` ({budget}; eval loss, lower is better; **bold**: chosen)", ""]
    lines += ["| method | rate | eval loss |", "|---|---|---|"]
    for s in sweeps:
        for rate in sorted(s.tried):
            loss = f"{s.tried[rate]:.4f}"
            lines.append(f"| {s.method} | {rate:g} | {f'**{loss}**' if rate == s.best else loss} |")
    edge = [s.method for s in sweeps if s.at_edge]
    if edge:
        lines += ["", f"Still on the grid's edge after extending: {', '.join(edge)}."]
    rates = ", ".join(f"{s.method}: {s.best:.1e}" for s in sweeps)
    lines += ["", f"learning_rates: {{{rates}}}", ""]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainers.demo.sweep_rates", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help="recipe name or YAML path")
    p.add_argument("--lang", required=True, help="the language (or accent) to tune on")
    p.add_argument("--methods", default=",".join(PAPER_METHODS))
    p.add_argument("--steps", type=int, required=True, help="optimizer steps per run: the budget being compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-extend", type=int, default=2, help="extra rungs tried past an edge, per method")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, repeatable")
    p.add_argument("--out", type=Path, default=Path("out/sweep-rates"))
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    log_progress_only()
    template = load_recipe(args.recipe, {**parse_set_items(args.set), "LANG": args.lang, "seed": args.seed})
    budget = {
        "MAX_STEPS": args.steps, "eval_steps": args.steps, "save_steps": 10**6, "logging_steps": args.steps,
        "warmup_steps": max(1, args.steps // 10),
    }  # fmt: skip
    base = load_base(template, progress=False)
    data = build_data(template, base)

    def runner(method: str) -> Callable[[float], float]:
        def score(rate: float) -> float:
            out = args.out / f"{method}-{rate:g}"
            recipe = apply_overrides(template, {**budget, "METHOD": method, "lr": rate, "OUTPUT_DIR": str(out)})
            loss = float(train(recipe, progress=False, base=base.private_copy(), data=data).metrics["eval_loss"])
            logger.info("%s lr %g: eval loss %.4f", method, rate, loss)
            return loss

        return score

    sweeps = []
    for method in [m for m in args.methods.split(",") if m]:
        start = apply_overrides(template, {"METHOD": method}).learning_rate
        sweeps.append(sweep_method(method, start, runner(method), args.max_extend))
    command = shlex.join(["python", "-m", "trainers.demo.sweep_rates", *argv])
    text = markdown(sweeps, command, f"{args.steps} steps, {args.lang}, seed {args.seed}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.md").write_text(text, encoding="utf-8")
    rows = [{**asdict(s), "tried": {f"{r:g}": v for r, v in s.tried.items()}, "best": s.best} for s in sweeps]
    (args.out / "sweep.json").write_text(json.dumps({"command": command, "sweeps": rows}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
