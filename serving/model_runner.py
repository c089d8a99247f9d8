"""One decoding step for a whole batch (TGI's ``generate_token``): forward, choose, detokenize, stop, filter.

At a prefill with MiLoRA rows the layers' routers run and write their gates into the batch's routing state, which
every later step's metadata points at, so each prompt is routed exactly once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import DynamicCache

from flora_hf.cache_compat import cache_kwargs, output_cache

from .batch import Batch
from .sampling import top_n_tokens
from .step_metadata import AdapterContext, PrefillRouting, StepMetadata
from .types import StepOutput, TokenInfo


def _on(device: torch.device, values: list) -> torch.Tensor:
    return torch.tensor(values).to(device, non_blocking=True)


def step_metadata(batch: Batch, device: torch.device) -> StepMetadata:
    """Slots per row, the adapter kinds present and MiLoRA's routing; built on the host, so no device sync.

    With MiLoRA rows the metadata points at the batch's own routing state; before the prefill it also groups those
    rows by slot for the routers, which then write their gates into that state.
    """
    methods = [a.method for a in batch.adapters]
    meta = StepMetadata(
        slots=_on(device, [a.slot for a in batch.adapters]).long(),
        flora_rank=max((a.rank for a in batch.adapters if a.method == "flora"), default=0),
        lora_rank=max((a.rank for a in batch.adapters if a.method in ("lora", "milora")), default=0),
        ia3="ia3" in methods,
    )
    if "milora" not in methods or batch.milora is None:
        return meta
    meta.milora = batch.milora
    if not batch.past_prefill:
        groups: dict[int, list[int]] = {}
        for row, adapter in enumerate(batch.adapters):
            if adapter.method == "milora":
                groups.setdefault(adapter.slot, []).append(row)
        meta.prefill = PrefillRouting(
            prompt_mask=batch.attention_mask.bool(),
            groups={slot: _on(device, rows) for slot, rows in groups.items()},
        )
    return meta


class CausalLMRunner:
    def __init__(self, model: nn.Module, tokenizer, context: AdapterContext) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context = context
        self.device = next(model.parameters()).device
        self.special_ids = frozenset(tokenizer.all_special_ids)

    def _token(self, token_id: int, text: str, logprob: Optional[float]) -> TokenInfo:
        return TokenInfo(id=token_id, text=text, logprob=logprob, special=token_id in self.special_ids)

    def _prefill_tokens(self, batch: Batch, logits: torch.Tensor, row: int) -> list[TokenInfo]:
        """Prompt tokens with the logprob the model gave each (the first has none), for decoder_input_details."""
        ids = batch.requests[row].input_ids
        n = len(ids)
        logprobs = torch.log_softmax(logits[row, -n:-1].float(), dim=-1)
        chosen = logprobs.gather(-1, torch.tensor(ids[1:], device=logprobs.device)[:, None]).squeeze(-1).tolist()
        texts = [self.tokenizer.decode([i]) for i in ids]
        return [self._token(ids[0], texts[0], None)] + [
            self._token(i, t, lp) for i, t, lp in zip(ids[1:], texts[1:], chosen)
        ]

    @torch.inference_mode()
    def forward(self, batch: Batch):
        """The model forward of one step (logits for the batch's new tokens); a prefill records MiLoRA's gates."""
        meta = step_metadata(batch, self.device)
        self.context.current = meta
        try:
            out = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                **cache_kwargs(self.model, batch.cache or DynamicCache(config=self.model.config)),
                use_cache=True,
            )
        finally:
            self.context.current = None
        return out

    @torch.inference_mode()
    def generate_token(self, batch: Batch) -> tuple[list[StepOutput], Optional[Batch]]:
        """Advance every row by one token; returns the outputs and the batch of rows still running (or None)."""
        out = self.forward(batch)
        first_step = not batch.past_prefill
        want_prefill = first_step and any(r.decoder_input_details for r in batch.requests)
        logits = out.logits if want_prefill else out.logits[:, -1:]
        next_ids, logprobs = batch.chooser(batch.token_ids, logits[:, -1].float())
        top = top_n_tokens(logprobs, [r.top_n_tokens for r in batch.requests])
        chosen_logprobs = logprobs.gather(-1, next_ids[:, None]).squeeze(-1).tolist()
        next_list = next_ids.tolist()
        seeds = batch.chooser.seeds

        outputs, keep = [], []
        for row, req in enumerate(batch.requests):
            token_id = next_list[row]
            detok = batch.detokenizers[row]
            piece = detok.step(token_id)  # extends the row's token history
            stop, reason = batch.stopping[row](token_id, detok.generated_text)
            outputs.append(
                StepOutput(
                    request_id=req.id,
                    token=self._token(token_id, piece, chosen_logprobs[row]),
                    top_tokens=[self._token(i, detok.token_text(i), lp) for i, lp in top[row]],
                    prefill_tokens=self._prefill_tokens(batch, logits, row)
                    if first_step and req.decoder_input_details
                    else None,
                    generated_tokens=detok.num_generated,
                    generated_text=detok.generated_text if stop else None,
                    finish_reason=reason if stop else None,
                    seed=seeds[row] if batch.chooser.do_sample[row] else None,
                )
            )
            if not stop:
                keep.append(req.id)

        batch.cache = output_cache(out)
        batch.input_ids = next_ids[:, None]
        batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(len(batch), 1)], dim=1)
        batch.position_ids = batch.position_ids[:, -1:] + 1
        return outputs, batch.filter(keep)
