from __future__ import annotations

import dataclasses
import functools
import re
import types
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..cache_compat import cache_length, find_cache, output_cache
from ..checkpointing import replay_adapter_state_in_checkpoints, uses_reentrant_checkpointing
from ..per_example import per_example_forward
from .config import (
    DEFAULT_ROUTING_PREFIX,
    ROUTING_PREFIX_BY_MODEL_TYPE,
    TRANSFORMERS_MODELS_TO_MILORA_TARGET_MODULES_MAPPING,
    MiLoRAConfig,
)
from .layer import Linear, MiLoRALayer
from .router import GateSlot, MiLoRARouter, RoutingRuntime, attach_gates_to_cache, route_before_layer

_LAYER_KEY = re.compile(r"^(.*?\.\d+)\.(.+)$")
"""``<layer list>.<index>`` then the module path inside the transformer layer (the expert's name)."""
ROUTER_ATTR = "prompt_router"
RUNTIME_ATTR = "_milora_runtime"


def split_expert_key(key: str) -> tuple[str, str]:
    """``model.layers.3.self_attn.q_proj`` -> (``model.layers.3``, ``self_attn.q_proj``)."""
    match = _LAYER_KEY.match(key)
    if match is None:
        raise ValueError(
            f"MiLoRA experts must sit inside a numbered transformer layer (e.g. model.layers.3.mlp.up_proj); {key!r} "
            "does not: leave it out of target_modules"
        )
    return match.group(1), match.group(2)


def _first_tensor(args: tuple, kwargs: dict[str, Any], *names: str) -> Optional[Tensor]:
    for name in names:
        value = kwargs.get(name)
        if isinstance(value, Tensor):
            return value
    return args[0] if args and isinstance(args[0], Tensor) else None


