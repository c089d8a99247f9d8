"""Training recipes: a YAML file under ``configs/`` plus command-line overrides, as one typed :class:`Recipe`.

The paper's settings (appendix A) live in the YAML files, not in code, so a run is reproducible from its
``recipe.yaml`` alone (the trainer writes the resolved recipe into its output folder). Overrides use the make
variables' names (``MODEL``, ``LANG``, ``METHOD``, ``RANK``, ``LR``...) or the recipe's own keys. The recipe also
turns a method name into its PEFT config, on the same layers for every method, with per-language ranks.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml
from peft import IA3Config, LoraConfig
from transformers import Seq2SeqTrainingArguments

from flora_hf import FLoRAConfig, MiLoRAConfig
from trainers import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs"
TASKS = ("code", "speech")
METHODS = ("flora", "lora", "ia3", "milora")
"""Methods a recipe can train."""
MULTI_ADAPTER_METHODS = ("flora", "milora")
"""Methods whose adapters can be mixed in one training batch (one adapter per example)."""
MILORA_KEYS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "top_k",
    "pooler",
    "rational_degrees",
    "rational_form",
    "load_balance_coef",
    "rational_lr",
    "routing_prefix",
    "target_modules",
)
"""Keys of a recipe's ``milora:`` mapping: :class:`flora_hf.MiLoRAConfig` fields (see its help)."""
SCALES = ("full", "tiny")

OVERRIDE_KEYS = {
    "MODEL": "model",
    "DATA": "data",
    "LANG": "languages",
    "LANGS": "languages",
    "METHOD": "method",
    "RANK": "rank",
    "LR": "lr",
    "BATCH_SIZE": "batch_size",
    "MAX_STEPS": "max_steps",
    "OUTPUT_DIR": "output_dir",
    "DEEPSPEED": "deepspeed",
    "RESUME": "resume",
}
"""Make variable -> recipe field."""


class RecipeError(ValueError):
    """A recipe file or override that cannot be used; the message says which key and why."""


