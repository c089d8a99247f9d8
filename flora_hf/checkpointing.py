"""Gradient checkpointing that recomputes each layer with the adapters its own forward used.

A checkpointed layer runs its forward a second time inside the backward pass, after the call that chose the
adapters (``adapter_names``, MiLoRA's routing context) has returned, and, with ``use_reentrant=True``, its first
forward runs without autograd. Neither moment can read "the current call" from global state: the recompute must
see what the original forward saw, or it trains the wrong adapter. So the checkpoint function of every
checkpointing module (transformers' ``module._gradient_checkpointing_func``) is wrapped once: at forward time it
takes a snapshot of the adapter state inside that module, and the function it checkpoints restores that snapshot
around every run of it, the recompute included. Exact with several forwards before one backward, too.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

from torch import nn

Snapshot = Callable[[], ContextManager[None]]
"""Restores the state it captured for the duration of a ``with`` block."""
Snapshotter = Callable[[nn.Module], Optional[Snapshot]]
"""Captures one kind of adapter state inside a checkpointed module (None: nothing of that kind there)."""

_SNAPSHOTTERS: list[Snapshotter] = []
_WRAPPED = "_flora_replays_adapter_state"


def register_snapshotter(snapshotter: Snapshotter) -> Snapshotter:
    """Add a kind of state to capture (the adapter batch here; MiLoRA's routing context in milora/)."""
    _SNAPSHOTTERS.append(snapshotter)
    return snapshotter


def attribute_snapshot(targets: Sequence[tuple[Any, Sequence[str]]]) -> Snapshot:
    """A snapshot of the named attributes of each object, restored inside ``with`` and put back after it."""
    saved = [(obj, {name: getattr(obj, name) for name in names}) for obj, names in targets]

    @contextmanager
    def restore() -> Iterator[None]:
        previous = [(obj, {name: getattr(obj, name) for name in values}) for obj, values in saved]
        for obj, values in saved:
            for name, value in values.items():
                setattr(obj, name, value)
        try:
            yield
        finally:
            for obj, values in previous:
                for name, value in values.items():
                    setattr(obj, name, value)

    return restore


@register_snapshotter
def _adapter_batches(module: nn.Module) -> Optional[Snapshot]:
    """The per-example adapter batch of every adapter layer and mixed-batch wrapper inside ``module``."""
    holders = [m for m in module.modules() if hasattr(m, "_adapter_batch")]
    return attribute_snapshot([(m, ("_adapter_batch",)) for m in holders]) if holders else None


def checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that transformers will checkpoint (``gradient_checkpointing`` on, a checkpoint function set)."""
    return [
        m
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False) and callable(getattr(m, "_gradient_checkpointing_func", None))
    ]


def uses_reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether any checkpointing module of ``model`` was set up with ``use_reentrant=True``."""
    for module in checkpointing_modules(model):
        func = getattr(module._gradient_checkpointing_func, "__wrapped__", module._gradient_checkpointing_func)
        if isinstance(func, partial) and func.keywords.get("use_reentrant") is True:
            return True
    return False


def replay_adapter_state_in_checkpoints(model: nn.Module) -> None:
    """Wrap the checkpoint function of every checkpointing module of ``model`` (once; again after a user re-enables
    gradient checkpointing, which installs a new function)."""
    for module in checkpointing_modules(model):
        func = module._gradient_checkpointing_func
        if not getattr(func, _WRAPPED, False):
            module._gradient_checkpointing_func = _replaying(module, func)


def _replaying(module: nn.Module, checkpoint: Callable[..., Any]) -> Callable[..., Any]:
    def checkpoint_replaying(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        snapshots = [s for s in (snap(module) for snap in _SNAPSHOTTERS) if s is not None]

        def function_with_state(*inner_args: Any, **inner_kwargs: Any) -> Any:
            with ExitStack() as stack:
                for snapshot in snapshots:
                    stack.enter_context(snapshot())
                return function(*inner_args, **inner_kwargs)

        return checkpoint(function_with_state, *args, **kwargs)

    checkpoint_replaying.__wrapped__ = checkpoint  # type: ignore[attr-defined]
    setattr(checkpoint_replaying, _WRAPPED, True)
    return checkpoint_replaying
