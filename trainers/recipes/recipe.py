"""Training recipes: a YAML file under ``configs/`` plus command-line overrides, as one typed :class:`Recipe`.

The paper's settings (appendix A) live in the YAML files, not in code, so a run is reproducible from its
``recipe.yaml`` alone (the trainer writes the resolved recipe into its output folder). Overrides use the make
variables' names (``MODEL``, ``LANG``, ``METHOD``, ``RANK``, ``LR``...) or the recipe's own keys. The recipe also
turns a method name into its PEFT config, on the same layers for every method, with per-language ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional, Sequence, Union

import yaml
from peft import IA3Config, LoraConfig
from pydantic import BeforeValidator, ConfigDict, TypeAdapter, ValidationError
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
IA3_MODULES = ("recipe", "peft-default")

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


CommaList = Annotated[list[str], BeforeValidator(lambda v: split_languages(v))]
"""A list, or one comma-separated string (``LANGS=perl,ruby``, ``--set target_modules=c_attn,c_proj``)."""
LanguageRanks = Annotated[dict[str, int], BeforeValidator(lambda v: {str(k).lower(): r for k, r in dict(v).items()})]
"""Language -> rank, language names in lower case (``rank_for`` looks them up that way)."""

SECTIONS = ("run", "adapters", "training", "code", "speech")
"""How :class:`Recipe`'s fields are grouped (``field(metadata={"section": ...})``); the YAML keys stay flat."""


