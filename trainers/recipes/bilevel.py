"""MiLoRA in training: the load-balancing loss, and bi-level optimization of the routers' rational activations.

MiLoRA (Zhang et al., 2024, section 3 and appendices A and D) splits an adapter's parameters in two:

- Ω, the experts (``milora_A``/``milora_B``), router weights (``milora_weight``) and the attention pooler's query
  (``milora_query``): trained by the Trainer's own optimizer on the training split, with the task loss plus
  ``load_balance_coef`` times the Switch load-balancing loss the model returns in training (``load_balance_loss``).
- Θ, the rational activations' coefficients (``milora_num``, ``milora_den``): DARTS-style "architecture"
  parameters, trained on the validation (dev) split by their own AdamW at ``rational_lr`` (paper: 1e-6), every other
  hyper-parameter as for Ω (betas, epsilon, weight decay, schedule and warmup, gradient clipping, batch size).

The two alternate, first order: after each optimizer step of Ω (``on_step_end``, so once per
``gradient_accumulation_steps`` micro-batches) Θ takes one step on the same objective (task loss + λ·L_lb) over
``gradient_accumulation_steps`` validation micro-batches of the training batch size, the effective batch of Ω's step.

How the two stay apart:

- Θ has ``requires_grad=False`` outside its own step: the training backward computes no Θ gradient, and the
  Trainer's optimizer (and DDP, DeepSpeed) never holds Θ.
- The Θ step differentiates with ``torch.autograd.grad(loss, Θ)``: no parameter's ``.grad`` is written, so a
  validation batch can give Ω nothing, and the next Ω step sees only training gradients. It runs the unwrapped
  model (no DDP hooks) and averages Θ's gradients over processes itself.
- Validation batches are a function of the optimizer step (a seeded permutation per pass over the dev split,
  cycling), and Θ's optimizer and schedule are saved in every checkpoint (``rational_optimizer.pt``; Θ's values are
  adapter weights, saved with the adapter): a resumed run continues exactly as an uninterrupted one.
- A run without validation data (a language too small to hold out a block) keeps Θ at its GELU initialization and
  says so: no bi-level, and no silent fallback to training Θ on the training split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import ConcatDataset
from transformers import TrainerCallback, get_scheduler

from flora_hf import MiLoRAConfig

logger = logging.getLogger(__name__)

RATIONAL_PARAM_KEYS = ("milora_num", "milora_den")
"""Parameter-name parts of Θ: ``...prompt_router.milora_num.<adapter>``."""
RATIONAL_STATE_NAME = "rational_optimizer.pt"
"""Θ's optimizer, schedule and step count, in each checkpoint folder."""


def milora_configs(model: nn.Module) -> dict[str, Any]:
    """Adapter name -> MiLoRAConfig for ``model``'s MiLoRA adapters."""

    configs = getattr(model, "peft_config", None) or {}
    return {name: config for name, config in configs.items() if isinstance(config, MiLoRAConfig)}


def _rational_owner(name: str) -> Optional[str]:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in RATIONAL_PARAM_KEYS:
            return parts[i + 1]
    return None


def is_rational_parameter(name: str) -> bool:
    return _rational_owner(name) is not None


def rational_parameters(model: nn.Module, adapters: Optional[Sequence[str]] = None) -> list[tuple[str, nn.Parameter]]:
    """Θ: the rational coefficients of ``adapters`` (default: every adapter), by name."""
    wanted = None if adapters is None else set(adapters)
    found = []
    for name, param in model.named_parameters():
        owner = _rational_owner(name)
        if owner is not None and (wanted is None or owner in wanted):
            found.append((name, param))
    return found


def freeze_rational(model: nn.Module) -> None:
    """Θ out of every backward but its own (PEFT's ``set_adapter`` and checkpoint loading make it trainable)."""
    for _name, param in rational_parameters(model):
        param.requires_grad_(False)


@dataclass
class MiLoRATraining:
    """What the trainer needs from a run's MiLoRA adapters (one value for the whole run)."""

    adapters: list[str]
    load_balance_coef: float
    rational_lr: float

    @classmethod
    def from_model(cls, model: nn.Module, adapter_names: Sequence[str]) -> Optional[MiLoRATraining]:
        configs = {name: c for name, c in milora_configs(model).items() if name in set(adapter_names)}
        if not configs:
            return None
        coefs = {float(c.load_balance_coef) for c in configs.values()}
        lrs = {float(c.rational_lr) for c in configs.values()}
        if len(coefs) > 1 or len(lrs) > 1:
            raise ValueError(
                "the MiLoRA adapters of one run must share load_balance_coef and rational_lr, got "
                + ", ".join(f"{n}: {c.load_balance_coef}/{c.rational_lr}" for n, c in configs.items())
            )
        return cls(sorted(configs), coefs.pop(), lrs.pop())


