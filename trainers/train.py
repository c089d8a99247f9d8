"""``flora-train``: fine-tune FLoRA, LoRA, IA3 or MiLoRA adapters per language with a recipe from ``configs/``.

    flora-train --recipe starcoder --lang perl --method lora
    flora-train --recipe starcoder --lang perl --method milora    # bi-level: rational coefficients on the dev split
    flora-train --recipe starcoder --langs perl,ruby,lua          # one run, one FLoRA adapter per language
    flora-train --recipe whisper --lang mr --data path/to/cv-corpus/mr --deepspeed configs/ds_zero2.json
    flora-train --recipe tiny-code --lang perl                    # offline, on a CPU (the first run builds the
                                                                  # tiny model once: ~4 min on 2 cores)

HF ``Trainer`` (code) or ``Seq2SeqTrainer`` (speech) does the loop, checkpoints (``--resume``), progress bars,
mixed precision, accelerate and DeepSpeed. A run with several languages routes each example to its language's
adapter (``adapter_names``) and trains every adapter in the same optimizer steps. The output folder holds one PEFT
adapter folder per language (``<output>/<language>/``, ready for ``flora-serve``), ``loss.png``, ``recipe.yaml``
and ``train_summary.json``. MiLoRA runs add the load-balancing loss and train the routers' rational activations on
the validation split with their own optimizer (:mod:`trainers.bilevel`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .base_models import LoadedBase, ModelUnavailable, hub_reachable, load_base, local_rank, model_problem
from .bilevel import MiLoRATrainerMixin, validation_dataset
from .checkpoints import (
    OutputWriteError,
    StagedCheckpointsMixin,
    clear_staging,
    describe_write_error,
    is_complete,
    latest_complete_checkpoint,
    output_problem,
)
from .cpu_budget import cpu_run_problem
from .launch import LaunchError, build_launch_command, check_launcher, launch_env, needs_launch, read_deepspeed_config
from .library_noise import quiet_library_noise
from .model_card import write_cards
from .recipe import Recipe, RecipeError, load_recipe
from .recipe_data import RecipeData, build_data, fit_block_size

logger = logging.getLogger(__name__)

ADAPTER_PARAM_PREFIXES = ("flora_", "lora_", "ia3_", "milora_")
"""PEFT parameter names hold ``<prefix...>.<adapter name>``: how parameters are grouped per adapter."""


# ------------------------------------------------------------------------------------------------ adapters
def attach_adapters(model: Any, recipe: Recipe) -> Any:
    """One adapter per language, named after it; in a multi-language run all of them trainable at once (PEFT makes
    only the active adapter trainable)."""
    from peft import get_peft_model

    import flora_hf

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
        import flora_hf

        flora_hf.set_trainable_adapters(model, recipe.adapter_names)


# ------------------------------------------------------------------------------------------------- trainer
class AdapterTrainerMixin:
    """What HF Trainer needs for per-language adapters.

    - Resuming: Trainer reloads each adapter of a checkpoint but leaves only the active one trainable; every adapter
      of the run is made trainable again before the optimizer is built.
    - Clipping per adapter: one global gradient norm would let one language's examples scale another language's
      update; clipping each adapter's gradient separately keeps every adapter's step a function of its own
      examples only (DeepSpeed clips globally itself).
    """

    flora_recipe: Optional[Recipe] = None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        if self.flora_recipe is not None:
            make_trainable(model if model is not None else self.model, self.flora_recipe)  # type: ignore[attr-defined]

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
    from transformers import Seq2SeqTrainer, Trainer

    class AdapterTrainer(StagedCheckpointsMixin, MiLoRATrainerMixin, AdapterTrainerMixin, Trainer):
        """HF Trainer for per-language adapters (code)."""

    class AdapterSeq2SeqTrainer(StagedCheckpointsMixin, MiLoRATrainerMixin, AdapterTrainerMixin, Seq2SeqTrainer):
        """HF Seq2SeqTrainer for per-language adapters (speech)."""

    return AdapterTrainer, AdapterSeq2SeqTrainer


def precision_flags(recipe: Recipe) -> dict[str, bool]:
    """bf16 where the GPU has it, else fp16 on GPUs, fp32 on CPU ("auto"); or as the recipe says."""
    if not torch.cuda.is_available() or recipe.precision == "fp32":
        return {}
    if recipe.precision == "bf16" or (recipe.precision == "auto" and torch.cuda.is_bf16_supported()):
        return {"bf16": True}
    return {"fp16": True}


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing under the name this transformers uses: ``activation_checkpointing`` since 5.2x,
    ``gradient_checkpointing`` (deprecated, removed in v6) before. Non-reentrant: the adapters' per-example
    routing is replayed correctly only by the non-reentrant implementation (:mod:`flora_hf.checkpointing`)."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def training_arguments(recipe: Recipe, output_dir: Path, has_eval: bool, progress: bool = True) -> Any:
    """HF TrainingArguments from the recipe. ``remove_unused_columns=False`` keeps each row's adapter name for the
    collator; ``label_names`` is explicit because a PeftModel's forward does not name its labels."""
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

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
    if recipe.task != "speech" or recipe.multi_adapter:
        return
    from .data.speech import whisper_language

    config = model.generation_config
    config.language = whisper_language(recipe.languages[0])
    config.task = recipe.whisper_task
    config.forced_decoder_ids = None


