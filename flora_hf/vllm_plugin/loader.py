"""Read a FLoRA adapter folder for vLLM and place its tensors on vLLM's (packed) layers, refusing what would not serve.

A PEFT FLoRA folder holds ``adapter_config.json`` (``peft_type: FLORA``) and ``adapter_model.safetensors`` with
``<module>.flora_in`` ``(r, d_in)`` and ``<module>.flora_out`` ``(r, d_out)`` per adapted module, named after the
Hugging Face model (``base_model.model.model.layers.0.self_attn.q_proj``). vLLM packs some of those modules into one
layer (``q_proj``, ``k_proj``, ``v_proj`` into ``qkv_proj``; ``gate_proj``, ``up_proj`` into ``gate_up_proj``, after
the model's ``packed_modules_mapping``): each becomes a *slice* of the packed layer, with its own FLoRA factors.

Nothing here imports vLLM: the plugin passes in the model's layer table and its name mapping, so this module is
tested (and importable) without it. Every refusal is a :class:`FLoRAAdapterError` naming the adapter, the module
and the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_ROLES = ("flora_in", "flora_out")

SliceFactors = Optional[tuple[Tensor, Tensor]]
"""One slice's ``(flora_in (r, d_in), flora_out (r, d_out_slice))`` in PEFT's mean form, or None (not adapted)."""


class FLoRAAdapterError(ValueError):
    """A FLoRA adapter folder cannot be served by this vLLM model (the message says which adapter, module, why)."""


@dataclass(frozen=True)
class LayerSpec:
    """A vLLM layer that can hold FLoRA factors: its input width and the output width of each slice."""

    d_in: int
    slice_widths: tuple[int, ...]


@dataclass
class FLoRAWeights:
    """One FLoRA adapter placed on vLLM's layers: per vLLM module name, the factors of each slice (None: identity)."""

    name: str
    rank: int
    modules: dict[str, list[SliceFactors]] = field(default_factory=dict)


def read_peft_type(folder: str | Path) -> Optional[str]:
    """The folder's ``peft_type`` in upper case, or None when it has no readable adapter_config.json."""
    path = Path(folder) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return str(config.get("peft_type", "")).upper() if isinstance(config, dict) else None


def is_flora_folder(folder: str | Path) -> bool:
    return read_peft_type(folder) == "FLORA"


def module_targets(
    module_names: Sequence[str], packed_modules_mapping: Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, int]]:
    """Adapter module name -> (vLLM module name, slice index), as vLLM packs LoRA modules.

    ``model.layers.0.self_attn.qkv_proj`` with ``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}`` takes
    ``model.layers.0.self_attn.q_proj`` as slice 0, ``k_proj`` as 1, ``v_proj`` as 2; a module that is not packed
    (or packed from a single name, which vLLM does not register as packed) takes its own name as slice 0.
    """
    targets: dict[str, tuple[str, int]] = {}
    for name in module_names:
        prefix, _, leaf = name.rpartition(".")
        parts = list(packed_modules_mapping.get(leaf, ()))
        if len(parts) <= 1:
            targets[name] = (name, 0)
            continue
        for index, part in enumerate(parts):
            targets[f"{prefix}.{part}" if prefix else part] = (name, index)
    return targets