@dataclass
class Recipe:
    """Everything one training run needs. Field names are the YAML keys."""

    name: str = "custom"
    task: str = "code"
    scale: str = "full"
    model: str = ""
    data: Optional[str] = None
    languages: list[str] = field(default_factory=lambda: ["perl"])
    method: str = "flora"

    rank: int = 1
    rank_overrides: dict[str, int] = field(default_factory=dict)
    target_modules: list[str] = field(default_factory=list)
    ia3_feedforward_modules: list[str] = field(default_factory=list)
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    learning_rates: dict[str, float] = field(default_factory=dict)
    lr: Optional[float] = None  # overrides learning_rates[method]
    # MiLoRA's own settings (MiLoRAConfig fields): its experts are on MiLoRA's per-model module types unless this
    # mapping names target_modules; the top-level target_modules/rank/lora_alpha are the other methods'. `r`
    # defaults to the recipe's rank; RANK= on the command line replaces it.
    milora: dict[str, Any] = field(default_factory=dict)

    max_steps: int = 100
    batch_size: int = 8
    eval_batch_size: Optional[int] = None
    gradient_accumulation_steps: int = 1
    load_in_8bit: bool = False
    gradient_checkpointing: bool = False
    precision: str = "auto"
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_adapter_clipping: bool = True
    eval_steps: int = 50
    save_steps: int = 50
    save_total_limit: Optional[int] = 3
    logging_steps: int = 10
    max_eval_examples: Optional[int] = None
    dataloader_num_workers: int = 0
    seed: int = 0

    # code
    block_size: int = 1024
    eval_fraction: float = 0.05
    max_train_bytes: Optional[int] = None
    balance_languages: bool = False

    # speech
    hub_dataset: Optional[str] = None
    hub_config: Optional[str] = None
    whisper_task: str = "transcribe"
    train_split: str = "train"
    eval_split: str = "dev"
    test_split: str = "test"
    max_label_tokens: int = 448
    max_train_examples: Optional[int] = None
    generation_max_length: int = 225

    # run
    output_dir: Optional[str] = None
    deepspeed: Optional[str] = None
    resume: Optional[str] = None
    # any other transformers TrainingArguments field, passed to the Trainer as given (report_to, push_to_hub,
    # hub_model_id, torch_compile, ...); `--set report_to=tensorboard` lands here
    trainer_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        if self.task not in TASKS:
            raise RecipeError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.scale not in SCALES:
            raise RecipeError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.method not in METHODS:
            raise RecipeError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.languages:
            raise RecipeError("no language given (LANG=perl or LANGS=perl,ruby)")
        if len(set(self.languages)) != len(self.languages):
            raise RecipeError(f"a language is listed twice: {self.languages}")
        if self.rank < 1 or any(r < 1 for r in self.rank_overrides.values()):
            raise RecipeError(f"ranks must be >= 1, got rank={self.rank}, rank_overrides={self.rank_overrides}")
        if self.lr is None and self.method not in self.learning_rates:
            raise RecipeError(f"no learning rate for {self.method}: add it to learning_rates or pass LR=")
        if self.multi_adapter and self.method not in MULTI_ADAPTER_METHODS:
            raise RecipeError(
                f"one run with several languages ({', '.join(self.languages)}) routes every example to its own "
                f"adapter, which only FLoRA and MiLoRA support in training (PEFT's {self.method} cannot mix adapters "
                "in a batch); use METHOD=flora or milora, or train one language per run"
            )
        unknown = sorted(set(self.milora) - set(MILORA_KEYS))
        if unknown:
            raise RecipeError(f"milora: unknown key(s) {unknown}; known keys: {list(MILORA_KEYS)}")
        for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "eval_steps", "save_steps"):
            if getattr(self, key) < 1:
                raise RecipeError(f"{key} must be >= 1, got {getattr(self, key)}")

    # --------------------------------------------------------------------------------------------- derived
    @property
    def multi_adapter(self) -> bool:
        """Several languages in one run: mixed batches, each row routed to its language's adapter."""
        return len(self.languages) > 1

    @property
    def learning_rate(self) -> float:
        return float(self.lr if self.lr is not None else self.learning_rates[self.method])

    def rank_for(self, language: str) -> int:
        """The paper's per-language rank (e.g. 4 for Lua, Racket and Marathi), else the recipe's rank."""
        return int(self.rank_overrides.get(language.lower(), self.rank))

    def adapter_name(self, language: str) -> str:
        """Adapters are named after their language, so a run folder holds ``<output_dir>/<language>/``."""
        return language

    @property
    def adapter_names(self) -> list[str]:
        return [self.adapter_name(lang) for lang in self.languages]

    def resolved_output_dir(self) -> Path:
        """``OUTPUT_DIR``, else ``out/<recipe>-<languages>[-<method>]`` (the method is left out for FLoRA)."""
        if self.output_dir:
            return Path(self.output_dir).expanduser()
        suffix = "" if self.method == "flora" else f"-{self.method}"
        return Path("out") / f"{self.name}-{'-'.join(self.languages)}{suffix}"

    def data_sources(self) -> dict[str, Optional[str]]:
        """Language -> where its data comes from: None (the recipe's hub default), ``builtin``/``synthetic`` (the
        tiny recipes' offline data), a folder, or a hub id. ``DATA`` may be one source for every language (a folder
        with one sub-folder per language is split accordingly) or ``lang=source,lang=source``."""
        data = self.data
        if data is None or data in ("builtin", "synthetic"):
            return {lang: data for lang in self.languages}
        if "=" in data:
            pairs = dict(item.split("=", 1) for item in data.split(",") if item.strip())
            missing = [lang for lang in self.languages if lang not in pairs]
            if missing:
                raise RecipeError(f"DATA names no source for {missing}: {data!r}")
            return {lang: pairs[lang] for lang in self.languages}
        folder = Path(data).expanduser()
        if folder.is_dir():
            subfolders = {lang: folder / lang for lang in self.languages if (folder / lang).is_dir()}
            if len(subfolders) == len(self.languages):
                return {lang: str(path) for lang, path in subfolders.items()}
            if self.multi_adapter:
                raise RecipeError(
                    f"DATA={data} must hold one sub-folder per language ({', '.join(self.languages)}), or pass "
                    "DATA=lang=folder,lang=folder"
                )
            return {self.languages[0]: str(folder)}
        return {lang: data for lang in self.languages}  # a hub dataset id (the data loaders check it)

    # --------------------------------------------------------------------------------------------------- PEFT
    def peft_config(self, language: str) -> Any:
        """The PEFT config of ``language``'s adapter: a fresh object each call (PEFT mutates the one it gets)."""

        targets = list(self.target_modules) or None
        task_type = "CAUSAL_LM" if self.task == "code" else None
        if self.method == "flora":
            return FLoRAConfig(r=self.rank_for(language), target_modules=targets, task_type=task_type)
        if self.method == "lora":
            return LoraConfig(
                r=self.rank_for(language),
                lora_alpha=self.lora_alpha,
                lora_dropout=self.lora_dropout,
                target_modules=targets,
                task_type=task_type,
            )
        if self.method == "milora":
            options = dict(self.milora)
            options.setdefault("r", self.rank_for(language))
            if options.get("rational_degrees") is not None:
                options["rational_degrees"] = tuple(options["rational_degrees"])
            try:
                return MiLoRAConfig(**options, task_type=task_type)
            except (TypeError, ValueError) as err:
                raise RecipeError(f"milora: {err}") from err
        feedforward = ia3_feedforward(targets or [], self.ia3_feedforward_modules)
        return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=task_type)

    # ------------------------------------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def ia3_feedforward(targets: Sequence[str], feedforward: Sequence[str]) -> list[str]:
    """The feedforward modules that are also targets: PEFT's IA3 requires them to be a subset, and "the same layers
    for every method" means IA3 adds none of its own."""
    return [m for m in feedforward if m in targets]