def setting(default: Any = None, *, help: str, section: str, factory: Any = None) -> Any:
    """One recipe key: its default, what it means and its section. Its type annotation is how a YAML or command-line
    value is parsed (:func:`coerce`), so declaring a field is all a new key needs."""
    metadata = {"help": help, "section": section}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Recipe:
    """Everything one training run needs. Field names are the YAML keys; ``metadata["help"]`` says what each does."""

    # run: what is trained on what (output_dir, deepspeed, resume and trainer_args close the recipe)
    name: str = setting("custom", help="the recipe's name (default: the YAML file's stem)", section="run")
    task: str = setting("code", help=f"one of {TASKS}: causal LM on code, or Whisper on speech", section="run")
    scale: str = setting("full", help=f"one of {SCALES}: tiny recipes run offline on a CPU", section="run")
    model: str = setting(
        "",
        help="base model: a hub id, a local folder, tiny-code / tiny-whisper, or whisper-tiny-en (pretrained)",
        section="run",
    )
    data: Optional[str] = setting(
        help="data source(s): a folder, a hub id, lang=source,..., builtin or synthetic (default: the hub's)",
        section="run",
    )
    languages: CommaList = setting(
        help="one adapter per language, named after it", section="run", factory=lambda: ["perl"]
    )
    method: str = setting("flora", help=f"one of {METHODS}", section="run")

    # adapters: the same layers for every method
    rank: int = setting(1, help="adapter rank (RANK= also replaces rank_overrides and milora.r)", section="adapters")
    rank_overrides: LanguageRanks = setting(
        help="language -> rank, the paper's per-language ranks (e.g. 4 for Lua)", section="adapters", factory=dict
    )
    target_modules: CommaList = setting(
        help="modules every method adapts (empty: PEFT's default for the model type)", section="adapters", factory=list
    )
    ia3_feedforward_modules: CommaList = setting(
        help="which of target_modules IA3 scales on their input (its feed-forward modules)", section="adapters",
        factory=list,
    )  # fmt: skip
    ia3_modules: str = setting(
        "recipe",
        help=f"one of {IA3_MODULES}: IA3 on the recipe's target_modules (scaling ia3_feedforward_modules' inputs), or "
        "PEFT's default modules for the model type, as the FLoRA paper ran IA3 on StarCoder",
        section="adapters",
    )
    lora_alpha: float = setting(8, help="LoRA's alpha (scale alpha / r)", section="adapters")
    lora_dropout: float = setting(0.0, help="LoRA's dropout", section="adapters")

    learning_rates: dict[str, float] = setting(help="method -> learning rate", section="adapters", factory=dict)
    lr: Optional[float] = setting(help="learning rate for this run, over learning_rates[method]", section="adapters")
    milora: dict[str, Any] = setting(
        help="MiLoRA's own settings (MiLoRAConfig fields, see MILORA_KEYS); r defaults to the recipe's rank and its "
        "experts to MiLoRA's per-model modules unless target_modules is given here",
        section="adapters",
        factory=dict,
    )

    # training: the optimisation, for every task
    max_steps: int = setting(100, help="optimizer steps", section="training")
    batch_size: int = setting(8, help="examples per device per step", section="training")
    eval_batch_size: Optional[int] = setting(
        help="examples per device per eval step (default: batch_size)", section="training"
    )
    gradient_accumulation_steps: int = setting(1, help="micro-batches per optimizer step", section="training")
    load_in_8bit: bool = setting(False, help="8-bit base weights (bitsandbytes, CUDA only)", section="training")
    gradient_checkpointing: bool = setting(False, help="recompute activations in backward", section="training")
    precision: str = setting("auto", help="auto, bf16, fp16 or fp32 (a CPU always runs fp32)", section="training")
    lr_scheduler_type: str = setting("linear", help="transformers' scheduler name", section="training")
    warmup_steps: int = setting(0, help="linear warm-up steps", section="training")
    weight_decay: float = setting(0.0, help="AdamW's weight decay", section="training")
    max_grad_norm: float = setting(1.0, help="gradient clipping norm", section="training")
    per_adapter_clipping: bool = setting(
        True, help="clip each adapter's gradient on its own in multi-language runs", section="training"
    )
    eval_steps: int = setting(50, help="steps between evaluations", section="training")
    save_steps: int = setting(50, help="steps between checkpoints", section="training")
    save_total_limit: Optional[int] = setting(3, help="checkpoints kept", section="training")
    logging_steps: int = setting(10, help="steps between loss logs", section="training")
    max_eval_examples: Optional[int] = setting(help="cap on each language's eval split", section="training")
    dataloader_num_workers: int = setting(0, help="data loader worker processes", section="training")
    seed: int = setting(0, help="seed of data order, initialisation and the tiny models", section="training")

    # code
    block_size: int = setting(
        1024, help="tokens per packed training block (capped by the model's context)", section="code"
    )
    eval_fraction: float = setting(0.05, help="share of a local code folder held out for eval", section="code")
    max_train_bytes: Optional[int] = setting(help="cap on each language's training text", section="code")
    balance_languages: bool = setting(False, help="as many blocks of each language per epoch", section="code")

    # speech
    hub_dataset: Optional[str] = setting(help="the hub's speech dataset (Common Voice)", section="speech")
    hub_config: Optional[str] = setting(help="its config, if not the language", section="speech")
    whisper_task: str = setting("transcribe", help="Whisper's task token: transcribe or translate", section="speech")
    train_split: str = setting("train", help="split to train on", section="speech")
    eval_split: str = setting("dev", help="split to evaluate on while training", section="speech")
    test_split: str = setting("test", help="split flora-eval scores", section="speech")
    max_label_tokens: int = setting(448, help="longest transcript kept, in tokens (Whisper's limit)", section="speech")
    max_train_examples: Optional[int] = setting(help="cap on each language's training clips", section="speech")
    generation_max_length: int = setting(225, help="longest generated transcript in eval", section="speech")

    # run: where it goes
    output_dir: Optional[str] = setting(
        help="run folder (default: out/<recipe>-<languages>[-<method>])", section="run"
    )
    deepspeed: Optional[str] = setting(
        help="a DeepSpeed JSON config (re-runs under the deepspeed launcher)", section="run"
    )
    resume: Optional[str] = setting(help="a checkpoint folder, or latest", section="run")
    trainer_args: dict[str, Any] = setting(
        help="any other transformers TrainingArguments field, passed as given (report_to, push_to_hub, ...)",
        section="run",
        factory=dict,
    )

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        if self.task not in TASKS:
            raise RecipeError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.scale not in SCALES:
            raise RecipeError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.ia3_modules not in IA3_MODULES:
            raise RecipeError(f"ia3_modules must be one of {IA3_MODULES}, got {self.ia3_modules!r}")
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
        if self.ia3_modules == "peft-default":  # PEFT picks the target and feed-forward modules by model type
            return IA3Config(task_type=task_type)
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
_TYPES = typing.get_type_hints(Recipe, include_extras=True)
_PARSE = ConfigDict(coerce_numbers_to_str=True)  # `name: 2024` in YAML is the string "2024"


@functools.cache
def _parser(key: str) -> TypeAdapter:
    return TypeAdapter(_TYPES[key], config=_PARSE if _TYPES[key] is str else None)


def coerce(key: str, value: Any) -> Any:
    """A YAML or command-line value as the field's declared type (pydantic's lax parsing: ``"3"`` -> 3, ``"yes"`` ->
    True); empty strings mean "not set" (make's ``MODEL=``)."""
    if value is None or (isinstance(value, str) and value.strip() == "" and key != "name"):
        return None
    try:
        return _parser(key).validate_python(value)
    except ValidationError as err:
        reason = "; ".join(e["msg"] for e in err.errors())
        raise RecipeError(f"{key}: cannot use {value!r} ({reason})") from None


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
        coerced = coerce(key, value)
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
        value = coerce(key, raw_value)
        if value is None or value == []:
            continue
        if key == "milora":
            value = {**dict(merged.get("milora") or {}), **value}
        merged[key] = value
        if key == "rank":
            merged["rank_overrides"] = {}
            merged["milora"] = {k: v for k, v in dict(merged.get("milora") or {}).items() if k != "r"}
    return merged


def parse_set_items(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` arguments as overrides, each value read as YAML (``lr=3e-3`` is a float, ``x=`` None)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return overrides


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
