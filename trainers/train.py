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
the validation split with their own optimizer (:mod:`trainers.recipes.bilevel`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from transformers.integrations import get_available_reporting_integrations
from transformers.utils import logging as hf_logging

from trainers.data.hub import HubDataUnavailable, hub_reachable
from trainers.recipes.base_models import (
    ModelUnavailable,
    model_problem,
)
from trainers.recipes.checkpoints import (
    OutputWriteError,
    output_problem,
)
from trainers.recipes.cpu_budget import cpu_run_problem
from trainers.recipes.launch import (
    LaunchError,
    build_launch_command,
    check_launcher,
    launch_env,
    needs_launch,
    read_deepspeed_config,
)
from trainers.recipes.recipe import Recipe, RecipeError, load_recipe, parse_set_items
from trainers.recipes.training import (
    train,
    training_arguments,
)

from .library_noise import quiet_library_noise

logger = logging.getLogger(__name__)


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
    overrides.update(parse_set_items(args.set))
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