# ------------------------------------------------------------------------------------------------- loading
def recipe_path(name_or_path: Union[str, Path]) -> Path:
    """``starcoder`` -> ``configs/starcoder.yaml``; a path is used as is."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        return path
    for folder in (Path.cwd() / "configs", CONFIG_DIR):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise RecipeError(f"no recipe {name_or_path!r}; known recipes: {known} (or pass a .yaml path)")


def split_languages(value: Union[str, Sequence[str]]) -> list[str]:
    """``"perl, ruby"`` or a list -> ``["perl", "ruby"]``."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]


_FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}
_INT = {"rank", "max_steps", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "warmup_steps"}
_INT |= {"eval_steps", "save_steps", "save_total_limit", "logging_steps", "max_eval_examples", "seed", "block_size"}
_INT |= {
    "max_train_bytes",
    "max_label_tokens",
    "max_train_examples",
    "generation_max_length",
    "dataloader_num_workers",
}
_FLOAT = {"lr", "lora_alpha", "lora_dropout", "weight_decay", "max_grad_norm", "eval_fraction"}
_BOOL = {"load_in_8bit", "gradient_checkpointing", "balance_languages", "per_adapter_clipping"}


def _coerce(key: str, value: Any) -> Any:
    """A YAML or command-line value as the field's type; empty strings mean "not set" (make's ``MODEL=``)."""
    if isinstance(value, str) and value.strip() == "" and key not in ("name",):
        return None
    try:
        if value is None:
            return None
        if key == "languages":
            return split_languages(value)
        if key in _INT:
            return int(value)
        if key in _FLOAT:
            return float(value)
        if key in _BOOL:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if key == "learning_rates":
            return {str(k): float(v) for k, v in dict(value).items()}
        if key == "rank_overrides":
            return {str(k).lower(): int(v) for k, v in dict(value).items()}
        if key in ("milora", "trainer_args"):
            return {str(k): v for k, v in dict(value).items()}
        if key in ("target_modules", "ia3_feedforward_modules"):
            return split_languages(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{key}: cannot use {value!r} ({err})") from err


TRAINER_ARG_KEYS = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
}
"""TrainingArguments names of what a recipe sets itself: an override by that name sets the recipe's key."""