class ValidationBatches:
    """The dev split as an endless, deterministic stream of batches: position ``p`` of the stream is item
    ``perm_e[p mod n]`` with ``e = p // n`` and ``perm_e`` a permutation seeded by ``seed + e``. Batch ``i`` holds
    positions ``i*batch_size ...``; the trainer derives ``i`` from the optimizer step (and process), so a resumed run
    reads the same batches without saving an iterator."""

    def __init__(self, dataset: Any, batch_size: int, collator: Callable[[list[Any]], Any], seed: int = 0) -> None:
        if len(dataset) == 0:
            raise ValueError("no validation examples")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.collator = collator
        self.seed = int(seed)
        self._epoch = -1
        self._perm: list[int] = []
        self.served = 0
        """Batches built so far (tests count them)."""

    def __len__(self) -> int:
        return len(self.dataset)

    def item_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(len(self.dataset), generator=generator).tolist()
            self._epoch = epoch
        return self._perm[offset]

    def batch(self, index: int) -> Any:
        start = index * self.batch_size
        self.served += 1
        return self.collator([self.dataset[self.item_index(start + k)] for k in range(self.batch_size)])


def validation_dataset(evals: Any) -> Any:
    """One dataset from the recipe's eval sets (a dict per language, or one dataset); None when there is none."""

    if evals is None:
        return None
    if isinstance(evals, dict):
        parts = [d for d in evals.values() if d is not None and len(d)]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return evals if len(evals) else None


def rational_step_callback(trainer: Any) -> Any:
    """Θ's step, once per optimizer step of Ω: ``on_step_end`` comes after Ω's step (and ``model.zero_grad()``) and
    before logging, saving and evaluation, so checkpoints hold both."""

    class RationalStepCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            trainer.rational_step()

    return RationalStepCallback()


