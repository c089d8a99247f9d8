"""One recipe run on the Hugging Face Trainer: attach one adapter per language, build the Trainer (or Seq2SeqTrainer)
with the run's mixins, train, and save one PEFT folder per language with its model card, loss plot and summary.

The Trainer classes compose three mixins: :class:`~trainers.recipes.checkpoints.StagedCheckpointsMixin` (whole
checkpoints only), :class:`~trainers.recipes.bilevel.MiLoRATrainerMixin` (λ·L_lb and the Θ step) and
:class:`AdapterTrainerMixin` (per-adapter clipping, and what stays trainable after a checkpoint load, decided in one
method, :meth:`AdapterTrainerMixin.restore_trainable`, whatever the mixin order).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from peft import get_peft_model
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments, set_seed

import flora_hf
from trainers.data.speech import is_english_only, whisper_language
from trainers.recipes.base_models import LoadedBase, half_precision, load_base, local_rank
from trainers.recipes.bilevel import MiLoRATrainerMixin, freeze_rational, validation_dataset
from trainers.recipes.checkpoints import (
    OutputWriteError,
    StagedCheckpointsMixin,
    clear_staging,
    describe_write_error,
    is_complete,
    latest_complete_checkpoint,
)
from trainers.recipes.datasets import RecipeData, build_data, fit_block_size
from trainers.recipes.model_card import write_cards
from trainers.recipes.recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)

ADAPTER_PARAM_PREFIXES = ("flora_", "lora_", "ia3_", "milora_")
"""PEFT parameter names hold ``<prefix...>.<adapter name>``: how parameters are grouped per adapter."""


# ------------------------------------------------------------------------------------------------ adapters
def attach_adapters(model: Any, recipe: Recipe) -> Any:
    """One adapter per language, named after it; in a multi-language run all of them trainable at once (PEFT makes
    only the active adapter trainable)."""

    first, *rest = recipe.languages
    peft_model = get_peft_model(model, recipe.peft_config(first), adapter_name=recipe.adapter_name(first))
    for lang in rest:
        peft_model.add_adapter(recipe.adapter_name(lang), recipe.peft_config(lang))
    if recipe.multi_adapter:
        flora_hf.set_trainable_adapters(peft_model, recipe.adapter_names)
    return peft_model


def adapter_parameter_groups(model: torch.nn.Module, names: Sequence[str]) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters by adapter name (anything else, e.g. ``modules_to_save``, under ``""``)."""
    wanted = set(names)
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = pname.split(".")
        owner = next(
            (
                part
                for i, part in enumerate(parts)
                if i > 0 and part in wanted and parts[i - 1].startswith(ADAPTER_PARAM_PREFIXES)
            ),
            "",
        )
        groups.setdefault(owner, []).append(param)
    return groups


def make_trainable(model: Any, recipe: Recipe) -> None:
    """Every adapter of the run trainable (again: loading a checkpoint freezes all but the active one)."""
    if recipe.multi_adapter:
        flora_hf.set_trainable_adapters(model, recipe.adapter_names)


# ------------------------------------------------------------------------------------------------- trainer
class AdapterTrainerMixin:
    """What HF Trainer needs for per-language adapters.

    - Resuming: Trainer reloads each adapter of a checkpoint but leaves only the active one trainable;
      :meth:`restore_trainable` decides, in one place, what trains after the load.
    - Clipping per adapter: one global gradient norm would let one language's examples scale another language's
      update; clipping each adapter's gradient separately keeps every adapter's step a function of its own
      examples only (DeepSpeed clips globally itself).
    """

    flora_recipe: Optional[Recipe] = None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        self.restore_trainable(model if model is not None else self.model)  # type: ignore[attr-defined]

    def restore_trainable(self, model: torch.nn.Module) -> None:
        """After a checkpoint load: every adapter of the run trainable again, then MiLoRA's rational coefficients
        frozen (their own optimizer trains them on the validation split). In this order, in this one method, so no
        mixin's override can undo another's."""
        if self.flora_recipe is not None:
            make_trainable(model, self.flora_recipe)
        if getattr(self, "milora", None) is not None:
            freeze_rational(model)

    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        recipe = self.flora_recipe
        if (
            recipe is None
            or not recipe.per_adapter_clipping
            or not recipe.multi_adapter
            or getattr(self, "is_deepspeed_enabled", False)
            or getattr(self, "is_fsdp_enabled", False)
        ):
            return super()._clip_grad_norm(model)  # type: ignore[misc]
        self.accelerator.unscale_gradients()  # type: ignore[attr-defined]
        max_norm = self.args.max_grad_norm  # type: ignore[attr-defined]
        norms = [
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            for params in adapter_parameter_groups(model, recipe.adapter_names).values()
        ]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)


