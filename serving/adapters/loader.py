"""Read a PEFT-format adapter folder (FLoRA, LoRA, IA3 or MiLoRA) into host tensors, refusing what would not serve.

A server must never crash or serve garbage because of one bad adapter file, so every check happens here, at load:
format (safetensors only), method, shapes against the base model's layers, rank limit, finite values, and for
MiLoRA the routers (one per transformer layer holding experts, a weight row per expert, a known pooler).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from flora_hf.base_layers import linear_features as base_linear_features
from flora_hf.milora import MiLoRAConfig
from flora_hf.milora.model import split_expert_key
from flora_hf.ops import INPUT_ROLES, BankRole, RouterParams, lora_bank_row, lora_scaling

from ..types import AdapterError

Method = Literal["flora", "lora", "ia3", "milora"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass
class RouterWeights:
    """A MiLoRA router of one transformer layer, as :func:`flora_hf.ops.milora.route` takes it.

    ``experts`` are the module paths inside the layer (``self_attn.q_proj``), sorted: the order of ``weight``'s rows
    (N, d). ``query`` (d,) only for the attention pooler; ``num`` (m+1,) and ``den`` (n,) the rational coefficients.
    """

    experts: tuple[str, ...]
    weight: Tensor
    num: Tensor
    den: Tensor
    query: Optional[Tensor]
    pooler: str
    top_k: int
    rational_form: str

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.weight, self.num, self.den, self.query) if t is not None]

    def params(self, device: torch.device) -> RouterParams:
        """This router on ``device`` as the math core routes with it (router and rational stay fp32)."""
        to = {"device": device, "dtype": torch.float32}
        return RouterParams(
            weight=self.weight.to(**to),
            numerator=self.num.to(**to),
            denominator=self.den.to(**to),
            top_k=self.top_k,
            pooler=self.pooler,
            form=self.rational_form,
            query=None if self.query is None else self.query.to(**to),
        )


@dataclass
class AdapterWeights:
    """One adapter on the host: per base-module path, its tensors by role, in the shapes the slot banks take.

    flora_in (r, d_in), flora_out (r, d_out): the PEFT parameters (mean form); lora_a (r, d_in) and lora_b
    (r, d_out) with PEFT's ``alpha / r`` scaling folded into lora_b; ia3_in (d_in,), ia3_out (d_out,). MiLoRA
    experts are LoRA factors (same roles, scaling folded in), and ``routers`` holds a router per transformer layer
    path (``model.layers.3``), whose gates scale those experts row by row.
    """

    name: str
    method: Method
    rank: int  # 0 for IA3
    modules: dict[str, dict[BankRole, Tensor]] = field(default_factory=dict)
    source: str = ""
    routers: dict[str, RouterWeights] = field(default_factory=dict)

    def nbytes(self) -> int:
        tensors = [t for roles in self.modules.values() for t in roles.values()]
        tensors += [t for router in self.routers.values() for t in router.tensors()]
        return sum(t.numel() * t.element_size() for t in tensors)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a layer the server can adapt."""
    try:
        return base_linear_features(module)
    except TypeError:
        raise AdapterError(f"{type(module).__name__} layers cannot carry adapters (only Linear and Conv1D)") from None


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


def _lora_config(config: dict) -> LoraConfig:
    """The folder's config as PEFT's LoraConfig (validated as PEFT validates it), so that patterns are read the way
    PEFT reads them when it loads the same folder."""
    known = {f.name for f in fields(LoraConfig)}
    try:
        return LoraConfig(**{k: v for k, v in config.items() if k in known and k not in ("peft_type", "task_type")})
    except (TypeError, ValueError) as err:
        raise AdapterError(f"adapter_config.json is not a valid LoRA config: {err}") from None


def _lora_scaling(config: LoraConfig, module_path: str, rank: int) -> float:
    """PEFT's scaling of one module: ``alpha_pattern`` keys match a module as PEFT matches them
    (``get_pattern_key``: the whole key after a dot boundary, or a regex), not as a plain suffix."""
    alpha_key = get_pattern_key(config.alpha_pattern.keys(), module_path)
    alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
    return lora_scaling(alpha, rank, bool(config.use_rslora))