# ------------------------------------------------------------------------------------------------- trainer
class MiLoRATrainerMixin:
    """HF Trainer additions for MiLoRA adapters; a no-op for runs without one (``milora`` stays None)."""

    milora: Optional[MiLoRATraining] = None
    rational_batches: Optional[ValidationBatches] = None
    rational_optimizer: Optional[torch.optim.Optimizer] = None
    rational_scheduler: Any = None
    rational_steps: int = 0
    """Θ steps taken (equal to the optimizer step count when bi-level is on)."""

    def setup_milora(self, adapter_names: Sequence[str], validation: Any, collator: Callable) -> Optional[str]:
        """Find the run's MiLoRA adapters; freeze Θ; with validation data, add Θ's step. Returns a line for the run
        summary (None without MiLoRA)."""
        self.milora = MiLoRATraining.from_model(self.model, adapter_names)  # type: ignore[attr-defined]
        if self.milora is None:
            return None
        self._milora_stats: dict[str, list[torch.Tensor]] = {"load_balance_loss": [], "rational_loss": []}
        freeze_rational(self.model)  # type: ignore[attr-defined]
        self._rational_params = rational_parameters(self.model, self.milora.adapters)  # type: ignore[attr-defined]
        if not self._rational_params:
            return "MiLoRA: no rational coefficients found, so no bi-level optimization"
        if validation is None:
            line = (
                "MiLoRA: no validation data, so no bi-level optimization: the rational activations stay at their "
                "GELU initialization (hold out some data: eval_fraction, or an eval_split)"
            )
            logger.warning(line)
            return line
        args = self.args  # type: ignore[attr-defined]
        self.rational_batches = ValidationBatches(validation, args.per_device_train_batch_size, collator, args.seed)
        self.add_callback(rational_step_callback(self))  # type: ignore[attr-defined]
        return (
            f"MiLoRA: bi-level, {len(self._rational_params)} rational coefficient tensors trained on "
            f"{len(validation)} validation examples at lr {self.milora.rational_lr:g}, one step per optimizer step; "
            f"load-balance weight {self.milora.load_balance_coef:g}"
        )

    # ------------------------------------------------------------------------------------------------- loss
    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """As Trainer.training_step decides whether the loss is already normalized over the accumulated batch."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def _task_and_balance(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Any]:
        loss, outputs = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        balance = outputs.get("load_balance_loss") if isinstance(outputs, dict) else None
        return loss, balance, outputs

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The task loss plus ``load_balance_coef`` × the load-balancing loss (training only; the model returns it
        only in train mode), scaled for gradient accumulation as the task loss is."""
        if self.milora is None or not model.training:
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, balance, outputs = self._task_and_balance(model, inputs, num_items_in_batch)
        if balance is not None:
            self._milora_stats["load_balance_loss"].append(balance.detach().float())
            term = self.milora.load_balance_coef * balance
            if self._loss_scaled_for_ga(num_items_in_batch):
                accumulation = getattr(self, "current_gradient_accumulation_steps", None)
                term = term / max(1, accumulation or self.args.gradient_accumulation_steps)  # type: ignore[attr-defined]
            loss = loss + term.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs gain ``load_balance_loss`` (raw L_lb, mean over the micro-batches since the last log) and
        ``rational_loss`` (Θ's validation objective, mean over its steps since the last log)."""
        if self.milora is not None and "loss" in logs:
            for key, values in self._milora_stats.items():
                if values:
                    logs[key] = round(float(torch.stack([v.to(values[0].device) for v in values]).mean()), 6)
                    values.clear()
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------------------------------------- optimizers
    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        if self.milora is not None:
            freeze_rational(self.model)  # type: ignore[attr-defined]
        return super().create_optimizer(*args, **kwargs)  # type: ignore[misc]

    def ensure_rational_optimizer(self) -> torch.optim.Optimizer:
        """Θ's AdamW and schedule, with the run's hyper-parameters but ``rational_lr``."""
        if self.rational_optimizer is None:
            args = self.args  # type: ignore[attr-defined]
            assert self.milora is not None
            total = args.max_steps if args.max_steps > 0 else self.state.max_steps  # type: ignore[attr-defined]
            self.rational_optimizer = torch.optim.AdamW(
                [p for _, p in self._rational_params],
                lr=self.milora.rational_lr,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                weight_decay=args.weight_decay,
            )
            self.rational_scheduler = get_scheduler(
                args.lr_scheduler_type,
                optimizer=self.rational_optimizer,
                num_warmup_steps=args.get_warmup_steps(total),
                num_training_steps=total,
                scheduler_specific_kwargs=args.lr_scheduler_kwargs,
            )
        return self.rational_optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
        if self.rational_optimizer is not None and self.args.should_save:  # type: ignore[attr-defined]
            state = {
                "optimizer": self.rational_optimizer.state_dict(),
                "scheduler": self.rational_scheduler.state_dict(),
                "steps": self.rational_steps,
                "parameters": [name for name, _ in self._rational_params],
            }
            torch.save(state, Path(output_dir) / RATIONAL_STATE_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        if checkpoint is None or self.rational_batches is None:
            return
        path = Path(checkpoint) / RATIONAL_STATE_NAME
        if not path.is_file():
            logger.warning(f"{checkpoint} has no {RATIONAL_STATE_NAME}: Θ's optimizer restarts from zero moments")
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        names = [name for name, _ in self._rational_params]
        if state.get("parameters") != names:
            raise ValueError(f"{path} is for other rational parameters than this run's; resume with the same recipe")
        self.ensure_rational_optimizer().load_state_dict(state["optimizer"])
        self.rational_scheduler.load_state_dict(state["scheduler"])
        self.rational_steps = int(state["steps"])

    # ---------------------------------------------------------------------------------------------- Θ step
    def rational_step(self) -> None:
        """One optimizer step of Θ on ``gradient_accumulation_steps`` validation micro-batches (see the module
        docstring); touches no other parameter and no ``.grad`` but Θ's own."""
        if self.rational_batches is None or self.milora is None:
            return
        optimizer = self.ensure_rational_optimizer()
        args = self.args  # type: ignore[attr-defined]
        model = self.model  # type: ignore[attr-defined]
        params = [p for _, p in self._rational_params]
        if self.rational_steps == 0 and any(p.dtype != torch.float32 for p in params):
            logger.warning(
                f"the rational coefficients are {params[0].dtype}, not fp32 (DeepSpeed casts the whole model): "
                f"steps of {self.milora.rational_lr:g} are below that precision and may leave them unchanged"
            )
        micro = max(1, args.gradient_accumulation_steps)
        world, rank = max(1, args.world_size), args.process_index
        step = self.state.global_step  # type: ignore[attr-defined]  # already counts the Ω step just taken
        scaler = getattr(self.accelerator, "scaler", None)  # type: ignore[attr-defined]
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        grads = [torch.zeros_like(p) for p in params]
        used = [False] * len(params)
        objective = torch.zeros((), device=params[0].device)
        was_training = model.training
        model.train()
        for p in params:
            p.requires_grad_(True)
        try:
            for m in range(micro):
                index = ((step - 1) * micro + m) * world + rank
                inputs = self._prepare_inputs(self.rational_batches.batch(index))  # type: ignore[attr-defined]
                with self.compute_loss_context_manager():  # type: ignore[attr-defined]
                    loss, balance, _ = self._task_and_balance(model, inputs)
                    if balance is not None:
                        loss = loss + self.milora.load_balance_coef * balance.to(loss.dtype)
                parts = torch.autograd.grad(loss * (scale / micro), params, allow_unused=True)
                for i, g in enumerate(parts):
                    if g is not None:
                        grads[i].add_(g.to(grads[i].dtype))
                        used[i] = True
                objective += loss.detach().float().to(objective.device) / micro
        finally:
            for p in params:
                p.requires_grad_(False)
            model.train(was_training)
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flat = torch.cat([g.flatten() for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= world
            grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
            flags = torch.tensor(used, dtype=torch.int32, device=flat.device)
            torch.distributed.all_reduce(flags)
            used = [bool(f) for f in flags.tolist()]
        if scale != 1.0:
            grads = [g / scale for g in grads]
        if not all(torch.isfinite(g).all() for g in grads):
            logger.warning(f"step {step}: non-finite rational-coefficient gradients, Θ step skipped")
            return
        for p, g, u in zip(params, grads, used):
            p.grad = g if u else None  # like Ω's optimizer, AdamW leaves a parameter without gradient alone
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], args.max_grad_norm)
        optimizer.step()
        self.rational_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.rational_steps += 1
        self._milora_stats["rational_loss"].append(objective)
