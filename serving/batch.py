"""The running batch, as TGI's server keeps it: built from requests, filtered, concatenated, KV cache carried along.

Rows are left-padded: every row's next token sits in the last column, so one decode step is a single forward of
``(B, 1)`` tokens whatever the prompt lengths. Each row carries its adapter slot, sampling state and stop criteria.

MiLoRA rows are routed once, at prefill: the batch's :class:`~serving.step_metadata.MiLoRARouting` (the gates of
each transformer layer, zero for rows without MiLoRA) lives here beside the KV cache, the model's routers write it
and its experts read it, and ``filter`` / ``concatenate`` carry it row for row.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from transformers import DynamicCache

from .sampling import HeterogeneousNextTokenChooser, IncrementalDetokenizer, StoppingCriteria
from .step_metadata import MiLoRARouting
from .types import GenerationRequest

_STEP_FIELDS = ("cache", "input_ids", "attention_mask", "position_ids")
"""Batch fields a step reassigns (it never writes into their tensors)."""


@dataclass
class StepSnapshot:
    """A running batch's state before one step (see :meth:`Batch.snapshot`)."""

    fields: dict[str, object]
    cache_layers: Optional[list[tuple[torch.Tensor, torch.Tensor]]]
    generators: list[tuple[torch.Generator, torch.Tensor]]
    stopping: list[tuple[int, int]]
    detokenizers: list[tuple[int, int, int]]


@dataclass
class RowAdapter:
    """The adapter a row decodes with: its name (None = base), slot, and kind for the step metadata."""

    name: Optional[str] = None
    slot: int = 0
    method: Optional[str] = None
    rank: int = 0


def lora_row_mask(adapters: list[RowAdapter], device: torch.device) -> Optional[Tensor]:
    """``(B,)`` bool, True on plain LoRA rows (None when there are none): they share the LoRA banks with MiLoRA's
    experts at scale 1."""
    if not any(a.method == "lora" for a in adapters):
        return None
    return torch.tensor([a.method == "lora" for a in adapters], device=device)


