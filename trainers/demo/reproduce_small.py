"""``make reproduce-small``: the paper's method comparison (FLoRA ≈ LoRA > IA3) at toy scale, on a CPU.

Code: the demo's tiny GPTBigCode (pretrained on this machine's python, perl and C files) gets one FLoRA, one LoRA
and one IA3 adapter per language, each trained through the tiny-code recipe with the same budget (steps, batch,
data, layers: c_attn at rank 1, as the paper's StarCoder runs), and is scored by held-out loss; perl was in the
model's pretraining, shell (scripts in /usr/bin) was not. Speech: a tiny Whisper pretrained on espeak-ng speech
gets the same per language (every fully-connected layer, rank 1, Marathi rank 4), scored by test loss, WER and
CER on real sentences neither training stage heard. Each method uses its own learning rate from the tiny recipes,
tuned by a small sweep on languages this table does not report (as the paper tuned its rates per method). Results
go to ``<out>/results.json`` and ``results.md`` with a verdict on the paper's ordering per language and metric,
stated as measured. Other methods (``--methods flora,lora,ia3,milora``) get rows but no verdict: the paper's claim
is about these three.

    python -m trainers.demo.reproduce_small [--code-steps 300] [--speech-steps 400] [--skip-speech] [--out out/reproduce-small]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader
from transformers.utils import logging as hf_logging

from trainers.eval_cli import evaluate_speech
from trainers.offline.synth_speech import EspeakNotFound, espeak_binary
from trainers.recipes.base_models import load_base
from trainers.recipes.datasets import RecipeData, build_data, speech_split
from trainers.recipes.recipe import Recipe, apply_overrides, load_recipe
from trainers.recipes.training import train

logger = logging.getLogger(__name__)

CODE_LANGUAGES = ("perl", "shell")
"""perl: one of the tiny model's pretraining languages; shell: one it never saw (the low-resource case)."""
SPEECH_LANGUAGES = ("hi", "mr")
REAL_WHISPER_RECIPE = "whisper-tiny-en"
REAL_WHISPER_ACCENTS = ("en-gb-scotland", "en-029")
"""The pretrained tiny.en is English-only: its "languages" are espeak-ng accents, the two its base transcribes worst."""
PAPER_METHODS = ("flora", "lora", "ia3")
"""The methods of the paper's claim (FLoRA ≈ LoRA > IA3): the default set, and the ones a verdict needs."""
CODE_STEPS = 300
SPEECH_STEPS = 400
"""Default budgets: the same for every method; about 8 minutes for the whole table on an idle 2-core CPU."""
TIE = 0.02
"""Relative difference under which two methods count as equal (≈) on a metric."""


@dataclass
class Row:
    """One (task, language, method) result; ``method`` "base" is the model without adapter."""

    task: str
    language: str
    method: str
    loss: float
    wer: Optional[float] = None
    normalized_wer: Optional[float] = None
    cer: Optional[float] = None
    rank: Optional[int] = None
    lr: Optional[float] = None
    steps: int = 0
    train_seconds: float = 0.0
    trainable_params: int = 0
    seed: int = 0


@dataclass
class Summary:
    """One (task, language, method) over the seeds: mean and standard deviation (n - 1) of each metric."""

    task: str
    language: str
    method: str
    seeds: int
    mean: dict[str, float]
    std: dict[str, float]