def _read_config(name: str, folder: Path) -> dict:
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FLoRAAdapterError(f"FLoRA adapter {name!r}: {folder} has no {CONFIG_NAME}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FLoRAAdapterError(f"FLoRA adapter {name!r}: {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "FLORA":
        raise FLoRAAdapterError(f"FLoRA adapter {name!r}: {path} is not a FLoRA config (peft_type must be FLORA)")
    return config


def _read_tensors(name: str, folder: Path) -> dict[str, Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        found = (
            " (found adapter_model.bin: only safetensors is read)" if (folder / "adapter_model.bin").exists() else ""
        )
        raise FLoRAAdapterError(f"FLoRA adapter {name!r}: {WEIGHTS_NAME} is missing in {folder}{found}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise FLoRAAdapterError(f"FLoRA adapter {name!r}: {path} is not a readable safetensors file: {exc}") from None


def _group_by_module(name: str, tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Tensor names (``<stem>.flora_in`` / ``.flora_out``) grouped by stem; anything else is refused."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, role = key.rpartition(".")
        if role not in _ROLES or not stem:
            raise FLoRAAdapterError(
                f"FLoRA adapter {name!r}: unexpected tensor {key!r} (a FLoRA adapter holds only "
                "<module>.flora_in and <module>.flora_out)"
            )
        grouped.setdefault(stem, {})[role] = tensor
    if not grouped:
        raise FLoRAAdapterError(f"FLoRA adapter {name!r} holds no weights")
    return grouped


def _check_factors(name: str, module: str, roles: Mapping[str, Tensor], d_in: int, d_out: int, max_rank: int) -> int:
    """The module's rank after checking its two factors against the layer (shape, rank limit, finite values)."""
    missing = [role for role in _ROLES if role not in roles]
    if missing:
        raise FLoRAAdapterError(f"FLoRA adapter {name!r}: module {module} lacks {' and '.join(missing)}")
    flora_in, flora_out = roles["flora_in"], roles["flora_out"]
    for role, tensor, width in (("flora_in", flora_in, d_in), ("flora_out", flora_out, d_out)):
        if tensor.dim() != 2 or tensor.shape[1] != width:
            raise FLoRAAdapterError(
                f"FLoRA adapter {name!r} does not fit the model: {module}.{role} has shape {tuple(tensor.shape)}, "
                f"the layer needs (r, {width})"
            )
        if not torch.isfinite(tensor).all():
            raise FLoRAAdapterError(f"FLoRA adapter {name!r} has NaN or infinite values in {module}.{role}")
    rank = flora_in.shape[0]
    if flora_out.shape[0] != rank or rank < 1:
        raise FLoRAAdapterError(
            f"FLoRA adapter {name!r}: {module} has factors of ranks {flora_in.shape[0]} and {flora_out.shape[0]}"
        )
    if rank > max_rank:
        raise FLoRAAdapterError(
            f"FLoRA adapter {name!r} has rank {rank} in {module}, greater than max_lora_rank {max_rank}"
        )
    return rank


def load_flora_adapter(
    name: str,
    folder: str | Path,
    layers: Mapping[str, LayerSpec],
    packed_modules_mapping: Mapping[str, Sequence[str]],
    max_rank: int,
    *,
    module_name: Callable[[str], str] = lambda stem: stem.removeprefix("base_model.model."),
    refused: Optional[Mapping[str, str]] = None,
) -> FLoRAWeights:
    """Read and validate the FLoRA folder ``folder`` for the vLLM layers ``layers`` (module name -> spec).

    ``module_name`` turns a tensor stem (``base_model.model.model.layers.0.mlp.up_proj``) into vLLM's module name
    before packing (the plugin passes vLLM's own LoRA name parsing, so a model's ``hf_to_vllm_mapper`` applies).
    ``refused`` names vLLM modules that carry LoRA but cannot carry FLoRA, with the reason, for a precise error.
    """
    folder = Path(folder)
    _read_config(name, folder)
    grouped = _group_by_module(name, _read_tensors(name, folder))
    refused = dict(refused or {})
    targets = module_targets([*layers, *refused], packed_modules_mapping)
    located: dict[str, tuple[str, int]] = {}
    for stem in sorted(grouped):  # every name first: a folder for another model fails on its names, not shapes
        module = module_name(stem)
        target = targets.get(module)
        if target is None:
            raise FLoRAAdapterError(
                f"FLoRA adapter {name!r} targets {module!r}, which is not a LoRA-capable layer of this vLLM model "
                f"(known modules end in: {sorted({m.rpartition('.')[2] for m in targets})})"
            )
        if target[0] in refused:
            raise FLoRAAdapterError(f"FLoRA adapter {name!r} targets {module!r}: {refused[target[0]]}")
        located[stem] = target
    placed: dict[str, list[SliceFactors]] = {}
    rank = 0
    for stem, roles in sorted(grouped.items()):
        module = module_name(stem)
        layer, index = located[stem]
        spec = layers[layer]
        rank = max(rank, _check_factors(name, module, roles, spec.d_in, spec.slice_widths[index], max_rank))
        slices = placed.setdefault(layer, [None] * len(spec.slice_widths))
        slices[index] = (roles["flora_in"].float(), roles["flora_out"].float())
    return FLoRAWeights(name=name, rank=rank, modules=placed)
