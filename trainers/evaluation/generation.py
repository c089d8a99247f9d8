"""Sample completions for MultiPL-E problems, each through its own adapter, locally or from a running flora-serve.

Locally, rows of several problems (and so several languages and adapters) share each ``generate`` call: FLoRA's
per-example adapters are what make such mixed batches cheap. Through a server, concurrent requests carry
``adapter_id`` and the server batches them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from huggingface_hub import InferenceClient
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from flora_hf.per_example import BASE_ADAPTER_NAME, adapter_batch, per_example_layers

from .languages import canonical_language
from .problems import DEFAULT_N_SAMPLES, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Problem, truncate_at_stop_tokens

AdapterChoice = Union[None, str, Mapping[str, str], Callable[[Problem], Optional[str]]]
"""None: the base model; a name: that adapter for every problem; a mapping: language -> adapter name (every
language of the problems must be a key; map to ``"__base__"`` for the base model); a callable: problem -> name."""


def adapter_names_for(problems: Sequence[Problem], adapter_for_problem: AdapterChoice) -> list[str]:
    """One adapter name per problem (``"__base__"`` for none)."""
    if adapter_for_problem is None:
        return [BASE_ADAPTER_NAME] * len(problems)
    if isinstance(adapter_for_problem, str):
        return [adapter_for_problem] * len(problems)
    if isinstance(adapter_for_problem, Mapping):
        by_language = {canonical_language(lang): name for lang, name in adapter_for_problem.items()}
        absent = sorted({p.language for p in problems} - set(by_language))
        if absent:
            raise ValueError(
                f"no adapter for language(s) {absent}; map them to an adapter or to {BASE_ADAPTER_NAME!r}"
            )
        return [by_language[p.language] for p in problems]
    return [adapter_for_problem(p) or BASE_ADAPTER_NAME for p in problems]


class StopOnStrings(StoppingCriteria):
    """Per-row stop: a row is done once its own continuation contains one of its own stop strings.

    Rows of different languages share a batch, so one language's stop token must not end another's row.
    """

    def __init__(self, tokenizer: Any, prompt_length: int, stops: Sequence[Sequence[str]]) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stops = [tuple(s for s in row if s) for row in stops]
        longest = max((len(s) for row in self.stops for s in row), default=0)
        self.window = longest + 4  # a stop string of m characters spans at most m tokens
        self.done = [False] * len(self.stops)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        for i, row in enumerate(self.stops):
            if row and not self.done[i]:
                tail = input_ids[i, max(self.prompt_length, input_ids.shape[1] - self.window) :]
                text = self.tokenizer.decode(tail, skip_special_tokens=True)
                self.done[i] = any(stop in text for stop in row)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def _is_peft_model(model: Any) -> bool:
    return isinstance(model, PeftModel)


def _generate_with_adapters(model: Any, names: list[str], **kwargs: Any) -> torch.Tensor:
    """``generate`` with ``names[i]`` applied to row ``i``, on a PeftModel or a transformers model with adapters."""
    if _is_peft_model(model):
        if len(set(names)) == 1:  # one adapter: works for every PEFT method, IA3 included
            name = names[0]
            if name == BASE_ADAPTER_NAME:
                with model.disable_adapter():
                    return model.generate(**kwargs)
            previous = model.active_adapter
            model.set_adapter(name)
            try:
                return model.generate(**kwargs)
            finally:
                model.set_adapter(previous)
        return model.generate(adapter_names=names, **kwargs)
    if per_example_layers(model):
        with adapter_batch(model, names):
            return model.generate(**kwargs)
    if all(name == BASE_ADAPTER_NAME for name in names):
        return model.generate(**kwargs)
    raise ValueError("the model has no adapters; load them (PeftModel or model.load_adapter) or pass no adapter")


def _left_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def generate_completions(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    n_samples: int = DEFAULT_N_SAMPLES,
    temperature: float = DEFAULT_TEMPERATURE,
    adapter_for_problem: AdapterChoice = None,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    *,
    top_p: float = DEFAULT_TOP_P,
    seed: Optional[int] = None,
    mix_adapters: bool = True,
    progress: bool = False,
) -> list[list[str]]:
    """``n_samples`` completions per problem from a local model, cut at each problem's stop tokens.

    Rows are ordered by prompt length, so a batch holds problems of similar length from any language, each row
    through its own adapter. ``mix_adapters=False`` keeps each batch to one adapter, for PEFT methods that cannot
    mix adapters in a batch (IA3). ``temperature=0`` is greedy decoding.
    """
    names = adapter_names_for(problems, adapter_for_problem)
    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems]
    rows = [(i, j) for i in range(len(problems)) for j in range(n_samples)]
    groups = [rows] if mix_adapters else [[r for r in rows if names[r[0]] == name] for name in dict.fromkeys(names)]
    batches = []
    for group in groups:
        group = sorted(group, key=lambda row: len(prompts[row[0]]))  # similar lengths: little padding
        batches += [group[s : s + batch_size] for s in range(0, len(group), batch_size)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    completions: list[list[str]] = [[""] * n_samples for _ in problems]
    iterator: Any = batches
    if progress:
        iterator = tqdm(batches, desc="generating", unit="batch")
    model.eval()
    for b, batch in enumerate(iterator):
        ids, mask = _left_padded([prompts[i] for i, _ in batch], pad_id, device)
        stop = StopOnStrings(tokenizer, ids.shape[1], [problems[i].stop_tokens for i, _ in batch])
        if seed is not None:
            torch.manual_seed(seed + b)
        with torch.no_grad():
            out = _generate_with_adapters(
                model,
                [names[i] for i, _ in batch],
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                stopping_criteria=StoppingCriteriaList([stop]),
                **sampling,
            )
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        for (i, j), text in zip(batch, texts):
            completions[i][j] = truncate_at_stop_tokens(text, problems[i].stop_tokens)
    return completions


def generate_completions_via_server(
    url: str,
    problems: Sequence[Problem],
    adapter_for_problem: AdapterChoice = None,
    n_samples: int = DEFAULT_N_SAMPLES,
    temperature: float = DEFAULT_TEMPERATURE,
    max_new_tokens: int = 512,
    *,
    top_p: float = DEFAULT_TOP_P,
    seed: Optional[int] = None,
    concurrency: int = 16,
    max_stop_sequences: int = 4,
    timeout_s: float = 600.0,
    progress: bool = False,
) -> list[list[str]]:
    """The same completions from a running ``flora-serve`` (or TGI), through ``huggingface_hub.InferenceClient``.

    Requests run ``concurrency`` at a time so the server batches them across adapters. The server stops at the
    first ``max_stop_sequences`` stop tokens (TGI's limit, 4 by default); all of them are applied afterwards.
    With ``seed``, sample ``j`` of every problem uses ``seed + j``.
    """

    client = InferenceClient(url, timeout=timeout_s)
    names = adapter_names_for(problems, adapter_for_problem)

    def one(row: tuple[int, int]) -> str:
        i, j = row
        problem = problems[i]
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "stop": list(problem.stop_tokens[:max_stop_sequences]),
        }
        if names[i] != BASE_ADAPTER_NAME:
            kwargs["adapter_id"] = names[i]
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
            if seed is not None:
                kwargs["seed"] = seed + j
        text = client.text_generation(problem.prompt, **kwargs)
        return truncate_at_stop_tokens(text, problem.stop_tokens)

    rows = [(i, j) for i in range(len(problems)) for j in range(n_samples)]
    completions: list[list[str]] = [[""] * n_samples for _ in problems]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outputs: Any = pool.map(one, rows)
        if progress:
            outputs = tqdm(outputs, total=len(rows), desc="generating", unit="sample")
        for (i, j), text in zip(rows, outputs):
            completions[i][j] = text
    return completions