# ---------------------------------------------------------------------------------------------------- run
def train(
    recipe: Recipe, progress: bool = True, base: Optional[LoadedBase] = None, data: Optional[RecipeData] = None
) -> TrainResult:
    """Load, attach adapters, build data, run the Trainer (resuming if asked), save adapters, plot and summarize.
    ``base`` and ``data`` may be passed in already built (tests, :mod:`trainers.reproduce_small`)."""
    from transformers import set_seed

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
        metrics.update(trainer.evaluate())
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


# --------------------------------------------------------------------------------------------------- checks
def _is_hub_id(source: Optional[str]) -> bool:
    return source is None or (
        source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists()
    )


def trainer_args_problems(recipe: Recipe, online: Callable[[], bool]) -> list[str]:
    """What the Trainer would reject only after the model loaded: invalid TrainingArguments, a reporter whose
    package is not installed, pushing to an unreachable hub."""
    if not recipe.trainer_args:
        return []
    try:
        args = training_arguments(recipe, recipe.resolved_output_dir(), has_eval=True, progress=False)
    except (ValueError, TypeError) as err:
        return [f"trainer_args: {err}"]
    from transformers.integrations import get_available_reporting_integrations

    problems = []
    available = set(get_available_reporting_integrations())
    for reporter in args.report_to or []:
        if reporter not in ("none", "all") and reporter not in available:
            extra = " (pip install 'flora-hf[tensorboard]')" if reporter == "tensorboard" else ""
            problems.append(f"report_to={reporter}: its package is not installed here{extra}")
    if args.push_to_hub and not online():
        problems.append("push_to_hub: the Hugging Face hub is unreachable from here")
    return problems


def preflight(recipe: Recipe, allow_cpu: bool = False, reachable: Optional[bool] = None) -> list[str]:
    """Everything that would make the run fail later, found now: no GPU for a full-scale recipe, a model or data
    set neither local nor downloadable, a broken DeepSpeed config. Empty when the run can start."""
    problems: list[str] = []

    def online() -> bool:
        nonlocal reachable
        if reachable is None:
            reachable = hub_reachable()
        return reachable

    problem = output_problem(recipe.resolved_output_dir())
    if problem is not None:
        problems.append(problem)
    problem = model_problem(recipe.model, online)
    if problem is not None:
        problems.append(problem)
    elif recipe.scale == "full" and not torch.cuda.is_available():
        # a model that fits trains on the CPU with a warning stating its cost; only one too large is refused
        problem = cpu_run_problem(recipe, allow_cpu)
        if problem is not None:
            problems.append(problem)
    for lang, source in recipe.data_sources().items():
        if source in ("builtin", "synthetic"):
            continue
        if _is_hub_id(source):
            if source is None and recipe.task == "speech" and not recipe.hub_dataset:
                problems.append(f"no speech data for {lang}: pass DATA=path/to/cv-corpus/{lang}")
            elif not online():
                dataset = source or (recipe.hub_dataset if recipe.task == "speech" else "bigcode/the-stack-dedup")
                local = (
                    f"a Common Voice folder (DATA=path/to/cv-corpus/{lang})"
                    if recipe.task == "speech"
                    else (f"a folder of {lang} source files (DATA=path/to/{lang}-sources)")
                )
                problems.append(
                    f"{lang} data comes from the hub dataset {dataset}, which is unreachable here: pass {local}"
                )
        elif not Path(source).expanduser().exists():
            problems.append(f"{lang} data folder {source} does not exist")
    problems += trainer_args_problems(recipe, online)
    if recipe.deepspeed:
        try:
            ds_config = read_deepspeed_config(recipe.deepspeed)
        except LaunchError as err:
            problems.append(str(err))
        else:
            if recipe.method == "milora" and ds_config["zero_optimization"].get("stage") == 3:
                problems.append(
                    "MiLoRA's bi-level step differentiates the rational coefficients outside DeepSpeed's engine, "
                    "which ZeRO-3's partitioned parameters do not allow; use configs/ds_zero2.json"
                )
    return problems