RUN_OWNED_ARGS = {
    "remove_unused_columns": "the collator needs each row's adapter name",
    "label_names": "a PeftModel's forward does not name its labels, so flora-train names them",
    "use_cpu": "chosen from the machine (CUDA or not)",
}
"""TrainingArguments a run sets for itself and an override must not change (why, for the error)."""


@functools.cache
def training_argument_names() -> frozenset[str]:
    """Every field of transformers' Seq2SeqTrainingArguments (TrainingArguments' plus the generation ones)."""

    return frozenset(f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init)


def check_trainer_args(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` if every key is a TrainingArguments field a recipe may pass through; else a RecipeError."""
    for key in values:
        if key in RUN_OWNED_ARGS:
            raise RecipeError(f"trainer_args: {key} cannot be changed ({RUN_OWNED_ARGS[key]})")
        if key in TRAINER_ARG_KEYS or key in _FIELDS:
            raise RecipeError(f"trainer_args: {key} is a recipe setting; set {TRAINER_ARG_KEYS.get(key, key)} instead")
        if key not in training_argument_names():
            raise RecipeError(f"trainer_args: {key!r} is not a transformers TrainingArguments field")
    return dict(values)


def recipe_from_dict(values: Mapping[str, Any]) -> Recipe:
    """A recipe from YAML keys; unknown keys are an error (a typo must not silently fall back to a default)."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {unknown}; known keys: {sorted(_FIELDS)}")
    kwargs = {}
    for key, value in values.items():
        coerced = _coerce(key, value)
        if coerced is None and key in ("languages", "learning_rates", "rank_overrides", "milora", "trainer_args"):
            continue
        if key == "trainer_args":
            coerced = check_trainer_args(coerced)
        kwargs[key] = coerced
    return Recipe(**kwargs)


def _merged(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with ``overrides`` (make names or recipe keys) applied; None and empty overrides are ignored.
    ``RANK`` sets every language's rank, the recipe's per-language ranks and MiLoRA's ``r`` included; a ``milora``
    override updates the recipe's mapping key by key."""
    merged = dict(values)
    for raw_key, raw_value in overrides.items():
        key = OVERRIDE_KEYS.get(raw_key, TRAINER_ARG_KEYS.get(raw_key, raw_key))
        if key not in _FIELDS:
            if raw_key in training_argument_names():
                trainer_args = {**dict(merged.get("trainer_args") or {}), raw_key: raw_value}
                merged["trainer_args"] = check_trainer_args(trainer_args)
                continue
            raise RecipeError(
                f"unknown override {raw_key!r}; use one of {sorted(OVERRIDE_KEYS)}, a recipe key, or a "
                "transformers TrainingArguments field"
            )
        value = _coerce(key, raw_value)
        if value is None or value == []:
            continue
        if key == "milora":
            value = {**dict(merged.get("milora") or {}), **value}
        merged[key] = value
        if key == "rank":
            merged["rank_overrides"] = {}
            merged["milora"] = {k: v for k, v in dict(merged.get("milora") or {}).items() if k != "r"}
    return merged


def apply_overrides(recipe: Recipe, overrides: Mapping[str, Any]) -> Recipe:
    """A copy of ``recipe`` with ``overrides`` applied (see :func:`_merged`)."""
    return recipe_from_dict(_merged(recipe.to_dict(), overrides))


def load_recipe(name_or_path: Union[str, Path], overrides: Optional[Mapping[str, Any]] = None) -> Recipe:
    """Read a recipe (a name under ``configs/`` or a YAML path) and apply ``overrides`` before validating, so an
    override may repair what the file alone would not allow (e.g. ``LR`` for a method the file has no rate for)."""
    path = recipe_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise RecipeError(f"{path} must hold a mapping of recipe keys")
    values.setdefault("name", path.stem)
    return recipe_from_dict(_merged(values, overrides or {}))