def trainer_classes() -> tuple[type, type]:

    class AdapterTrainer(StagedCheckpointsMixin, MiLoRATrainerMixin, AdapterTrainerMixin, Trainer):
        """HF Trainer for per-language adapters (code)."""

    class AdapterSeq2SeqTrainer(StagedCheckpointsMixin, MiLoRATrainerMixin, AdapterTrainerMixin, Seq2SeqTrainer):
        """HF Seq2SeqTrainer for per-language adapters (speech)."""

    return AdapterTrainer, AdapterSeq2SeqTrainer


def precision_flags(recipe: Recipe) -> dict[str, bool]:
    """TrainingArguments' mixed precision: the half type the base weights are loaded in (:func:`half_precision`)."""
    dtype = half_precision(recipe)
    return {} if dtype is None else {"bf16": True} if dtype == torch.bfloat16 else {"fp16": True}


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing under the name this transformers uses: ``activation_checkpointing`` since 5.2x,
    ``gradient_checkpointing`` (deprecated, removed in v6) before. Non-reentrant: the adapters' per-example
    routing is replayed correctly only by the non-reentrant implementation (:mod:`flora_hf.checkpointing`)."""

    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def training_arguments(recipe: Recipe, output_dir: Path, has_eval: bool, progress: bool = True) -> Any:
    """HF TrainingArguments from the recipe. ``remove_unused_columns=False`` keeps each row's adapter name for the
    collator; ``label_names`` is explicit because a PeftModel's forward does not name its labels."""

    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.eval_batch_size or recipe.batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=recipe.eval_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        logging_steps=recipe.logging_steps,
        logging_first_step=True,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        seed=recipe.seed,
        data_seed=recipe.seed,
        **checkpointing_arguments(recipe.gradient_checkpointing),
        deepspeed=recipe.deepspeed,
        dataloader_num_workers=recipe.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
        **precision_flags(recipe),
    )
    kwargs.update(recipe.trainer_args)  # the user's Trainer arguments win (report_to, push_to_hub, ...)
    if recipe.task == "speech":
        return Seq2SeqTrainingArguments(
            **kwargs, predict_with_generate=False, generation_max_length=recipe.generation_max_length
        )
    return TrainingArguments(**kwargs)


def make_trainer(
    recipe: Recipe, peft_model: Any, data: RecipeData, base: LoadedBase, output_dir: Path, progress: bool
) -> Any:
    code_cls, speech_cls = trainer_classes()
    cls = speech_cls if recipe.task == "speech" else code_cls
    evals: Any = data.eval if len(data.eval) > 1 else next(iter(data.eval.values()), None)
    trainer = cls(
        model=peft_model,
        args=training_arguments(recipe, output_dir, evals is not None, progress),
        train_dataset=data.train,
        eval_dataset=evals,
        data_collator=data.collator,
        processing_class=base.tokenizer,
    )
    trainer.flora_recipe = recipe
    line = trainer.setup_milora(recipe.adapter_names, validation_dataset(data.eval), data.collator)
    if line is not None:
        data.summary.append(line)
    return trainer


# ------------------------------------------------------------------------------------------------- outputs
def resolve_resume(recipe: Recipe, output_dir: Path) -> Optional[str]:
    """``--resume`` alone (``latest``): the newest complete checkpoint in the output folder; else the given one."""
    if not recipe.resume:
        return None
    if recipe.resume.lower() in ("latest", "last", "auto", "true", "1", "yes"):
        found = latest_complete_checkpoint(output_dir)
        if found is None:
            raise RecipeError(
                f"--resume: no checkpoint to resume from (no complete checkpoint-* folder in {output_dir})"
            )
        return str(found)
    path = Path(recipe.resume).expanduser()
    if not path.is_dir():
        raise RecipeError(f"--resume: checkpoint folder {path} does not exist")
    if not is_complete(path):
        raise RecipeError(
            f"--resume: {path} is an incomplete checkpoint (its save was interrupted); RESUME=latest "
            "takes the newest complete one"
        )
    return str(path)


def loss_series(log_history: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(step, loss)...], "eval": [...], "eval <lang>": [...]}`` from Trainer's log history."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        step = int(entry.get("step", 0))
        for key, value in entry.items():
            if key == "loss":
                series.setdefault("train", []).append((step, float(value)))
            elif key.startswith("eval_") and key.endswith("_loss"):
                name = key[len("eval_") : -len("_loss")]
                series.setdefault(f"eval {name}" if name else "eval", []).append((step, float(value)))
    return series