# ------------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="flora-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--recipe",
        required=True,
        help="a name under configs/ (starcoder, whisper, tiny-code, tiny-whisper) or a YAML path",
    )
    p.add_argument("--model", help="hub id or local folder (MODEL)")
    p.add_argument("--data", help="folder, hub id, or lang=folder,... (DATA)")
    p.add_argument("--lang", help="one language (LANG)")
    p.add_argument("--langs", help="comma-separated languages, one adapter each, mixed batches (LANGS)")
    p.add_argument("--method", help="flora | lora | ia3 | milora (METHOD)")
    p.add_argument("--rank", help="adapter rank for every language (RANK)")
    p.add_argument("--lr", help="learning rate (LR)")
    p.add_argument("--batch-size", help="per-device batch size (BATCH_SIZE)")
    p.add_argument("--max-steps", help="optimizer steps (MAX_STEPS)")
    p.add_argument("--output-dir", help="run folder (OUTPUT_DIR); default out/<recipe>-<languages>[-<method>]")
    p.add_argument("--deepspeed", help="DeepSpeed JSON, e.g. configs/ds_zero2.json (DEEPSPEED)")
    p.add_argument("--resume", nargs="?", const="latest", help="resume from the latest checkpoint, or the one given")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other recipe key")
    p.add_argument("--launcher", default="deepspeed", choices=["deepspeed", "accelerate", "torchrun"])
    p.add_argument("--num-gpus", type=int, help="processes to launch (default: every visible GPU)")
    p.add_argument("--print-launch", action="store_true", help="print the launch command and stop")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and stop")
    p.add_argument(
        "--allow-cpu",
        action="store_true",
        help="without a CUDA GPU, train even a model estimated too large for this machine's memory (ALLOW_CPU=1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    overrides: dict[str, Any] = {}
    for flag, key in (
        ("model", "MODEL"),
        ("data", "DATA"),
        ("lang", "LANG"),
        ("langs", "LANGS"),
        ("method", "METHOD"),
        ("rank", "RANK"),
        ("lr", "LR"),
        ("batch_size", "BATCH_SIZE"),
        ("max_steps", "MAX_STEPS"),
        ("output_dir", "OUTPUT_DIR"),
        ("deepspeed", "DEEPSPEED"),
        ("resume", "RESUME"),
    ):
        value = getattr(args, flag)
        if value not in (None, ""):
            overrides[key] = value
    if args.lang and args.langs:
        raise RecipeError("pass either --lang or --langs, not both")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--set expects KEY=VALUE, got {item!r}")
        import yaml

        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return load_recipe(args.recipe, overrides)


def close_process_group(wait_for_others: bool = True) -> None:
    """End a launched run's process group before the interpreter exits: left open, its communication threads can
    outlive Python's shutdown and abort the process ("terminate called without an active exception"), failing a
    run that trained and saved correctly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_others:
            dist.barrier()  # every rank has saved before any tears the group down
        dist.destroy_process_group()


def _refuse_problems(recipe: Recipe, allow_cpu: bool) -> None:
    problems = preflight(recipe, allow_cpu)
    if problems:
        raise RecipeError("\n  - ".join(["cannot start this run:", *problems]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        recipe = recipe_from_args(args)
        if args.print_recipe:
            print(recipe.to_yaml(), end="")
            return 0
        if needs_launch(recipe.deepspeed, args.num_gpus):
            command = build_launch_command(
                argv, launcher=args.launcher, num_gpus=args.num_gpus, deepspeed=recipe.deepspeed
            )
            if args.print_launch:
                print(shlex.join(command))
                return 0
            _refuse_problems(recipe, args.allow_cpu)  # checked before the launch is announced
            check_launcher(command, recipe.deepspeed)
            print(f"flora-train: launching {shlex.join(command)}", file=sys.stderr)
            return subprocess.call(command, env=launch_env())
        _refuse_problems(recipe, args.allow_cpu)
        quiet_library_noise(uses_deepspeed=bool(recipe.deepspeed))
        if args.no_progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # transformers' own bars (loading weights) too
        try:
            result = train(recipe, progress=not args.no_progress)
        except BaseException:
            close_process_group(wait_for_others=False)  # a failed rank must not wait for the others forever
            raise
        close_process_group()
    except (RecipeError, ModelUnavailable, LaunchError, FileNotFoundError) as err:
        print(f"flora-train: error: {err}", file=sys.stderr)
        return 2
    except OutputWriteError as err:
        print(f"flora-train: error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        from .data.hub import HubDataUnavailable

        if isinstance(err, HubDataUnavailable):
            print(f"flora-train: error: {err}", file=sys.stderr)
            return 2
        raise
    for lang, path in result.adapter_dirs.items():
        print(f"adapter {lang}: {path}")
    losses = {k: round(v, 4) for k, v in result.metrics.items() if k.endswith("loss")}
    print(f"final metrics: {losses}; loss curve: {result.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
