"""``flora-eval``: score trained adapters as the paper does, pass@k on MultiPL-E or WER on Common Voice.

    flora-eval --task code --lang perl --adapter out/starcoder-perl              # local model, 100 samples, T=0.1
    flora-eval --task code --lang perl --server http://localhost:8080            # through a running flora-serve
    flora-eval --task speech --lang mr --adapter out/whisper-mr --data cv-corpus-17.0/mr --split test

``--adapter`` is a PEFT adapter folder, a training run folder (its ``<language>/`` sub-folder is used, and its
``recipe.yaml`` supplies the base model and data unless ``--model``/``--data`` are given), or ``lang=folder,...``.
Without an adapter the base model is scored. Reports are JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

from flora_hf.loading import ModelLoadError, load_named_adapters
from trainers.data.hub import hub_reachable
from trainers.data.speech import is_english_only, whisper_language
from trainers.evaluation.confinement import SandboxUnavailable
from trainers.recipes.base_models import LoadedBase, ModelUnavailable, load_base, model_problem
from trainers.recipes.datasets import speech_split
from trainers.recipes.recipe import (
    Recipe,
    RecipeError,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
    split_languages,
)

from .evaluation import (
    DEFAULT_N_SAMPLES,
    DEFAULT_TEMPERATURE,
    corpus_wer,
    load_problems,
    require_confinement,
    run_passk_eval,
)
from .library_noise import quiet_library_noise

DEFAULT_RECIPES = {"code": "starcoder", "speech": "whisper"}


# -------------------------------------------------------------------------------------------------- adapters
def is_adapter_folder(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def resolve_adapters(spec: Optional[str], languages: Sequence[str]) -> dict[str, Path]:
    """Language -> PEFT adapter folder, from an adapter folder (one language), a run folder holding
    ``<language>/adapter_config.json`` for each language, or ``lang=folder,...``; empty for the base model."""
    if not spec:
        return {}
    if "=" in spec:
        pairs = {k.strip(): Path(v).expanduser() for k, v in (item.split("=", 1) for item in spec.split(","))}
        missing = [lang for lang in languages if lang not in pairs]
        if missing:
            raise RecipeError(f"--adapter names no folder for {missing}")
        found = {lang: pairs[lang] for lang in languages}
    else:
        root = Path(spec).expanduser()
        if not root.is_dir():
            raise RecipeError(
                f"adapter folder {root} does not exist (train one first: make train-starcoder or make train-whisper, or flora-train)"
            )
        if all(is_adapter_folder(root / lang) for lang in languages):
            found = {lang: root / lang for lang in languages}
        elif is_adapter_folder(root) and len(languages) == 1:
            found = {languages[0]: root}
        else:
            raise RecipeError(
                f"{root} is neither a PEFT adapter folder (adapter_config.json) nor a run folder with one per "
                f"language ({', '.join(languages)})"
            )
    bad = [str(p) for p in found.values() if not is_adapter_folder(p)]
    if bad:
        raise RecipeError(f"not PEFT adapter folders (no adapter_config.json): {bad}")
    return found


def run_recipe(adapters: dict[str, Path], task: str, overrides: dict[str, Any]) -> Recipe:
    """The recipe a run was trained with (``recipe.yaml`` beside or above its adapters), else the task's default
    recipe; ``overrides`` (MODEL, DATA, LANGS) win. Training-only settings do not matter here."""
    for folder in adapters.values():
        for candidate in (folder / "recipe.yaml", folder.parent / "recipe.yaml"):
            if candidate.is_file():
                values = yaml.safe_load(candidate.read_text(encoding="utf-8")) or {}
                values.update({"resume": None, "deepspeed": None, "output_dir": None})
                recipe = recipe_from_dict(values)

                return apply_overrides(recipe, overrides)
    recipe = load_recipe(DEFAULT_RECIPES[task], overrides)
    if "MODEL" not in overrides and adapters:  # the base model the adapter names
        config = json.loads(next(iter(adapters.values())).joinpath("adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        if base:
            recipe = apply_overrides(recipe, {"MODEL": base})
    return recipe


def attach_trained_adapters(model: Any, adapters: dict[str, Path]) -> Any:
    """The base model with each language's adapter loaded under the language's name (PEFT's loader)."""
    return load_named_adapters(model, adapters)


def load_for_eval(recipe: Recipe, adapters: dict[str, Path]) -> tuple[LoadedBase, Any]:
    base = load_base(recipe, progress=False)
    base.model.config.use_cache = True
    if torch.cuda.is_available() and not base.quantized:
        base.model = base.model.to("cuda")
    return base, attach_trained_adapters(base.model, adapters)


# ----------------------------------------------------------------------------------------------------- speech
@torch.no_grad()
def transcribe(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    language: str,
    task: str = "transcribe",
    adapter: Optional[str] = None,
    batch_size: int = 8,
    max_new_tokens: int = 225,
    num_beams: int = 1,
) -> tuple[list[str], list[str]]:
    """(references, hypotheses) for every example of a :class:`WhisperSpeechDataset`. The language and task go to
    ``generate`` (transformers' current way, not forced decoder ids); the reference is the example's own label
    text, so a clip skipped while decoding can never misalign the pairs. ``adapter`` None: the base model."""

    code = whisper_language(language)
    device = next(model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    is_peft = hasattr(model, "disable_adapter") and hasattr(model, "set_adapter")
    if is_peft and adapter is not None:
        model.set_adapter(adapter)
    refs: list[str] = []
    hyps: list[str] = []
    model.eval()
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        features = torch.stack([torch.as_tensor(it["input_features"]) for it in items]).to(device, dtype)
        kwargs = dict(input_features=features, max_new_tokens=max_new_tokens)
        if not is_english_only(model):  # an English-only Whisper's generate refuses a language or task
            kwargs.update(language=code, task=task)
        kwargs["num_beams"] = num_beams
        if is_peft and adapter is None:
            with model.disable_adapter():
                out = model.generate(**kwargs)
        else:
            out = model.generate(**kwargs)
        hyps += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
        labels = [[int(x) for x in it["labels"] if int(x) >= 0] for it in items]
        refs += [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
    return refs, hyps


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER (jiwer): finer than WER where every word is wrong, as on tiny models."""

    pairs = [(r, h) for r, h in zip(references, hypotheses) if r]
    if not pairs:
        return 0.0
    import jiwer  # an extra (flora-hf[train]): --task code runs without it

    return float(jiwer.cer([r for r, _ in pairs], [h or " " for _, h in pairs]))


def evaluate_speech(
    model: Any,
    base: LoadedBase,
    recipe: Recipe,
    language: str,
    split: str,
    adapter: Optional[str],
    batch_size: int = 8,
    max_examples: Optional[int] = None,
    num_beams: int = 1,
) -> dict[str, Any]:
    """WER (unnormalized, as the paper, and Whisper-normalized) and CER of one language's split."""

    source = recipe.data_sources()[language]
    dataset = speech_split(recipe, base, language, source, split, max_examples)
    start = time.perf_counter()
    refs, hyps = transcribe(
        model,
        base.tokenizer,
        dataset,
        language,
        recipe.whisper_task,
        adapter,
        batch_size,
        recipe.generation_max_length,
        num_beams,
    )
    result = corpus_wer(refs, hyps, language=language)
    return {
        "language": language,
        "split": split,
        "adapter": adapter,
        **result.to_dict(),
        "cer": character_error_rate(refs, hyps),
        "clips": str(dataset.stats),
        "clips_skipped": dataset.stats.total_skipped,
        "seconds": round(time.perf_counter() - start, 2),
        "utterances_detail": [{"reference": r, "hypothesis": h} for r, h in zip(refs, hyps)],
    }


# ------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="flora-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", required=True, choices=["code", "speech"])
    p.add_argument("--lang", required=True, help="language(s), comma-separated (LANG / LANGS)")
    p.add_argument("--adapter", help="adapter folder, run folder, or lang=folder,... (none: the base model)")
    p.add_argument("--model", help="base model: hub id or folder (default: the run's recipe or the adapter's config)")
    p.add_argument("--data", help="speech: Common Voice folder or hub id (default: the run's recipe)")
    p.add_argument("--split", default=None, help="speech split (default: the recipe's test split)")
    p.add_argument("--problems", help="code: MultiPL-E jsonl (default: nuprl/MultiPL-E humaneval from the hub)")
    p.add_argument("--server", help="code: URL of a running flora-serve / TGI instead of a local model")
    p.add_argument("--adapter-id", help="code with --server: the adapter's name on the server (default: the language)")
    p.add_argument("--n-samples", type=int, default=None, help="code: samples per problem (default 100, the paper)")
    p.add_argument("--temperature", type=float, default=None, help="code: sampling temperature (default 0.1)")
    p.add_argument("--k", default="1", help="code: comma-separated k for pass@k")
    p.add_argument("--limit", type=int, help="code: first N problems; speech: first N clips")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=1, help="speech: beam search width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-base", action="store_true", help="also score the base model (no adapter)")
    p.add_argument("--out", help="JSON report path (default: <adapter run folder>/eval-<task>-<langs>.json)")
    p.add_argument(
        "--unsafe-no-sandbox",
        action="store_true",
        help="code: run generated programs without Linux namespaces (resource limits only), where the machine "
        "cannot make them, e.g. inside a container that is itself the sandbox; see README 'Evaluators'",
    )
    return p.parse_args(argv)


def default_out(args: argparse.Namespace, adapters: dict[str, Path], languages: Sequence[str]) -> Path:
    if args.out:
        return Path(args.out)
    folder = next(iter(adapters.values())).parent if adapters else Path("out")
    return folder / f"eval-{args.task}-{'-'.join(languages)}.json"


def use_hub_cache_only() -> None:
    """No hub here: ``datasets`` and ``huggingface_hub`` read their caches only, so data never downloaded fails at
    once instead of after a minute of retries (the modules read these settings at import; patch them if imported)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE",)),
    ):
        loaded = sys.modules.get(module)
        for name in names if loaded is not None else ():
            setattr(loaded, name, True)


def context_length(model: Any) -> Optional[int]:
    """The model's position limit (GPTBigCode ``n_positions``, others ``max_position_embeddings``), if it has one."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_new_tokens(requested: int, limit: Optional[int], prompt_lengths: Sequence[int]) -> int:
    """``requested`` new tokens, or fewer so that the longest prompt plus its completion fits ``limit`` positions
    (generating past them is an index error on models with learned positions, such as the tiny code model)."""
    if limit is None or not prompt_lengths:
        return requested
    room = limit - max(prompt_lengths)
    if room < 1:
        raise RecipeError(
            f"a prompt of {max(prompt_lengths)} tokens leaves no room in the model's {limit} positions; "
            "pass --limit or a problems file with shorter prompts"
        )
    if room < requested:
        print(
            f"flora-eval: --max-new-tokens {requested} does not fit the model's {limit} positions after the longest "
            f"prompt ({max(prompt_lengths)} tokens); generating at most {room}",
            file=sys.stderr,
        )
    return min(requested, room)


def _server_json(url: str, route: str, body: Optional[dict[str, Any]] = None, timeout_s: float = 30.0) -> Any:

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url.rstrip("/") + route, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def server_token_limits(url: str, prompts: Sequence[str]) -> tuple[Optional[int], list[int]]:
    """A running server's ``max_total_tokens`` (``/info``) and each prompt's length by its tokenizer (``/tokenize``,
    as TGI and flora-serve have it); (None, []) where the server does not say. An unreachable server is an error."""

    try:
        info = _server_json(url, "/info")
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise RecipeError(f"cannot reach the server at {url} ({err}); start it first (flora-serve --help)") from err
    limit = info.get("max_total_tokens") if isinstance(info, dict) else None
    if not isinstance(limit, int):
        return None, []
    try:
        lengths = [len(_server_json(url, "/tokenize", {"inputs": prompt})) for prompt in dict.fromkeys(prompts)]
    except (urllib.error.URLError, OSError, ValueError, TypeError):
        return None, []
    return limit, lengths


def can_mix_adapters(adapters: dict[str, Path]) -> bool:
    """Whether one generation batch may hold several of these adapters: FLoRA's per-example path, or PEFT's mixed
    LoRA batches; IA3 (or a mix of methods) generates one adapter per batch."""
    types = {json.loads((folder / "adapter_config.json").read_text()).get("peft_type") for folder in adapters.values()}
    return len(types) <= 1 and types <= {"FLORA", "LORA"}


def run_code(args: argparse.Namespace, languages: list[str], adapters: dict[str, Path], out: Path) -> dict[str, Any]:

    if not args.unsafe_no_sandbox:
        require_confinement()  # before loading a model or asking a server anything
    problems = load_problems(args.problems) if args.problems else []
    if not args.problems:
        offline = not hub_reachable()
        if offline:
            use_hub_cache_only()
        try:
            for lang in languages:
                problems += load_problems(lang, limit=args.limit)
        except RuntimeError as err:
            if offline:
                raise RecipeError(
                    "the Hugging Face hub is unreachable and MultiPL-E is not cached here; pass a local problems "
                    f"file: PROBLEMS=path/to/problems.jsonl (flora-eval --problems). {err}"
                ) from err
            raise
    elif args.limit is not None:
        problems = problems[: args.limit]
    settings = dict(
        n_samples=args.n_samples or DEFAULT_N_SAMPLES,
        temperature=DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
        out_json=out,
        ks=[int(k) for k in args.k.split(",")],
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=True,
        unsafe_no_sandbox=args.unsafe_no_sandbox,
    )
    if args.server:
        names = split_languages(args.adapter_id) if args.adapter_id else languages
        if len(names) != len(languages):
            raise RecipeError("--adapter-id needs one name per language")
        mapping = dict(zip(languages, names)) if (args.adapter_id or adapters) else None
        limit, lengths = server_token_limits(args.server, [p.prompt for p in problems])
        settings["max_new_tokens"] = fit_new_tokens(args.max_new_tokens, limit, lengths)
        return run_passk_eval(args.server, problems, adapter=mapping, **settings)
    recipe = run_recipe(adapters, "code", {"MODEL": args.model, "LANGS": ",".join(languages)})
    problem = model_problem(recipe.model)
    if problem is not None:
        raise ModelUnavailable(problem)
    base, model = load_for_eval(recipe, adapters)
    lengths = [len(base.tokenizer(p.prompt)["input_ids"]) for p in problems]
    settings["max_new_tokens"] = fit_new_tokens(args.max_new_tokens, context_length(base.model), lengths)
    mapping = {lang: (lang if lang in adapters else "__base__") for lang in languages}
    settings["mix_adapters"] = can_mix_adapters(adapters)
    return run_passk_eval(model, problems, adapter=mapping, tokenizer=base.tokenizer, **settings)


def run_speech(args: argparse.Namespace, languages: list[str], adapters: dict[str, Path], out: Path) -> dict[str, Any]:
    overrides = {"MODEL": args.model, "DATA": args.data, "LANGS": ",".join(languages)}
    recipe = run_recipe(adapters, "speech", overrides)
    problem = model_problem(recipe.model)
    if problem is not None:
        raise ModelUnavailable(problem)
    base, model = load_for_eval(recipe, adapters)
    split = args.split or recipe.test_split
    report: dict[str, Any] = {"task": "speech", "model": recipe.model, "split": split, "languages": {}}
    for lang in languages:
        entry = {}
        if lang in adapters:
            entry["adapter"] = evaluate_speech(
                model, base, recipe, lang, split, lang, args.batch_size, args.limit, args.num_beams
            )
        if args.compare_base or lang not in adapters:
            entry["base"] = evaluate_speech(
                model, base, recipe, lang, split, None, args.batch_size, args.limit, args.num_beams
            )
        report["languages"][lang] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def summary_lines(task: str, report: dict[str, Any]) -> list[str]:
    lines = []
    if task == "speech":
        for lang, entry in report["languages"].items():
            for which, res in entry.items():
                lines.append(
                    f"{lang} {which}: WER {100 * res['wer']:.2f} (normalized {100 * res['normalized_wer']:.2f}), "
                    f"CER {100 * res['cer']:.2f}, {res['utterances']} utterances"
                )
            first = next(iter(entry.values()), {})
            if first.get("clips_skipped"):  # the same clips for every model: said once, never only in the JSON
                lines.append(f"{lang} clips: {first['clips']}")
        return lines
    for lang, res in report.get("languages", {}).items():
        shown = {k: v for k, v in res.items() if k.startswith("pass@")}
        lines.append(f"{lang}: {shown or res}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    languages = split_languages(args.lang)
    quiet_library_noise(uses_deepspeed=False)
    try:
        adapters = resolve_adapters(args.adapter, languages)
        out = default_out(args, adapters, languages)
        if args.task == "code":
            report = run_code(args, languages, adapters, out)
        else:
            report = run_speech(args, languages, adapters, out)
    except (RecipeError, ModelUnavailable, ModelLoadError, FileNotFoundError, SandboxUnavailable) as err:
        print(f"flora-eval: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if "hub" in str(err).lower() or "could not load" in str(err).lower():
            print(f"flora-eval: error: {err}", file=sys.stderr)
            return 2
        raise
    for line in summary_lines(args.task, report):
        print(line)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