def _is_feedforward(config: dict, module_path: str) -> bool:
    """IA3's rule, as PEFT's IA3Model applies it: a regex matches the whole path; else any listed suffix."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, module_path) is not None
    return any(module_path.endswith(m) for m in ff)


def _milora_config(name: str, config: dict) -> MiLoRAConfig:
    """The folder's config as a MiLoRAConfig: the class validates it, so the server accepts what PEFT accepts."""
    known = {f.name for f in fields(MiLoRAConfig)}
    try:
        return MiLoRAConfig(**{key: value for key, value in config.items() if key in known})
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: invalid MiLoRA config: {exc}") from None


_ROUTER_PARTS = {"milora_weight": "weight", "milora_query": "query", "milora_num": "num", "milora_den": "den"}


def _parse_tensors(
    method: Method, config: dict, tensors: dict[str, Tensor], milora: Optional[MiLoRAConfig] = None
) -> tuple[dict[str, dict[BankRole, Tensor]], dict[str, dict[str, Tensor]]]:
    """Per module path its tensors by role; for MiLoRA also per layer path its router tensors by part."""
    modules: dict[str, dict[BankRole, Tensor]] = {}
    routers: dict[str, dict[str, Tensor]] = {}
    lora_config = _lora_config(config) if method == "lora" else None
    for key, tensor in tensors.items():
        if method == "milora":
            stem, _, leaf = key.rpartition(".")
            if stem.endswith(".prompt_router") and leaf in _ROUTER_PARTS:
                layer = _module_path(stem, ".prompt_router")
                routers.setdefault(layer, {})[_ROUTER_PARTS[leaf]] = tensor.float()
                continue
            if leaf in ("milora_A", "milora_B"):
                role: BankRole = "lora_a" if leaf == "milora_A" else "lora_b"
                modules.setdefault(_module_path(key, "." + leaf), {})[role] = tensor.float()
                continue
            raise AdapterError(f"unexpected tensor {key!r} in a MILORA adapter")
        if method == "flora" and key.endswith((".flora_in", ".flora_out")):
            suffix = ".flora_in" if key.endswith(".flora_in") else ".flora_out"
            modules.setdefault(_module_path(key, suffix), {})[suffix[1:]] = tensor.float()
        elif method == "lora" and key.endswith((".lora_A.weight", ".lora_B.weight")):
            suffix = ".lora_A.weight" if key.endswith(".lora_A.weight") else ".lora_B.weight"
            role = "lora_a" if suffix == ".lora_A.weight" else "lora_b"
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
        needed = {"flora": {"flora_in", "flora_out"}, "lora": {"lora_a", "lora_b"}, "milora": {"lora_a", "lora_b"}}
        if method in needed and set(roles) != needed[method]:
            raise AdapterError(f"module {path}: expected tensors {sorted(needed[method])}, found {sorted(roles)}")
        if method in ("lora", "milora") and any(t.dim() != 2 for t in roles.values()):
            shapes = {role: tuple(t.shape) for role, t in roles.items()}
            raise AdapterError(f"module {path}: LoRA factors must be matrices, got shapes {shapes}")
        if method in ("lora", "milora"):  # milora_B is (d_out, r), as PEFT's lora_B
            rank = roles["lora_a"].shape[0]
            scaling = _lora_scaling(lora_config, path, rank) if method == "lora" else milora.scaling
            a, b = lora_bank_row(roles["lora_a"], roles["lora_b"], scaling)
            roles["lora_a"], roles["lora_b"] = a, b.contiguous()
    return modules, routers


def _check_against_base(
    name: str, method: Method, modules: dict[str, dict[BankRole, Tensor]], base: nn.Module, max_rank: int
) -> int:
    rank = 0
    for path, roles in modules.items():
        try:
            target = base.get_submodule(path)
        except AttributeError:
            raise AdapterError(f"adapter {name!r} targets {path!r}, which the base model does not have") from None
        d_in, d_out = linear_features(getattr(target, "base_layer", target))  # unwrap a slot layer
        for role, tensor in roles.items():
            want = d_in if role in INPUT_ROLES else d_out
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