def prompt_mask_for_call(
    model: nn.Module, args: tuple, kwargs: dict[str, Any], routing_prefix: int
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Which tokens of this forward are prompt: (decoder/causal mask ``(B, T)``, encoder mask or None).

    Padding is never prompt. With ``labels``, positions labelled -100 are the prompt (the response is what the loss
    reads); rows whose every label is a target (packed language modelling) route on their first ``routing_prefix``
    tokens.
    """
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    labels = kwargs.get("labels")
    if encoder_decoder:
        tokens = _first_tensor((), kwargs, "decoder_input_ids", "decoder_inputs_embeds")
        attention = kwargs.get("decoder_attention_mask")
        encoder_mask = kwargs.get("attention_mask")
        if tokens is None and labels is not None:
            tokens = labels
    else:
        tokens = _first_tensor(args, kwargs, "input_ids", "inputs_embeds")
        attention = kwargs.get("attention_mask")
        encoder_mask = None
    if tokens is None:
        return None, encoder_mask
    batch, length = tokens.shape[:2]
    mask = torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
    if isinstance(attention, Tensor) and attention.dim() == 2:
        mask = attention[:, -length:].to(device=tokens.device, dtype=torch.bool)
    if isinstance(labels, Tensor) and labels.shape[:2] == (batch, length):
        prompt = mask & (labels == -100)
        prefix = mask & (mask.long().cumsum(1) <= routing_prefix)
        mask = torch.where(prompt.any(1, keepdim=True), prompt, prefix)
    return mask, encoder_mask if isinstance(encoder_mask, Tensor) and encoder_mask.dim() == 2 else None


class MiLoRAModel(BaseTuner):
    """Injects MiLoRA (prompt-aware mixture of LoRA experts, routed once per prompt) into a transformers model.

    Each targeted module becomes an expert (:class:`~flora_hf.milora.layer.Linear`); each transformer layer holding
    experts gets a :class:`~flora_hf.milora.router.MiLoRARouter` (``layer.prompt_router``), run by a forward pre-hook.
    Hooks on the model's own forward decide, per call, whether it is a prefill (route) or a decoding step with a KV
    cache (reuse), and attach the load-balancing loss to the output as ``load_balance_loss`` in training.
    Per-example adapters (``adapter_names=[...]``) work as for FLoRA, MiLoRA rows mixed with base rows.
    """

    prefix: str = "milora_"
    tuner_layer_cls = MiLoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_MILORA_TARGET_MODULES_MAPPING

    # ------------------------------------------------------------------------------------------------ injection
    def _create_and_replace(
        self,
        config: MiLoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        layer_key, expert_name = split_expert_key(current_key)
        slot = self._slot_for(layer_key)
        self.__dict__.setdefault("_new_experts", {}).setdefault(layer_key, set()).add(expert_name)
        kwargs = {
            "r": config.r,
            "scaling": config.scaling,
            "dropout": config.lora_dropout,
            "init_weights": config.init_weights,
        }
        if isinstance(target, MiLoRALayer):
            target.update_layer(adapter_name, **kwargs, inference_mode=config.inference_mode)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise ValueError(
                f"MiLoRA experts wrap nn.Linear or transformers Conv1D layers; {current_key!r} is {type(base).__name__}"
            )
        slot.columns.setdefault(expert_name, len(slot.columns))
        new_module = Linear(target, adapter_name, expert_name, slot, fan_in_fan_out=isinstance(base, Conv1D), **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _slot_for(self, layer_key: str) -> GateSlot:
        layer = self.model.get_submodule(layer_key)
        router = getattr(layer, ROUTER_ATTR, None)
        if router is not None:
            return router.slot
        return self.__dict__.setdefault("_pending_slots", {}).setdefault(layer_key, GateSlot())

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        hidden = router_hidden_size(model)  # checked before any module is wrapped: a refusal leaves the model as is
        self.__dict__["_new_experts"] = {}
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._install_routers(model, adapter_name, hidden)

    def _install_routers(self, model: nn.Module, adapter_name: str, hidden: int) -> None:
        config: MiLoRAConfig = self.peft_config[adapter_name]
        runtime = install_routing_hooks(model, config)
        pending = self.__dict__.get("_pending_slots", {})
        for layer_key, experts in sorted(self.__dict__.get("_new_experts", {}).items()):
            layer = model.get_submodule(layer_key)
            router = getattr(layer, ROUTER_ATTR, None)
            if router is None:
                is_encoder = ".encoder." in f".{layer_key}."
                router = MiLoRARouter(layer_key, hidden, runtime, is_encoder)
                router.slot = pending.pop(layer_key, router.slot)
                router.slot.router = router
                setattr(layer, ROUTER_ATTR, router)
                router._hook = layer.register_forward_pre_hook(route_before_layer, with_kwargs=True)
            device = next((p.device for p in layer.parameters() if p.device.type != "meta"), torch.device("cpu"))
            router.update_layer(
                adapter_name,
                tuple(sorted(experts)),
                top_k=config.top_k,
                pooler=config.pooler,
                rational_degrees=config.rational_degrees,
                rational_form=config.rational_form,
                device=device,
                inference_mode=config.inference_mode,
            )
        # As BaseTuner.inject_adapter does for the experts: routers follow the tuner's active adapters (a new router
        # would otherwise start on PEFT's placeholder "default" and route for no adapter at all).
        for router in self.routers():
            router.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self.__dict__["_new_experts"] = {}

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        for router in self.routers():  # not MiLoRALayer instances, so PEFT's set_adapter skips them
            router.set_adapter(adapter_name, inference_mode=inference_mode)

    def routers(self) -> list[MiLoRARouter]:
        return [m for m in self.model.modules() if isinstance(m, MiLoRARouter)]

    # --------------------------------------------------------------------------------------- adapter lifecycle
    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for router in self.routers():
            if adapter_name in router.milora_weight:
                router.delete_adapter(adapter_name)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any):
        if merge:
            self._check_merge_allowed()
        remove_routers(self.model)
        return super()._unload_and_optionally_merge(merge=False, **kwargs)

    def _check_merge_allowed(self) -> None:
        raise ValueError("MiLoRA cannot be merged into the base weights: the experts in use depend on each prompt")

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT calls this around forward and generate: ``adapter_names`` selects an adapter per example."""
        with per_example_forward(self.model, args, kwargs):
            yield


def router_hidden_size(model: nn.Module) -> int:
    """The width of the hidden states the routers pool (``model.config.hidden_size``)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0:
        raise ValueError(
            f"MiLoRA sizes its routers from the model config's hidden_size, and this {type(model).__name__} has "
            f"{'no config' if getattr(model, 'config', None) is None else 'no integer hidden_size in its config'}; "
            "give the model a config with hidden_size (a transformers PretrainedConfig has one)"
        )
    return hidden


def install_routing_hooks(model: nn.Module, config: MiLoRAConfig) -> RoutingRuntime:
    """Hooks on the model's forward that tell the routers whether this call routes or reuses (once per model)."""
    runtime = getattr(model, RUNTIME_ATTR, None)
    if runtime is not None:
        return runtime
    runtime = RoutingRuntime()
    object.__setattr__(model, RUNTIME_ATTR, runtime)
    model_type = getattr(model.config, "model_type", "")
    prefix = config.routing_prefix or ROUTING_PREFIX_BY_MODEL_TYPE.get(model_type, DEFAULT_ROUTING_PREFIX)

    # The hooks look the runtime up on the module they run for, rather than closing over it: copy.deepcopy(model)
    # shares hook functions between the copies but gives the copy's routers their own runtime.
    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        runtime = getattr(module, RUNTIME_ATTR)
        if module.training and torch.is_grad_enabled():
            _check_checkpointing(module)
        cache = find_cache(kwargs)
        runtime.in_model_call = True
        runtime.cache = cache
        runtime.local_gates = {}
        # A non-empty cache means decoding: reuse the gates stored on it at prefill (the routers raise a clear
        # error when a cache was filled without them).
        runtime.reuse = cache_length(cache) > 0
        if runtime.reuse:  # decoding steps read no prompt: skip building its mask on the hot path
            runtime.prompt_mask = runtime.encoder_mask = None
            return
        mask, encoder_mask = prompt_mask_for_call(module, args, kwargs, prefix)
        if runtime.explicit_prompt_mask is not None and mask is not None:
            mask = mask & runtime.explicit_prompt_mask.to(mask.device, torch.bool)
        if runtime.generate_prompt_length is not None and mask is not None:
            # generate(use_cache=False) re-runs the whole sequence at every step: route on the prompt part only
            mask = mask.clone()
            mask[:, runtime.generate_prompt_length :] = False
        runtime.prompt_mask, runtime.encoder_mask = mask, encoder_mask

    def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        runtime = getattr(module, RUNTIME_ATTR)
        runtime.in_model_call = False
        created = output_cache(output)
        if runtime.cache is None and created is not None:
            _refuse_a_cache_it_did_not_see(module, created, args, kwargs)
        if runtime.cache is None and runtime.local_gates and hasattr(created, "get_seq_length"):
            # A prefill without a cache passed in (a hand-written decoding loop: model(ids, use_cache=True)) made
            # its cache inside the model: the gates go with it, so the next step can reuse them.
            attach_gates_to_cache(created, runtime.local_gates)
        losses, runtime.balance_losses = runtime.balance_losses, []
        if losses and isinstance(output, dict):
            return with_load_balance_loss(output, torch.stack(losses).mean())
        return output

    runtime._handles = (
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    )
    if not getattr(model.config, "is_encoder_decoder", False) and hasattr(type(model), "generate"):
        # A bound method in the instance (not a closure), so copy.deepcopy rebinds it to the copy.
        model.generate = types.MethodType(_generate_knowing_the_prompt, model)
    return runtime


def with_load_balance_loss(output: Any, loss: Tensor) -> Any:
    """``output`` with ``load_balance_loss`` as a real dataclass field, not an extra key: DistributedDataParallel
    rebuilds a ModelOutput from its fields alone (torch.distributed.utils._apply_to_tensors), which would drop an
    extra key or fail on it."""
    if not dataclasses.is_dataclass(output):
        output["load_balance_loss"] = loss
        return output
    cls = _output_class_with_balance_loss(type(output))
    values = {f.name: getattr(output, f.name) for f in dataclasses.fields(output) if f.init}
    return cls(**values, load_balance_loss=loss)


@functools.cache
def _output_class_with_balance_loss(output_class: type) -> type:
    name = f"MiLoRA{output_class.__name__}"
    cls = dataclasses.make_dataclass(
        name,
        [("load_balance_loss", Optional[Tensor], dataclasses.field(default=None))],
        bases=(output_class,),
        namespace={"__module__": __name__, "__doc__": f"{output_class.__name__} plus MiLoRA's load-balancing loss."},
    )
    globals()[name] = cls  # importable by name, so the output pickles
    return cls


def _check_checkpointing(model: nn.Module) -> None:
    """Checkpointed layers recompute with this call's routing context; reentrant checkpointing is refused."""
    if uses_reentrant_checkpointing(model):
        raise ValueError(
            "MiLoRA cannot train under reentrant gradient checkpointing (use_reentrant=True): each layer's gates "
            "come from its router, outside the checkpointed forward, and a reentrant checkpoint back-propagates "
            "only to its own inputs in a backward of its own, so the router's graph would be traversed twice (or, "
            "where the router runs inside, not at all). Use model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False}), transformers' default"
        )
    replay_adapter_state_in_checkpoints(model)


def _refuse_a_cache_it_did_not_see(module: nn.Module, created: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    """Raise when a forward returned a cache holding more tokens than it was given: the cache came in by a way the
    hook cannot see (a new argument name, a positional argument), so this call routed on new tokens as if they
    were a prompt. Decoding must reuse the prefill's gates, never quietly re-route."""
    if getattr(module.config, "is_encoder_decoder", False):
        tokens = _first_tensor((), kwargs, "decoder_input_ids", "decoder_inputs_embeds")
    else:
        tokens = _first_tensor(args, kwargs, "input_ids", "inputs_embeds")
    if tokens is None or tokens.dim() < 2 or not hasattr(created, "get_seq_length"):
        return
    if cache_length(created) > tokens.shape[1]:
        raise RuntimeError(
            "MiLoRA: this forward extended a KV cache that it could not find among its arguments (looked for "
            "cache / past_key_values / cache_params and any transformers Cache), so it cannot reuse the prompt's "
            "routing and would re-route on decoding tokens; pass the cache by keyword (cache= on transformers "
            "5.24+, past_key_values= before)"
        )


def _generate_knowing_the_prompt(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``generate``, telling the routers how long the prompt is, for calls that run without a KV cache."""
    runtime = getattr(model, RUNTIME_ATTR)
    prompt = _first_tensor(args, kwargs, "input_ids", "inputs_embeds")
    previous = runtime.generate_prompt_length
    runtime.generate_prompt_length = None if prompt is None else prompt.shape[1]
    try:
        return type(model).generate(model, *args, **kwargs)
    finally:
        runtime.generate_prompt_length = previous


def remove_routers(model: nn.Module) -> None:
    """Take every router, its hook and the model-level hooks off ``model`` (unload)."""
    for _name, module in list(model.named_modules()):
        router = getattr(module, ROUTER_ATTR, None)
        if isinstance(router, MiLoRARouter):
            router._hook.remove()
            delattr(module, ROUTER_ATTR)
    runtime = getattr(model, RUNTIME_ATTR, None)
    if runtime is not None:
        for handle in runtime._handles:
            handle.remove()
        object.__delattr__(model, RUNTIME_ATTR)
        model.__dict__.pop("generate", None)


@contextmanager
def routing_prompt_mask(model: nn.Module, prompt_mask: Tensor) -> Iterator[None]:
    """Route on exactly these tokens (``(B, T)`` bool, True = prompt) for forwards inside the block.

    For training data whose prompt/response split is not in ``labels``; intersected with the attention mask.
    """
    runtimes = {id(r): r for r in (getattr(m, RUNTIME_ATTR, None) for m in model.modules()) if r is not None}
    if not runtimes:
        warnings.warn("routing_prompt_mask: the model has no MiLoRA adapter", stacklevel=2)
    previous = {key: r.explicit_prompt_mask for key, r in runtimes.items()}
    for r in runtimes.values():
        r.explicit_prompt_mask = prompt_mask
    try:
        yield
    finally:
        for key, r in runtimes.items():
            r.explicit_prompt_mask = previous[key]