@dataclass
class Verdict:
    task: str
    language: str
    metric: str
    values: dict[str, float]
    flora_matches_lora: bool
    both_beat_ia3: bool
    holds: bool
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def dataset_loss(model: Any, dataset: Any, collator: Any, batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy over ``dataset`` (labels -100 ignored), the same for every method."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        batch.pop("adapter_names", None)
        n = (
            int((batch["labels"][:, 1:] != -100).sum())
            if "input_ids" in batch
            else int((batch["labels"] != -100).sum())
        )
        loss = model(**batch).loss
        total += float(loss) * n
        tokens += n
    return total / max(tokens, 1)


def trainable_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def verdict(task: str, language: str, metric: str, values: dict[str, float]) -> Verdict:
    """The paper's ordering on one metric (lower is better): FLoRA within :data:`TIE` of LoRA, both below IA3."""
    flora, lora, ia3 = values["flora"], values["lora"], values["ia3"]
    scale = max(abs(lora), 1e-9)
    matches = abs(flora - lora) / scale <= TIE
    beats = flora < ia3 and lora < ia3
    note = ""
    if not matches:
        note = "FLoRA better than LoRA" if flora < lora else "LoRA better than FLoRA"
    if not beats:
        note = (note + "; " if note else "") + "IA3 not worse than both"
    return Verdict(task, language, metric, values, matches, beats, matches and beats, note)


# ------------------------------------------------------------------------------------------------------ runs
def _recipe(template: Recipe, language: str, method: str, steps: int, out: Path, extra: dict[str, Any]) -> Recipe:
    """``template`` (the recipe file, read once, so every method of the table sees the same file even if it is
    edited while the table runs) for one method and language."""
    overrides = {
        "LANG": language,
        "METHOD": method,
        "MAX_STEPS": steps,
        "OUTPUT_DIR": str(out / f"{method}-{language}"),
        "eval_steps": 10**6,  # score once, at the end, with dataset_loss
        "save_steps": 10**6,  # no checkpoints: nothing resumes here
        "max_eval_examples": 10**6,  # the whole held-out split
        "logging_steps": max(1, steps // 5),
        **extra,
    }
    return apply_overrides(template, overrides)


def run_task(
    task: str, recipe_name: str, languages: Sequence[str], methods: Sequence[str], steps: int, out: Path,
    extra: Optional[dict[str, Any]] = None, progress: bool = False, seed: int = 0,
) -> list[Row]:  # fmt: skip
    """Every method on every language from the same base model and the same data, scored the same way. ``seed``
    is the recipes' seed (initialisation and data order; for synthetic speech also which sentences are held out)."""

    extra = {**dict(extra or {}), "seed": seed}
    out = out / f"seed-{seed}"
    template = load_recipe(recipe_name)
    first = _recipe(template, languages[0], "flora", steps, out, extra)
    base = load_base(first, progress=progress)
    base.model.eval()
    rows: list[Row] = []
    for language in languages:
        recipe = _recipe(template, language, "flora", steps, out, extra)
        data: RecipeData = build_data(recipe, base)
        if task == "code":
            scored, split = data.eval[language], "held-out"
        else:
            split = recipe.test_split
            scored = speech_split(recipe, base, language, recipe.data_sources()[language], split)
        logger.info("%s %s: %d train examples, %d %s examples", task, language, len(data.train), len(scored), split)
        base_row = Row(task, language, "base", dataset_loss(base.model, scored, data.collator), seed=seed)
        if task == "speech":
            _add_wer(base_row, evaluate_speech(base.model, base, recipe, language, split, None))
        rows.append(base_row)
        for method in methods:
            recipe = _recipe(template, language, method, steps, out, extra)
            start = time.perf_counter()
            result = train(recipe, progress=progress, base=base.private_copy(), data=data)
            model = result.model
            row = Row(
                task, language, method, dataset_loss(model, scored, data.collator),
                rank=_rank(recipe, language), lr=recipe.learning_rate, steps=steps,
                train_seconds=round(time.perf_counter() - start, 1), trainable_params=trainable_parameters(model),
                seed=seed,
            )  # fmt: skip
            if task == "speech":
                _add_wer(row, evaluate_speech(model, base, recipe, language, split, language))
            rows.append(row)
            logger.info("%s %s %s: loss %.4f (base %.4f)", task, language, method, row.loss, base_row.loss)
    return rows


def _rank(recipe: Recipe, language: str) -> Optional[int]:
    """The adapter's rank as trained: none for IA3, MiLoRA's experts' own ``r`` where its settings give one."""
    if recipe.method == "ia3":
        return None
    if recipe.method == "milora" and "r" in recipe.milora:
        return int(recipe.milora["r"])
    return recipe.rank_for(language)


def _add_wer(row: Row, result: dict[str, Any]) -> None:
    row.wer, row.normalized_wer, row.cer = result["wer"], result["normalized_wer"], result["cer"]


METRICS = ("loss", "wer", "normalized_wer", "cer")


def summarize(rows: Sequence[Row]) -> list[Summary]:
    """Mean ± standard deviation over seeds per (task, language, method), as the paper reports WER."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.task, r.language, r.method), []).append(r)
    out = []
    for (task, language, method), group in groups.items():
        mean, std = {}, {}
        for metric in METRICS:
            values = [getattr(r, metric) for r in group if getattr(r, metric) is not None]
            if values:
                mean[metric] = statistics.fmean(values)
                std[metric] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(Summary(task, language, method, len(group), mean, std))
    return out


def verdicts_for(summaries: Sequence[Summary]) -> list[Verdict]:
    """The paper's ordering on each metric's mean over seeds."""
    out = []
    keys = sorted({(s.task, s.language) for s in summaries}, key=lambda k: (k[0] != "code", k[1]))
    for task, language in keys:
        by_method = {s.method: s for s in summaries if (s.task, s.language) == (task, language)}
        if not set(PAPER_METHODS) <= set(by_method):
            continue
        metrics = ["loss"] + (["wer", "cer"] if task == "speech" else [])
        for metric in metrics:
            out.append(verdict(task, language, metric, {m: by_method[m].mean[metric] for m in PAPER_METHODS}))
    return out


# ---------------------------------------------------------------------------------------------------- output
def _fmt(value: Optional[float], percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.4f}"


def loss_change(report: Report, row: Row) -> Optional[float]:
    """``row``'s held-out loss relative to the base model's on the same task and language (-0.02: 2% lower)."""
    same = (row.task, row.language, "base", row.seed)
    base = next((r for r in report.rows if (r.task, r.language, r.method, r.seed) == same), None)
    if base is None or row.method == "base" or not base.loss:
        return None
    return row.loss / base.loss - 1


def _signed_percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:+.2f}"


def markdown(report: Report) -> str:
    lines = []
    settings = report.settings
    if settings.get("command"):
        took = ", ".join(f"{k} {v:.0f} s" for k, v in report.seconds.items())
        lines += [f"`{settings['command']}` ({took})", ""]
    if settings.get("commands"):
        lines += ["Merged from: " + "; ".join(f"`{c}`" for c in settings["commands"]), ""]
    lines += [
        "| task | language | method | seed | held-out loss | loss vs base % | WER % | normalized WER % | CER % | rank "
        "| lr | trainable params | train s |",
        "|---" * 13 + "|",
    ]
    for r in report.rows:
        lines.append(
            f"| {r.task} | {r.language} | {r.method} | {r.seed} | {_fmt(r.loss)} | "
            f"{_signed_percent(loss_change(report, r))} | "
            f"{_fmt(r.wer, True)} | {_fmt(r.normalized_wer, True)} | {_fmt(r.cer, True)} | "
            f"{r.rank if r.rank is not None else '-'} | {r.lr if r.lr is not None else '-'} | "
            f"{r.trainable_params or '-'} | {f'{r.train_seconds:.0f}' if r.train_seconds else '-'} |"
        )
    if any(s.seeds > 1 for s in report.summaries):
        lines += ["", "Mean ± standard deviation over seeds:", "", "| task | language | method | seeds | held-out loss "
                  "| WER % | normalized WER % | CER % |", "|---" * 8 + "|"]  # fmt: skip
        for m in report.summaries:
            cells = [
                f"{_fmt(m.mean.get(k), k != 'loss')} ± {_fmt(m.std.get(k), k != 'loss')}" if k in m.mean else "-"
                for k in METRICS
            ]
            lines.append(f"| {m.task} | {m.language} | {m.method} | {m.seeds} | " + " | ".join(cells) + " |")
    lines += ["", f"Paper's ordering on the means (lower is better; ≈ means within {100 * TIE:.0f}%):", ""]
    for v in report.verdicts:
        values = ", ".join(f"{m} {_fmt(x, v.metric != 'loss')}" for m, x in v.values.items())
        mark = "holds" if v.holds else f"does not hold ({v.note})"
        lines.append(f"- {v.task} {v.language} {v.metric}: {values}: FLoRA ≈ LoRA > IA3 {mark}")
    held = sum(v.holds for v in report.verdicts)
    lines += ["", f"The ordering holds in {held} of {len(report.verdicts)} comparisons.", ""]
    return "\n".join(lines)


def print_table(report: Report) -> None:

    table = Table(title="reproduce-small: equal budgets per method (lower is better)")
    for column in ("task", "language", "method", "held-out loss", "vs base %", "WER %", "CER %", "train s"):
        table.add_column(column, justify="left" if column in ("task", "language", "method") else "right")
    for r in report.rows:
        table.add_row(
            r.task, r.language, r.method, _fmt(r.loss), _signed_percent(loss_change(report, r)), _fmt(r.wer, True),
            _fmt(r.cer, True), f"{r.train_seconds:.0f}" if r.train_seconds else "-",
        )  # fmt: skip
    console = Console()
    console.print(table)
    for v in report.verdicts:
        mark = "[green]holds[/]" if v.holds else f"[yellow]does not hold[/] ({v.note})"
        console.print(f"{v.task} {v.language} {v.metric}: FLoRA ≈ LoRA > IA3 {mark}")


def write(report: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "rows": [asdict(r) for r in report.rows],
        "verdicts": [asdict(v) for v in report.verdicts],
        "summaries": [asdict(m) for m in report.summaries],
        "settings": report.settings,
        "seconds": report.seconds,
    }
    (out / "results.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(report), encoding="utf-8")


def merged(folders: Sequence[Path]) -> Report:
    """One report from several runs' ``results.json`` (e.g. one seed each, run separately so a cut-off run loses
    only its own seed): rows concatenated, means, spreads and verdicts recomputed over all of them."""
    report = Report(settings={"merged": [str(f) for f in folders], "commands": []})
    seen: set[tuple[str, str, str, int]] = set()
    for folder in folders:
        data = json.loads((Path(folder) / "results.json").read_text(encoding="utf-8"))
        for values in data["rows"]:
            row = Row(**values)
            key = (row.task, row.language, row.method, row.seed)
            if key in seen:
                raise ValueError(f"{folder}: {key} is already in an earlier folder (the same seed twice?)")
            seen.add(key)
            report.rows.append(row)
        report.settings["commands"].append(data["settings"].get("command", ""))
        for part, seconds in data.get("seconds", {}).items():
            report.seconds[part] = report.seconds.get(part, 0.0) + seconds
    report.summaries = summarize(report.rows)
    report.verdicts = verdicts_for(report.summaries)
    return report


# ------------------------------------------------------------------------------------------------------- CLI
def log_progress_only() -> None:
    """Our one-line progress messages, without transformers' per-run warnings (dozens of runs in one table)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_logging.set_verbosity_error()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainers.demo.reproduce_small", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/reproduce-small"))
    p.add_argument(
        "--methods", default=",".join(PAPER_METHODS), help="comma-separated; milora adds rows, not verdicts"
    )
    p.add_argument("--code-languages", default=",".join(CODE_LANGUAGES))
    p.add_argument(
        "--speech-languages",
        default=None,
        help=f"default: {','.join(SPEECH_LANGUAGES)}; with --speech-recipe {REAL_WHISPER_RECIPE}: "
        f"{','.join(REAL_WHISPER_ACCENTS)}",
    )
    p.add_argument(
        "--speech-recipe",
        default="tiny-whisper",
        help=f"tiny-whisper (a random tiny Whisper) or {REAL_WHISPER_RECIPE} (the pretrained tiny.en, per accent)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated recipe seeds; several give mean ± std")
    p.add_argument("--code-steps", type=int, default=CODE_STEPS, help="optimizer steps per code adapter")
    p.add_argument("--speech-steps", type=int, default=SPEECH_STEPS, help="optimizer steps per speech adapter")
    p.add_argument("--skip-code", action="store_true")
    p.add_argument("--skip-speech", action="store_true")
    p.add_argument("--progress", action="store_true", help="progress bars for every run")
    p.add_argument(
        "--merge", nargs="+", type=Path, metavar="FOLDER",
        help="train nothing: combine earlier runs' results (e.g. one seed each) into --out, with means and verdicts",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    log_progress_only()
    command = shlex.join(["python", "-m", "trainers.demo.reproduce_small", *argv])
    if args.merge:
        report = merged(args.merge)
        report.settings["command"] = command
        write(report, args.out)
        print_table(report)
        print(f"results: {args.out / 'results.md'}, {args.out / 'results.json'}")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    report = Report(
        settings={
            "command": command, "methods": methods, "code_steps": args.code_steps,
            "speech_steps": args.speech_steps, "tie": TIE, "torch_threads": torch.get_num_threads(),
        }
    )  # fmt: skip
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    report.settings.update(seeds=seeds, speech_recipe=args.speech_recipe)
    start = time.perf_counter()
    if not args.skip_code:
        t = time.perf_counter()
        languages = [x for x in args.code_languages.split(",") if x]
        for seed in seeds:
            report.rows += run_task(
                "code", "tiny-code", languages, methods, args.code_steps, args.out / "code", seed=seed
            )
        report.seconds["code"] = round(time.perf_counter() - t, 1)
    if not args.skip_speech:
        try:
            espeak_binary()
        except EspeakNotFound as err:
            logger.warning("speech part skipped: %s", err)
        else:
            t = time.perf_counter()
            default = REAL_WHISPER_ACCENTS if args.speech_recipe == REAL_WHISPER_RECIPE else SPEECH_LANGUAGES
            languages = [x for x in (args.speech_languages or ",".join(default)).split(",") if x]
            for seed in seeds:
                report.rows += run_task(
                    "speech", args.speech_recipe, languages, methods, args.speech_steps, args.out / "speech",
                    seed=seed,
                )  # fmt: skip
            report.seconds["speech"] = round(time.perf_counter() - t, 1)
    report.seconds["total"] = round(time.perf_counter() - start, 1)
    report.summaries = summarize(report.rows)
    report.verdicts = verdicts_for(report.summaries)
    write(report, args.out)
    print_table(report)
    print(f"results: {args.out / 'results.md'}, {args.out / 'results.json'} ({report.seconds['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
