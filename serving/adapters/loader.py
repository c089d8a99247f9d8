"""Read a PEFT-format adapter folder (FLoRA, LoRA or IA3) into host tensors, refusing anything that would not serve.

A server must never crash or serve garbage because of one bad adapter file, so every check happens here, at load:
format (safetensors only), method, shapes against the base model's layers, rank limit, finite values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..types import AdapterError

Method = Literal["flora", "lora", "ia3"]
Role = Literal["flora_in", "flora_out", "lora_a", "lora_b", "ia3_in", "ia3_out"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterWeights:
    """One adapter on the host: per base-module path, its tensors by role, in the shapes the slot banks take.

    flora_in (r, d_in), flora_out (r, d_out): the PEFT parameters (mean form); lora_a (r, d_in) and lora_b
    (r, d_out) with PEFT's ``alpha / r`` scaling folded into lora_b; ia3_in (d_in,), ia3_out (d_out,).
    """

    name: str
    method: Method
    rank: int  # 0 for IA3
    modules: dict[str, dict[Role, Tensor]] = field(default_factory=dict)
    source: str = ""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for roles in self.modules.values() for t in roles.values())


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a layer the server can adapt."""
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)  # stored (in, out)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise AdapterError(f"{type(module).__name__} layers cannot carry adapters (only Linear and Conv1D)")


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{folder} is not a PEFT adapter folder: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    return config


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        if (folder / "adapter_model.bin").exists():
            raise AdapterError(f"{folder}: only safetensors adapters are served (found adapter_model.bin)")
        raise AdapterError(f"{folder}: {WEIGHTS_NAME} is missing")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} is not a readable safetensors file: {exc}") from exc


def _module_path(key: str, suffix: str) -> str:
    return key[: -len(suffix)].removeprefix(_PEFT_PREFIX)


def _lora_scaling(config: dict, module_path: str, rank: int) -> float:
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module_path.endswith(pattern):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _is_feedforward(config: dict, module_path: str) -> bool:
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        import re

        return re.fullmatch(ff, module_path) is not None
    return any(module_path == m or module_path.endswith("." + m) for m in ff)


def _parse_tensors(method: Method, config: dict, tensors: dict[str, Tensor]) -> dict[str, dict[Role, Tensor]]:
    modules: dict[str, dict[Role, Tensor]] = {}
    for key, tensor in tensors.items():
        if method == "flora" and key.endswith((".flora_in", ".flora_out")):
            suffix = ".flora_in" if key.endswith(".flora_in") else ".flora_out"
            modules.setdefault(_module_path(key, suffix), {})[suffix[1:]] = tensor.float()
        elif method == "lora" and key.endswith((".lora_A.weight", ".lora_B.weight")):
            suffix = ".lora_A.weight" if key.endswith(".lora_A.weight") else ".lora_B.weight"
            role: Role = "lora_a" if suffix == ".lora_A.weight" else "lora_b"
            modules.setdefault(_module_path(key, suffix), {})[role] = tensor.float()
        elif method == "ia3" and key.endswith(".ia3_l"):
            path = _module_path(key, ".ia3_l")
            role = "ia3_in" if _is_feedforward(config, path) else "ia3_out"
            modules.setdefault(path, {})[role] = tensor.float().flatten()
        else:
            raise AdapterError(f"unexpected tensor {key!r} in a {method.upper()} adapter")
    if not modules:
        raise AdapterError("the adapter holds no weights")
    for path, roles in modules.items():
        needed = {"flora": {"flora_in", "flora_out"}, "lora": {"lora_a", "lora_b"}}.get(method)
        if needed and set(roles) != needed:
            raise AdapterError(f"module {path}: expected tensors {sorted(needed)}, found {sorted(roles)}")
        if method == "lora":
            rank = roles["lora_a"].shape[0]
            roles["lora_b"] = roles["lora_b"].t().contiguous() * _lora_scaling(config, path, rank)
    return modules


def _check_against_base(
    name: str, method: Method, modules: dict[str, dict[Role, Tensor]], base: nn.Module, max_rank: int
) -> int:
    rank = 0
    for path, roles in modules.items():
        try:
            target = base.get_submodule(path)
        except AttributeError:
            raise AdapterError(f"adapter {name!r} targets {path!r}, which the base model does not have") from None
        d_in, d_out = linear_features(getattr(target, "base_layer", target))  # unwrap a slot layer
        for role, tensor in roles.items():
            want = d_in if role in ("flora_in", "lora_a", "ia3_in") else d_out
            if tensor.shape[-1] != want or (role.startswith("ia3") and tensor.dim() != 1):
                raise AdapterError(
                    f"adapter {name!r} does not fit the base model: {path}.{role} has shape {tuple(tensor.shape)}, "
                    f"the layer needs last dimension {want}"
                )
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"adapter {name!r} has NaN or infinite values in {path}.{role}")
        if method != "ia3":
            first, second = sorted(r for r in roles)
            if roles[first].shape[0] != roles[second].shape[0]:
                raise AdapterError(f"adapter {name!r}: {path} has factors of different ranks")
            rank = max(rank, roles[first].shape[0])
    if rank > max_rank:
        raise AdapterError(f"adapter {name!r} has rank {rank}; this server holds ranks up to {max_rank}")
    return rank


def load_adapter_folder(name: str, folder: str | Path, base: nn.Module, max_rank: int) -> AdapterWeights:
    """Load and validate ``folder`` (PEFT format) for serving on ``base``; raises AdapterError with the reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter {name!r}: {folder} is not a directory")
    config = _read_config(folder)
    peft_type = str(config.get("peft_type", "")).upper()
    methods: dict[str, Method] = {"FLORA": "flora", "LORA": "lora", "IA3": "ia3"}
    if peft_type not in methods:
        raise AdapterError(
            f"adapter {name!r}: peft_type {peft_type or 'missing'} is not served (FLORA, LORA, IA3 are)"
        )
    method = methods[peft_type]
    if method == "lora" and config.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA adapters are not served")
    modules = _parse_tensors(method, config, _read_tensors(folder))
    rank = _check_against_base(name, method, modules, base, max_rank)
    return AdapterWeights(name=name, method=method, rank=rank, modules=modules, source=str(folder))
