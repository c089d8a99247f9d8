"""Per-example adapter selection: which adapter each row of a batch goes through.

PEFT injects ``adapter_names`` into every LoRA layer through forward pre-hooks registered on each call. Here one
:class:`AdapterBatch` (vLLM calls this the per-step metadata) is shared by all adapter layers of a model for the
duration of a call, and it turns names into an index tensor once per distinct bank layout and batch size, so a whole
``generate`` pays for that conversion once rather than per layer and per step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .checkpointing import replay_adapter_state_in_checkpoints

BASE_ADAPTER_NAME = "__base__"
"""PEFT's name for "no adapter" in ``adapter_names``."""


def length_mismatch(names: int, inputs: int) -> str:
    """PEFT's wording (users grep for it), then what to do."""
    return (
        f"Length of `adapter_names` should be the same as the number of inputs, but got {names} and {inputs} "
        "respectively. Pass one adapter name per example."
    )


def as_adapter_names(names: Sequence[str]) -> tuple[str, ...]:
    """Validate a user's ``adapter_names``: a non-empty sequence of str, one per example."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a list of str, one per example, got {names!r}")
    if len(names) == 0:
        raise ValueError("adapter_names is empty")
    return tuple(names)


class AdapterBatch:
    """The adapter name of each example in a batch, and its index in each layer's bank layout."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = as_adapter_names(names)
        self._indices: dict[tuple, Tensor] = {}

    def indices(self, bank_order: tuple[str, ...], rows: int, device: torch.device) -> Tensor:
        """Bank row per example for a layer whose bank holds identity at 0 and then ``bank_order``.

        A layer may see the batch expanded by an integer factor (beam search, ``num_return_sequences``):
        ``generate`` repeats each example consecutively, so the names are repeated the same way. Adapters a
        layer does not hold map to the identity row.
        """
        key = (bank_order, rows, device)
        cached = self._indices.get(key)
        if cached is not None:
            return cached
        position = {name: k for k, name in enumerate(bank_order, start=1)}
        idx = torch.tensor([position.get(name, 0) for name in self.names_for_rows(rows)], dtype=torch.long)
        idx = idx.to(device)
        self._indices[key] = idx
        return idx

    def names_for_rows(self, rows: int) -> tuple[str, ...]:
        """One name per row of a layer input of ``rows`` rows (``generate`` repeats each example consecutively)."""
        n = len(self.names)
        if rows % n != 0:
            raise ValueError(length_mismatch(n, rows))
        return self.names if rows == n else tuple(name for name in self.names for _ in range(rows // n))


def _in_backward() -> bool:
    # Gradient checkpointing recomputes a layer's forward inside the backward pass, after the call that set the
    # batch has returned; that recompute must see the same adapters as the original forward.
    return torch._C._current_graph_task_id() != -1


_OPTIMIZER_STEPS = [0]
"""Optimizer steps taken in this process (every torch optimizer, fused ones included): part of a bank's key."""


def _count_optimizer_step(optimizer: object, args: object, kwargs: object) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class PerExampleAdapterLayer:
    """Mixin for adapter layers that read the current :class:`AdapterBatch`."""

    _adapter_batch: Optional[AdapterBatch] = None
    _saved_adapter_batch: Optional[AdapterBatch] = None

    def current_adapter_batch(self) -> Optional[AdapterBatch]:
        # A recompute under transformers' checkpointing has its forward's batch restored (checkpointing.py); one
        # under a hand-made torch.utils.checkpoint falls back to the batch of the last forward (saved in any grad
        # mode: reentrant checkpointing runs its first forward without autograd).
        if _in_backward():
            return self._saved_adapter_batch if self._adapter_batch is None else self._adapter_batch
        self._saved_adapter_batch = self._adapter_batch
        return self._adapter_batch

    def adapter_names_in_layer(self) -> set[str]:
        raise NotImplementedError

    def _cached_bank(
        self, key: tuple, params: list[tuple[Tensor, Tensor]], build: Callable[[], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """``build()`` once per parameter version in inference; rebuilt on every call while gradients must flow."""
        flat = [t for pair in params for t in pair]
        if torch.is_grad_enabled() and any(t.requires_grad for t in flat):
            return build()
        # a fused optimizer (AdamW(fused=True), Trainer's default) updates parameters without bumping `_version`,
        # so any optimizer step anywhere also makes every cached bank stale
        versions = (_OPTIMIZER_STEPS[0], *((id(t), t._version) for t in flat))
        cache = self.__dict__.setdefault("_bank_cache", {})
        hit = cache.get(key)
        if hit is not None and hit[0] == versions:
            return hit[1], hit[2]
        with torch.no_grad():
            bank_in, bank_out = build()
        cache[key] = (versions, bank_in, bank_out)
        return bank_in, bank_out


def per_example_layers(model: nn.Module) -> list[PerExampleAdapterLayer]:
    return [m for m in model.modules() if isinstance(m, PerExampleAdapterLayer)]


def known_adapter_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for layer in per_example_layers(model):
        names |= layer.adapter_names_in_layer()
    return names


def check_adapter_names(model: nn.Module, names: Sequence[str]) -> None:
    """Raise a clear error for names no layer of ``model`` holds (typos must not silently mean "base model")."""
    known = known_adapter_names(model)
    unknown = sorted({n for n in names if n != BASE_ADAPTER_NAME} - known)
    if unknown:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. Known adapters: {sorted(known)} "
            f"(or {BASE_ADAPTER_NAME!r} for the base model)"
        )


@contextmanager
def adapter_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[AdapterBatch]:
    """Run every forward inside the block with ``adapter_names[i]`` applied to example ``i``.

    Works on any model carrying flora-hf adapter layers, including one adapted with transformers'
    ``model.add_adapter(FLoRAConfig(...))``::

        with flora_hf.adapter_batch(model, ["perl", "ruby", "__base__"]):
            model.generate(input_ids)
    """
    batch = AdapterBatch(adapter_names)
    layers = per_example_layers(model)
    if not layers:
        raise ValueError("the model has no flora-hf adapter layers; add an adapter first")
    check_adapter_names(model, batch.names)
    holders = [*layers, *mixed_batch_wrappers(model)]
    previous = [holder._adapter_batch for holder in holders]
    for holder in holders:
        holder._adapter_batch = batch
    replay_adapter_state_in_checkpoints(model)
    try:
        yield batch
    finally:
        for holder, prev in zip(holders, previous):
            holder._adapter_batch = prev


def mixed_batch_wrappers(model: nn.Module) -> list[nn.Module]:
    """PEFT's ``modules_to_save`` / trainable-token wrappers, each given a hook that passes it the batch's names.

    PEFT hands ``adapter_names`` to these wrappers as it does to LoRA layers, and they split the batch by adapter
    themselves (raising for module kinds they cannot split); a mixed FLoRA or MiLoRA batch must reach them too, or
    every row, ``__base__`` included, would go through the active adapter's copy.
    """
    wrappers = [m for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    for wrapper in wrappers:
        if not hasattr(wrapper, "_adapter_batch"):
            wrapper._adapter_batch = None
            wrapper.register_forward_pre_hook(_pass_adapter_names, with_kwargs=True)
    return wrappers


def _pass_adapter_names(wrapper: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Optional[tuple[tuple, dict]]:
    batch: Optional[AdapterBatch] = wrapper._adapter_batch
    if batch is None or "adapter_names" in kwargs or not args or not isinstance(args[0], Tensor):
        return None
    has = getattr(wrapper, "_adapters", set())
    # an adapter without its own copy of this module leaves it as the base model has it
    names = [n if n in has else BASE_ADAPTER_NAME for n in batch.names_for_rows(args[0].shape[0])]
    return args, {**kwargs, "adapter_names": names}


def set_trainable_adapters(model: nn.Module, adapter_names: Optional[Sequence[str]] = None) -> list[str]:
    """Make the named adapters (default: all) trainable, so one mixed-batch optimizer step trains them all.

    PEFT keeps only the active adapter trainable; per-example training needs every adapter of the run to receive
    gradients. Returns the names made trainable.
    """
    names = sorted(known_adapter_names(model)) if adapter_names is None else list(adapter_names)
    check_adapter_names(model, names)
    for layer in per_example_layers(model):
        present = [n for n in names if n in layer.adapter_names_in_layer()]
        if present:
            layer.set_requires_grad(present, requires_grad=True)
    for wrapper in mixed_batch_wrappers(model):  # each adapter's modules_to_save copies learn from its rows too
        present = [n for n in names if n in getattr(wrapper, "_adapters", ())]
        if present:
            wrapper.set_requires_grad(present, requires_grad=True)
    return names


_BATCHED_INPUTS = ("input_ids", "inputs_embeds", "input_features", "input_values", "pixel_values")


def _input_batch_size(args: Sequence[Any], kwargs: dict[str, Any]) -> Optional[int]:
    for key in _BATCHED_INPUTS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    return None


@contextmanager
def per_example_forward(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> Iterator[None]:
    """The tuners' ``_enable_peft_forward_hooks``: pops ``adapter_names`` (one per example) and applies them."""
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is None:
        yield
        return
    adapter_names = as_adapter_names(adapter_names)
    batch_size = _input_batch_size(args, kwargs)
    if batch_size is not None and len(adapter_names) != batch_size:
        raise ValueError(length_mismatch(len(adapter_names), batch_size))
    with adapter_batch(model, adapter_names):
        yield