def split_layer_path(path: str) -> tuple[str, str]:
    """``model.layers.3.self_attn.q_proj`` -> (``model.layers.3``, ``self_attn.q_proj``): a MiLoRA expert's layer."""
    try:
        return split_expert_key(path)
    except ValueError as exc:
        raise AdapterError(str(exc)) from None


def _check_routers(
    name: str,
    milora: MiLoRAConfig,
    modules: dict[str, dict[BankRole, Tensor]],
    tensors: dict[str, dict[str, Tensor]],
    base: nn.Module,
) -> dict[str, RouterWeights]:
    """MiLoRA's routers against its experts and the base model: one per layer with experts, rows = experts."""
    pooler, degrees = milora.pooler, milora.rational_degrees
    hidden = getattr(getattr(base, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise AdapterError(f"adapter {name!r}: MiLoRA needs the base model config's hidden_size")
    experts: dict[str, list[str]] = {}
    for path in modules:
        layer, expert = split_layer_path(path)
        experts.setdefault(layer, []).append(expert)
    if set(tensors) != set(experts):
        missing, extra = sorted(set(experts) - set(tensors)), sorted(set(tensors) - set(experts))
        raise AdapterError(
            f"adapter {name!r}: every transformer layer with MiLoRA experts needs exactly one router; "
            f"layers without a router: {missing}, routers without experts: {extra}"
        )
    routers: dict[str, RouterWeights] = {}
    for layer, parts in sorted(tensors.items()):
        names = tuple(sorted(experts[layer]))
        where = f"adapter {name!r}: router of {layer}"
        try:
            base.get_submodule(layer)
        except AttributeError:
            raise AdapterError(f"{where}: the base model has no layer {layer!r}") from None
        for needed in ("weight", "num", "den"):
            if needed not in parts:
                raise AdapterError(f"{where}: milora_{needed} is missing")
        query = parts.get("query")
        if (query is not None) != (pooler == "attention"):
            raise AdapterError(
                f"{where}: milora_query must be present exactly when the pooler is 'attention' (pooler {pooler!r})"
            )
        shapes = {
            "weight": (len(names), hidden),
            "num": (degrees[0] + 1,),
            "den": (degrees[1],),
            "query": (hidden,),
        }
        for part in ("weight", "query", "num", "den"):
            tensor = parts.get(part)
            if tensor is None:
                continue
            if tuple(tensor.shape) != shapes[part]:
                detail = f" ({len(names)} experts {list(names)}, hidden size {hidden})" if part == "weight" else ""
                raise AdapterError(
                    f"{where}: milora_{part} has shape {tuple(tensor.shape)}, expected {shapes[part]}{detail}"
                )
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"adapter {name!r} has NaN or infinite values in {layer}.prompt_router.{part}")
        routers[layer] = RouterWeights(
            experts=names,
            weight=parts["weight"],
            num=parts["num"],
            den=parts["den"],
            query=query,
            pooler=pooler,
            top_k=milora.top_k,
            rational_form=milora.rational_form,
        )
    return routers


def load_adapter_folder(name: str, folder: str | Path, base: nn.Module, max_rank: int) -> AdapterWeights:
    """Load and validate ``folder`` (PEFT format) for serving on ``base``; raises AdapterError with the reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter {name!r}: {folder} is not a directory")
    config = _read_config(folder)
    peft_type = str(config.get("peft_type", "")).upper()
    methods: dict[str, Method] = {"FLORA": "flora", "LORA": "lora", "IA3": "ia3", "MILORA": "milora"}
    if peft_type not in methods:
        raise AdapterError(
            f"adapter {name!r}: peft_type {peft_type or 'missing'} is not served (FLORA, LORA, IA3, MILORA are)"
        )
    method = methods[peft_type]
    if method == "lora" and config.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA adapters are not served")
    milora = _milora_config(name, config) if method == "milora" else None
    modules, router_tensors = _parse_tensors(method, config, _read_tensors(folder), milora)
    rank = _check_against_base(name, method, modules, base, max_rank)
    routers = _check_routers(name, milora, modules, router_tensors, base) if milora is not None else {}
    return AdapterWeights(name=name, method=method, rank=rank, modules=modules, source=str(folder), routers=routers)
