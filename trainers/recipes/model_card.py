"""Model cards for trained adapters: one in each per-language adapter folder (the folder a user pushes or serves),
filled with what the run knows, and one for the run folder that lists them.

PEFT's ``save_pretrained`` writes its empty template ("[More Information Needed]") once, at the run root; the cards
here replace it. ``huggingface_hub.ModelCard`` writes the metadata block the hub reads (``library_name: peft``,
``base_model`` when the base is a hub id, ``language``, tags).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

from huggingface_hub import ModelCard, ModelCardData

from .recipe import Recipe

METHOD_NAMES = {"flora": "FLoRA", "lora": "LoRA", "ia3": "IA3", "milora": "MiLoRA"}
PIPELINES = {"code": "text-generation", "speech": "automatic-speech-recognition"}


def _language_code(language: str) -> Optional[str]:
    """An ISO 639 code for the hub's ``language`` field (speech); programming languages are tags instead."""
    return language if len(language) in (2, 3) and language.isalpha() else None


def adapter_metrics(metrics: Mapping[str, float], language: str, adapter: str, single: bool) -> dict[str, float]:
    """The run's final metrics that belong to one adapter: ``eval_<adapter>_*`` in a multi-language run, every
    ``eval_*`` in a single-language one."""
    prefix = "eval_" if single else f"eval_{adapter}_"
    return {key: value for key, value in metrics.items() if key.startswith(prefix) and key.endswith("loss")}


def adapter_card(
    recipe: Recipe,
    language: str,
    *,
    base_model: str,
    steps: int,
    metrics: Mapping[str, float],
    data_lines: Sequence[str],
) -> ModelCard:
    method = METHOD_NAMES.get(recipe.method, recipe.method)
    adapter = recipe.adapter_name(language)
    code = _language_code(language) if recipe.task == "speech" else None
    data = ModelCardData(
        library_name="peft",
        base_model=None if Path(base_model).expanduser().exists() else base_model,  # a hub id, not a local folder
        language=[code] if code else None,
        pipeline_tag=PIPELINES[recipe.task],
        tags=["flora-hf", recipe.method, *([] if code else [language])],
    )
    rows = [
        ("method", method),
        ("rank", str(recipe.rank_for(language))),
        ("base model", f"`{base_model}`"),
        ("language", language),
        ("data", f"`{recipe.data_sources().get(language) or 'the recipe default'}`"),
        ("optimizer steps", str(steps)),
        ("learning rate", f"{recipe.learning_rate:g}"),
        ("batch size", f"{recipe.batch_size} x {recipe.gradient_accumulation_steps} accumulation"),
        ("recipe", f"`{recipe.name}`"),
    ]
    rows += [(name, f"{value:.4f}") for name, value in metrics.items()]
    table = "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])
    lines = [line for line in data_lines if line.startswith(f"{language} ")] or list(data_lines)
    usage = (
        "```python\nfrom peft import PeftModel\nimport flora_hf  # registers FLoRA and MiLoRA with PEFT\n\n"
        f'model = PeftModel.from_pretrained(base, "path/to/{adapter}", adapter_name="{adapter}")\n```\n\n'
        f"Served with others: `flora-serve --model-id {base_model} --lora-adapters {adapter}=path/to/{adapter}`, "
        f'then requests with `"adapter_id": "{adapter}"`.'
    )
    content = "\n\n".join(
        [
            f"---\n{data.to_yaml()}\n---",
            f"# {method} adapter `{adapter}` for `{base_model}`",
            f"A {method} adapter (rank {recipe.rank_for(language)}) for {language} {recipe.task}, trained with "
            "flora-hf's `flora-train`.",
            table,
            "## Data\n\n" + "\n".join(f"- {line}" for line in lines),
            "## Use\n\n" + usage,
        ]
    )
    return ModelCard(content + "\n")


def write_cards(
    recipe: Recipe,
    output_dir: Path,
    adapter_dirs: Mapping[str, Path],
    *,
    base_model: str,
    steps: int,
    metrics: Mapping[str, float],
    data_lines: Sequence[str],
) -> None:
    """A card in every adapter folder, and the run folder's README listing the adapters."""
    single = len(adapter_dirs) == 1
    for language, folder in adapter_dirs.items():
        own = adapter_metrics(metrics, language, recipe.adapter_name(language), single)
        card = adapter_card(recipe, language, base_model=base_model, steps=steps, metrics=own, data_lines=data_lines)
        card.save(folder / "README.md")
    method = METHOD_NAMES.get(recipe.method, recipe.method)
    listing = "\n".join(
        f"- [`{folder.name}/`]({folder.name}/README.md): {lang}" for lang, folder in adapter_dirs.items()
    )
    run_card = (
        f"# {method} adapters for `{base_model}`\n\nThe run folder of `flora-train --recipe {recipe.name}`: one "
        f"adapter per language, each with its own card.\n\n{listing}\n\n`recipe.yaml` reruns this run; "
        "`train_summary.json` holds its metrics and loss history.\n"
    )
    (output_dir / "README.md").write_text(run_card, encoding="utf-8")