def plot_losses(log_history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Optional[Path]:
    """The training and eval loss curves as a PNG (matplotlib's Agg backend: no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the train extra
        logger.warning("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    series = loss_series(log_history)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="o" if name != "train" else None, markersize=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dirs: dict[str, Path]
    metrics: dict[str, float]
    log_history: list[dict[str, Any]]
    plot: Optional[Path] = None
    model: Any = None
    trainer: Any = None
    summary: list[str] = field(default_factory=list)


def set_generation_language(model: Any, recipe: Recipe) -> None:
    """Whisper: the language and task live in the generation config (transformers' current way); a multi-language
    run leaves them unset, and generation passes ``language=`` per call."""
    if recipe.task != "speech" or recipe.multi_adapter or is_english_only(model):
        return  # an English-only Whisper keeps its own prompt (no language or task token)

    config = model.generation_config
    config.language = whisper_language(recipe.languages[0])
    config.task = recipe.whisper_task
    config.forced_decoder_ids = None


# ---------------------------------------------------------------------------------------------------- run
def final_evaluation(trainer: Any) -> dict[str, float]:
    """The trained model's eval metrics. With step-based evaluation the Trainer already evaluates at the last step
    (transformers does so whenever that step was not an eval step anyway), so its logged result is reused instead
    of evaluating the same weights twice; with ``load_best_model_at_end`` the kept model is another checkpoint's,
    and a Trainer that did not log an eval there (older releases) is asked for one."""
    step = trainer.state.global_step
    logged = [
        entry for entry in trainer.state.log_history
        if entry.get("step") == step and any(k.startswith("eval_") and k.endswith("_loss") for k in entry)
    ]  # fmt: skip
    if not logged or trainer.args.load_best_model_at_end:
        return trainer.evaluate()
    metrics: dict[str, float] = {}
    for entry in logged:  # one entry per eval dataset (one per language in a multi-language run)
        metrics.update({k: v for k, v in entry.items() if k != "step"})
    return metrics


def train(
    recipe: Recipe, progress: bool = True, base: Optional[LoadedBase] = None, data: Optional[RecipeData] = None
) -> TrainResult:
    """Load, attach adapters, build data, run the Trainer (resuming if asked), save adapters, plot and summarize.
    ``base`` and ``data`` may be passed in already built (tests, :mod:`trainers.demo.reproduce_small`)."""

    output_dir = recipe.resolved_output_dir()
    resume = resolve_resume(recipe, output_dir)
    if local_rank() == 0:  # each machine's first process: its output folder may be its own disk
        clear_staging(output_dir)
    set_seed(recipe.seed)
    base = base or load_base(recipe, progress)
    recipe = fit_block_size(recipe, base.model.config)
    set_generation_language(base.model, recipe)
    data = data or build_data(recipe, base)
    for line in data.summary:
        logger.info(line)
    set_seed(recipe.seed)  # adapters start the same however much randomness data loading used
    peft_model = attach_adapters(base.model, recipe)
    trainer = make_trainer(recipe, peft_model, data, base, output_dir, progress)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    metrics: dict[str, float] = {"train_seconds": round(time.perf_counter() - start, 2)}
    if data.eval:
        metrics.update(final_evaluation(trainer))
    adapter_dirs = {lang: output_dir / recipe.adapter_name(lang) for lang in recipe.languages}
    history = list(trainer.state.log_history)
    try:
        plot = save_outputs(recipe, trainer, base, data, output_dir, adapter_dirs, metrics, resume, history)
    except OSError as err:
        raise OutputWriteError(
            f"the trained adapters were not saved: {describe_write_error(err, output_dir)}"
        ) from err
    return TrainResult(output_dir, adapter_dirs, metrics, history, plot, peft_model, trainer, data.summary)


def save_outputs(
    recipe: Recipe,
    trainer: Any,
    base: LoadedBase,
    data: RecipeData,
    output_dir: Path,
    adapter_dirs: dict[str, Path],
    metrics: dict[str, float],
    resume: Optional[str],
    history: list[dict[str, Any]],
) -> Optional[Path]:
    """The adapters (one folder per language), loss plot, recipe and summary; returns the plot's path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    # every process calls it: under ZeRO-3 it gathers the partitioned adapter weights; PEFT then writes one folder
    # per adapter, <output_dir>/<language>/
    trainer.save_model(str(output_dir))
    plot = None
    if trainer.args.should_save:
        plot = plot_losses(
            history, output_dir / "loss.png", f"{recipe.name} {','.join(recipe.languages)} {recipe.method}"
        )
        write_cards(
            recipe,
            output_dir,
            adapter_dirs,
            base_model=base.source,
            steps=trainer.state.global_step,
            metrics=metrics,
            data_lines=data.summary,
        )
        # what reruns this run from the start: a resume belongs to one invocation, not to the recipe
        rerun = dataclasses.replace(recipe, resume=None)
        (output_dir / "recipe.yaml").write_text(rerun.to_yaml(), encoding="utf-8")
        summary = {
            "recipe": recipe.to_dict(),
            "base_model": base.source,
            "adapters": {lang: str(path) for lang, path in adapter_dirs.items()},
            "metrics": metrics,
            "data": data.summary,
            "resumed_from": resume,
            "log_history": history,
        }
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    return plot