@dataclass
class Batch:
    requests: list[GenerationRequest]
    adapters: list[RowAdapter]
    input_ids: Tensor  # (B, L): the tokens the next forward consumes
    attention_mask: Tensor  # (B, past + L)
    position_ids: Tensor  # (B, L)
    chooser: HeterogeneousNextTokenChooser
    stopping: list[StoppingCriteria]
    detokenizers: list[IncrementalDetokenizer]  # each row's token history (prompt + generated) and text
    cache: Optional[DynamicCache] = None  # the KV cache, once the prefill has made it
    milora: Optional[MiLoRARouting] = None  # MiLoRA's routing, when a row uses a MiLoRA adapter

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def past_prefill(self) -> bool:
        return self.cache is not None

    @property
    def token_ids(self) -> list[list[int]]:
        """Prompt + generated ids per row (for penalties), read from the detokenizers that hold them."""
        return [detok.token_ids for detok in self.detokenizers]

    @classmethod
    def from_requests(
        cls,
        requests: list[GenerationRequest],
        adapters: list[RowAdapter],
        tokenizer,
        eos_token_ids: set[int],
        device: torch.device,
        pad_token_id: int = 0,
    ) -> Batch:
        lengths = [len(r.input_ids) for r in requests]
        width = max(lengths)
        input_ids = torch.full((len(requests), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, (req, n) in enumerate(zip(requests, lengths)):
            input_ids[row, width - n :] = torch.tensor(req.input_ids, dtype=torch.long)
            attention_mask[row, width - n :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return cls(
            requests=list(requests),
            adapters=list(adapters),
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            chooser=HeterogeneousNextTokenChooser([r.sampling for r in requests], device=device),
            stopping=[StoppingCriteria(r.stopping, eos_token_ids) for r in requests],
            detokenizers=[IncrementalDetokenizer(tokenizer, r.input_ids) for r in requests],
            milora=MiLoRARouting(lora_rows=lora_row_mask(adapters, device))
            if any(a.method == "milora" for a in adapters)
            else None,
        )

    # ---------------------------------------------------------------------------------------- undo a step
    def snapshot(self) -> StepSnapshot:
        """What one ``generate_token`` call changes, kept by reference (no tensor is copied): the KV cache's
        tensors (the model replaces them, it does not write into them), MiLoRA's gates, sampling generators, and
        each row's stopping and detokenizer (token history) counters."""
        layers = [(layer.keys, layer.values) for layer in self.cache.layers] if self.cache is not None else None
        return StepSnapshot(
            fields={name: getattr(self, name) for name in _STEP_FIELDS}
            | {"milora": None if self.milora is None else self.milora.copy()},
            cache_layers=layers,
            generators=self.chooser.generator_states(),
            stopping=[criteria.state() for criteria in self.stopping],
            detokenizers=[detok.state() for detok in self.detokenizers],
        )

    def restore(self, snapshot: StepSnapshot) -> None:
        """This batch as it was at :meth:`snapshot`, after a step that failed part-way."""
        for name, value in snapshot.fields.items():
            setattr(self, name, value)
        if snapshot.cache_layers is not None and self.cache is not None:
            for layer, (keys, values) in zip(self.cache.layers, snapshot.cache_layers):
                layer.keys, layer.values = keys, values
        self.chooser.restore_generators(snapshot.generators)
        for criteria, state in zip(self.stopping, snapshot.stopping):
            criteria.restore(state)
        for detok, state in zip(self.detokenizers, snapshot.detokenizers):
            detok.restore(state)

    # ------------------------------------------------------------------------------------------- filter
    def filter(self, keep_ids: list[int]) -> Optional[Batch]:
        """Only the rows whose request id is in ``keep_ids``, in their current order; None when none is left."""
        keep_set = set(keep_ids)
        rows = [i for i, r in enumerate(self.requests) if r.id in keep_set]
        if not rows:
            return None
        if len(rows) == len(self):
            return self
        index = torch.tensor(rows, device=self.input_ids.device)
        attention_mask = self.attention_mask[index]
        # drop left columns that are padding for every remaining row
        trim = int((attention_mask.cumsum(-1) == 0).sum(-1).min().item())
        attention_mask = attention_mask[:, trim:]
        cache = self.cache
        if cache is not None:  # a new cache object: this batch's stays whole (a failed step is split and retried)
            cache = copy.copy(cache)
            cache.layers = [copy.copy(layer) for layer in cache.layers]
            for layer in cache.layers:
                layer.keys = layer.keys[index, :, trim:]
                layer.values = layer.values[index, :, trim:]
        return Batch(
            requests=[self.requests[i] for i in rows],
            adapters=[self.adapters[i] for i in rows],
            input_ids=self.input_ids[index],
            attention_mask=attention_mask,
            position_ids=self.position_ids[index],
            chooser=self.chooser.filter(rows),
            stopping=[self.stopping[i] for i in rows],
            detokenizers=[self.detokenizers[i] for i in rows],
            cache=cache,
            milora=None if self.milora is None else self.milora.index_select(index),
        )

    # --------------------------------------------------------------------------------------- concatenate
    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """Merge decoding batches (each past prefill) into one, left-padding masks and KV caches to one length."""
        if len(batches) == 1:
            return batches[0]
        if not all(b.past_prefill for b in batches):
            raise ValueError("only batches past their prefill can be concatenated")
        past = max(b.attention_mask.shape[1] for b in batches)
        masks, layers_k, layers_v = [], None, None
        for b in batches:
            pad = past - b.attention_mask.shape[1]
            masks.append(torch.nn.functional.pad(b.attention_mask, (pad, 0)))
            ks = [torch.nn.functional.pad(layer.keys, (0, 0, pad, 0)) for layer in b.cache.layers]
            vs = [torch.nn.functional.pad(layer.values, (0, 0, pad, 0)) for layer in b.cache.layers]
            layers_k = [[k] for k in ks] if layers_k is None else [acc + [k] for acc, k in zip(layers_k, ks)]
            layers_v = [[v] for v in vs] if layers_v is None else [acc + [v] for acc, v in zip(layers_v, vs)]
        adapters = [a for b in batches for a in b.adapters]
        milora = None
        if any(b.milora is not None for b in batches):  # the row mask is a device tensor: only when it is used
            milora = MiLoRARouting.concatenate(
                [b.milora for b in batches], [len(b) for b in batches], lora_row_mask(adapters, masks[0].device)
            )
        cache = batches[0].cache
        for layer, ks, vs in zip(cache.layers, layers_k, layers_v):
            layer.keys = torch.cat(ks)
            layer.values = torch.cat(vs)
        return Batch(
            requests=[r for b in batches for r in b.requests],
            adapters=adapters,
            input_ids=torch.cat([b.input_ids for b in batches]),
            attention_mask=torch.cat(masks),
            position_ids=torch.cat([b.position_ids for b in batches]),
            chooser=HeterogeneousNextTokenChooser.concatenate([b.chooser for b in batches]),
            stopping=[s for b in batches for s in b.stopping],
            detokenizers=[d for b in batches for d in b.detokenizers],
            cache=cache,
            milora=milora,
        )
